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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

/// The channel the relay `LISTEN`s on; it is notified after appends commit.
pub const OUTBOX_CHANNEL: &str = "orderflow_outbox";

/// Events one transaction may append in total: the ordinal takes the low 20 bits of a
/// position.
pub const MAX_EVENTS_PER_TRANSACTION: usize = (1 << 20) - 1;

/// What the writer believes about the stream's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last event must have exactly this version (the first event is 1).
    Exact(i64),
    /// Like `Exact`, with a version this store reported (from a load, a read or an
    /// earlier append). Events are never deleted, so such a version still exists and
    /// the append skips the lookup that proves it: the common load-decide-append path
    /// pays for no extra read.
    Stored(StoredVersion),
}

impl ExpectedVersion {
    /// The statement that appends under this expectation, and its version parameter.
    /// `in_transaction`: the append runs inside a [`StoreTransaction`], whose
    /// transaction id may predate the stream's head (see [`APPEND_AT_IN_TX`]).
    fn statement(self, in_transaction: bool) -> (AppendSql, i64) {
        let pick = |plain, guarded| if in_transaction { guarded } else { plain };
        match self {
            ExpectedVersion::Any => (pick(APPEND_ANY, APPEND_ANY_IN_TX), -1),
            ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => (APPEND_AT, 0),
            // The unique index refuses version n + 1 if it exists; only the existence
            // of version n needs checking, or an append could leave a hole.
            ExpectedVersion::Exact(version) => {
                (pick(APPEND_AT_EXISTING, APPEND_AT_EXISTING_IN_TX), version)
            }
            ExpectedVersion::Stored(version) => (pick(APPEND_AT, APPEND_AT_IN_TX), version.0),
        }
    }
}

/// A stream version this store has seen stored. Only the store makes these, which is
/// what lets [`ExpectedVersion::Stored`] trust it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredVersion(i64);

impl StoredVersion {
    pub(crate) fn new(version: i64) -> Self {
        StoredVersion(version)
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(version) => write!(f, "{version}"),
            ExpectedVersion::Stored(version) => write!(f, "{}", version.0),
        }
    }
}

/// Who caused an event and which conversation it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    /// Shared by everything that follows from one outside request.
    pub correlation_id: Uuid,
    /// The command or event that directly caused this one.
    pub causation_id: Uuid,
}

impl Metadata {
    pub fn new(correlation_id: Uuid, causation_id: Uuid) -> Self {
        Metadata {
            correlation_id,
            causation_id,
        }
    }
}

/// An event ready to append: already encoded, with its id chosen by the writer so a
/// retried append can be recognised.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// UUIDv7: unique, and roughly time-ordered for indexes and humans.
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_fingerprint: i64,
    pub payload: Vec<u8>,
    pub metadata: Metadata,
}

impl NewEvent {
    pub fn new(encoded: crate::Encoded, metadata: Metadata) -> Self {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: encoded.event_type.to_owned(),
            schema_fingerprint: encoded.fingerprint,
            payload: encoded.payload,
            metadata,
        }
    }
}

/// A command for another service, sent through the outbox (see
/// [`StoreTransaction::send_command`]) and handled from that service's command queue,
/// idempotently by `command_id`.
#[derive(Debug, Clone)]
pub struct OutgoingCommand {
    /// The receiver's inbox is keyed by it: choose it so that a retried sender sends
    /// the same id (for example derived from the event that caused the command).
    pub command_id: Uuid,
    pub command_type: String,
    /// The service whose `<service>.commands` queue receives it.
    pub target_service: String,
    /// Commands with one ordering key are handled one at a time, in the order sent
    /// (typically the stream the command acts on).
    pub ordering_key: String,
    pub schema_fingerprint: i64,
    /// Avro single-object encoding, like an event's.
    pub payload: Vec<u8>,
    pub metadata: Metadata,
}

impl OutgoingCommand {
    pub fn new(
        target_service: &str,
        ordering_key: impl Into<String>,
        encoded: crate::Encoded,
        metadata: Metadata,
    ) -> Self {
        OutgoingCommand {
            command_id: Uuid::now_v7(),
            command_type: encoded.event_type.to_owned(),
            target_service: target_service.to_owned(),
            ordering_key: ordering_key.into(),
            schema_fingerprint: encoded.fingerprint,
            payload: encoded.payload,
            metadata,
        }
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    pub global_position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_fingerprint: i64,
    pub payload: Vec<u8>,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub recorded_at: DateTime<Utc>,
}

/// Where an append left the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append: the expected version for the next one.
    pub stream_version: i64,
    pub first_position: i64,
    pub last_position: i64,
    /// True when every event was already stored by an earlier append of the same ids,
    /// and nothing was written this time.
    pub already_stored: bool,
}

