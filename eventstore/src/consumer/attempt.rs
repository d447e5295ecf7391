//! Attempts: a batch tried once in one transaction, a message retried on its own with
//! backoff, and the verdict settled (acknowledged, or dead-lettered).

use std::time::Instant;

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use uuid::Uuid;

use super::dead_letter::{DeadLetter, dead_letter};
use super::inbox::{Failed, try_once};
use super::session::SessionChannels;
use super::{Handler, Message, Shared};
use crate::amqp::{self, Envelope, dead_letter_headers};
use crate::backoff::Backoff;
use crate::codec::CodecError;

/// What claiming a message found.
pub(super) enum Claim {
    /// Applied by the handler; the transaction committed.
    Applied,
    /// Already applied by an earlier delivery.
    Duplicate,
    /// Its stream is parked behind this earlier dead letter.
    Parked(Uuid),
    /// The consumer already applied a later version of its stream.
    OutOfOrder,
}

pub(super) enum Failure {
    /// The database or the network failed under us (connection lost, say): retried
    /// without counting an attempt, since the handler never ran to a verdict.
    Infrastructure(String),
    /// The handler (or decoding for it) failed: counts as an attempt. `permanent`: it
    /// said no attempt can succeed ([`Permanent`](super::Permanent)), so this one is
    /// the last.
    Handler { error: String, permanent: bool },
}

impl Failure {
    /// A failure of the handler that a later attempt may mend.
    pub(super) fn handler(error: impl Into<String>) -> Failure {
        Failure::Handler {
            error: error.into(),
            permanent: false,
        }
    }

    fn text(&self) -> &str {
        match self {
            Failure::Infrastructure(error) | Failure::Handler { error, .. } => error,
        }
    }

    /// Sorts a database error: lost connections are infrastructure, anything else
    /// (a constraint, a serialization failure at commit) is the attempt's failure.
    pub(super) fn from_database(error: &sqlx::Error) -> Failure {
        let transient = match error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // Class 08: connection exception; 57P0x: the server is shutting down.
            sqlx::Error::Database(database) => database
                .code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0")),
            _ => false,
        };
        if transient {
            Failure::Infrastructure(error.to_string())
        } else {
            Failure::handler(error.to_string())
        }
    }

    pub(super) fn from_store(error: crate::StoreError) -> Failure {
        match &error {
            crate::StoreError::Database(database) => Failure::from_database(database),
            _ => Failure::handler(error.to_string()),
        }
    }
}

/// Whether and how a dead letter parks its stream.
#[derive(Clone, Copy)]
pub(super) enum Park {
    /// Nothing to park: the message has no usable stream.
    No,
    /// This message failed: its stream waits for it (or, if the stream already waits
    /// for another, it queues behind that one).
    Stream,
    /// The stream already waits for this earlier dead letter; queue behind it.
    Behind(Uuid),
}

/// A delivery whose first try failed, to be tried again on its own.
pub(super) struct Retry {
    pub(super) key: String,
    pub(super) delivery: Delivery,
    /// Failed attempts so far (a failed batch counts none).
    pub(super) attempts: u32,
}

