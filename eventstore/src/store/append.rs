//! One append: the statement for the expected version, and what a refused append
//! finds (the same events already stored, or another version).

use sqlx::{PgConnection, Row};
use tracing::Instrument;
use uuid::Uuid;

use super::{AppendResult, ExpectedVersion, MAX_EVENTS_PER_TRANSACTION, NewEvent, StoreError};
use crate::trace;

/// Appends once. `first_ordinal` is the number of positions the surrounding
/// transaction already used. `can_look_again` is false inside a caller's transaction,
/// which a failed statement aborts, so the follow-up queries cannot run.
pub(super) async fn append_once(
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
    let span = tracing::info_span!("append", otel.kind = "internal", stream_id, events = count);
    // The events name the append as their cause's span, so what they lead to (the
    // relay's publish, a subscription's apply) hangs below it.
    let trace = span.in_scope(|| trace::outgoing(events[0].metadata.trace));
    let outcome = bind_events(query, events)
        .bind(first_ordinal)
        .bind(published)
        .bind(trace.map(|trace| trace.to_string()))
        .fetch_all(&mut *connection)
        .instrument(span)
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
pub(super) fn bind_events<'q>(
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
pub(super) async fn already_stored(
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

pub(super) async fn stream_version_on(
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
