//! Loading aggregates and running commands on them.
//!
//! A load reads the aggregate's snapshot (if it has one of the current format), then
//! every event after it, and folds them with `evolve`. Snapshots are only a shortcut:
//! a missing, stale, or unreadable snapshot just means more events are read, which is
//! why deleting them is always safe.

use std::any::Any;
use std::sync::Arc;

use domain::Aggregate;
use domain::wire::WireEvent;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::cache::VersionedCache;
use crate::codec::{CodecError, SchemaRegistry};
use crate::store::{
    AppendResult, EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent, StoreError,
    StoreTransaction, StoredVersion, read_stream_on,
};

/// How an aggregate's state is cached. Aggregates with short streams keep the default
/// (no snapshots); long-lived ones name a format and serialise their state.
/// `Send + Sync + 'static` so that a state can live in the state cache.
pub trait Snapshot: Aggregate + Send + Sync + 'static {
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
    /// Events read after the snapshot or cached state (all of them when there was
    /// neither).
    pub events_read: usize,
    pub from_snapshot: bool,
    /// Started from the state cache rather than the database.
    pub from_cache: bool,
    /// Version of the stream's newest snapshot as far as this load knows (0: none).
    snapshot_at: i64,
    /// Taken from the cache without reading the stream ([`AggregateStore::load_to_write`]).
    unverified: bool,
}

impl<A> Loaded<A> {
    /// `state` at `version` as a snapshot (or nothing, at 0) gave it, before any event
    /// was read after it.
    fn snapshot(state: A, version: i64) -> Self {
        Loaded {
            state,
            version,
            events_read: 0,
            from_snapshot: version > 0,
            from_cache: false,
            snapshot_at: version,
            unverified: false,
        }
    }
}

/// A state in the state cache, of whichever aggregate type its stream is.
#[derive(Clone)]
struct CachedState {
    state: Arc<dyn Any + Send + Sync>,
    snapshot_at: i64,
    /// The id of the event at its version: a pending state is confirmed only by that
    /// very event, not by one another process stored at the same version after the
    /// pending write rolled back.
    last_event_id: Uuid,
}

