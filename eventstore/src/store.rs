//! The PostgreSQL event store.
//!
//! An append is one SQL statement: it checks the expected version, inserts the events
//! and their outbox rows, and queues a `NOTIFY` for the relay, all in one transaction
//! (the statement's own, or the caller's). The happy path is therefore one round trip.
//!
//! Global order: an event's `global_position` is `(writing transaction id << 20) +
//! ordinal`, and [`EventStore::read_all`] only returns positions below the oldest
//! transaction still running (`pg_snapshot_xmin`). Every transaction that could still
//! commit has a transaction id at or above that bound, so its events sort after
//! everything already returned: a reader that remembers the last position it saw can
//! never skip an event that commits late. Positions are sparse, never reused, and
//! totally ordered; ARCHITECTURE.md has the argument in full.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

/// The channel the relay `LISTEN`s on; every append that stored something notifies it.
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
}

impl ExpectedVersion {
    /// The version the stream must be at, or `None` for any.
    fn required(self) -> Option<i64> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(version) => Some(version),
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(version) => write!(f, "{version}"),
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
    /// Metadata for the first step of a new conversation, caused by `command_id`.
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else appended first. `actual` is `None` when the race was lost inside a
    /// caller's transaction (which PostgreSQL has then aborted, so it cannot be asked).
    #[error("stream {stream_id}: expected version {expected}, but it is at {}", .actual.map_or("a newer version".to_owned(), |v| v.to_string()))]
    Concurrency {
        stream_id: String,
        expected: ExpectedVersion,
        actual: Option<i64>,
    },
    /// Some of the event ids are already stored, but not as this exact append.
    #[error("stream {stream_id}: some event ids are already stored elsewhere")]
    EventIdConflict { stream_id: String },
    #[error("an append takes 1 to {MAX_EVENTS_PER_TRANSACTION} events; got {0}")]
    BadBatch(usize),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    pub fn is_concurrency(&self) -> bool {
        matches!(self, StoreError::Concurrency { .. })
    }
}

/// The event store of one service database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
}

/// One statement: version check, events, outbox rows, NOTIFY. Parameters: $1 stream,
/// $2 required version (-1 for any), $3..$8 the events' columns as arrays.
const APPEND: &str = r#"
WITH current AS (
    SELECT coalesce(max(stream_version), 0) AS version FROM events WHERE stream_id = $1
), tx AS (
    SELECT (pg_current_xact_id()::text::bigint << 20) AS base
), taken AS (
    -- Positions this transaction already used (an earlier append in the same transaction).
    SELECT coalesce((SELECT max(global_position) FROM events
                     WHERE global_position >= tx.base AND global_position < tx.base + 1048576)
                    - tx.base + 1, 0) AS used
    FROM tx
), inserted AS (
    INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type,
                        schema_fingerprint, payload, correlation_id, causation_id)
    SELECT tx.base + taken.used + e.n - 1, $1, current.version + e.n, e.event_id, e.event_type,
           e.fingerprint, e.payload, e.correlation_id, e.causation_id
    FROM unnest($3::uuid[], $4::text[], $5::bigint[], $6::bytea[], $7::uuid[], $8::uuid[])
             WITH ORDINALITY AS e(event_id, event_type, fingerprint, payload, correlation_id, causation_id, n)
    CROSS JOIN current CROSS JOIN tx CROSS JOIN taken
    WHERE ($2 < 0 OR current.version = $2)
      AND taken.used + cardinality($3::uuid[]) < 1048576
    RETURNING global_position
), queued AS (
    INSERT INTO outbox (global_position) SELECT global_position FROM inserted
), notified AS (
    SELECT pg_notify('orderflow_outbox', '') FROM (SELECT 1 FROM inserted LIMIT 1) AS stored
)
SELECT (SELECT version FROM current) AS current_version,
       (SELECT count(*) FROM inserted) AS inserted,
       (SELECT min(global_position) FROM inserted) AS first_position,
       (SELECT count(*) FROM notified) AS notified
"#;

