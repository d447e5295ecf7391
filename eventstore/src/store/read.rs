//! Reading: the read fence, and events by stream, by global position and by id.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::sql::{FENCE, READ_BELOW, READ_CORRELATED, READ_STREAM};
use super::{RecordedEvent, StoreError};
use crate::trace::{self, TraceParent};

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

/// [`EventStore::read_stream`](super::EventStore::read_stream) on a connection the caller holds (or its transaction).
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

pub(super) fn recorded(row: &PgRow) -> Result<RecordedEvent, StoreError> {
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
        traceparent: trace::stored(row)?,
    })
}

/// How many events after `after` are in streams whose id starts with `stream_prefix`
/// (as committed now): the size of a rebuild, for its progress.
pub async fn count_after_on(
    connection: &mut PgConnection,
    after: i64,
    stream_prefix: &str,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE global_position > $1 AND stream_id LIKE $2 || '%'",
    )
    .bind(after)
    .bind(stream_prefix)
    .fetch_one(connection)
    .await?)
}

/// The events of `stream_ids` in the conversations `correlation_ids`, in global order:
/// what `orderflow trace` shows of one order in each store.
pub async fn read_correlated(
    pool: &PgPool,
    stream_ids: &[String],
    correlation_ids: &[Uuid],
) -> Result<Vec<RecordedEvent>, StoreError> {
    let rows = sqlx::query(READ_CORRELATED)
        .bind(stream_ids)
        .bind(correlation_ids)
        .fetch_all(pool)
        .await?;
    rows.iter().map(recorded).collect()
}

/// A command for another service as its outbox row still holds it (published rows are
/// kept for the relay's retention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedCommand {
    pub command_id: Uuid,
    pub command_type: String,
    pub target_service: String,
    pub ordering_key: String,
    pub correlation_id: Uuid,
    pub causation_id: Uuid,
    pub enqueued_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
    pub traceparent: Option<TraceParent>,
}

/// The commands in the outbox that belong to the conversations `correlation_ids`.
pub async fn queued_commands(
    pool: &PgPool,
    correlation_ids: &[Uuid],
) -> Result<Vec<QueuedCommand>, StoreError> {
    let rows = sqlx::query(
        "SELECT message_id, message_type, target_service, ordering_key, correlation_id, \
         causation_id, enqueued_at, published_at, traceparent FROM outbox \
         WHERE message_id IS NOT NULL AND correlation_id = ANY($1) ORDER BY global_position",
    )
    .bind(correlation_ids)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(QueuedCommand {
                command_id: row.try_get("message_id")?,
                command_type: row.try_get("message_type")?,
                target_service: row.try_get("target_service")?,
                ordering_key: row.try_get("ordering_key")?,
                correlation_id: row.try_get("correlation_id")?,
                causation_id: row.try_get("causation_id")?,
                enqueued_at: row.try_get("enqueued_at")?,
                published_at: row.try_get("published_at")?,
                traceparent: trace::stored(row)?,
            })
        })
        .collect()
}
