//! The PostgreSQL event store.
//!
//! An append is one SQL statement: it checks the expected version and inserts the
//! events and their outbox rows, in one transaction (the statement's own, or a
//! [`StoreTransaction`]). The happy path is one round trip. Once the transaction has
//! committed, the relay is woken with a `NOTIFY` (see [`RelayWaker`] for why that is
//! not inside the writer's transaction).
//!
//! Global order: an event's `global_position` is `(writing transaction id << 20) +
//! ordinal`, and [`EventStore::read_all`] only returns positions below a [`Fence`]:
//! the oldest transaction id among the transactions running in *this store's
//! database*, or the next transaction id when none runs. Every transaction that could
//! still commit an event to this store is one of them, so its events sort after
//! everything already returned: a reader that remembers the last position it saw can
//! never skip an event that commits late. Transactions that cannot write to this store
//! (in other databases, or holding no transaction id) are not waited for. Positions
//! are sparse, never reused, and totally ordered; ARCHITECTURE.md has the argument in
//! full.
//!
//! The parts: `types` (what is appended and read), `sql` (the statements), `append`,
//! `read` (the fence and the reads), `transaction` ([`StoreTransaction`]) and `waker`
//! ([`RelayWaker`]); the store itself is here.

#[macro_use]
mod sql;
mod append;
mod read;
mod transaction;
mod types;
mod waker;

use std::sync::Arc;

use sqlx::{Connection, PgConnection, PgPool};

use append::{append_once, stream_version_on};
use read::recorded;
use sql::READ_COMMITTED;

pub use read::{
    Blocker, Fence, QueuedCommand, count_after_on, events_by_id, fence_on, queued_commands,
    read_below_on, read_between_on, read_correlated, read_stream_on,
};
pub(crate) use sql::stream_locks;
pub use transaction::StoreTransaction;
pub use types::{
    AppendResult, ExpectedVersion, MAX_EVENTS_PER_TRANSACTION, Metadata, NewEvent, OUTBOX_CHANNEL,
    OutgoingCommand, RecordedEvent, StoreError, StoredVersion,
};
pub(crate) use waker::LocalRelaySignal;
pub use waker::RelayWaker;