const COLUMNS: &str = "global_position, stream_id, stream_version, event_id, event_type, \
     schema_fingerprint, payload, correlation_id, causation_id, recorded_at";

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        EventStore { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to `stream_id` in a transaction of its own.
    ///
    /// With [`ExpectedVersion::Any`], losing a race to another writer is retried here;
    /// otherwise it is a [`StoreError::Concurrency`]. Appending events whose ids are all
    /// already stored as this stream's latest append succeeds without storing anything
    /// (`already_stored`), so a writer that is unsure whether it committed can retry.
    pub async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        let mut connection = self.pool.acquire().await?;
        append_on(&mut connection, stream_id, expected, events).await
    }

    /// Appends inside the caller's transaction, so that other writes (saga state, read
    /// models) commit or roll back with the events. A race lost to a concurrent writer
    /// aborts the caller's transaction and reports `Concurrency { actual: None }`.
    pub async fn append_in_transaction(
        &self,
        transaction: &mut PgConnection,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<AppendResult, StoreError> {
        append_once(transaction, stream_id, expected, events, false).await
    }

    /// Events of one stream from `from_version` on, in version order.
    pub async fn read_stream(
        &self,
        stream_id: &str,
        from_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM events WHERE stream_id = $1 AND stream_version >= $2 \
             ORDER BY stream_version LIMIT $3"
        )))
        .bind(stream_id)
        .bind(from_version)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(recorded).collect()
    }

    /// Up to `limit` events after `after` in global order, never skipping one that
    /// commits later: only positions below the oldest running transaction are returned.
    /// Start from 0; continue from the last position returned.
    pub async fn read_all(&self, after: i64, limit: i64) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM events \
             WHERE global_position > $1 \
               AND global_position < (pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20) \
             ORDER BY global_position LIMIT $2"
        )))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(recorded).collect()
    }

    /// The version of a stream's last event, 0 if it has none.
    pub async fn stream_version(&self, stream_id: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(max(stream_version), 0) FROM events WHERE stream_id = $1",
        )
        .bind(stream_id)
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Appends on a connection outside any transaction, retrying lost races for `Any` and
/// recognising a repeated append.
async fn append_on(
    connection: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<AppendResult, StoreError> {
    const ANY_RETRIES: usize = 16;
    let mut attempt = 0;
    loop {
        match append_once(connection, stream_id, expected, events, true).await {
            Err(StoreError::Concurrency { .. }) if expected == ExpectedVersion::Any => {
                attempt += 1;
                if attempt >= ANY_RETRIES {
                    let actual = stream_version_on(connection, stream_id).await?;
                    return Err(StoreError::Concurrency {
                        stream_id: stream_id.to_owned(),
                        expected,
                        actual: Some(actual),
                    });
                }
            }
            other => return other,
        }
    }
}

async fn append_once(
    connection: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
    can_look_again: bool,
) -> Result<AppendResult, StoreError> {
    if events.is_empty() || events.len() > MAX_EVENTS_PER_TRANSACTION {
        return Err(StoreError::BadBatch(events.len()));
    }
    let count = events.len();
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let mut event_types = Vec::with_capacity(count);
    let mut fingerprints = Vec::with_capacity(count);
    let mut payloads = Vec::with_capacity(count);
    let mut correlation_ids = Vec::with_capacity(count);
    let mut causation_ids = Vec::with_capacity(count);
    for event in events {
        event_types.push(event.event_type.as_str());
        fingerprints.push(event.schema_fingerprint);
        payloads.push(event.payload.as_slice());
        correlation_ids.push(event.metadata.correlation_id);
        causation_ids.push(event.metadata.causation_id);
    }
    let outcome = sqlx::query(APPEND)
        .bind(stream_id)
        .bind(expected.required().unwrap_or(-1))
        .bind(&event_ids)
        .bind(&event_types)
        .bind(&fingerprints)
        .bind(&payloads)
        .bind(&correlation_ids)
        .bind(&causation_ids)
        .fetch_one(&mut *connection)
        .await;
    let row = match outcome {
        Ok(row) => row,
        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
            if !can_look_again {
                return Err(match error.constraint() {
                    Some("events_event_id_key") => StoreError::EventIdConflict {
                        stream_id: stream_id.to_owned(),
                    },
                    _ => StoreError::Concurrency {
                        stream_id: stream_id.to_owned(),
                        expected,
                        actual: None,
                    },
                });
            }
            return already_stored(connection, stream_id, expected, &event_ids).await;
        }
        Err(error) => return Err(error.into()),
    };
    let inserted: i64 = row.try_get("inserted")?;
    if inserted as usize == count {
        let current: i64 = row.try_get("current_version")?;
        let first_position: i64 = row.try_get("first_position")?;
        return Ok(AppendResult {
            stream_version: current + count as i64,
            first_position,
            last_position: first_position + count as i64 - 1,
            already_stored: false,
        });
    }
    // Nothing was inserted: the version did not match (or the transaction ran out of
    // positions, which a plain version check below cannot explain).
    let current: i64 = row.try_get("current_version")?;
    if expected
        .required()
        .is_none_or(|required| required == current)
    {
        return Err(StoreError::BadBatch(count));
    }
    if can_look_again {
        return already_stored(connection, stream_id, expected, &event_ids).await;
    }
    Err(StoreError::Concurrency {
        stream_id: stream_id.to_owned(),
        expected,
        actual: Some(current),
    })
}

/// Decides whether a refused append was a repeat of one already stored (success) or a
/// real conflict.
async fn already_stored(
    connection: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    event_ids: &[Uuid],
) -> Result<AppendResult, StoreError> {
    let rows = sqlx::query(
        "SELECT event_id, stream_id, stream_version, global_position FROM events \
         WHERE event_id = ANY($1)",
    )
    .bind(event_ids)
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
            .zip(event_ids)
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