impl AppendResult {
    /// The version to expect on the next append to this stream.
    pub fn next_expected(&self) -> ExpectedVersion {
        ExpectedVersion::Stored(StoredVersion(self.stream_version))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else appended first. `actual` is `None` when the race was lost inside a
    /// [`StoreTransaction`] (which PostgreSQL has then aborted, so it cannot be asked).
    #[error("stream {stream_id}: expected version {expected}, but it is at {}", .actual.map_or("a newer version".to_owned(), |v| v.to_string()))]
    Concurrency {
        stream_id: String,
        expected: ExpectedVersion,
        actual: Option<i64>,
    },
    /// Inside a [`StoreTransaction`] that began writing before the stream's head was
    /// committed: appending now would give the new events lower global positions than
    /// their predecessor. Roll back and retry in a new transaction.
    #[error(
        "stream {stream_id}: its head was written after this transaction began; retry in a new transaction"
    )]
    Reordered { stream_id: String },
    /// Some of the event ids are already stored, but not as this exact append.
    #[error("stream {stream_id}: some event ids are already stored elsewhere")]
    EventIdConflict { stream_id: String },
    #[error("an append takes 1 to {MAX_EVENTS_PER_TRANSACTION} events; got {0}")]
    BadBatch(usize),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// A race lost to another writer: retrying (in a new transaction) can succeed.
    pub fn is_concurrency(&self) -> bool {
        matches!(
            self,
            StoreError::Concurrency { .. } | StoreError::Reordered { .. }
        )
    }
}

/// An append statement in two shapes: `one` binds a single event's columns as
/// scalars, `many` binds every column as an array and unnests them. Scalars matter:
/// for single events, sending one-element arrays cost about a quarter of the
/// throughput (BENCHMARKS.md).
struct AppendSql {
    one: &'static str,
    many: &'static str,
}

/// Builds both shapes. $1 is the stream, $2 the version parameter, $3..$8 the event
/// columns (id, type, fingerprint, payload, correlation id, causation id), $9 the
/// number of positions this transaction already used (earlier appends in a
/// [`StoreTransaction`]), $10 the event types that leave the service through the
/// outbox (NULL: every one; see [`EventStore::publishing`]). Each statement returns
/// one row per stored event.
/// An expression that takes the stream locks of [`StoreTransaction::lock_streams`] for
/// the `text[]` parameter `$param`, in one global order (by lock key), and counts them.
/// The two-key advisory-lock space (class 1: streams) is separate from the one-key
/// space the relay's leadership lock lives in. OFFSET 0 keeps the sort below the lock
/// calls.
macro_rules! stream_locks {
    ($param:literal) => {
        concat!(
            "count(pg_advisory_xact_lock(1, key)) AS locks FROM \
             (SELECT DISTINCT hashtext(s) AS key FROM unnest(",
            $param,
            "::text[]) s ORDER BY key OFFSET 0) k"
        )
    };
}
pub(crate) use stream_locks;

macro_rules! append_sql {
    (first_version: $first_version:literal, guard: $guard:literal, result: $result:literal) => {
        AppendSql {
            one: append_sql!(@statement $first_version, $guard, $result,
                "(VALUES ($3::uuid, $4::text, $5::bigint, $6::bytea, $7::uuid, $8::uuid, 1::bigint))"),
            many: append_sql!(@statement $first_version, $guard, $result,
                "unnest($3::uuid[], $4::text[], $5::bigint[], $6::bytea[], $7::uuid[], $8::uuid[]) WITH ORDINALITY"),
        }
    };
    (@statement $first_version:literal, $guard:literal, $result:literal, $rows:literal) => {
        concat!(
            "WITH inserted AS (
    INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type,
                        schema_fingerprint, payload, correlation_id, causation_id)
    SELECT (pg_current_xact_id()::text::bigint << 20) + $9 + e.n - 1, $1, ",
            $first_version,
            " + e.n,
           e.event_id, e.event_type, e.fingerprint, e.payload, e.correlation_id, e.causation_id
    FROM ",
            $rows,
            " AS e(event_id, event_type, fingerprint, payload, correlation_id, causation_id, n)
    WHERE ",
            $guard,
            "
    RETURNING global_position, stream_version, event_type
)
",
            $result
        )
    };
}

