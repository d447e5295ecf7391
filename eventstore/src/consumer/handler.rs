//! What a consumer hands its handler: the [`Message`], the [`Handler`] trait, and how
//! far a consumer has applied a stream (for read-your-writes).

use std::future::Future;

use sqlx::PgPool;

use crate::amqp::Envelope;
use crate::store::StoreTransaction;

/// What a handler can fail with; any error counts as a failed attempt.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A failure no further attempt can mend, such as a message that names something
/// that cannot exist. Returned by a handler (or a subscriber), it sends the message to
/// the dead letters (or parks its event) after this attempt, with its stream parked,
/// instead of after every attempt has been spent. Any other error is tried again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

impl Permanent {
    /// The error a handler returns.
    pub fn error(reason: impl Into<String>) -> HandlerError {
        Box::new(Permanent(reason.into()))
    }
}

/// Whether `error` or one of its causes is [`Permanent`].
pub fn is_permanent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<Permanent>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// A message as a handler sees it: decoded into the current reader schema, with the
/// envelope (ids, stream, position) and where it was routed.
#[derive(Debug, Clone)]
pub struct Message {
    pub envelope: Envelope,
    /// The payload resolved into the current schema of its type.
    pub value: apache_avro::types::Value,
    /// The payload as received (Avro single-object encoding).
    pub payload: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
}

impl Message {
    /// The message as its wire record.
    pub fn decode<E: domain::wire::WireEvent>(&self) -> Result<E, domain::wire::WireError> {
        E::from_avro(&self.envelope.message_type, &self.value)
    }

    /// Metadata for what handling this message records or sends: the conversation
    /// carries on, and this message is the cause.
    pub fn caused_metadata(&self) -> crate::Metadata {
        crate::Metadata::new(self.envelope.correlation_id, self.envelope.message_id)
            .traced(self.envelope.trace)
    }

    /// The span its handling runs in (see [`crate::trace::handling`]).
    pub fn span(&self, alone: bool) -> tracing::Span {
        let envelope = &self.envelope;
        crate::trace::handling(
            &envelope.message_type,
            envelope.message_id,
            &envelope.stream_id,
            envelope.correlation_id,
            envelope.trace,
            alone,
        )
    }
}

/// Applies messages. `handle` runs inside the transaction that claimed the message's
/// inbox row; whatever it writes through `transaction` (read models, events, commands
/// for other services) commits with that claim or not at all.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        message: &Message,
        transaction: &mut StoreTransaction<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The event streams `handle` will append to, which the claim statement locks (as
    /// [`StoreTransaction::lock_streams`] does) before it writes anything. A handler that
    /// appends should name them: a stream locked only after the claim can have been
    /// written by a transaction that started later, and the append is then refused as
    /// [`Reordered`](crate::StoreError::Reordered) and retried.
    fn streams_to_lock(&self, _message: &Message) -> Vec<String> {
        Vec::new()
    }

    /// Called once `message`'s effect has committed: a hook to wake whoever waits on
    /// it (read-your-writes queries) without polling.
    fn committed(&self, _message: &Message) {}
}

/// The version of `stream_id` that the consumer `queue` has applied, 0 if none: what a
/// read-your-writes query waits on.
pub async fn applied_version(
    pool: &PgPool,
    queue: &str,
    stream_id: &str,
) -> Result<i64, sqlx::Error> {
    let version: Option<i64> = sqlx::query_scalar(
        "SELECT last_version FROM consumer_streams WHERE consumer = $1 AND stream_id = $2",
    )
    .bind(queue)
    .bind(stream_id)
    .fetch_optional(pool)
    .await?;
    Ok(version.unwrap_or(0))
}

/// [`applied_version`] of each of `stream_ids` that the consumer `queue` has applied
/// anything of, in one statement.
pub async fn applied_versions(
    pool: &PgPool,
    queue: &str,
    stream_ids: &[String],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT stream_id, last_version FROM consumer_streams \
         WHERE consumer = $1 AND stream_id = ANY($2)",
    )
    .bind(queue)
    .bind(stream_ids)
    .fetch_all(pool)
    .await
}
