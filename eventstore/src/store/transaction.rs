//! A transaction on the store: appends, commands, stream locks, and what runs after
//! the commit.

use std::sync::Arc;

use sqlx::PgConnection;

use super::append::append_once;
use super::{
    AppendResult, ExpectedVersion, MAX_EVENTS_PER_TRANSACTION, NewEvent, OutgoingCommand,
    RelayWaker, StoreError,
};

/// A transaction that appends events together with the caller's own writes, which
/// go through [`connection`](Self::connection). Dropping it without `commit` rolls
/// everything back.
pub struct StoreTransaction<'c> {
    pub(super) transaction: sqlx::Transaction<'c, sqlx::Postgres>,
    pub(super) waker: RelayWaker,
    /// The store's [`EventStore::publishing`] choice.
    pub(super) published: Option<Arc<[String]>>,
    /// Positions are (transaction id << 20) + ordinal; this is the next ordinal.
    pub(super) positions_used: i64,
    /// Streams this transaction holds the lock of: locking one again costs nothing.
    pub(super) locked_streams: Vec<String>,
    /// Run once the commit succeeded, in order: caches of committed state learn what
    /// this transaction wrote only when it is certain to be there.
    pub(super) after_commit: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for StoreTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTransaction")
            .field("positions_used", &self.positions_used)
            .field("locked_streams", &self.locked_streams)
            .field("after_commit", &self.after_commit.len())
            .finish_non_exhaustive()
    }
}

impl StoreTransaction<'_> {
    /// Appends inside this transaction. A race lost to a concurrent writer aborts the
    /// transaction and reports `Concurrency { actual: None }`: roll back and retry.
    pub async fn append(
        &mut self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        if self.positions_used as usize + events.len() > MAX_EVENTS_PER_TRANSACTION {
            return Err(StoreError::BadBatch(events.len()));
        }
        let result = append_once(
            &mut self.transaction,
            stream_id,
            expected,
            events,
            self.positions_used,
            false,
            self.published.as_deref(),
        )
        .await?;
        self.positions_used += events.len() as i64;
        Ok(result)
    }

    /// Queues a command for another service in the outbox, inside this transaction: it
    /// is sent if and only if the transaction commits. Returns its outbox position.
    pub async fn send_command(&mut self, command: &OutgoingCommand) -> Result<i64, StoreError> {
        if self.positions_used as usize >= MAX_EVENTS_PER_TRANSACTION {
            return Err(StoreError::BadBatch(1));
        }
        let position = sqlx::query_scalar(
            "INSERT INTO outbox (global_position, message_id, message_type, target_service, \
             ordering_key, schema_fingerprint, payload, correlation_id, causation_id, traceparent) \
             VALUES ((pg_current_xact_id()::text::bigint << 20) + $1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             RETURNING global_position",
        )
        .bind(self.positions_used)
        .bind(command.command_id)
        .bind(command.command_type.as_str())
        .bind(command.target_service.as_str())
        .bind(command.ordering_key.as_str())
        .bind(command.schema_fingerprint)
        .bind(command.payload.as_slice())
        .bind(command.metadata.correlation_id)
        .bind(command.metadata.causation_id)
        .bind(crate::trace::outgoing(command.metadata.trace).map(|trace| trace.to_string()))
        .fetch_one(&mut *self.transaction)
        .await?;
        self.positions_used += 1;
        Ok(position)
    }

    /// Serialises writers of these streams until this transaction ends: every writer
    /// that locks a stream before loading it sees the state the previous one committed,
    /// so it cannot lose an optimistic-concurrency race. Locks are taken in one global
    /// order (by lock key), so writers locking several streams cannot deadlock.
    pub async fn lock_streams(&mut self, stream_ids: &[impl AsRef<str>]) -> Result<(), StoreError> {
        let new: Vec<&str> = stream_ids
            .iter()
            .map(AsRef::as_ref)
            .filter(|id| !self.locked_streams.iter().any(|held| held == id))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        sqlx::query(concat!("SELECT ", stream_locks!("$1")))
            .bind(&new)
            .execute(&mut *self.transaction)
            .await?;
        self.locked_streams
            .extend(new.into_iter().map(str::to_owned));
        Ok(())
    }

    /// The streams of `stream_ids` this transaction does not hold yet, recorded as held:
    /// the caller's next statement must take them with [`stream_locks!`] before it
    /// writes anything (or fail, which aborts the transaction). Saves
    /// [`Self::lock_streams`]'s round trip.
    pub(crate) fn streams_to_lock_in_next_statement(
        &mut self,
        stream_ids: impl IntoIterator<Item = String>,
    ) -> Vec<String> {
        let mut new: Vec<String> = Vec::new();
        for id in stream_ids {
            if !self.locked_streams.contains(&id) && !new.contains(&id) {
                new.push(id);
            }
        }
        self.locked_streams.extend(new.iter().cloned());
        new
    }

    /// The transaction's connection, for the caller's other writes.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.transaction
    }

    /// Runs `action` after this transaction commits, and never if it does not (rolled
    /// back, dropped, or a commit whose outcome is unknown because the connection
    /// broke).
    pub fn after_commit(&mut self, action: impl FnOnce() + Send + 'static) {
        self.after_commit.push(Box::new(action));
    }

    /// Commits, then wakes the relay if anything was appended and runs the
    /// [`after_commit`](Self::after_commit) actions.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.transaction.commit().await?;
        if self.positions_used > 0 {
            self.waker.wake();
        }
        for action in self.after_commit {
            action();
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.transaction.rollback().await?)
    }
}