/// Versions $2 + 1…: a new stream ($2 = 0) or a version the store reported. The
/// unique index on (stream, version) refuses the append if anyone wrote $2 + 1 first.
const APPEND_AT: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "$2 >= 0",
    result: ", queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM inserted
    WHERE $10::text[] IS NULL OR event_type = ANY($10::text[]))
SELECT global_position, $2::bigint + 1 AS first_version FROM inserted"
);

/// Like [`APPEND_AT`] for a version the caller only claims: it must exist.
const APPEND_AT_EXISTING: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = $2)",
    result: ", queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM inserted
    WHERE $10::text[] IS NULL OR event_type = ANY($10::text[]))
SELECT global_position, $2::bigint + 1 AS first_version FROM inserted"
);

/// Any version: continue after the stream's head ($2 is unused and always -1).
const APPEND_ANY: AppendSql = append_sql!(
    first_version: "(SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1)",
    guard: "$2 = -1",
    result: ", queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM inserted
    WHERE $10::text[] IS NULL OR event_type = ANY($10::text[]))
SELECT global_position, min(stream_version) OVER () AS first_version FROM inserted"
);

/// [`APPEND_AT`] inside a [`StoreTransaction`], guarded: the stream's head must come
/// from a transaction no newer than this one. Outside such a transaction that always
/// holds (the writer gets its transaction id inside the append statement, after every
/// event it can see was committed), but a transaction that wrote something else first
/// (an inbox row, saga state) holds an older id. If another writer committed the
/// stream's head in between, our events would sort before their predecessor in global
/// order, and the relay and `read_all` would hand them out in the wrong order.
const APPEND_AT_IN_TX: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "$2 >= 0 AND coalesce((SELECT global_position >> 20 FROM events \
     WHERE stream_id = $1 AND stream_version = $2), 0) <= pg_current_xact_id()::text::bigint",
    result: ", queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM inserted
    WHERE $10::text[] IS NULL OR event_type = ANY($10::text[]))
SELECT global_position, $2::bigint + 1 AS first_version FROM inserted"
);

/// [`APPEND_AT_EXISTING`] inside a caller's transaction.
const APPEND_AT_EXISTING_IN_TX: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = $2 \
     AND global_position >> 20 <= pg_current_xact_id()::text::bigint)",
    result: ", queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM inserted
    WHERE $10::text[] IS NULL OR event_type = ANY($10::text[]))
SELECT global_position, $2::bigint + 1 AS first_version FROM inserted"
);

/// [`APPEND_ANY`] inside a caller's transaction.
const APPEND_ANY_IN_TX: AppendSql = append_sql!(
    first_version: "(SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1)",
    guard: "$2 = -1 AND coalesce((SELECT global_position >> 20 FROM events \
     WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1), 0) <= pg_current_xact_id()::text::bigint",
    result: ", queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM inserted
    WHERE $10::text[] IS NULL OR event_type = ANY($10::text[]))
SELECT global_position, min(stream_version) OVER () AS first_version FROM inserted"
);

macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT global_position, stream_id, stream_version, event_id, event_type, \
             schema_fingerprint, payload, correlation_id, causation_id, recorded_at \
             FROM events ",
            $rest
        )
    };
}

const READ_STREAM: &str = select_events!(
    "WHERE stream_id = $1 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
);

/// Positions after $1 and below the fence $3 (taken by an earlier statement: see
/// [`Fence`]).
const READ_BELOW: &str = select_events!(
    "WHERE global_position > $1 AND global_position < $3 ORDER BY global_position LIMIT $2"
);

/// The fence: the next transaction id as of this statement's snapshot (its xmax, one
/// past the last completed id), and the oldest transaction running in this database
/// that holds an id (a 32-bit `backend_xid` widened to 64 bits by its signed distance
/// from that xmax: a running id may lie on either side of it, never 2^31 away;
/// prepared transactions of this database count too), with its process, and whether
/// committed events wait beyond it.
const FENCE: &str = "WITH horizon AS (
    SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next
), running AS (
    SELECT a.pid, a.application_name, a.xact_start, a.backend_xid AS xid32
    FROM pg_stat_activity a
    WHERE a.backend_xid IS NOT NULL
      AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
    UNION ALL
    SELECT NULL, 'prepared transaction ' || p.gid, p.prepared, p.transaction
    FROM pg_prepared_xacts p WHERE p.database = current_database()
), writer AS (
    SELECT r.pid, r.application_name, r.xact_start,
           orderflow_xid8(h.next, r.xid32) AS xid
    FROM horizon h, running r
    ORDER BY xid LIMIT 1
)
SELECT h.next, w.xid, w.pid, w.application_name, w.xact_start,
       w.xid IS NOT NULL AND w.xid < h.next
           AND EXISTS (SELECT 1 FROM events WHERE global_position >= w.xid << 20) AS waiting
