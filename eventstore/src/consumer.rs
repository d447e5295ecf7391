//! The consumer runtime that projections, sagas and command handlers run on.
//!
//! A [`Consumer`] owns one quorum queue (`<service>.<name>`) and hands each message to
//! a [`Handler`] inside a [`StoreTransaction`] that also claims the message's inbox row,
//! so a message's effect and the record that it was applied commit together: a second
//! delivery finds the row and changes nothing.
//!
//! Order: messages with one stream id (an event's stream, a command's ordering key) are
//! handled one at a time, in delivery order; different streams run in parallel, up to
//! `concurrency`. A failing handler is retried in process (3 attempts, 100 ms then
//! 200 ms apart), blocking only its own stream. After the last attempt the message goes
//! to `dlq.<service>.retry` with the error, the attempt count and its original routing
//! in headers, and its stream is parked: the stream's later messages follow it into the
//! dead-letter queue untried, so none is applied ahead of it, until the dead letter is
//! replayed successfully or skipped ([`unpark`]). An undecodable message goes straight
//! to the dead-letter queue. A lost broker connection is re-established with backoff;
//! unacknowledged messages come back and the inbox absorbs the repeats.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use futures_util::{FutureExt, StreamExt};
use lapin::Confirmation;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::amqp::{self, COMMANDS_EXCHANGE, EVENTS_EXCHANGE, Envelope, dead_letter_headers};
use crate::codec::{CodecError, SchemaRegistry};
use crate::metrics::Metrics;
use crate::store::{EventStore, StoreTransaction};

/// What a handler can fail with; any error counts as a failed attempt.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

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

    /// The event streams `handle` will append to, which the runtime locks (see
    /// [`StoreTransaction::lock_streams`]) before it claims the message. A handler that
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

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub service: String,
    /// The consumer's name; its queue is `<service>.<name>`.
    pub name: String,
    /// (exchange, routing pattern) pairs the queue is bound with.
    pub bindings: Vec<(String, String)>,
    pub amqp_url: String,
    /// Unacknowledged messages the broker may hand over at once.
    pub prefetch: u16,
    /// Streams handled at the same time.
    pub concurrency: usize,
    /// Database connections the consumer keeps open for its handlers (at most
    /// `concurrency` are used).
    pub connections: usize,
    /// Handler attempts before a message is dead-lettered.
    pub max_attempts: u32,
    /// The pause after the first failed attempt; it doubles after each further one.
    pub first_retry_delay: Duration,
}

impl ConsumerConfig {
    /// A consumer of the events whose routing keys match `patterns`
    /// (`<service>.<EventType>`, `#` and `*` allowed).
    pub fn events(service: &str, name: &str, amqp_url: &str, patterns: &[&str]) -> Self {
        let bindings = patterns
            .iter()
            .map(|pattern| (EVENTS_EXCHANGE.to_owned(), (*pattern).to_owned()))
            .collect();
        Self::with_bindings(service, name, amqp_url, bindings)
    }

    /// The consumer of a service's own command queue, `<service>.commands`.
    pub fn commands(service: &str, amqp_url: &str) -> Self {
        let bindings = vec![(COMMANDS_EXCHANGE.to_owned(), format!("{service}.#"))];
        Self::with_bindings(service, "commands", amqp_url, bindings)
    }

    fn with_bindings(
        service: &str,
        name: &str,
        amqp_url: &str,
        bindings: Vec<(String, String)>,
    ) -> Self {
        ConsumerConfig {
            service: service.to_owned(),
            name: name.to_owned(),
            bindings,
            amqp_url: amqp_url.to_owned(),
            prefetch: 256,
            concurrency: 32,
            connections: 8,
            max_attempts: 3,
            first_retry_delay: Duration::from_millis(100),
        }
    }

    /// The queue, which also names the consumer in the inbox and in metrics.
    pub fn queue(&self) -> String {
        format!("{}.{}", self.service, self.name)
    }

    /// Declares the service's topology and this consumer's queue with its bindings.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        amqp::declare_service(channel, &self.service).await?;
        let bindings: Vec<(&str, &str)> = self
            .bindings
            .iter()
            .map(|(exchange, pattern)| (exchange.as_str(), pattern.as_str()))
            .collect();
        amqp::declare_queue(channel, &self.queue(), &bindings, true).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    CancelledByBroker,
}

