//! Events parked for a subscription, as `orderflow dlq` lists and replays them.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::Subscriber;
use crate::consumer::HandlerError;
use crate::store::{EventStore, RecordedEvent, StoreError};

/// Whether `stream_id` is parked for the subscription (its later events are held).
pub async fn is_parked(pool: &PgPool, name: &str, stream_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM parked_streams WHERE consumer = $1 AND stream_id = $2)",
    )
    .bind(name)
    .bind(stream_id)
    .fetch_one(pool)
    .await
}

/// An event parked for a subscription, as `orderflow dlq` shows it.
#[derive(Debug, Clone)]
pub struct ParkedEvent {
    pub subscription: String,
    pub event: RecordedEvent,
    /// Why it failed (for the event its stream waits for).
    pub error: Option<String>,
    /// The event it waits behind, if it was never tried.
    pub parked_behind: Option<Uuid>,
    pub parked_at: Option<DateTime<Utc>>,
}

/// Every event parked for the named subscriptions, stream by stream: the one each
/// stream waits for first, then those behind it in order.
pub async fn parked_events(
    pool: &PgPool,
    subscriptions: &[&str],
) -> Result<Vec<ParkedEvent>, StoreError> {
    type Row = (
        String,
        String,
        Uuid,
        Option<String>,
        Option<DateTime<Utc>>,
        Option<Uuid>,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
            "SELECT s.consumer, s.stream_id, s.blocking_message_id, s.error, s.parked_at, NULL::uuid, \
                    0::bigint AS seq \
             FROM parked_streams s WHERE s.consumer = ANY($1) \
             UNION ALL \
             SELECT m.consumer, m.stream_id, m.message_id, NULL, NULL, s.blocking_message_id, m.seq \
             FROM parked_messages m JOIN parked_streams s \
               ON s.consumer = m.consumer AND s.stream_id = m.stream_id \
             WHERE m.consumer = ANY($1) AND m.message_id <> s.blocking_message_id \
             ORDER BY 1, 2, 7",
        )
    .bind(subscriptions)
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.2).collect();
    let events = crate::store::events_by_id(pool, &ids).await?;
    Ok(rows
        .into_iter()
        .filter_map(
            |(subscription, _, id, error, parked_at, parked_behind, _)| {
                let event = events.iter().find(|event| event.event_id == id)?.clone();
                Some(ParkedEvent {
                    subscription,
                    event,
                    error,
                    parked_behind,
                    parked_at,
                })
            },
        )
        .collect())
}

/// Applies a parked stream's events again, in order, through `subscriber`, and lets
/// the stream go on (`orderflow dlq replay`): all in one transaction that holds the
/// stream's parking row, so the live subscription (which takes it shared) neither
/// applies nor parks an event of the stream meanwhile. If one fails again, nothing
/// changes and the error is returned. Returns the events applied.
pub async fn replay_parked<S: Subscriber>(
    store: &EventStore,
    subscriber: &S,
    name: &str,
    stream_id: &str,
) -> Result<usize, HandlerError> {
    let mut transaction = store.begin().await?;
    let locks = events_of_stream_locks(subscriber, store, name, stream_id).await?;
    transaction.lock_streams(&locks).await?;
    let blocking: Option<Uuid> = sqlx::query_scalar(
        "SELECT blocking_message_id FROM parked_streams \
         WHERE consumer = $1 AND stream_id = $2 FOR UPDATE",
    )
    .bind(name)
    .bind(stream_id)
    .fetch_optional(transaction.connection())
    .await?;
    let Some(blocking) = blocking else {
        return Ok(0);
    };
    let behind: Vec<Uuid> = sqlx::query_scalar(
        "SELECT message_id FROM parked_messages WHERE consumer = $1 AND stream_id = $2 \
         AND message_id <> $3 ORDER BY seq",
    )
    .bind(name)
    .bind(stream_id)
    .bind(blocking)
    .fetch_all(transaction.connection())
    .await?;
    let ids: Vec<Uuid> = std::iter::once(blocking).chain(behind).collect();
    let events = crate::store::events_by_id(store.pool(), &ids).await?;
    let mut applied = 0;
    for id in &ids {
        let Some(event) = events.iter().find(|event| event.event_id == *id) else {
            continue;
        };
        subscriber
            .apply(event, &mut transaction)
            .await
            .map_err(|error| format!("event at {} failed again: {error}", event.global_position))?;
        applied += 1;
    }
    crate::parking::unpark_in(transaction.connection(), name, stream_id).await?;
    transaction.commit().await?;
    Ok(applied)
}

/// The streams a replay of a parked stream appends to, by its parked events.
async fn events_of_stream_locks<S: Subscriber>(
    subscriber: &S,
    store: &EventStore,
    name: &str,
    stream_id: &str,
) -> Result<Vec<String>, StoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT blocking_message_id FROM parked_streams WHERE consumer = $1 AND stream_id = $2 \
         UNION ALL SELECT message_id FROM parked_messages WHERE consumer = $1 AND stream_id = $2",
    )
    .bind(name)
    .bind(stream_id)
    .fetch_all(store.pool())
    .await?;
    let events = crate::store::events_by_id(store.pool(), &ids).await?;
    Ok(events
        .iter()
        .flat_map(|event| subscriber.streams_to_lock(event))
        .collect())
}
