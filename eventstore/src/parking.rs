//! Parked streams, as operators handle them: a stream whose message was dead-lettered
//! waits for it (consumers and subscriptions alike: `parked_streams` and
//! `parked_messages`, keyed by consumer or subscription name) until it is replayed,
//! skipped or purged. `orderflow dlq` calls these; the runtimes park.

use sqlx::PgPool;
use uuid::Uuid;

/// Lets a parked stream go past the message it waits for, without applying that
/// message: what `orderflow dlq` does when an operator skips a dead letter. The next
/// parked message (if any) becomes the one the stream waits for; replay the dead
/// letters in order to let them through. Returns the message now waited for, or
/// `None` once the stream flows again.
pub async fn skip(
    pool: &PgPool,
    consumer: &str,
    stream_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let next = advance_park(&mut transaction, consumer, stream_id).await?;
    transaction.commit().await?;
    Ok(next)
}

/// Forgets everything parked on a stream at once, so its later messages are applied
/// again. Returns whether the stream was parked.
pub async fn unpark(pool: &PgPool, consumer: &str, stream_id: &str) -> Result<bool, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let unparked = unpark_in(&mut transaction, consumer, stream_id).await?;
    transaction.commit().await?;
    Ok(unparked)
}

/// [`unpark`] inside the caller's transaction.
pub async fn unpark_in(
    connection: &mut sqlx::PgConnection,
    consumer: &str,
    stream_id: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query("DELETE FROM parked_messages WHERE consumer = $1 AND stream_id = $2")
        .bind(consumer)
        .bind(stream_id)
        .execute(&mut *connection)
        .await?;
    let deleted = sqlx::query("DELETE FROM parked_streams WHERE consumer = $1 AND stream_id = $2")
        .bind(consumer)
        .bind(stream_id)
        .execute(connection)
        .await?;
    Ok(deleted.rows_affected() > 0)
}

/// Forgets a dead letter that will never be applied (`orderflow dlq purge`): if its
/// stream waits for it, the stream moves on to its next parked message (or flows
/// again); if it was parked behind another, it is no longer waited for.
pub async fn forget(
    pool: &PgPool,
    consumer: &str,
    stream_id: &str,
    message_id: Uuid,
) -> Result<(), sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let blocking: Option<Uuid> = sqlx::query_scalar(
        "SELECT blocking_message_id FROM parked_streams \
         WHERE consumer = $1 AND stream_id = $2 FOR UPDATE",
    )
    .bind(consumer)
    .bind(stream_id)
    .fetch_optional(&mut *transaction)
    .await?;
    if blocking == Some(message_id) {
        advance_park(&mut transaction, consumer, stream_id).await?;
    } else {
        sqlx::query("DELETE FROM parked_messages WHERE consumer = $1 AND message_id = $2")
            .bind(consumer)
            .bind(message_id)
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await
}

/// Moves a parked stream on to its next parked message, or unparks it when none is
/// left. Returns the message the stream now waits for.
pub(crate) async fn advance_park(
    connection: &mut sqlx::PgConnection,
    consumer: &str,
    stream_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    let next: Option<Uuid> = sqlx::query_scalar(
        "DELETE FROM parked_messages WHERE seq = (SELECT min(seq) FROM parked_messages \
         WHERE consumer = $1 AND stream_id = $2) RETURNING message_id",
    )
    .bind(consumer)
    .bind(stream_id)
    .fetch_optional(&mut *connection)
    .await?;
    let statement = match next {
        Some(_) => {
            "UPDATE parked_streams SET blocking_message_id = $3, \
             error = 'parked behind an earlier dead letter of its stream' \
             WHERE consumer = $1 AND stream_id = $2"
        }
        None => {
            "DELETE FROM parked_streams WHERE consumer = $1 AND stream_id = $2 AND $3::uuid IS NULL"
        }
    };
    sqlx::query(statement)
        .bind(consumer)
        .bind(stream_id)
        .bind(next)
        .execute(connection)
        .await?;
    Ok(next)
}
