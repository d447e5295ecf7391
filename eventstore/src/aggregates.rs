//! Loading aggregates and running commands on them.
//!
//! A load reads the aggregate's snapshot (if it has one of the current format), then
//! every event after it, and folds them with `evolve`. Snapshots are only a shortcut:
//! a missing, stale, or unreadable snapshot just means more events are read, which is
//! why deleting them is always safe.

use domain::Aggregate;
use domain::wire::WireEvent;
use sqlx::{PgConnection, Row};

use crate::codec::{CodecError, SchemaRegistry};
use crate::store::{
    AppendResult, EventStore, ExpectedVersion, Metadata, NewEvent, StoreError, StoreTransaction,
    StoredVersion, read_stream_on,
};

/// How an aggregate's state is cached. Aggregates with short streams keep the default
/// (no snapshots); long-lived ones name a format and serialise their state.
pub trait Snapshot: Aggregate {
    /// Names the stored layout; change it whenever the state's shape or meaning changes,
    /// and snapshots of the old format are ignored (then overwritten).
    const FORMAT: Option<&'static str> = None;

    fn to_snapshot(&self) -> Option<serde_json::Value> {
        None
    }

    fn from_snapshot(_state: serde_json::Value) -> Option<Self> {
        None
    }
}

impl Snapshot for domain::order::Order {}
impl Snapshot for domain::payment::Payment {}
impl Snapshot for domain::user::User {}

/// A stock item sees an event per reservation, release and commit, for ever.
impl Snapshot for domain::inventory::StockItem {
    const FORMAT: Option<&'static str> = Some("StockItem/1");

    fn to_snapshot(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    fn from_snapshot(state: serde_json::Value) -> Option<Self> {
        serde_json::from_value(state).ok()
    }
}

/// An aggregate's state and the version of the last event folded into it.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub state: A,
    pub version: i64,
    /// Events read after the snapshot (all of them when there was none).
    pub events_read: usize,
    pub from_snapshot: bool,
}

/// What running a command did.
#[derive(Debug, Clone)]
pub struct Executed<A: Aggregate> {
    pub events: Vec<A::Event>,
    pub state: A,
    /// The stream's version after the command (unchanged when it decided nothing).
    pub version: i64,
    /// Where the events were stored; `None` when the command decided no events.
    pub append: Option<AppendResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Domain(E),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Loads aggregates from, and runs commands against, one service's event store.
#[derive(Clone, Debug)]
pub struct AggregateStore {
    store: EventStore,
    registry: SchemaRegistry,
    /// A load that had to read at least this many events saves a fresh snapshot.
    snapshot_after: usize,
}

const PAGE: i64 = 1000;
/// Commands without a pinned version are re-decided this often when another writer
/// gets in between the load and the append.
const CONFLICT_RETRIES: usize = 5;

impl AggregateStore {
    pub fn new(store: EventStore, registry: SchemaRegistry) -> Self {
        AggregateStore {
            store,
            registry,
            snapshot_after: 100,
        }
    }

    pub fn with_snapshot_after(mut self, events: usize) -> Self {
        self.snapshot_after = events.max(1);
        self
    }

    pub fn event_store(&self) -> &EventStore {
        &self.store
    }

    pub fn registry(&self) -> &SchemaRegistry {
        &self.registry
    }

    /// The stream id of an aggregate: its kind, a dash, and its id.
    pub fn stream_id<A: Aggregate>(id: impl std::fmt::Display) -> String {
        format!("{}-{id}", A::KIND)
    }

    pub async fn load<A>(&self, stream_id: &str) -> Result<Loaded<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let mut connection = self
            .store
            .pool()
            .acquire()
            .await
            .map_err(StoreError::from)?;
        self.load_on(&mut connection, stream_id).await
    }

