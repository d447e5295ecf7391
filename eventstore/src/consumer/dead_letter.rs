//! Moving a delivery to the service's dead-letter queue, parking its stream first.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Confirmation};

use super::Shared;
use super::attempt::{Park, acknowledge, original_routing};
use super::session::SessionChannels;
use crate::amqp::{self, Envelope, dead_letter_headers};
use crate::backoff::Backoff;

/// A delivery on its way to the dead-letter queue, with why.
pub(super) struct DeadLetter<'a> {
    delivery: &'a Delivery,
    /// Known unless the message was malformed.
    envelope: Option<&'a Envelope>,
    park: Park,
    error: String,
    attempts: u32,
}

impl<'a> DeadLetter<'a> {
    pub(super) fn new(
        delivery: &'a Delivery,
        envelope: Option<&'a Envelope>,
        park: Park,
        error: String,
        attempts: u32,
    ) -> Self {
        DeadLetter {
            delivery,
            envelope,
            park,
            error,
            attempts,
        }
    }
}

/// A dead letter's confirm that has not come in this long counts as a failure.
const DEAD_LETTER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Moves a delivery to the service's dead-letter queue and acknowledges it, parking
/// its stream first as `park` says. Keeps retrying while the session lives; if it
/// dies, the message is redelivered anyway.
pub(super) async fn dead_letter<H>(
    shared: &Shared<H>,
    channels: &SessionChannels,
    letter: DeadLetter<'_>,
) {
    let mut backoff = Backoff::new();
    loop {
        match try_dead_letter(shared, channels, &letter).await {
            Ok(()) => {
                shared.metrics.dead_lettered(&shared.queue);
                let correlation_id = letter.envelope.map(|envelope| envelope.correlation_id);
                tracing::warn!(
                    error = letter.error,
                    attempts = letter.attempts,
                    correlation_id = correlation_id.map(tracing::field::display),
                    "dead-lettered"
                );
                acknowledge(letter.delivery).await;
                return;
            }
            Err(failure) => {
                if !channels.alive() {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(error = %failure, ?delay, "could not dead-letter; retrying");
                if !crate::backoff::sleep(delay, &shared.cancel).await {
                    return;
                }
            }
        }
    }
}

/// Parks the stream: as the message it waits for if it waits for none, otherwise
/// queued behind the parked messages it has.
const PARK: &str = "
WITH waits_for AS (
    INSERT INTO parked_streams (consumer, stream_id, blocking_message_id, error)
    VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, stream_id) DO NOTHING
    RETURNING 1
)
INSERT INTO parked_messages (consumer, stream_id, message_id)
SELECT $1, $2, $3
WHERE NOT EXISTS (SELECT 1 FROM waits_for)
  AND NOT EXISTS (SELECT 1 FROM parked_streams
                  WHERE consumer = $1 AND stream_id = $2 AND blocking_message_id = $3)
ON CONFLICT (consumer, message_id) DO NOTHING";

async fn try_dead_letter<H>(
    shared: &Shared<H>,
    channels: &SessionChannels,
    letter: &DeadLetter<'_>,
) -> Result<(), String> {
    let delivery = letter.delivery;
    if let (Some(envelope), Park::Stream | Park::Behind(_)) = (letter.envelope, letter.park) {
        sqlx::query(PARK)
            .bind(shared.queue.as_str())
            .bind(envelope.stream_id.as_str())
            .bind(envelope.message_id)
            .bind(letter.error.as_str())
            .execute(shared.store.pool())
            .await
            .map_err(|error| error.to_string())?;
    }
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let mut set = |name: &str, value: AMQPValue| {
        headers.insert(name.into(), value);
    };
    set(
        dead_letter_headers::ERROR,
        amqp::long_string(letter.error.as_str()),
    );
    set(
        dead_letter_headers::ATTEMPTS,
        AMQPValue::LongLongInt(i64::from(letter.attempts)),
    );
    // A dead letter that failed again after a replay keeps its original routing.
    let exchange = original_routing(delivery, dead_letter_headers::EXCHANGE)
        .unwrap_or_else(|| delivery.exchange.to_string());
    let routing_key = original_routing(delivery, dead_letter_headers::ROUTING_KEY)
        .unwrap_or_else(|| delivery.routing_key.to_string());
    set(dead_letter_headers::EXCHANGE, amqp::long_string(exchange));
    set(
        dead_letter_headers::ROUTING_KEY,
        amqp::long_string(routing_key),
    );
    set(
        dead_letter_headers::QUEUE,
        amqp::long_string(shared.queue.as_str()),
    );
    if shared.config.partitions > 1 {
        let exchange = amqp::partition_exchange(&shared.queue);
        set(
            dead_letter_headers::REPLAY_EXCHANGE,
            amqp::long_string(exchange),
        );
    }
    if let Park::Behind(behind) = letter.park {
        set(
            dead_letter_headers::PARKED_BEHIND,
            amqp::long_string(behind.to_string()),
        );
    }
    let now = AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis());
    set(dead_letter_headers::LAST_FAILED_AT, now.clone());
    if amqp::header_integer(&headers, dead_letter_headers::FIRST_FAILED_AT).is_none() {
        headers.insert(dead_letter_headers::FIRST_FAILED_AT.into(), now);
    }
    let properties: BasicProperties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    let queue = amqp::dead_letter_queue(&shared.config.service);
    let confirm = channels
        .dead_letters
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &delivery.data,
            properties,
        )
        .await
        .map_err(|error| error.to_string())?;
    let confirmed = tokio::select! {
        _ = shared.cancel.cancelled() => return Err("stopping".to_owned()),
        confirmed = tokio::time::timeout(DEAD_LETTER_CONFIRM_TIMEOUT, confirm) => confirmed,
    };
    match confirmed {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(_)) => Err("the broker refused the dead letter".to_owned()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no confirm within {DEAD_LETTER_CONFIRM_TIMEOUT:?}")),
    }
}
