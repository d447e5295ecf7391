//! A service's dead-letter queue (`dlq.<service>.retry`), as `orderflow dlq` operates
//! it: list what is there, send dead letters back to the consumer that gave up on them
//! (in queue order, so a parked stream is applied in order), or purge them (and let
//! their streams move on).
//!
//! Each operation takes the queue's messages with `basic.get` without acknowledging
//! them, acknowledges the ones it replayed or purged, and returns the others to the
//! queue by closing the channel (which puts them back at the head, in order). The
//! queue's order is still not to be trusted (a dead letter that failed again after a
//! replay goes to the back): letters are listed and replayed in the order they were
//! first published (their global position), which keeps each stream's letters in
//! order, the one its stream waits for first.

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel, Confirmation};
use sqlx::PgPool;
use uuid::Uuid;

use crate::amqp::{self, Envelope, dead_letter_headers};

/// Dead letters taken from the queue in one operation, at most.
pub const MAX_LETTERS: usize = 100_000;

/// A message in a dead-letter queue, with why it is there.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The event or command id, when the message carried one.
    pub message_id: Option<Uuid>,
    pub message_type: Option<String>,
    /// The envelope, unless the message was malformed.
    pub envelope: Option<Envelope>,
    /// The consumer (queue) that gave up on it, where a replay sends it.
    pub queue: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub error: Option<String>,
    pub attempts: Option<i64>,
    /// The earlier dead letter of its stream it waits behind, if it was never tried.
    pub parked_behind: Option<Uuid>,
    /// For a consumer split into partitions: the exchange a replay goes through.
    pub replay_exchange: Option<String>,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub last_failed_at: Option<DateTime<Utc>>,
    pub payload: Vec<u8>,
    properties: BasicProperties,
    delivery_tag: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the broker refused to take back dead letter {0}")]
    Refused(String),
}

/// What an operation did with the letters it selected.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Replayed or purged, in queue order.
    pub done: Vec<DeadLetter>,
    /// Selected but left in the queue, and why.
    pub skipped: Vec<(DeadLetter, String)>,
    /// Letters in the queue that were not selected.
    pub others: usize,
}

/// Every dead letter of `service`, in the order they were first published; the queue
/// keeps them all.
pub async fn list(amqp_url: &str, service: &str) -> Result<Vec<DeadLetter>, DlqError> {
    let session = Session::open(amqp_url, service).await?;
    let letters = session.take_all().await?;
    session.give_back().await?;
    Ok(letters)
}

/// Sends the selected dead letters back to the queue of the consumer that gave up on
/// them, in queue order, each removed from the dead-letter queue once the broker
/// confirmed it; with `dry_run`, only says which.
pub async fn replay(
    amqp_url: &str,
    service: &str,
    select: impl Fn(&DeadLetter) -> bool,
    dry_run: bool,
) -> Result<Outcome, DlqError> {
    act(amqp_url, service, select, dry_run, Action::Replay(None)).await
}

/// As [`replay`], but leaves in the queue (as skipped) every letter that first failed
/// before `horizon`: a copy of it may have been applied another way (a redelivery, a
/// republish) and that copy's inbox row pruned since ([`crate::retention`]), so the
/// consumer could no longer recognise it.
pub async fn replay_since(
    amqp_url: &str,
    service: &str,
    select: impl Fn(&DeadLetter) -> bool,
    dry_run: bool,
    horizon: DateTime<Utc>,
) -> Result<Outcome, DlqError> {
    act(
        amqp_url,
        service,
        select,
        dry_run,
        Action::Replay(Some(horizon)),
    )
    .await
}

/// Deletes the selected dead letters for good, and lets each one's stream move on in
/// the consumer's parking records (in `pool`, the service's database); with
/// `dry_run`, only says which.
pub async fn purge(
    amqp_url: &str,
    service: &str,
    pool: &PgPool,
    select: impl Fn(&DeadLetter) -> bool,
    dry_run: bool,
) -> Result<Outcome, DlqError> {
    act(amqp_url, service, select, dry_run, Action::Purge(pool)).await
}

enum Action<'a> {
    /// Letters that first failed before the horizon, if one is given, stay.
    Replay(Option<DateTime<Utc>>),
    /// With the service's database, where the consumer's parking records are.
    Purge(&'a PgPool),
}