/// Tries a batch of deliveries of different streams once, in one transaction, and
/// settles every message that reached a verdict (applied, duplicate, dead-lettered).
/// Returns those to try again on their own: all of them if the batch failed (a handler
/// error, a lost connection, a deadlock between batches), so a batch never changes
/// what happens to a message, only how many commits it shares; attempts are counted
/// per message, by [`process`].
pub(super) async fn process_batch<H: Handler>(
    shared: &Shared<H>,
    channels: &SessionChannels,
    batch: Vec<(String, Delivery)>,
) -> Vec<Retry> {
    let received = Instant::now();
    let mut retries = Vec::new();
    let mut decoded = Vec::with_capacity(batch.len());
    for (key, delivery) in batch {
        let envelope = match Envelope::from_properties(&delivery.properties) {
            Ok(envelope) => envelope,
            Err(why) => {
                let error = format!("malformed message: {why}");
                let letter = DeadLetter::new(&delivery, None, Park::No, error, 0);
                dead_letter(shared, channels, letter).await;
                continue;
            }
        };
        match decode(shared, &delivery, &envelope).await {
            Ok(message) => decoded.push((key, delivery, message)),
            Err(Failure::Handler { error, .. }) => {
                let error = format!("undecodable payload: {error}");
                let letter = DeadLetter::new(&delivery, Some(&envelope), Park::Stream, error, 0);
                dead_letter(shared, channels, letter).await;
            }
            Err(Failure::Infrastructure(_)) => retries.push(Retry {
                key,
                delivery,
                attempts: 0,
            }),
        }
    }
    if decoded.is_empty() {
        return retries;
    }
    let messages: Vec<&Message> = decoded.iter().map(|(_, _, message)| message).collect();
    match try_once(shared, &messages).await {
        Ok(claims) => {
            let settled = decoded
                .iter()
                .zip(claims)
                .map(|((_, delivery, message), claim)| {
                    settle(
                        shared,
                        channels,
                        delivery,
                        &message.envelope,
                        claim,
                        0,
                        received,
                    )
                });
            futures_util::future::join_all(settled).await;
        }
        Err(Failed { failure, culprit }) => {
            // The message whose handler failed has used an attempt; the others of its
            // batch were only rolled back with it and try again at once.
            if let (Some(index), Failure::Handler { error, permanent }) = (culprit, &failure) {
                let (key, delivery, message) = decoded.swap_remove(index);
                shared.metrics.failed(&shared.queue);
                let message_id = message.envelope.message_id;
                let correlation_id = message.envelope.correlation_id;
                tracing::warn!(%error, attempt = 1, %message_id, %correlation_id, "handler failed");
                if *permanent || shared.config.max_attempts <= 1 {
                    let envelope = Some(&message.envelope);
                    let letter =
                        DeadLetter::new(&delivery, envelope, Park::Stream, error.clone(), 1);
                    dead_letter(shared, channels, letter).await;
                } else {
                    retries.push(Retry {
                        key,
                        delivery,
                        attempts: 1,
                    });
                }
            } else {
                let error = failure.text();
                tracing::debug!(%error, size = decoded.len(), "batch failed; trying its messages one by one");
            }
            retries.extend(decoded.into_iter().map(|(key, delivery, _)| Retry {
                key,
                delivery,
                attempts: 0,
            }));
        }
    }
    retries
}

/// Tries one delivery again until it is acknowledged as applied or a duplicate, or is
/// safely in the dead-letter queue (after `max_attempts` failed attempts, counting
/// the `attempts` made before); or leaves it unacknowledged (to be redelivered) when the
/// session or the consumer stops first.
pub(super) async fn process<H: Handler>(
    shared: &Shared<H>,
    channels: &SessionChannels,
    delivery: Delivery,
    mut attempts: u32,
) {
    let received = Instant::now();
    let envelope = match Envelope::from_properties(&delivery.properties) {
        Ok(envelope) => envelope,
        Err(why) => {
            let error = format!("malformed message: {why}");
            let letter = DeadLetter::new(&delivery, None, Park::No, error, 0);
            return dead_letter(shared, channels, letter).await;
        }
    };
    let mut infrastructure_delays = Backoff::new();
    let mut delay = None;
    loop {
        if attempts > 0 && delay.is_none() {
            delay = Some(shared.config.first_retry_delay * 2u32.saturating_pow(attempts - 1));
        }
        if let Some(delay) = delay.take()
            && !crate::backoff::sleep(delay, &shared.cancel).await
        {
            return;
        }
        let outcome = match decode(shared, &delivery, &envelope).await {
            Ok(message) => try_once(shared, &[&message])
                .await
                .map(|mut claims| claims.pop().unwrap_or(Claim::Duplicate))
                .map_err(|failed| failed.failure),
            Err(Failure::Handler { error, .. }) => {
                let error = format!("undecodable payload: {error}");
                let letter = DeadLetter::new(&delivery, Some(&envelope), Park::Stream, error, 0);
                return dead_letter(shared, channels, letter).await;
            }
            Err(failure) => Err(failure),
        };
        match outcome {
            Ok(claim) => {
                return settle(
                    shared, channels, &delivery, &envelope, claim, attempts, received,
                )
                .await;
            }
            Err(Failure::Infrastructure(error)) => {
                if !channels.alive() {
                    return; // redelivered on the next session
                }
                let wait = infrastructure_delays.next_delay();
                tracing::warn!(%error, delay = ?wait, message_id = %envelope.message_id, correlation_id = %envelope.correlation_id, "cannot reach the database; retrying");
                delay = Some(wait);
            }
            Err(Failure::Handler { error, permanent }) => {
                attempts += 1;
                shared.metrics.failed(&shared.queue);
                tracing::warn!(%error, attempt = attempts, permanent, message_id = %envelope.message_id, correlation_id = %envelope.correlation_id, "handler failed");
                if permanent || attempts >= shared.config.max_attempts {
                    let letter =
                        DeadLetter::new(&delivery, Some(&envelope), Park::Stream, error, attempts);
                    return dead_letter(shared, channels, letter).await;
                }
            }
        }
    }
}