FROM horizon h LEFT JOIN writer w ON true";

/// How far a reader may read now: every event below [`position`](Self::position)
/// that will ever be visible is committed, and a statement that starts after the
/// fence was taken sees all of them.
///
/// The argument (ARCHITECTURE.md has it with the tests that guard each case): the
/// fence is the smaller of `next` (the fence statement's snapshot's xmax: every id
/// below it was handed out before that snapshot) and the oldest id held by a
/// transaction running in this database when the statement reads
/// `pg_stat_activity`, which is after its snapshot. Take a transaction T that appends
/// an event below the fence: its id is below `next`, so T had it before the snapshot,
/// and T runs in this database (it writes this store's table). Had T still been
/// running when the activity was read, its id would have been listed and the fence
/// would be at or below it. So T had ended by then: committed (and visible to any later
/// snapshot) or rolled back (no events). A transaction with no id yet gets one at or
/// above `next`. No writer has to announce itself, so even a writer that is not
/// orderflow's (an operator's `INSERT`) is waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The first position that may not be read yet.
    pub position: i64,
    /// The writer the fence waits for, when one holds it below the next id.
    pub blocker: Option<Blocker>,
}

/// An open transaction in the store's database that holds readers back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    /// Its transaction id (the fence).
    pub xid: i64,
    /// The backend in `pg_stat_activity` (none for a prepared transaction).
    pub pid: Option<i32>,
    pub application_name: String,
    pub transaction_started: Option<DateTime<Utc>>,
    /// Committed events wait beyond it: readers are held back now, not only later.
    pub events_waiting: bool,
}

const READ_COMMITTED: &str =
    select_events!("WHERE global_position > $1 ORDER BY global_position LIMIT $2");

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

/// A transaction that appends events together with the caller's own writes, which
/// go through [`connection`](Self::connection). Dropping it without `commit` rolls
/// everything back.
pub struct StoreTransaction<'c> {
    transaction: sqlx::Transaction<'c, sqlx::Postgres>,
    waker: RelayWaker,
    /// The store's [`EventStore::publishing`] choice.
    published: Option<Arc<[String]>>,
    /// Positions are (transaction id << 20) + ordinal; this is the next ordinal.
    positions_used: i64,
    /// Streams this transaction holds the lock of: locking one again costs nothing.
    locked_streams: Vec<String>,
    /// Run once the commit succeeded, in order: caches of committed state learn what
    /// this transaction wrote only when it is certain to be there.
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
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
             ordering_key, schema_fingerprint, payload, correlation_id, causation_id) \
             VALUES ((pg_current_xact_id()::text::bigint << 20) + $1, $2, $3, $4, $5, $6, $7, $8, $9) \
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

/// Wakes the outbox relay after appends commit, with a `NOTIFY` on its own connection.
///
/// Why not `NOTIFY` inside the writer's transaction: PostgreSQL serialises the commits
/// of all notifying transactions behind one lock held through the WAL flush, which
/// throws away group commit. Measured here (see BENCHMARKS.md), it cut 8 concurrent
/// writers from about 8k to 4.7k appends/s and 32 writers to 2.9k. A wake-up is only a
/// hint: a lost one (a crash between commit and notify) delays publication until the
/// relay's fallback poll; nothing is lost, because the outbox row committed with the
/// events. Wake-ups are coalesced to at most one `NOTIFY` per millisecond, sent with
/// `synchronous_commit = off` since a notification needs no durability.
#[derive(Clone, Debug)]
pub struct RelayWaker {
    /// Wakes a relay in this process directly: no round trip through PostgreSQL.
    local: Arc<tokio::sync::Notify>,
    /// Counts the commits of this process that appended: the store's subscriptions in
    /// this process wait on it (each sees every change, unlike a `Notify`).
    commits: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set while a relay of this process leads.
    local_leader: Arc<AtomicBool>,
    /// Subscriptions of this store in this process that stand by (another process
    /// leads them). While none does and the relay leads here, no other process reads
    /// this store, and no NOTIFY is needed.
    standing_by: Arc<std::sync::atomic::AtomicUsize>,
    wakes: tokio::sync::mpsc::Sender<()>,
    /// Taken by the first wake, which starts the task that sends the notifications
    /// (starting it lazily keeps `EventStore::new` free of a runtime requirement).
    pending_task: Arc<Mutex<Option<WakeTask>>>,
    started: Arc<AtomicBool>,
}

