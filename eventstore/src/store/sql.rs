//! The store's SQL text: the append statements in their shapes, the stream locks, the
//! reads and the read fence. Declared first in `store`, so its macros are in scope in
//! the files after it.

use super::ExpectedVersion;

/// An append statement in two shapes: `one` binds a single event's columns as
/// scalars, `many` binds every column as an array and unnests them. Scalars matter:
/// for single events, sending one-element arrays cost about a quarter of the
/// throughput (BENCHMARKS.md).
pub(super) struct AppendSql {
    pub(super) one: &'static str,
    pub(super) many: &'static str,
}

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

/// Builds both shapes. $1 is the stream, $2 the version parameter, $3..$8 the event
/// columns (id, type, fingerprint, payload, correlation id, causation id), $9 the
/// number of positions this transaction already used (earlier appends in a
/// [`StoreTransaction`]), $10 the event types that leave the service through the
/// outbox (NULL: every one; see [`EventStore::publishing`]), $11 the trace context
/// every event of the append is stored with. Each statement returns
/// one row per stored event, with the first version stored as `reported_first`
/// computes it.
macro_rules! append_sql {
    (first_version: $first_version:literal, guard: $guard:literal, reported_first: $reported:literal) => {
        AppendSql {
            one: append_sql!(@statement $first_version, $guard, $reported,
                "(VALUES ($3::uuid, $4::text, $5::bigint, $6::bytea, $7::uuid, $8::uuid, 1::bigint))"),
            many: append_sql!(@statement $first_version, $guard, $reported,
                "unnest($3::uuid[], $4::text[], $5::bigint[], $6::bytea[], $7::uuid[], $8::uuid[]) WITH ORDINALITY"),
        }
    };
    (@statement $first_version:literal, $guard:literal, $reported:literal, $rows:literal) => {
        concat!(
            "WITH inserted AS (
    INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type,
                        schema_fingerprint, payload, correlation_id, causation_id, traceparent)
    SELECT (pg_current_xact_id()::text::bigint << 20) + $9 + e.n - 1, $1, ",
            $first_version,
            " + e.n,
           e.event_id, e.event_type, e.fingerprint, e.payload, e.correlation_id, e.causation_id,
           $11::text
    FROM ",
            $rows,
            " AS e(event_id, event_type, fingerprint, payload, correlation_id, causation_id, n)
    WHERE ",
            $guard,
            "
    RETURNING global_position, stream_version, event_type
), queued AS (INSERT INTO outbox (global_position) SELECT global_position FROM inserted
    WHERE $10::text[] IS NULL OR event_type = ANY($10::text[]))
SELECT global_position, ",
            $reported,
            " AS first_version FROM inserted"
        )
    };
}

/// Versions $2 + 1…: a new stream ($2 = 0) or a version the store reported. The
/// unique index on (stream, version) refuses the append if anyone wrote $2 + 1 first.
pub(super) const APPEND_AT: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "$2 >= 0",
    reported_first: "$2::bigint + 1"
);

/// Like [`APPEND_AT`] for a version the caller only claims: it must exist.
pub(super) const APPEND_AT_EXISTING: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = $2)",
    reported_first: "$2::bigint + 1"
);

/// Any version: continue after the stream's head ($2 is unused and always -1).
pub(super) const APPEND_ANY: AppendSql = append_sql!(
    first_version: "(SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1)",
    guard: "$2 = -1",
    reported_first: "min(stream_version) OVER ()"
);

/// [`APPEND_AT`] inside a [`StoreTransaction`], guarded: the stream's head must come
/// from a transaction no newer than this one. Outside such a transaction that always
/// holds (the writer gets its transaction id inside the append statement, after every
/// event it can see was committed), but a transaction that wrote something else first
/// (an inbox row, saga state) holds an older id. If another writer committed the
/// stream's head in between, our events would sort before their predecessor in global
/// order, and the relay and `read_all` would hand them out in the wrong order.
pub(super) const APPEND_AT_IN_TX: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "$2 >= 0 AND coalesce((SELECT global_position >> 20 FROM events \
     WHERE stream_id = $1 AND stream_version = $2), 0) <= pg_current_xact_id()::text::bigint",
    reported_first: "$2::bigint + 1"
);

/// [`APPEND_AT_EXISTING`] inside a caller's transaction.
pub(super) const APPEND_AT_EXISTING_IN_TX: AppendSql = append_sql!(
    first_version: "$2::bigint",
    guard: "EXISTS (SELECT 1 FROM events WHERE stream_id = $1 AND stream_version = $2 \
     AND global_position >> 20 <= pg_current_xact_id()::text::bigint)",
    reported_first: "$2::bigint + 1"
);

/// [`APPEND_ANY`] inside a caller's transaction.
pub(super) const APPEND_ANY_IN_TX: AppendSql = append_sql!(
    first_version: "(SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1)",
    guard: "$2 = -1 AND coalesce((SELECT global_position >> 20 FROM events \
     WHERE stream_id = $1 ORDER BY stream_version DESC LIMIT 1), 0) <= pg_current_xact_id()::text::bigint",
    reported_first: "min(stream_version) OVER ()"
);

macro_rules! select_events {
    ($rest:literal) => {
        concat!(
            "SELECT global_position, stream_id, stream_version, event_id, event_type, \
             schema_fingerprint, payload, correlation_id, causation_id, recorded_at, \
             traceparent FROM events ",
            $rest
        )
    };
}

/// The events of streams `$1` that belong to the conversations `$2`: one order's
/// events in a store, through the stream index.
pub(super) const READ_CORRELATED: &str = select_events!(
    "WHERE stream_id = ANY($1) AND correlation_id = ANY($2) ORDER BY global_position"
);

pub(super) const READ_STREAM: &str = select_events!(
    "WHERE stream_id = $1 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
);

/// Positions after $1 and below the fence $3 (taken by an earlier statement: see
/// [`Fence`]).
pub(super) const READ_BELOW: &str = select_events!(
    "WHERE global_position > $1 AND global_position < $3 ORDER BY global_position LIMIT $2"
);

/// The fence: the next transaction id as of this statement's snapshot (its xmax, one
/// past the last completed id), and the oldest transaction running in this database
/// that holds an id (a 32-bit `backend_xid` widened to 64 bits by its signed distance
/// from that xmax: a running id may lie on either side of it, never 2^31 away;
/// prepared transactions of this database count too), with its process, and whether
/// committed events wait beyond it.
pub(super) const FENCE: &str = "WITH horizon AS (
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

pub(super) const READ_COMMITTED: &str =
    select_events!("WHERE global_position > $1 ORDER BY global_position LIMIT $2");

impl ExpectedVersion {
    /// The statement that appends under this expectation, and its version parameter.
    /// `in_transaction`: the append runs inside a [`StoreTransaction`](super::StoreTransaction), whose
    /// transaction id may predate the stream's head (see [`APPEND_AT_IN_TX`]).
    pub(super) fn statement(self, in_transaction: bool) -> (AppendSql, i64) {
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