/// The event store of one service database. Cheap to clone; clones share one
/// [`RelayWaker`].
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
    waker: RelayWaker,
    /// The event types that leave the service through the outbox; `None`: every one.
    published: Option<Arc<[String]>>,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        let waker = RelayWaker::new(pool.connect_options().as_ref().clone());
        EventStore {
            pool,
            waker,
            published: None,
        }
    }

    /// Puts only events of these types in the outbox: what other services consume
    /// (DESIGN §3). The service's own subscriptions read every event from the store,
    /// so an event nobody else reads never goes to the broker. Without this, every
    /// event is published.
    pub fn publishing(mut self, event_types: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.published = Some(event_types.into_iter().map(Into::into).collect());
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to `stream_id` in a transaction of its own.
    ///
    /// With [`ExpectedVersion::Any`], losing a race to another writer is retried here;
    /// otherwise it is a [`StoreError::Concurrency`]. Appending events whose ids are all
    /// already stored as one earlier append to this stream succeeds without storing
    /// anything (`already_stored`), so a writer unsure whether it committed can retry.
    pub async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        let mut connection = self.pool.acquire().await?;
        self.append_on(&mut connection, stream_id, expected, events)
            .await
    }

    /// [`append`](Self::append) on a connection the caller holds (outside any
    /// transaction): for writers that keep a dedicated connection and so skip the
    /// pool's per-checkout round trip.
    pub async fn append_on(
        &self,
        connection: &mut PgConnection,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        const ANY_RETRIES: usize = 16;
        let mut attempt = 0;
        let published = self.published.as_deref();
        let result = loop {
            match append_once(connection, stream_id, expected, events, 0, true, published).await {
                Err(StoreError::Concurrency { .. })
                    if expected == ExpectedVersion::Any && attempt < ANY_RETRIES =>
                {
                    attempt += 1;
                }
                other => break other?,
            }
        };
        if !result.already_stored {
            self.waker.wake();
        }
        Ok(result)
    }

    /// Starts a transaction in which events can be appended together with the caller's
    /// other writes (saga state, inbox rows, read models).
    pub async fn begin(&self) -> Result<StoreTransaction<'static>, StoreError> {
        Ok(StoreTransaction {
            transaction: self.pool.begin().await?,
            waker: self.waker.clone(),
            published: self.published.clone(),
            positions_used: 0,
            locked_streams: Vec::new(),
            after_commit: Vec::new(),
        })
    }

    /// [`begin`](Self::begin) on a connection the caller holds: for workers that keep
    /// their own connections and so skip the pool's ping on every release.
    pub async fn begin_on<'c>(
        &self,
        connection: &'c mut PgConnection,
    ) -> Result<StoreTransaction<'c>, StoreError> {
        Ok(StoreTransaction {
            transaction: Connection::begin(connection).await?,
            waker: self.waker.clone(),
            published: self.published.clone(),
            positions_used: 0,
            locked_streams: Vec::new(),
            after_commit: Vec::new(),
        })
    }

    /// Wakes the outbox relay: for writers that put rows in the outbox by other means.
    pub fn wake_relay(&self) {
        self.waker.wake();
    }

    pub(crate) fn relay_signal(&self) -> LocalRelaySignal {
        self.waker.local_signal()
    }

    pub(crate) fn waker(&self) -> &RelayWaker {
        &self.waker
    }

    /// Events of one stream from `from_version` on, in version order.
    pub async fn read_stream(
        &self,
        stream_id: &str,
        from_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        read_stream_on(&mut connection, stream_id, from_version, limit).await
    }

    /// The stream and version of the event at a global position, if one is stored
    /// there (what a read-your-writes query turns a position into).
    pub async fn event_at(&self, position: i64) -> Result<Option<(String, i64)>, StoreError> {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT stream_id, stream_version FROM events WHERE global_position = $1",
        )
        .bind(position)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    /// The global position of a stream's event at `version`, if one is stored.
    pub async fn position_of(
        &self,
        stream_id: &str,
        version: i64,
    ) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT global_position FROM events WHERE stream_id = $1 AND stream_version = $2",
        )
        .bind(stream_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Up to `limit` events after `after` in global order, never skipping one that
    /// commits later: only positions below the [`Fence`] are returned, so a reader waits
    /// for the writers running in this store's database, and for nothing else on the
    /// server. Start from 0; continue from the last position returned.
    pub async fn read_all(&self, after: i64, limit: i64) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        let fence = fence_on(&mut connection).await?;
        read_below_on(&mut connection, after, &fence, limit).await
    }

    /// The [`Fence`] readers may read up to now.
    pub async fn fence(&self) -> Result<Fence, StoreError> {
        let mut connection = self.pool.acquire().await?;
        fence_on(&mut connection).await
    }

    /// Up to `limit` events after `after` and below a fence taken earlier, in global
    /// order. A fence stays valid: nothing will ever appear below it that is not
    /// visible now, so a reader takes a new one only once it has read up to it.
    pub async fn read_below(
        &self,
        after: i64,
        fence: &Fence,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        read_below_on(&mut connection, after, fence, limit).await
    }

    /// Up to `limit` events after `after` in global order, as committed now. Unlike
    /// [`read_all`](Self::read_all), this does not wait behind running transactions,
    /// so a reader that continues after the last position it got can miss an event
    /// that commits later with a lower position (of another stream: a stream's own
    /// events always commit in version order). For reading history once, not for
    /// following the store.
    pub async fn read_committed(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(READ_COMMITTED)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded).collect()
    }

    /// The version of a stream's last event, 0 if it has none.
    pub async fn stream_version(&self, stream_id: &str) -> Result<i64, StoreError> {
        let mut connection = self.pool.acquire().await?;
        stream_version_on(&mut connection, stream_id).await
    }
}