/// What the wake-sending task needs: where wakes arrive, and how to connect.
type WakeTask = (tokio::sync::mpsc::Receiver<()>, PgConnectOptions);

/// At most one NOTIFY per this interval; wakes in between are merged.
const WAKE_INTERVAL: Duration = Duration::from_millis(1);

impl RelayWaker {
    fn new(options: PgConnectOptions) -> Self {
        // Capacity one: a wake while one is pending is merged into it.
        let (wakes, receiver) = tokio::sync::mpsc::channel(1);
        RelayWaker {
            local: Arc::new(tokio::sync::Notify::new()),
            commits: Arc::new(tokio::sync::watch::Sender::new(0)),
            local_leader: Arc::new(AtomicBool::new(false)),
            standing_by: Arc::default(),
            wakes,
            pending_task: Arc::new(Mutex::new(Some((receiver, options)))),
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    fn wake(&self) {
        self.local.notify_one();
        self.commits
            .send_modify(|count| *count = count.wrapping_add(1));
        if self.local_leader.load(Ordering::Acquire)
            && self.standing_by.load(Ordering::Acquire) == 0
        {
            return;
        }
        // After the first wake this is one atomic load: appends never contend here.
        if !self.started.load(Ordering::Acquire) {
            let mut pending = self
                .pending_task
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((receiver, options)) = pending.take() {
                tokio::spawn(send_wakes(receiver, options));
            }
            self.started.store(true, Ordering::Release);
        }
        let _ = self.wakes.try_send(());
    }
}

/// What a relay in this process uses to be woken directly and to say it leads.
#[derive(Clone, Debug)]
pub(crate) struct LocalRelaySignal {
    pub(crate) wakes: Arc<tokio::sync::Notify>,
    pub(crate) leading: Arc<AtomicBool>,
}

impl RelayWaker {
    pub(crate) fn local_signal(&self) -> LocalRelaySignal {
        LocalRelaySignal {
            wakes: self.local.clone(),
            leading: self.local_leader.clone(),
        }
    }

    /// Changes whenever an append of this process commits.
    pub(crate) fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Counts a subscription of this process as standing by until the returned guard
    /// says it leads (or is dropped): appends then notify other processes.
    pub(crate) fn standby(&self) -> Standby {
        self.standing_by.fetch_add(1, Ordering::AcqRel);
        Standby {
            standing_by: self.standing_by.clone(),
            counted: true,
        }
    }
}

/// A subscription of this process standing by, counted until it leads.
#[derive(Debug)]
pub(crate) struct Standby {
    standing_by: Arc<std::sync::atomic::AtomicUsize>,
    counted: bool,
}

impl Standby {
    /// Whether the subscription leads here now.
    pub(crate) fn leading(&mut self, leading: bool) {
        if leading == self.counted {
            if leading {
                self.standing_by.fetch_sub(1, Ordering::AcqRel);
            } else {
                self.standing_by.fetch_add(1, Ordering::AcqRel);
            }
            self.counted = !leading;
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if self.counted {
            self.standing_by.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Sends one NOTIFY per merged wake until every store handle is gone.
async fn send_wakes(mut wakes: tokio::sync::mpsc::Receiver<()>, options: PgConnectOptions) {
    let mut connection: Option<PgConnection> = None;
    let mut backoff = Duration::from_millis(100);
    while wakes.recv().await.is_some() {
        if connection.is_none() {
            connection = connect_for_wakes(&options).await;
        }
        if let Some(live) = connection.as_mut()
            && let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                .bind(OUTBOX_CHANNEL)
                .execute(&mut *live)
                .await
        {
            tracing::warn!(%error, "relay wake-up failed; reconnecting");
            connection = None;
        }
        // Healthy: merge the wakes of the next interval. Failing: back off, doubling.
        let pause = if connection.is_some() {
            backoff = Duration::from_millis(100);
            WAKE_INTERVAL
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(5));
            backoff
        };
        tokio::time::sleep(pause).await;
    }
}

/// A connection for wake-ups: notifications need no durability, so they do not wait
/// for the WAL flush. `None` (logged) when it cannot be had; the relay's poll covers.
async fn connect_for_wakes(options: &PgConnectOptions) -> Option<PgConnection> {
    let attempt = async {
        let mut connection = PgConnection::connect_with(options).await?;
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut connection)
            .await?;
        Ok::<_, sqlx::Error>(connection)
    };
    match attempt.await {
        Ok(connection) => Some(connection),
        Err(error) => {
            tracing::warn!(%error, "relay waker cannot connect; the relay's poll will cover");
            None
        }
    }
}

/// Appends once. `first_ordinal` is the number of positions the surrounding
/// transaction already used. `can_look_again` is false inside a caller's transaction,
/// which a failed statement aborts, so the follow-up queries cannot run.
async fn append_once(
    connection: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
    first_ordinal: i64,
    can_look_again: bool,
    published: Option<&[String]>,
) -> Result<AppendResult, StoreError> {
    if events.is_empty() || events.len() > MAX_EVENTS_PER_TRANSACTION {
        return Err(StoreError::BadBatch(events.len()));
    }
    let count = events.len();
    let (sql, version) = expected.statement(!can_look_again);
    let query = sqlx::query(if count == 1 { sql.one } else { sql.many })
        .bind(stream_id)
        .bind(version);
    let outcome = bind_events(query, events)
        .bind(first_ordinal)
        .bind(published)
        .fetch_all(&mut *connection)
        .await;
    let refused = match outcome {
        Ok(rows) if rows.len() == count => {
            let mut first_position = i64::MAX;
            let mut first_version = 0;
            for row in &rows {
                first_position = first_position.min(row.try_get("global_position")?);
                first_version = row.try_get("first_version")?;
            }
            return Ok(AppendResult {
                stream_version: first_version + count as i64 - 1,
                first_position,
                last_position: first_position + count as i64 - 1,
                already_stored: false,
            });
        }
        // Nothing stored: the claimed version does not exist, the stream is behind.
        Ok(_) => None,
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
            Some(error.constraint().map(str::to_owned))
        }
        Err(error) => return Err(error.into()),
    };
    if can_look_again {
        return already_stored(connection, stream_id, expected, events).await;
    }
    let Some(violated) = refused else {
        // No statement failed, so the transaction is still usable: say where it is.
        // At the expected version (or appending at any), the ordering guard refused.
        let actual = stream_version_on(connection, stream_id).await?;
        if expected == ExpectedVersion::Any || actual == version.max(0) {
            return Err(StoreError::Reordered {
                stream_id: stream_id.to_owned(),
            });
        }
        return Err(StoreError::Concurrency {
            stream_id: stream_id.to_owned(),
            expected,
            actual: Some(actual),
        });
    };
    Err(match violated.as_deref() {
        Some("events_event_id_key") => StoreError::EventIdConflict {
            stream_id: stream_id.to_owned(),
        },
        _ => StoreError::Concurrency {
            stream_id: stream_id.to_owned(),
            expected,
            actual: None,
        },
    })
}
/// Binds $3..$8: one event's columns as scalars, or every event's as arrays.
fn bind_events<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    events: &'q [NewEvent],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    if let [event] = events {
        return query
            .bind(event.event_id)
            .bind(event.event_type.as_str())
            .bind(event.schema_fingerprint)
            .bind(event.payload.as_slice())
            .bind(event.metadata.correlation_id)
            .bind(event.metadata.causation_id);
    }
    let column = |f: fn(&NewEvent) -> Uuid| events.iter().map(f).collect::<Vec<_>>();
    query
        .bind(column(|e| e.event_id))
        .bind(
            events
                .iter()
                .map(|e| e.event_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.schema_fingerprint)
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .iter()
                .map(|e| e.payload.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(column(|e| e.metadata.correlation_id))
        .bind(column(|e| e.metadata.causation_id))
}

/// Decides whether a refused append was a repeat of one already stored (success) or a
/// real conflict.
async fn already_stored(
    connection: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<AppendResult, StoreError> {
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let rows = sqlx::query(
        "SELECT event_id, stream_id, stream_version, global_position FROM events \
         WHERE event_id = ANY($1)",
    )
    .bind(&event_ids)
    .fetch_all(&mut *connection)
    .await?;
    if rows.is_empty() {
        let actual = stream_version_on(connection, stream_id).await?;
        return Err(StoreError::Concurrency {
            stream_id: stream_id.to_owned(),
            expected,
            actual: Some(actual),
        });
    }
    let mut stored: Vec<(Uuid, String, i64, i64)> = rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get("event_id")?,
                row.try_get("stream_id")?,
                row.try_get("stream_version")?,
                row.try_get("global_position")?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    stored.sort_by_key(|(_, _, version, _)| *version);
    let same_append = stored.len() == event_ids.len()
        && stored
            .iter()
            .zip(&event_ids)
            .all(|((id, stream, _, _), expected_id)| id == expected_id && stream == stream_id)
        && stored.windows(2).all(|pair| pair[1].2 == pair[0].2 + 1);
    if !same_append {
        return Err(StoreError::EventIdConflict {
            stream_id: stream_id.to_owned(),
        });
    }
    let (first, last) = (&stored[0], &stored[stored.len() - 1]);
    Ok(AppendResult {
        stream_version: last.2,
        first_position: first.3,
        last_position: last.3,
        already_stored: true,
    })
}

async fn stream_version_on(
    connection: &mut PgConnection,
    stream_id: &str,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1",
    )
    .bind(stream_id)
    .fetch_one(connection)
    .await?)
}

/// The [`Fence`], on a connection outside any transaction.
pub async fn fence_on(connection: &mut PgConnection) -> Result<Fence, StoreError> {
    let row = sqlx::query(FENCE).fetch_one(&mut *connection).await?;
    let next: i64 = row.try_get("next")?;
    let xid: Option<i64> = row.try_get("xid")?;
    let blocker = match xid {
        Some(xid) if xid < next => Some(Blocker {
            xid,
            pid: row.try_get("pid")?,
            application_name: row
                .try_get::<Option<String>, _>("application_name")?
                .unwrap_or_default(),
            transaction_started: row.try_get("xact_start")?,
            events_waiting: row.try_get("waiting")?,
        }),
        _ => None,
    };
    let fence = blocker.as_ref().map_or(next, |blocker| blocker.xid);
    Ok(Fence {
        position: fence << 20,
        blocker,
    })
}

/// Up to `limit` events after `after` and below `fence`, in global order, on a
/// connection outside any transaction: the statement's snapshot must be taken after
/// the fence was.
pub async fn read_below_on(
    connection: &mut PgConnection,
    after: i64,
    fence: &Fence,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows = sqlx::query(READ_BELOW)
        .bind(after)
        .bind(limit)
        .bind(fence.position)
        .fetch_all(connection)
        .await?;
    rows.iter().map(recorded).collect()
}

/// Up to `limit` events after `after` and up to `until` (inclusive), in global order, as
/// committed now: for a reader that knows everything up to `until` is committed (a
/// subscription's checkpoint).
pub async fn read_between_on(
    connection: &mut PgConnection,
    after: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows = sqlx::query(select_events!(
        "WHERE global_position > $1 AND global_position <= $2 ORDER BY global_position LIMIT $3"
    ))
    .bind(after)
    .bind(until)
    .bind(limit)
    .fetch_all(connection)
    .await?;
    rows.iter().map(recorded).collect()
}

/// The events with these ids, in global order (those not stored are left out).
pub async fn events_by_id(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows = sqlx::query(select_events!(
        "WHERE event_id = ANY($1) ORDER BY global_position"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await?;
    rows.iter().map(recorded).collect()
}

/// [`EventStore::read_stream`] on a connection the caller holds (or its transaction).
pub async fn read_stream_on(
    connection: &mut PgConnection,
    stream_id: &str,
    from_version: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows = sqlx::query(READ_STREAM)
        .bind(stream_id)
        .bind(from_version)
        .bind(limit)
        .fetch_all(connection)
        .await?;
    rows.iter().map(recorded).collect()
}

fn recorded(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    Ok(RecordedEvent {
        global_position: row.try_get("global_position")?,
        stream_id: row.try_get("stream_id")?,
        stream_version: row.try_get("stream_version")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        schema_fingerprint: row.try_get("schema_fingerprint")?,
        payload: row.try_get("payload")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        recorded_at: row.try_get("recorded_at")?,
    })
}