/// Takes every dead letter, does `action` to the selected ones (unless `dry_run`) and
/// gives the rest back, in order.
async fn act(
    amqp_url: &str,
    service: &str,
    select: impl Fn(&DeadLetter) -> bool,
    dry_run: bool,
    action: Action<'_>,
) -> Result<Outcome, DlqError> {
    let session = Session::open(amqp_url, service).await?;
    let mut outcome = Outcome::default();
    for letter in session.take_all().await? {
        if !select(&letter) {
            outcome.others += 1;
            continue;
        }
        match (&action, letter.queue.clone()) {
            (Action::Replay(_), None) => {
                let why = "it names no consumer queue to go back to".to_owned();
                outcome.skipped.push((letter, why));
                continue;
            }
            (Action::Replay(Some(horizon)), Some(_))
                if letter.first_failed_at.is_some_and(|at| at < *horizon) =>
            {
                let why = "it failed before the message retention, so its consumer could no \
                           longer tell a copy it applied meanwhile (--past-retention replays it)"
                    .to_owned();
                outcome.skipped.push((letter, why));
                continue;
            }
            _ if dry_run => {}
            (Action::Replay(_), Some(queue)) => session.send_back(&letter, &queue).await?,
            (Action::Purge(pool), queue) => {
                if let (Some(queue), Some(envelope)) = (queue, &letter.envelope) {
                    let (stream, id) = (&envelope.stream_id, envelope.message_id);
                    crate::parking::forget(pool, &queue, stream, id).await?;
                }
                session
                    .channel
                    .basic_ack(letter.delivery_tag, BasicAckOptions::default())
                    .await?;
            }
        }
        outcome.done.push(letter);
    }
    session.give_back().await?;
    Ok(outcome)
}

/// One connection to the broker, holding the dead letters it took unacknowledged.
struct Session {
    connection: lapin::Connection,
    channel: Channel,
    queue: String,
}

impl Session {
    async fn open(amqp_url: &str, service: &str) -> Result<Session, DlqError> {
        let connection = amqp::connect(amqp_url, "orderflow-dlq").await?;
        let channel = amqp::confirming_channel(&connection).await?;
        amqp::declare_service(&channel, service).await?;
        Ok(Session {
            connection,
            channel,
            queue: amqp::dead_letter_queue(service),
        })
    }

    /// Takes every message of the queue (up to [`MAX_LETTERS`]) without
    /// acknowledging it.
    /// In the order they were first published (malformed ones, with no position,
    /// last).
    async fn take_all(&self) -> Result<Vec<DeadLetter>, DlqError> {
        let mut letters = Vec::new();
        while letters.len() < MAX_LETTERS {
            let message = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await?;
            let Some(message) = message else { break };
            letters.push(DeadLetter::from_delivery(&message.delivery));
        }
        letters.sort_by_key(|letter| {
            let position = letter.envelope.as_ref().map(|e| e.global_position);
            (position.is_none(), position)
        });
        Ok(letters)
    }

    /// Publishes a dead letter to `queue` (through the default exchange) and removes
    /// it from the dead-letter queue once the broker confirmed it.
    async fn send_back(&self, letter: &DeadLetter, queue: &str) -> Result<(), DlqError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // A split consumer's partition exchange picks the partition by stream; a
        // plain queue takes it through the default exchange.
        let (exchange, routing_key) = match &letter.replay_exchange {
            Some(exchange) => (exchange.as_str(), ""),
            None => ("", queue),
        };
        let confirm = self
            .channel
            .basic_publish(
                amqp::short_string(exchange),
                amqp::short_string(routing_key),
                options,
                &letter.payload,
                letter.properties.clone(),
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => {}
            _ => return Err(DlqError::Refused(format!("{queue} (no such queue?)"))),
        }
        self.channel
            .basic_ack(letter.delivery_tag, BasicAckOptions::default())
            .await?;
        Ok(())
    }

    /// Returns every message still held to the queue and closes. Closing the channel
    /// puts them back at the head in their order; a `basic.nack` with requeue would
    /// put a quorum queue's messages behind any that arrived meanwhile.
    async fn give_back(self) -> Result<(), DlqError> {
        self.channel.close(200, "done".into()).await?;
        self.connection.close(200, "done".into()).await?;
        Ok(())
    }
}

impl DeadLetter {
    fn from_delivery(delivery: &lapin::message::Delivery) -> DeadLetter {
        let properties = delivery.properties.clone();
        let headers = properties.headers().clone().unwrap_or_default();
        let text = |name| amqp::header_string(&headers, name);
        let time = |name| {
            amqp::header_integer(&headers, name).and_then(DateTime::<Utc>::from_timestamp_millis)
        };
        let envelope = Envelope::from_properties(&properties).ok();
        DeadLetter {
            message_id: properties
                .message_id()
                .as_ref()
                .and_then(|id| Uuid::parse_str(id.as_str()).ok()),
            message_type: properties.kind().as_ref().map(|kind| kind.to_string()),
            queue: text(dead_letter_headers::QUEUE),
            exchange: text(dead_letter_headers::EXCHANGE),
            routing_key: text(dead_letter_headers::ROUTING_KEY),
            error: text(dead_letter_headers::ERROR),
            attempts: amqp::header_integer(&headers, dead_letter_headers::ATTEMPTS),
            parked_behind: text(dead_letter_headers::PARKED_BEHIND)
                .and_then(|id| Uuid::parse_str(&id).ok()),
            replay_exchange: text(dead_letter_headers::REPLAY_EXCHANGE),
            first_failed_at: time(dead_letter_headers::FIRST_FAILED_AT),
            last_failed_at: time(dead_letter_headers::LAST_FAILED_AT),
            payload: delivery.data.clone(),
            envelope,
            properties,
            delivery_tag: delivery.delivery_tag,
        }
    }
}