impl CachedState {
    fn new<A: Snapshot>(state: &A, snapshot_at: i64, last_event_id: Uuid) -> Self {
        CachedState {
            state: Arc::new(state.clone()),
            snapshot_at,
            last_event_id,
        }
    }
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

impl<A: Aggregate> Executed<A> {
    /// A command that decided no events: the state as loaded.
    fn nothing(loaded: Loaded<A>) -> Self {
        Executed {
            events: Vec::new(),
            state: loaded.state,
            version: loaded.version,
            append: None,
        }
    }
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
    /// The committed states of streams this process wrote recently (see
    /// [`with_state_cache`](Self::with_state_cache)); none by default.
    states: Option<VersionedCache<CachedState>>,
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
            states: None,
        }
    }

    pub fn with_snapshot_after(mut self, events: usize) -> Self {
        self.snapshot_after = events.max(1);
        self
    }

    /// Keeps the committed state of up to `streams` recently written streams in
    /// memory. A load then reads only the events after the cached version (usually
    /// none) instead of a snapshot and the events after it, and
    /// [`load_to_write`](Self::load_to_write) reads nothing at all. Entries are
    /// written only after the writing transaction commits, so they are never ahead of
    /// the database; one behind it (another process wrote the stream) is caught by the
    /// next append's version check and dropped.
    pub fn with_state_cache(mut self, streams: usize) -> Self {
        self.states = Some(VersionedCache::new(streams));
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
        let mut loaded = self.load_on(&mut connection, stream_id).await?;
        // The connection goes back first: a load that waited for a second one while
        // holding its first could, ten at once, hold the whole pool waiting for itself.
        drop(connection);
        self.snapshot_if_due(stream_id, &mut loaded).await;
        Ok(loaded)
    }

    /// [`load`](Self::load) through a connection the caller holds, such as a
    /// transaction's (so the load sees that transaction's view). It saves no snapshot:
    /// that would need a second connection while the caller holds the first, perhaps
    /// with stream locks, and a transaction's view may hold its own uncommitted
    /// events; writers in a transaction save theirs after the commit
    /// ([`snapshot_after_commit`](Self::snapshot_after_commit)).
    pub async fn load_on<A>(
        &self,
        connection: &mut PgConnection,
        stream_id: &str,
    ) -> Result<Loaded<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let cached = match self.cached::<A>(stream_id) {
            Some((loaded, None)) => Some(loaded),
            Some((loaded, Some(event_id))) => {
                self.confirm_pending(connection, stream_id, loaded, event_id)
                    .await?
            }
            None => None,
        };
        let mut loaded = match cached {
            Some(loaded) => loaded,
            None => {
                let (state, version) = self
                    .read_snapshot::<A>(&mut *connection, stream_id)
                    .await?
                    .unwrap_or_default();
                Loaded::snapshot(state, version)
            }
        };
        self.read_after(connection, stream_id, &mut loaded).await?;
        Ok(loaded)
    }

    /// A state cached as pending (written by a transaction that may not have
    /// committed) is right if the event it was written with is stored at its version:
    /// reads from that version on and folds what follows it, or `None` if that event
    /// is not there.
    async fn confirm_pending<A>(
        &self,
        connection: &mut PgConnection,
        stream_id: &str,
        mut loaded: Loaded<A>,
        event_id: Uuid,
    ) -> Result<Option<Loaded<A>>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let page = read_stream_on(&mut *connection, stream_id, loaded.version, PAGE).await?;
        let first = page
            .first()
            .map(|event| (event.stream_version, event.event_id));
        if first != Some((loaded.version, event_id)) {
            return Ok(None);
        }
        self.fold(&mut loaded, &page[1..]).await?;
        if page.len() as i64 == PAGE {
            self.read_after(connection, stream_id, &mut loaded).await?;
        }
        Ok(Some(loaded))
    }

    /// Folds the events after `loaded.version` into it; how many there were.
    async fn read_after<A>(
        &self,
        connection: &mut PgConnection,
        stream_id: &str,
        loaded: &mut Loaded<A>,
    ) -> Result<usize, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let mut read = 0;
        loop {
            let page =
                read_stream_on(&mut *connection, stream_id, loaded.version + 1, PAGE).await?;
            self.fold(loaded, &page).await?;
            read += page.len();
            if (page.len() as i64) < PAGE {
                break;
            }
        }
        loaded.unverified = false;
        Ok(read)
    }

    /// Folds `events` (the next ones of the stream) into `loaded`.
    async fn fold<A>(
        &self,
        loaded: &mut Loaded<A>,
        events: &[RecordedEvent],
    ) -> Result<(), ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        for recorded in events {
            let event: A::Event = self.decode(&recorded.payload).await?;
            loaded.state = std::mem::take(&mut loaded.state).evolve(&event);
            loaded.version = recorded.stream_version;
        }
        loaded.events_read += events.len();
        Ok(())
    }

    /// Brings a state that [`load_to_write`](Self::load_to_write) took from the cache up
    /// to date; true if the stream had moved on. Only an append checks a cached state,
    /// so a writer that trusted one and decided to write nothing (or was refused) must
    /// refresh it and, if it moved, decide again.
    pub async fn refresh<A>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
        loaded: &mut Loaded<A>,
    ) -> Result<bool, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        if !loaded.unverified {
            return Ok(false);
        }
        let read = self
            .read_after(transaction.connection(), stream_id, loaded)
            .await?;
        if read > 0
            && let Some(states) = &self.states
        {
            states.remove(stream_id);
        }
        Ok(read > 0)
    }

    /// Locks a stream this transaction is about to append to and loads it. A cached
    /// state is taken as it is, without reading the stream: if another process wrote
    /// the stream since, the append that follows fails as a conflict (the unique
    /// version index) and drops the entry, so the next attempt reads. Only for writers
    /// that are retried when that happens (consumer handlers); without a state cache
    /// this is a locked [`load_on`](Self::load_on).
    pub async fn load_to_write<A>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
    ) -> Result<Loaded<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        transaction.lock_streams(&[stream_id]).await?;
        let mut loaded = match self.cached::<A>(stream_id) {
            Some((mut loaded, None)) => {
                loaded.unverified = true;
                loaded
            }
            // Pending (or nothing): confirmed by reading.
            _ => self.load_on(transaction.connection(), stream_id).await?,
        };
        self.snapshot_after_commit(transaction, stream_id, &mut loaded);
        Ok(loaded)
    }

    /// The cached state of `stream_id` (of type `A`), and whether it is committed
    /// (if not, the id of the event it was written with).
    fn cached<A: Snapshot>(&self, stream_id: &str) -> Option<(Loaded<A>, Option<Uuid>)> {
        let cached = self.states.as_ref()?.get(stream_id)?;
        let state = cached.value.state.downcast_ref::<A>()?.clone();
        let loaded = Loaded {
            state,
            version: cached.version,
            events_read: 0,
            from_snapshot: false,
            from_cache: true,
            snapshot_at: cached.value.snapshot_at,
            unverified: false,
        };
        let pending = (!cached.committed).then_some(cached.value.last_event_id);
        Some((loaded, pending))
    }

    /// Remembers `state` as the committed state of `stream_id` at `version` once
    /// `transaction` commits, and as pending until then (see [`VersionedCache`]).
    fn cache_after_commit<A: Snapshot>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
        version: i64,
        state: &A,
        snapshot_at: i64,
        last_event_id: Uuid,
    ) {
        if let Some(states) = &self.states {
            let cached = CachedState::new(state, snapshot_at, last_event_id);
            states.write_through(transaction, stream_id, version, cached);
        }
    }

    fn snapshot_due<A: Snapshot>(&self, loaded: &Loaded<A>) -> bool {
        A::FORMAT.is_some() && loaded.version - loaded.snapshot_at >= self.snapshot_after as i64
    }

    /// Saves a snapshot of a state loaded in `transaction` once it commits, in the
    /// background (best effort, as `snapshot_if_due`): the
    /// transaction waits for no second connection, and a rolled-back view is never
    /// saved.
    pub fn snapshot_after_commit<A: Snapshot>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
        loaded: &mut Loaded<A>,
    ) {
        if !self.snapshot_due(loaded) {
            return;
        }
        let (Some(format), Some(json)) = (A::FORMAT, loaded.state.to_snapshot()) else {
            return;
        };
        let (pool, stream_id, version) = (
            self.store.pool().clone(),
            stream_id.to_owned(),
            loaded.version,
        );
        transaction.after_commit(move || {
            tokio::spawn(async move {
                if let Err(error) = write_snapshot(&pool, &stream_id, version, format, json).await {
                    tracing::warn!(%error, stream_id, "could not save snapshot");
                }
            });
        });
        loaded.snapshot_at = loaded.version;
    }

    /// Saves a snapshot when the stream moved `snapshot_after` events past its last.
    async fn snapshot_if_due<A: Snapshot>(&self, stream_id: &str, loaded: &mut Loaded<A>) {
        if !self.snapshot_due(loaded) {
            return;
        }
        // Best effort: a failed snapshot write costs only a longer next load.
        match self
            .save_snapshot(stream_id, loaded.version, &loaded.state)
            .await
        {
            Ok(()) => loaded.snapshot_at = loaded.version,
            Err(error) => tracing::warn!(%error, stream_id, "could not save snapshot"),
        }
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
            let events = decide(&loaded.state, command).map_err(ExecuteError::Domain)?;
            if events.is_empty() {
                return Ok(Executed::nothing(loaded));
            }
            let new_events = self.encode_all(&events, metadata)?;
            // The version came from the store's own read, so it is known to exist.
            let expected = ExpectedVersion::Stored(StoredVersion::new(loaded.version));
            match self.store.append(stream_id, expected, &new_events).await {
                Ok(append) => {
                    let state = loaded.state.replay(&events);
                    if let (Some(states), Some(last)) = (&self.states, new_events.last()) {
                        // Committed already: the append was its own transaction.
                        let cached = CachedState::new(&state, loaded.snapshot_at, last.event_id);
                        states.put(stream_id, append.stream_version, cached);
                    }
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
        self.execute_with(
            transaction,
            stream_id,
            expected_version,
            command,
            metadata,
            false,
        )
        .await
    }

    /// [`execute_in`](Self::execute_in) for a consumer handler, which is retried when
    /// its append conflicts: a cached state is trusted without reading the stream
    /// ([`load_to_write`](Self::load_to_write)).
    pub async fn execute_to_write<A>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
        command: &A::Command,
        metadata: Metadata,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        self.execute_with(transaction, stream_id, None, command, metadata, true)
            .await
    }

    async fn execute_with<A>(
        &self,
        transaction: &mut StoreTransaction<'_>,
        stream_id: &str,
        expected_version: Option<i64>,
        command: &A::Command,
        metadata: Metadata,
        trust_cache: bool,
    ) -> Result<Executed<A>, ExecuteError<A::Error>>
    where
        A: Snapshot,
        A::Event: WireEvent,
    {
        let mut loaded = if expected_version == Some(0) {
            Loaded::snapshot(A::default(), 0)
        } else if trust_cache {
            self.load_to_write::<A>(transaction, stream_id).await?
        } else {
            transaction.lock_streams(&[stream_id]).await?;
            let mut loaded = self
                .load_on::<A>(transaction.connection(), stream_id)
                .await?;
            self.snapshot_after_commit(transaction, stream_id, &mut loaded);
            loaded
        };
        pinned_version_holds(stream_id, expected_version, loaded.version)?;
        let mut decided = decide(&loaded.state, command);
        // A decision to write nothing is not checked by an append: check the state.
        if !matches!(&decided, Ok(events) if !events.is_empty())
            && self.refresh(transaction, stream_id, &mut loaded).await?
        {
            decided = decide(&loaded.state, command);
        }
        let events = decided.map_err(ExecuteError::Domain)?;
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
            return Ok(Executed::nothing(loaded));
        }
        let new_events = self.encode_all(&events, metadata)?;
        let expected = ExpectedVersion::Stored(StoredVersion::new(loaded.version));
        let append = match transaction.append(stream_id, expected, &new_events).await {
            Ok(append) => append,
            Err(error) => {
                if error.is_concurrency()
                    && let Some(states) = &self.states
                {
                    // Whatever we had is behind the stream now.
                    states.remove(stream_id);
                }
                return Err(error.into());
            }
        };
        let state = loaded.state.replay(&events);
        if let Some(last) = new_events.last() {
            let (version, snapshot_at) = (append.stream_version, loaded.snapshot_at);
            let event_id = last.event_id;
            self.cache_after_commit(
                transaction,
                stream_id,
                version,
                &state,
                snapshot_at,
                event_id,
            );
        }
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
        write_snapshot(self.store.pool(), stream_id, version, format, json).await
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

/// Writes a snapshot, never replacing a newer one with an older one (two loads
/// racing).
async fn write_snapshot(
    pool: &sqlx::PgPool,
    stream_id: &str,
    version: i64,
    format: &str,
    json: serde_json::Value,
) -> Result<(), StoreError> {
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
    .execute(pool)
    .await?;
    Ok(())
}
/// The aggregate's decision, in a span of its own: a trace shows it beside the append.
fn decide<A: Aggregate>(state: &A, command: &A::Command) -> Result<Vec<A::Event>, A::Error> {
    let span = tracing::info_span!("decide", otel.kind = "internal", aggregate = A::KIND);
    span.in_scope(|| state.decide(command))
}