/// Finishes a delivery whose claim reached a verdict: acknowledges what was applied or
/// was a duplicate, dead-letters what may not be applied (yet).
async fn settle<H>(
    shared: &Shared<H>,
    channels: &SessionChannels,
    delivery: &Delivery,
    envelope: &Envelope,
    claim: Claim,
    attempts: u32,
    received: Instant,
) {
    let letter =
        |park, error, attempts| DeadLetter::new(delivery, Some(envelope), park, error, attempts);
    match claim {
        Claim::Applied => {
            if acknowledge(delivery).await {
                shared.metrics.consumed(&shared.queue, received.elapsed());
            }
        }
        Claim::Duplicate => {
            if acknowledge(delivery).await {
                shared.metrics.duplicate(&shared.queue);
            }
        }
        Claim::Parked(behind) => {
            let error = format!("stream {} is parked behind {behind}", envelope.stream_id);
            dead_letter(shared, channels, letter(Park::Behind(behind), error, 0)).await;
        }
        Claim::OutOfOrder => {
            // Never applied: parked until an operator looks (replaying it cannot
            // help; skipping it lets the stream flow on).
            let error = format!(
                "out of order: a later version of stream {} was already applied",
                envelope.stream_id
            );
            dead_letter(shared, channels, letter(Park::Stream, error, attempts)).await;
        }
    }
}

pub(super) async fn acknowledge(delivery: &Delivery) -> bool {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!("could not acknowledge on a closed channel; it will be redelivered");
            false
        }
        Err(error) => {
            // The channel is gone: the message comes back and the inbox absorbs it.
            tracing::warn!(%error, "could not acknowledge; it will be redelivered");
            false
        }
    }
}

/// Resolves the payload into the current schema, learning an unknown writer schema
/// from the registry table first.
async fn decode<H>(
    shared: &Shared<H>,
    delivery: &Delivery,
    envelope: &Envelope,
) -> Result<Message, Failure> {
    let registry = &shared.registry;
    let decoded = match registry.decode_value(&delivery.data) {
        Err(CodecError::UnknownFingerprint(fingerprint)) => {
            registry
                .learn(shared.store.pool(), fingerprint)
                .await
                .map_err(|error| Failure::Infrastructure(error.to_string()))?;
            registry.decode_value(&delivery.data)
        }
        other => other,
    };
    let (_, value) = decoded.map_err(|error| Failure::handler(error.to_string()))?;
    Ok(Message {
        envelope: envelope.clone(),
        value,
        payload: delivery.data.clone(),
        exchange: original_routing(delivery, dead_letter_headers::EXCHANGE)
            .unwrap_or_else(|| delivery.exchange.to_string()),
        routing_key: original_routing(delivery, dead_letter_headers::ROUTING_KEY)
            .unwrap_or_else(|| delivery.routing_key.to_string()),
        redelivered: delivery.redelivered,
    })
}

/// Where a replayed dead letter was first routed (its dead-letter headers say): it
/// comes back through the default exchange, and handlers tell messages apart by the
/// original exchange and routing key.
pub(super) fn original_routing(delivery: &Delivery, header: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    amqp::header_string(headers, header)
}