/// Runs a [`Handler`] on a queue. See the module documentation.
pub struct Consumer<H> {
    shared: Arc<Shared<H>>,
}

struct Shared<H> {
    config: ConsumerConfig,
    connections: Connections,
    queue: String,
    store: EventStore,
    registry: SchemaRegistry,
    handler: H,
    metrics: Metrics,
    cancel: CancellationToken,
}

impl<H: Handler> Consumer<H> {
    pub fn new(
        config: ConsumerConfig,
        store: EventStore,
        registry: SchemaRegistry,
        handler: H,
        metrics: Metrics,
    ) -> Self {
        let queue = config.queue();
        metrics.track_consumer(&queue);
        let connections = Connections {
            options: store.pool().connect_options().as_ref().clone(),
            idle: std::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(
                config.connections.clamp(1, config.concurrency.max(1)),
            ),
        };
        Consumer {
            shared: Arc::new(Shared {
                connections,
                config,
                queue,
                store,
                registry,
                handler,
                metrics,
                cancel: CancellationToken::new(),
            }),
        }
    }

    /// Declares the topology and consumes until `cancel` fires, reconnecting with
    /// backoff whenever the broker connection is lost. On cancel it stops taking
    /// messages, lets the ones being handled finish, and returns.
    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::info_span!("consumer", queue = %self.shared.queue);
        async move {
            // Tasks watch the consumer's own token, so it can be cancelled from here.
            let _stop_tasks = self.shared.cancel.clone().drop_guard();
            let mut delays = reconnect_backoff();
            while !cancel.is_cancelled() {
                let started = Instant::now();
                match self.session(&cancel).await {
                    Ok(()) => return,
                    Err(error) => {
                        if started.elapsed() > Duration::from_secs(10) {
                            delays = reconnect_backoff();
                        }
                        let delay = delays.next().unwrap_or(Duration::from_secs(5));
                        tracing::warn!(%error, ?delay, "consumer lost its broker session; reconnecting");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One broker connection's worth of consuming. `Ok` means cancelled.
    async fn session(&self, cancel: &CancellationToken) -> Result<(), ConsumerError> {
        let shared = &self.shared;
        let config = &shared.config;
        let connection = amqp::connect(&config.amqp_url, &shared.queue).await?;
        let channel = connection.create_channel().await?;
        config.declare(&channel).await?;
        amqp::set_prefetch(&channel, config.prefetch).await?;
        let channels = Arc::new(SessionChannels {
            dead_letters: amqp::confirming_channel(&connection).await?,
            consume: channel.clone(),
        });
        let mut deliveries = channel
            .basic_consume(
                shared.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!("consuming");
        let (done_sender, mut done) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut dispatcher = Dispatcher::new(config.concurrency);
        let start = |(key, delivery): (String, Delivery)| {
            let done = DoneGuard {
                key: Some(key),
                sender: done_sender.clone(),
            };
            let (shared, channels) = (self.shared.clone(), channels.clone());
            tokio::spawn(
                async move {
                    process(&shared, &channels, delivery).await;
                    drop(done);
                }
                .in_current_span(),
            );
        };
        let outcome = loop {
            tokio::select! {
                biased;
                Some(key) = done.recv() => dispatcher.finished(&key).into_iter().for_each(&start),
                _ = cancel.cancelled() => break Ok(()),
                delivery = deliveries.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let key = ordering_key(&delivery);
                        dispatcher.arrived(key, delivery).into_iter().for_each(&start);
                    }
                    Some(Err(error)) => break Err(ConsumerError::Broker(error)),
                    None => break Err(ConsumerError::CancelledByBroker),
                },
            }
        };
        // Finish what is in hand; what waits behind it was never started and goes
        // back to the queue when the channel closes.
        if cancel.is_cancelled() {
            shared.cancel.cancel();
        }
        while dispatcher.running() > 0 {
            match done.recv().await {
                Some(_) => dispatcher.stop_one(),
                None => break,
            }
        }
        let _ = connection.close(200, "consumer stopping".into()).await;
        outcome
    }
}

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
    sqlx::query("DELETE FROM parked_messages WHERE consumer = $1 AND stream_id = $2")
        .bind(consumer)
        .bind(stream_id)
        .execute(&mut *transaction)
        .await?;
    let deleted = sqlx::query("DELETE FROM parked_streams WHERE consumer = $1 AND stream_id = $2")
        .bind(consumer)
        .bind(stream_id)
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(deleted.rows_affected() > 0)
}

/// Moves a parked stream on to its next parked message, or unparks it when none is
/// left. Returns the message the stream now waits for.
async fn advance_park(
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

/// The consumer's own database connections, kept open between messages. Handlers run
/// on these rather than on the pool because the pool pings every connection it gets
/// back, which costs a round trip per message (about a fifth of the consumer's
/// database work).
struct Connections {
    options: sqlx::postgres::PgConnectOptions,
    idle: std::sync::Mutex<Vec<sqlx::PgConnection>>,
    permits: tokio::sync::Semaphore,
}

impl Connections {
    async fn take(
        &self,
    ) -> Result<(tokio::sync::SemaphorePermit<'_>, sqlx::PgConnection), sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.lock().pop();
        let connection = match idle {
            Some(connection) => connection,
            None => <sqlx::PgConnection as sqlx::Connection>::connect_with(&self.options).await?,
        };
        Ok((permit, connection))
    }

    fn give_back(&self, connection: sqlx::PgConnection) {
        self.lock().push(connection);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<sqlx::PgConnection>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The channels of one broker session, shared by its message tasks.
struct SessionChannels {
    consume: Channel,
    /// With publisher confirms: a message is acknowledged only once its dead letter is
    /// safely in the dead-letter queue.
    dead_letters: Channel,
}

impl SessionChannels {
    fn alive(&self) -> bool {
        self.consume.status().connected() && self.dead_letters.status().connected()
    }
}

/// Tells the dispatcher a key is free again, even if the task panicked.
struct DoneGuard {
    key: Option<String>,
    sender: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let _ = self.sender.send(key);
        }
    }
}

/// The key that serialises a delivery: its stream id, or for a message without one
/// (it will be dead-lettered as malformed) its delivery tag, which serialises nothing.
fn ordering_key(delivery: &Delivery) -> String {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| amqp::header_string(headers, amqp::header::STREAM_ID))
        .unwrap_or_else(|| format!("\u{0}delivery-{}", delivery.delivery_tag))
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// What claiming a message found.
enum Claim {
    /// Applied by the handler; the transaction committed.
    Applied,
    /// Already applied by an earlier delivery.
    Duplicate,
    /// Its stream is parked behind this earlier dead letter.
    Parked(Uuid),
    /// The consumer already applied a later version of its stream.
    OutOfOrder,
}

enum Failure {
    /// The database or the network failed under us (connection lost, say): retried
    /// without counting an attempt, since the handler never ran to a verdict.
    Infrastructure(String),
    /// The handler (or decoding for it) failed: counts as an attempt.
    Handler(String),
}

impl Failure {
    /// Sorts a database error: lost connections are infrastructure, anything else
    /// (a constraint, a serialization failure at commit) is the attempt's failure.
    fn from_database(error: &sqlx::Error) -> Failure {
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
            Failure::Handler(error.to_string())
        }
    }

    fn from_store(error: crate::StoreError) -> Failure {
        match &error {
            crate::StoreError::Database(database) => Failure::from_database(database),
            _ => Failure::Handler(error.to_string()),
        }
    }
}

/// Whether and how a dead letter parks its stream.
#[derive(Clone, Copy)]
enum Park {
    /// Nothing to park: the message has no usable stream.
    No,
    /// This message failed: its stream waits for it (or, if the stream already waits
    /// for another, it queues behind that one).
    Stream,
    /// The stream already waits for this earlier dead letter; queue behind it.
    Behind(Uuid),
}

/// Handles one delivery to its end: acknowledged once applied, skipped as a duplicate,
/// or safely in the dead-letter queue; or left unacknowledged (to be redelivered) when
/// the session or the consumer stops first.
async fn process<H: Handler>(shared: &Shared<H>, channels: &SessionChannels, delivery: Delivery) {
    let received = Instant::now();
    let envelope = match Envelope::from_properties(&delivery.properties) {
        Ok(envelope) => envelope,
        Err(why) => {
            let error = format!("malformed message: {why}");
            let letter = DeadLetter::new(&delivery, None, Park::No, error, 0);
            return dead_letter(shared, channels, letter).await;
        }
    };
    let mut attempts = 0;
    let mut infrastructure_delays = reconnect_backoff();
    loop {
        let outcome = match decode(shared, &delivery, &envelope).await {
            Ok(message) => try_once(shared, &message).await,
            Err(Failure::Handler(error)) => {
                let error = format!("undecodable payload: {error}");
                let letter = DeadLetter::new(&delivery, Some(&envelope), Park::Stream, error, 0);
                return dead_letter(shared, channels, letter).await;
            }
            Err(failure) => Err(failure),
        };
        let letter = |park, error, attempts| {
            DeadLetter::new(&delivery, Some(&envelope), park, error, attempts)
        };
        match outcome {
            Ok(Claim::Applied) => {
                if acknowledge(&delivery).await {
                    shared.metrics.consumed(&shared.queue, received.elapsed());
                }
                return;
            }
            Ok(Claim::Duplicate) => {
                if acknowledge(&delivery).await {
                    shared.metrics.duplicate(&shared.queue);
                }
                return;
            }
            Ok(Claim::Parked(behind)) => {
                let error = format!("stream {} is parked behind {behind}", envelope.stream_id);
                return dead_letter(shared, channels, letter(Park::Behind(behind), error, 0)).await;
            }
            Ok(Claim::OutOfOrder) => {
                // Never applied: parked until an operator looks (replaying it cannot
                // help; skipping it lets the stream flow on).
                let error = format!(
                    "out of order: a later version of stream {} was already applied",
                    envelope.stream_id
                );
                return dead_letter(shared, channels, letter(Park::Stream, error, attempts)).await;
            }
            Err(Failure::Infrastructure(error)) => {
                if !channels.alive() {
                    return; // redelivered on the next session
                }
                let delay = infrastructure_delays
                    .next()
                    .unwrap_or(Duration::from_secs(5));
                tracing::warn!(%error, ?delay, message_id = %envelope.message_id, "cannot reach the database; retrying");
                if !pause(shared, delay).await {
                    return;
                }
            }
            Err(Failure::Handler(error)) => {
                attempts += 1;
                shared.metrics.failed(&shared.queue);
                tracing::warn!(%error, attempt = attempts, message_id = %envelope.message_id, "handler failed");
                if attempts >= shared.config.max_attempts {
                    return dead_letter(shared, channels, letter(Park::Stream, error, attempts))
                        .await;
                }
                let delay = shared.config.first_retry_delay * 2u32.saturating_pow(attempts - 1);
                if !pause(shared, delay).await {
                    return;
                }
            }
        }
    }
}

/// Sleeps, unless the consumer stops first (then false).
async fn pause<H>(shared: &Shared<H>, delay: Duration) -> bool {
    tokio::select! {
        _ = shared.cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

async fn acknowledge(delivery: &Delivery) -> bool {
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
    let (_, value) = decoded.map_err(|error| Failure::Handler(error.to_string()))?;
    Ok(Message {
        envelope: envelope.clone(),
        value,
        payload: delivery.data.clone(),
        exchange: delivery.exchange.to_string(),
        routing_key: delivery.routing_key.to_string(),
        redelivered: delivery.redelivered,
    })
}

/// Claims the inbox row (unless the message is a duplicate, parked behind another, or
/// older than what was applied), then runs the handler in the same transaction. The
/// message a parked stream waits for (a dead letter being replayed) is the one message
/// it lets through; when that succeeds, the stream moves on to its next parked message
/// in the same transaction.
const CLAIM: &str = "
WITH parked AS (
    SELECT blocking_message_id FROM parked_streams WHERE consumer = $1 AND stream_id = $3
), claimed AS (
    INSERT INTO inbox (consumer, message_id)
    SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM parked WHERE blocking_message_id <> $2)
    ON CONFLICT DO NOTHING
    RETURNING message_id
), advanced AS (
    INSERT INTO consumer_streams (consumer, stream_id, last_version)
    SELECT $1, $3, $4 FROM claimed WHERE $4::bigint IS NOT NULL
    ON CONFLICT (consumer, stream_id) DO UPDATE SET last_version = excluded.last_version
        WHERE consumer_streams.last_version < excluded.last_version
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM claimed) AS claimed,
       (SELECT blocking_message_id FROM parked) AS parked_behind,
       ($4::bigint IS NULL OR EXISTS (SELECT 1 FROM advanced)) AS in_order";

async fn try_once<H: Handler>(shared: &Shared<H>, message: &Message) -> Result<Claim, Failure> {
    let (_permit, mut connection) = shared
        .connections
        .take()
        .await
        .map_err(|error| Failure::from_database(&error))?;
    let outcome = claim_and_handle(shared, message, &mut connection).await;
    // After a failure the connection may be mid-transaction or broken: let it go.
    if outcome.is_ok() {
        shared.connections.give_back(connection);
    }
    outcome
}

async fn claim_and_handle<H: Handler>(
    shared: &Shared<H>,
    message: &Message,
    connection: &mut sqlx::PgConnection,
) -> Result<Claim, Failure> {
    let envelope = &message.envelope;
    let database = |error: sqlx::Error| Failure::from_database(&error);
    let mut transaction = shared
        .store
        .begin_on(connection)
        .await
        .map_err(Failure::from_store)?;
    let streams = shared.handler.streams_to_lock(message);
    if !streams.is_empty() {
        // Before the claim writes anything: the transaction id (which orders global
        // positions) is then assigned after the streams' previous writer committed.
        let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
        transaction
            .lock_streams(&streams)
            .await
            .map_err(Failure::from_store)?;
    }
    let row = sqlx::query(CLAIM)
        .bind(shared.queue.as_str())
        .bind(envelope.message_id)
        .bind(envelope.stream_id.as_str())
        .bind(envelope.stream_version)
        .fetch_one(transaction.connection())
        .await
        .map_err(database)?;
    let claimed: bool = row.try_get("claimed").map_err(database)?;
    let parked_behind: Option<Uuid> = row.try_get("parked_behind").map_err(database)?;
    let in_order: bool = row.try_get("in_order").map_err(database)?;
    let verdict = match parked_behind {
        Some(behind) if behind != envelope.message_id => Some(Claim::Parked(behind)),
        _ if !claimed => Some(Claim::Duplicate),
        _ if !in_order => Some(Claim::OutOfOrder),
        _ => None,
    };
    if let Some(verdict) = verdict {
        transaction.rollback().await.map_err(Failure::from_store)?;
        return Ok(verdict);
    }
    // A panicking handler counts as a failed attempt; it must not free the stream
    // for the next message while this one is still unapplied.
    let handled = AssertUnwindSafe(shared.handler.handle(message, &mut transaction))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err("the handler panicked".into()));
    if let Err(error) = handled {
        // Dropping the transaction rolls back the claim with the handler's writes.
        drop(transaction);
        return Err(Failure::Handler(error.to_string()));
    }
    if parked_behind.is_some() {
        advance_park(transaction.connection(), &shared.queue, &envelope.stream_id)
            .await
            .map_err(database)?;
    }
    transaction.commit().await.map_err(Failure::from_store)?;
    shared.handler.committed(message);
    Ok(Claim::Applied)
}

/// A delivery on its way to the dead-letter queue, with why.
struct DeadLetter<'a> {
    delivery: &'a Delivery,
    /// Known unless the message was malformed.
    envelope: Option<&'a Envelope>,
    park: Park,
    error: String,
    attempts: u32,
}

impl<'a> DeadLetter<'a> {
    fn new(
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
async fn dead_letter<H>(shared: &Shared<H>, channels: &SessionChannels, letter: DeadLetter<'_>) {
    let mut delays = reconnect_backoff();
    loop {
        match try_dead_letter(shared, channels, &letter).await {
            Ok(()) => {
                shared.metrics.dead_lettered(&shared.queue);
                tracing::warn!(
                    error = letter.error,
                    attempts = letter.attempts,
                    "dead-lettered"
                );
                acknowledge(letter.delivery).await;
                return;
            }
            Err(failure) => {
                if !channels.alive() {
                    return;
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %failure, ?delay, "could not dead-letter; retrying");
                if !pause(shared, delay).await {
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
    set(
        dead_letter_headers::EXCHANGE,
        amqp::long_string(delivery.exchange.as_str()),
    );
    set(
        dead_letter_headers::ROUTING_KEY,
        amqp::long_string(delivery.routing_key.as_str()),
    );
    set(
        dead_letter_headers::QUEUE,
        amqp::long_string(shared.queue.as_str()),
    );
    if let Park::Behind(behind) = letter.park {
        set(
            dead_letter_headers::PARKED_BEHIND,
            amqp::long_string(behind.to_string()),
        );
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

/// Decides which deliveries may start: one at a time per key, at most `concurrency`
/// at once, each key's deliveries in arrival order. Generic so it can be tested
/// without a broker.
struct Dispatcher<T> {
    concurrency: usize,
    running: usize,
    /// Keys with a delivery being handled, and what waits behind it.
    busy: HashMap<String, VecDeque<T>>,
    /// Deliveries free to start once a slot frees up, oldest first.
    ready: VecDeque<(String, T)>,
}

impl<T> Dispatcher<T> {
    fn new(concurrency: usize) -> Self {
        Dispatcher {
            concurrency: concurrency.max(1),
            running: 0,
            busy: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    fn running(&self) -> usize {
        self.running
    }

    /// A delivery arrived; returns what may start now.
    fn arrived(&mut self, key: String, item: T) -> Vec<(String, T)> {
        match self.busy.get_mut(&key) {
            Some(waiting) => waiting.push_back(item),
            None => {
                self.busy.insert(key.clone(), VecDeque::new());
                self.ready.push_back((key, item));
            }
        }
        self.startable()
    }

    /// The delivery of `key` is done; returns what may start now.
    fn finished(&mut self, key: &str) -> Vec<(String, T)> {
        self.running -= 1;
        match self.busy.get_mut(key).and_then(VecDeque::pop_front) {
            Some(next) => self.ready.push_back((key.to_owned(), next)),
            None => {
                self.busy.remove(key);
            }
        }
        self.startable()
    }

    /// A delivery ended while shutting down: nothing new starts.
    fn stop_one(&mut self) {
        self.running -= 1;
    }

    fn startable(&mut self) -> Vec<(String, T)> {
        let mut start = Vec::new();
        while self.running < self.concurrency {
            let Some(next) = self.ready.pop_front() else {
                break;
            };
            self.running += 1;
            start.push(next);
        }
        start
    }
}

#[cfg(test)]
mod tests {
    use super::Dispatcher;

    fn keys(started: Vec<(String, u32)>) -> Vec<(String, u32)> {
        started
    }

    #[test]
    fn one_key_runs_one_at_a_time_in_arrival_order() {
        let mut dispatcher = Dispatcher::new(8);
        assert_eq!(
            keys(dispatcher.arrived("a".into(), 1)),
            vec![("a".into(), 1)]
        );
        assert!(dispatcher.arrived("a".into(), 2).is_empty());
        assert!(dispatcher.arrived("a".into(), 3).is_empty());
        assert_eq!(dispatcher.arrived("b".into(), 9), vec![("b".into(), 9)]);
        assert_eq!(dispatcher.finished("a"), vec![("a".into(), 2)]);
        assert_eq!(dispatcher.finished("a"), vec![("a".into(), 3)]);
        assert!(dispatcher.finished("a").is_empty());
        assert_eq!(dispatcher.running(), 1);
        // The key is free again.
        assert_eq!(dispatcher.arrived("a".into(), 4), vec![("a".into(), 4)]);
    }

    #[test]
    fn concurrency_caps_running_keys_and_frees_in_arrival_order() {
        let mut dispatcher = Dispatcher::new(2);
        assert_eq!(dispatcher.arrived("a".into(), 1).len(), 1);
        assert_eq!(dispatcher.arrived("b".into(), 2).len(), 1);
        assert!(dispatcher.arrived("c".into(), 3).is_empty());
        assert!(dispatcher.arrived("a".into(), 4).is_empty());
        // "c" arrived before a's second delivery became ready.
        assert_eq!(dispatcher.finished("a"), vec![("c".into(), 3)]);
        assert_eq!(dispatcher.finished("b"), vec![("a".into(), 4)]);
        assert_eq!(dispatcher.running(), 2);
    }
}