    /// [`load`](Self::load) through a connection the caller holds, such as a
    /// transaction's (so the load sees that transaction's view).
    pub async fn load_on<A>(
        &self,
        connection: &mut PgConnection,
        stream_id: &str,
    ) -> Result<Loaded<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let (mut state, mut version) = self
            .read_snapshot::<A>(&mut *connection, stream_id)
            .await?
            .unwrap_or_default();
        let from_snapshot = version > 0;
        let mut events_read = 0;
        loop {
            let page = read_stream_on(&mut *connection, stream_id, version + 1, PAGE).await?;
            for recorded in &page {
                let event: A::Event = self.decode(&recorded.payload).await?;
                state = state.evolve(&event);
                version = recorded.stream_version;
            }
            events_read += page.len();
            if (page.len() as i64) < PAGE {
                break;
            }
        }
        if events_read >= self.snapshot_after {
            // Best effort: a failed snapshot write costs only a longer next load.
            if let Err(error) = self.save_snapshot(stream_id, version, &state).await {
                tracing::warn!(%error, stream_id, "could not save snapshot");
            }
        }
        Ok(Loaded {
            state,
            version,
            events_read,
            from_snapshot,
        })
    }

    /// Loads the aggregate, lets it decide `command`, and appends what it decided.
    ///
    /// `expected_version` pins the version the caller saw (an HTTP `If-Match`): if the
    /// stream moved on, the command is refused with `Concurrency`. Without it, a race
    /// with another writer is retried on fresh state, holding the stream's lock.
    pub async fn execute<A>(
        &self,
        stream_id: &str,
        expected_version: Option<i64>,
        command: &A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let mut attempt = 0;
        loop {
            let loaded = self.load::<A>(stream_id).await?;
            pinned_version_holds(stream_id, expected_version, loaded.version)?;
            let events = loaded.state.decide(command).map_err(ExecuteError::Domain)?;
            if events.is_empty() {
                return Ok(Executed {
                    events,
                    state: loaded.state,
                    version: loaded.version,
                    append: None,
                });
            }
            let new_events = self.encode_all(&events, metadata)?;
            // The version came from the store's own read, so it is known to exist.
            let expected = ExpectedVersion::Stored(StoredVersion::new(loaded.version));
            match self.store.append(stream_id, expected, &new_events).await {
                Ok(append) => {
                    let state = loaded.state.replay(&events);
                    return Ok(Executed {
                        events,
                        state,
                        version: append.stream_version,
                        append: Some(append),
                    });
                }
                Err(error)
                    if error.is_concurrency()
                        && expected_version.is_none()
                        && attempt < CONFLICT_RETRIES =>
                {
                    attempt += 1;
                    // Lost a race: try again holding the stream's lock, so writers that
                    // lost queue up behind each other instead of racing again (with
                    // many of them, an optimistic retry could lose every time).
                    let mut transaction = self.store.begin().await?;
                    match self
                        .execute_in::<A>(&mut transaction, stream_id, None, command, metadata)
                        .await
                    {
                        Ok(executed) => {
                            transaction.commit().await?;
                            return Ok(executed);
                        }
                        // A first, unlocked attempt of another writer slipped in.
                        Err(ExecuteError::Store(error)) if error.is_concurrency() => {}
                        Err(error) => return Err(error),
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Runs a command inside the caller's transaction, so its events commit together
    /// with the caller's other writes (an inbox row, an idempotency record, commands
    /// for other services). The stream is locked first ([`StoreTransaction::lock_streams`]),
    /// so writers that all go through here never lose a race to each other; the
    /// transaction sees what the previous writer committed.
    ///
    /// `expected_version` pins the version the caller saw, as in [`execute`](Self::execute).
    /// `Some(0)` says the stream must not exist yet (a fresh id): then there is nothing
    /// to lock or load, and a stream that does exist fails the append as `Concurrency`.
    pub async fn execute_in<A>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
        expected_version: Option<i64>,
        command: &A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let loaded = if expected_version == Some(0) {
            Loaded {
                state: A::default(),
                version: 0,
                events_read: 0,
                from_snapshot: false,
            }
        } else {
            transaction.lock_streams(&[stream_id]).await?;
            self.load_on::<A>(transaction.connection(), stream_id)
                .await?
        };
        pinned_version_holds(stream_id, expected_version, loaded.version)?;
        let events = loaded.state.decide(command).map_err(ExecuteError::Domain)?;
        self.append_decided(transaction, stream_id, loaded, events, metadata)
            .await
    }

    /// Appends events already decided on `loaded` state (loaded in this transaction,
    /// with its stream locked) and returns the new state. For callers that decide
    /// across several aggregates at once.
    pub async fn append_decided<A>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
        metadata: Metadata,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        if events.is_empty() {
            return Ok(Executed {
                events,
                state: loaded.state,
                version: loaded.version,
                append: None,
            });
        }
        let new_events = self.encode_all(&events, metadata)?;
        let expected = ExpectedVersion::Stored(StoredVersion::new(loaded.version));
        let append = transaction.append(stream_id, expected, &new_events).await?;
        let state = loaded.state.replay(&events);
        Ok(Executed {
            events,
            state,
            version: append.stream_version,
            append: Some(append),
        })
    }

    fn encode_all<E: WireEvent>(
        &self,
        events: &[E],
        metadata: Metadata,
    ) -> Result<Vec<NewEvent>, CodecError> {
        events
            .iter()
            .map(|event| Ok(NewEvent::new(self.registry.encode(event)?, metadata)))
            .collect()
    }

    /// Decodes a payload, learning its writer schema from the registry table first when
    /// this binary does not know the fingerprint (an event written by newer code).
    pub async fn decode<E: WireEvent>(&self, payload: &[u8]) -> Result<E, CodecError> {
        match self.registry.decode(payload) {
            Err(CodecError::UnknownFingerprint(fingerprint))
                if self.registry.learn(self.store.pool(), fingerprint).await? =>
            {
                self.registry.decode(payload)
            }
            other => other,
        }
    }

    pub async fn save_snapshot<A: Snapshot>(
        &self,
        stream_id: &str,
        version: i64,
        state: &A,
    ) -> Result<(), StoreError> {
        let (Some(format), Some(json)) = (A::FORMAT, state.to_snapshot()) else {
            return Ok(());
        };
        // Never replace a newer snapshot with an older one (two loads racing).
        sqlx::query(
            "INSERT INTO snapshots (stream_id, stream_version, state_format, state) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream_id) DO UPDATE SET stream_version = EXCLUDED.stream_version, \
               state_format = EXCLUDED.state_format, state = EXCLUDED.state, taken_at = now() \
             WHERE snapshots.stream_version < EXCLUDED.stream_version \
                OR snapshots.state_format <> EXCLUDED.state_format",
        )
        .bind(stream_id)
        .bind(version)
        .bind(format)
        .bind(json)
        .execute(self.store.pool())
        .await?;
        Ok(())
    }

    /// Deletes the snapshot of one stream, or of every stream when `stream_id` is None.
    pub async fn delete_snapshots(&self, stream_id: Option<&str>) -> Result<u64, StoreError> {
        let result = sqlx::query("DELETE FROM snapshots WHERE $1::text IS NULL OR stream_id = $1")
            .bind(stream_id)
            .execute(self.store.pool())
            .await?;
        Ok(result.rows_affected())
    }

    async fn read_snapshot<A: Snapshot>(
        &self,
        connection: &mut PgConnection,
        stream_id: &str,
    ) -> Result<Option<(A, i64)>, StoreError> {
        let Some(format) = A::FORMAT else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT stream_version, state_format, state FROM snapshots WHERE stream_id = $1",
        )
        .bind(stream_id)
        .fetch_optional(connection)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let stored_format: String = row.try_get("state_format")?;
        if stored_format != format {
            return Ok(None);
        }
        let version: i64 = row.try_get("stream_version")?;
        let state: serde_json::Value = row.try_get("state")?;
        Ok(A::from_snapshot(state).map(|state| (state, version)))
    }
}

/// A command pinned to the version its caller saw (`If-Match`) is refused when the
/// stream has moved on since.
fn pinned_version_holds(
    stream_id: &str,
    pinned: Option<i64>,
    actual: i64,
) -> Result<(), StoreError> {
    match pinned {
        Some(expected) if expected != actual => Err(StoreError::Concurrency {
            stream_id: stream_id.to_owned(),
            expected: ExpectedVersion::Exact(expected),
            actual: Some(actual),
        }),
        _ => Ok(()),
    }
}
