//! The consumer runtime that projections, sagas and command handlers run on.
//!
//! A [`Consumer`] owns one quorum queue (`<service>.<name>`) and hands each message to
//! a [`Handler`] inside a [`StoreTransaction`] that also claims the message's inbox row,
//! so a message's effect and the record that it was applied commit together: a second
//! delivery finds the row and changes nothing.
//!
//! Order: messages with one stream id (an event's stream, a command's ordering key) are
//! handled one at a time, in delivery order; different streams run in parallel, up to
//! `concurrency` transactions at once. Messages of different streams that are ready
//! while every transaction is busy go together into the next one (up to
//! `batch_size`): one claim statement, one commit, one connection for all of them, so
//! under load the per-message cost of a transaction is divided, and an idle consumer
//! still handles each message at once. If a batch fails, each of its messages is tried
//! again on its own, so batching never changes a message's outcome. A failing handler
//! is retried in process (3 attempts, 100 ms then 200 ms apart), blocking only its own
//! stream. After the last attempt the message goes
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
    /// Transactions in flight at once, each on a connection the consumer keeps open.
    pub concurrency: usize,
    /// Most messages (of different streams) applied in one transaction. Messages that
    /// are ready while every transaction slot is busy go together, which divides the
    /// commits and round trips per message under load and costs nothing when idle.
    pub batch_size: usize,
    /// Queues the consumer is split into, each with a share of the streams (by a hash
    /// of the stream id), so instances of a service can share the work: each takes the
    /// partitions assigned to it ([`Consumer::with_assignment`]). 1: one queue.
    pub partitions: u16,
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
            concurrency: 4,
            batch_size: 64,
            partitions: 1,
            max_attempts: 3,
            first_retry_delay: Duration::from_millis(100),
        }
    }

    /// The queue, which also names the consumer in the inbox and in metrics.
    pub fn queue(&self) -> String {
        format!("{}.{}", self.service, self.name)
    }

    /// The queue partition `partition` is read from (the consumer's queue itself when
    /// it is not split).
    pub fn partition_queue(&self, partition: u16) -> String {
        if self.partitions <= 1 {
            self.queue()
        } else {
            amqp::partition_queue(&self.queue(), partition)
        }
    }

    /// Declares the service's topology and this consumer's queue (or partitions) with
    /// its bindings.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        amqp::declare_service(channel, &self.service).await?;
        let bindings: Vec<(&str, &str)> = self
            .bindings
            .iter()
            .map(|(exchange, pattern)| (exchange.as_str(), pattern.as_str()))
            .collect();
        if self.partitions <= 1 {
            amqp::declare_queue(channel, &self.queue(), &bindings, true).await
        } else {
            amqp::declare_partitioned(channel, &self.queue(), &bindings, self.partitions).await
        }
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
    /// The partitions this instance takes, when the consumer is split; all of them
    /// when no one says.
    assignment: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
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
            permits: tokio::sync::Semaphore::new(config.concurrency.max(1)),
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
            assignment: None,
        }
    }

    /// Takes only the partitions `assignment` names (and follows its changes: a
    /// partition let go is handed back to the broker, whose single-active-consumer
    /// queue then delivers to the instance that took it up, starting with what was
    /// unacknowledged, in order).
    pub fn with_assignment(mut self, assignment: tokio::sync::watch::Receiver<Vec<u16>>) -> Self {
        self.assignment = Some(assignment);
        self
    }

    /// Declares the topology and consumes until `cancel` fires, reconnecting with
    /// backoff whenever the broker connection is lost. On cancel it stops taking
    /// messages, lets the ones being handled finish, and returns.
    pub async fn run(mut self, cancel: CancellationToken) {
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

    /// The partitions to consume now.
    fn wanted(&self) -> Vec<u16> {
        let partitions = self.shared.config.partitions.max(1);
        match &self.assignment {
            Some(assignment) if partitions > 1 => assignment
                .borrow()
                .iter()
                .copied()
                .filter(|p| *p < partitions)
                .collect(),
            _ => (0..partitions).collect(),
        }
    }

    /// Starts consuming the partitions of `wanted` not yet consumed, each on a
    /// channel of its own, and lets go of those no longer wanted by closing their
    /// channel (which returns what they held unacknowledged to the queue's head).
    async fn follow(
        &self,
        connection: &lapin::Connection,
        subscribed: &mut HashMap<u16, Channel>,
        deliveries: &mut futures_util::stream::SelectAll<PartitionDeliveries>,
        wanted: &[u16],
    ) -> Result<(), ConsumerError> {
        let config = &self.shared.config;
        let gone: Vec<u16> = subscribed
            .keys()
            .copied()
            .filter(|p| !wanted.contains(p))
            .collect();
        for partition in gone {
            if let Some(channel) = subscribed.remove(&partition) {
                let _ = channel.close(200, "partition handed over".into()).await;
                tracing::info!(partition, "let go of a partition");
            }
        }
        for &partition in wanted {
            if subscribed.contains_key(&partition) {
                continue;
            }
            let channel = connection.create_channel().await?;
            amqp::set_prefetch(&channel, config.prefetch).await?;
            let queue = config.partition_queue(partition);
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            // Tagged with the partition, and ending with a mark of its end (None), so
            // a partition the broker stops delivering is noticed.
            let tagged = consumer
                .map(move |delivery| (partition, Some(delivery)))
                .chain(futures_util::stream::once(async move { (partition, None) }));
            deliveries.push(Box::pin(tagged));
            subscribed.insert(partition, channel);
        }
        Ok(())
    }

    /// One broker connection's worth of consuming. `Ok` means cancelled.
    async fn session(&mut self, cancel: &CancellationToken) -> Result<(), ConsumerError> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let connection = amqp::connect(&config.amqp_url, &shared.queue).await?;
        let channel = connection.create_channel().await?;
        config.declare(&channel).await?;
        let channels = Arc::new(SessionChannels {
            dead_letters: amqp::confirming_channel(&connection).await?,
            consume: channel.clone(),
        });
        let mut subscribed: HashMap<u16, Channel> = HashMap::new();
        let mut deliveries = futures_util::stream::SelectAll::new();
        let wanted = self.wanted();
        self.follow(&connection, &mut subscribed, &mut deliveries, &wanted)
            .await?;
        tracing::info!("consuming");
        let (done_sender, mut done) = tokio::sync::mpsc::unbounded_channel::<Done>();
        let mut dispatcher = Dispatcher::new(config.concurrency, config.batch_size);
        let start = |batch: Vec<(String, Delivery)>| {
            let keys = batch.iter().map(|(key, _)| key.clone()).collect();
            let mut done = DoneGuard::new(keys, true, done_sender.clone());
            let (shared, channels) = (self.shared.clone(), channels.clone());
            let sender = done_sender.clone();
            tokio::spawn(
                async move {
                    let retries = process_batch(&shared, &channels, batch).await;
                    // Messages that must be retried leave the batch's slot to the next
                    // batch and keep only their own stream busy while they wait.
                    let guards: Vec<DoneGuard> = retries
                        .iter()
                        .map(|retry| {
                            done.hand_off(&retry.key);
                            DoneGuard::new(vec![retry.key.clone()], false, sender.clone())
                        })
                        .collect();
                    drop(done);
                    for (retry, guard) in retries.into_iter().zip(guards) {
                        let (shared, channels) = (shared.clone(), channels.clone());
                        tokio::spawn(
                            async move {
                                process(&shared, &channels, retry.delivery, retry.attempts).await;
                                drop(guard);
                            }
                            .in_current_span(),
                        );
                    }
                }
                .in_current_span(),
            );
        };
        let outcome = loop {
            tokio::select! {
                biased;
                Some(finished) = done.recv() => {
                    dispatcher.finished(finished);
                    dispatcher.startable().into_iter().for_each(&start);
                }
                _ = cancel.cancelled() => break Ok(()),
                changed = assignment_changed(&mut self.assignment) => {
                    if changed.is_err() {
                        // The assignment's owner is gone: keep what is taken.
                        self.assignment = None;
                        continue;
                    }
                    let wanted = self.wanted();
                    let followed = self.follow(&connection, &mut subscribed, &mut deliveries, &wanted);
                    if let Err(error) = followed.await {
                        break Err(error);
                    }
                }
                delivery = deliveries.next(), if !deliveries.is_empty() => {
                    // Take every delivery already here before starting any, so what
                    // arrived together can go in one transaction.
                    let mut next = Some(delivery);
                    let mut taken = 0;
                    let mut lost = None;
                    while let Some(delivery) = next.take() {
                        match delivery {
                            Some((_, Some(Ok(delivery)))) => {
                                let key = ordering_key(&delivery);
                                dispatcher.arrived(key, delivery);
                            }
                            // The end of a partition let go of on purpose.
                            Some((partition, _)) if !subscribed.contains_key(&partition) => {}
                            Some((_, Some(Err(error)))) => lost = Some(ConsumerError::Broker(error)),
                            // A partition still taken stopped delivering: start over.
                            Some((_, None)) => lost = Some(ConsumerError::CancelledByBroker),
                            // Every partition let go of (the set is empty): nothing to do.
                            None => {}
                        }
                        taken += 1;
                        if lost.is_none() && taken < config.batch_size {
                            next = deliveries.next().now_or_never();
                        }
                    }
                    dispatcher.startable().into_iter().for_each(&start);
                    if let Some(error) = lost {
                        break Err(error);
                    }
                }
            }
        };
        // Finish what is in hand; what waits behind it was never started and goes
        // back to the queue when the channel closes.
        if cancel.is_cancelled() {
            shared.cancel.cancel();
        }
        while dispatcher.in_flight() > 0 {
            match done.recv().await {
                Some(finished) => dispatcher.finished(finished),
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

/// One partition's deliveries, tagged with it, then `None` when it ends.
type PartitionDeliveries = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = (u16, Option<Result<Delivery, lapin::Error>>)> + Send>,
>;

/// Resolves when the assignment changes (or its sender is gone); never without one.
async fn assignment_changed(
    assignment: &mut Option<tokio::sync::watch::Receiver<Vec<u16>>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match assignment {
        Some(assignment) => assignment.changed().await,
        None => std::future::pending().await,
    }
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

/// What a task tells the dispatcher when it ends.
#[derive(Debug, PartialEq)]
struct Done {
    /// Streams free for their next message.
    keys: Vec<String>,
    /// A batch's slot is free (false: a retry task ended).
    slot: bool,
    /// Retry tasks the batch started, which keep their streams busy.
    handed_off: usize,
}

/// Tells the dispatcher a task ended, even if it panicked.
struct DoneGuard {
    done: Option<Done>,
    sender: tokio::sync::mpsc::UnboundedSender<Done>,
}

impl DoneGuard {
    fn new(
        keys: Vec<String>,
        slot: bool,
        sender: tokio::sync::mpsc::UnboundedSender<Done>,
    ) -> Self {
        let done = Done {
            keys,
            slot,
            handed_off: 0,
        };
        DoneGuard {
            done: Some(done),
            sender,
        }
    }

    /// `key` stays busy after this task: a retry task took it over.
    fn hand_off(&mut self, key: &str) {
        if let Some(done) = self.done.as_mut()
            && let Some(index) = done.keys.iter().position(|held| held == key)
        {
            done.keys.swap_remove(index);
            done.handed_off += 1;
        }
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = self.sender.send(done);
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

/// A delivery whose first try failed, to be tried again on its own.
struct Retry {
    key: String,
    delivery: Delivery,
    /// Failed attempts so far (a failed batch counts none).
    attempts: u32,
}

/// Tries a batch of deliveries of different streams once, in one transaction, and
/// settles every message that reached a verdict (applied, duplicate, dead-lettered).
/// Returns those to try again on their own: all of them if the batch failed (a handler
/// error, a lost connection, a deadlock between batches), so a batch never changes
/// what happens to a message, only how many commits it shares; attempts are counted
/// per message, by [`process`].
async fn process_batch<H: Handler>(
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
            Err(Failure::Handler(error)) => {
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
            if let (Some(index), Failure::Handler(error)) = (culprit, &failure) {
                let (key, delivery, message) = decoded.swap_remove(index);
                shared.metrics.failed(&shared.queue);
                let message_id = message.envelope.message_id;
                tracing::warn!(%error, attempt = 1, %message_id, "handler failed");
                if shared.config.max_attempts <= 1 {
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
                let (Failure::Handler(error) | Failure::Infrastructure(error)) = &failure;
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
async fn process<H: Handler>(
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
    let mut infrastructure_delays = reconnect_backoff();
    let mut delay = None;
    loop {
        if attempts > 0 && delay.is_none() {
            delay = Some(shared.config.first_retry_delay * 2u32.saturating_pow(attempts - 1));
        }
        if let Some(delay) = delay.take()
            && !pause(shared, delay).await
        {
            return;
        }
        let outcome = match decode(shared, &delivery, &envelope).await {
            Ok(message) => try_once(shared, &[&message])
                .await
                .map(|mut claims| claims.pop().unwrap_or(Claim::Duplicate))
                .map_err(|failed| failed.failure),
            Err(Failure::Handler(error)) => {
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
                let wait = infrastructure_delays
                    .next()
                    .unwrap_or(Duration::from_secs(5));
                tracing::warn!(%error, delay = ?wait, message_id = %envelope.message_id, "cannot reach the database; retrying");
                delay = Some(wait);
            }
            Err(Failure::Handler(error)) => {
                attempts += 1;
                shared.metrics.failed(&shared.queue);
                tracing::warn!(%error, attempt = attempts, message_id = %envelope.message_id, "handler failed");
                if attempts >= shared.config.max_attempts {
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
fn original_routing(delivery: &Delivery, header: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    amqp::header_string(headers, header)
}

/// Claims the inbox rows of a batch of messages of different streams, in one
/// statement. A message is claimed unless it is a duplicate (its inbox row exists),
/// parked behind another message of its stream, or older than what its stream already
/// applied; a message that is not claimed writes nothing, so the others of its batch
/// can still commit. The message a parked stream waits for (a dead letter being
/// replayed) is the one message it lets through; when that succeeds, the stream moves
/// on to its next parked message in the same transaction.
///
/// First it takes the locks of the streams the handlers will append to (`$5`), before
/// it writes anything: `checked` cannot yield a row before `locked` has taken them all,
/// and nothing is written before `checked` yields, so the transaction id (which orders
/// global positions) is assigned after the streams' previous writers committed.
macro_rules! claim_statement {
    ($batch:literal) => {
        concat!(
            "WITH locked AS (SELECT ",
            crate::store::stream_locks!("$5"),
            "), checked AS (
    SELECT b.message_id, b.stream_id, b.version,
           (SELECT blocking_message_id FROM parked_streams p
            WHERE p.consumer = $1 AND p.stream_id = b.stream_id) AS parked_behind,
           EXISTS (SELECT 1 FROM inbox i WHERE i.consumer = $1 AND i.message_id = b.message_id)
               AS seen,
           (b.version IS NULL OR NOT EXISTS (SELECT 1 FROM consumer_streams s
            WHERE s.consumer = $1 AND s.stream_id = b.stream_id AND s.last_version >= b.version))
               AS in_order
    FROM ",
            $batch,
            " AS b (message_id, stream_id, version), locked WHERE locked.locks >= 0
), claimed AS (
    INSERT INTO inbox (consumer, message_id)
    SELECT $1, message_id FROM checked
    WHERE NOT seen AND in_order AND (parked_behind IS NULL OR parked_behind = message_id)
    ON CONFLICT DO NOTHING
    RETURNING message_id
), advanced AS (
    INSERT INTO consumer_streams (consumer, stream_id, last_version)
    SELECT $1, c.stream_id, c.version FROM checked c
    WHERE c.version IS NOT NULL AND c.message_id IN (SELECT message_id FROM claimed)
    ON CONFLICT (consumer, stream_id)
        DO UPDATE SET last_version = excluded.last_version, applied_at = now()
        WHERE consumer_streams.last_version < excluded.last_version
    RETURNING stream_id
)
SELECT c.message_id,
       c.message_id IN (SELECT message_id FROM claimed) AS claimed,
       c.parked_behind,
       c.seen,
       c.in_order AND (c.version IS NULL
           OR c.message_id NOT IN (SELECT message_id FROM claimed)
           OR c.stream_id IN (SELECT stream_id FROM advanced)) AS in_order
FROM checked c"
        )
    };
}
/// The claim of one message. PostgreSQL plans each execution of these statements
/// anew (custom plans); with arrays, planning cost about half of a lone message's
/// database time, so a lone message binds scalars.
const CLAIM_ONE: &str = claim_statement!("(VALUES ($2::uuid, $3::text, $4::bigint))");
/// The claim of a batch, one array element per message.
const CLAIM_MANY: &str = claim_statement!("unnest($2::uuid[], $3::text[], $4::bigint[])");

/// Why a transaction failed, and the message whose handler failed, if one did.
struct Failed {
    failure: Failure,
    /// Index of the message whose handler failed (or whose claim went wrong).
    culprit: Option<usize>,
}

impl From<Failure> for Failed {
    fn from(failure: Failure) -> Self {
        Failed {
            failure,
            culprit: None,
        }
    }
}

/// Claims and applies `messages` (of different streams) in one transaction on one of
/// the consumer's connections; the verdict for each, in order.
async fn try_once<H: Handler>(
    shared: &Shared<H>,
    messages: &[&Message],
) -> Result<Vec<Claim>, Failed> {
    let (_permit, mut connection) = shared
        .connections
        .take()
        .await
        .map_err(|error| Failure::from_database(&error))?;
    let outcome = claim_and_handle(shared, messages, &mut connection).await;
    // After a failure the connection may be mid-transaction or broken: let it go.
    if outcome.is_ok() {
        shared.connections.give_back(connection);
    }
    outcome
}

async fn claim_and_handle<H: Handler>(
    shared: &Shared<H>,
    messages: &[&Message],
    connection: &mut sqlx::PgConnection,
) -> Result<Vec<Claim>, Failed> {
    let database = |error: sqlx::Error| Failure::from_database(&error);
    let mut transaction = shared
        .store
        .begin_on(connection)
        .await
        .map_err(Failure::from_store)?;
    // Taken by the claim before it writes anything (see `claim_statement!`).
    let streams = transaction.streams_to_lock_in_next_statement(
        messages
            .iter()
            .flat_map(|message| shared.handler.streams_to_lock(message)),
    );
    let claim = match messages {
        [one] => {
            let envelope = &one.envelope;
            sqlx::query(CLAIM_ONE)
                .bind(shared.queue.as_str())
                .bind(envelope.message_id)
                .bind(envelope.stream_id.as_str())
                .bind(envelope.stream_version)
        }
        _ => {
            let envelopes = messages.iter().map(|message| &message.envelope);
            sqlx::query(CLAIM_MANY)
                .bind(shared.queue.as_str())
                .bind(envelopes.clone().map(|e| e.message_id).collect::<Vec<_>>())
                .bind(
                    envelopes
                        .clone()
                        .map(|e| e.stream_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(envelopes.map(|e| e.stream_version).collect::<Vec<_>>())
        }
    }
    .bind(&streams);
    let rows = claim
        .fetch_all(transaction.connection())
        .await
        .map_err(database)?;
    let mut rows_by_id = HashMap::with_capacity(rows.len());
    for row in &rows {
        let id: Uuid = row.try_get("message_id").map_err(database)?;
        rows_by_id.insert(id, row);
    }
    let mut claims = Vec::with_capacity(messages.len());
    let mut applied = Vec::new();
    let mut moves_on: Vec<&Message> = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        let id = message.envelope.message_id;
        let Some(row) = rows_by_id.get(&id) else {
            let error = format!("the claim returned no row for {id}");
            return Err(Failure::Handler(error).into());
        };
        let claimed: bool = row.try_get("claimed").map_err(database)?;
        let parked_behind: Option<Uuid> = row.try_get("parked_behind").map_err(database)?;
        let seen: bool = row.try_get("seen").map_err(database)?;
        let in_order: bool = row.try_get("in_order").map_err(database)?;
        if seen && parked_behind == Some(id) {
            // The message its stream waits for was applied before it was parked (a
            // redelivery, a republish): nothing to apply, but the stream moves on.
            moves_on.push(*message);
        }
        let claim = match parked_behind {
            // Seen first: a message already applied is a duplicate, parked or not,
            // and must never become the message a parked stream waits for.
            _ if seen => Claim::Duplicate,
            Some(behind) if behind != id => Claim::Parked(behind),
            _ if claimed && in_order => Claim::Applied,
            // Claimed, but its stream moved past it meanwhile: that claim must not
            // commit. Alone, it is rolled back below; in a batch, the batch fails
            // and the message is tried alone.
            _ if claimed && messages.len() > 1 => {
                return Err(Failed {
                    failure: Failure::Handler(format!("{id} lost its stream's order")),
                    culprit: Some(index),
                });
            }
            _ if claimed => Claim::OutOfOrder,
            // Claimed meanwhile by a concurrent delivery of the same message.
            _ if in_order => Claim::Duplicate,
            _ => Claim::OutOfOrder,
        };
        if matches!(claim, Claim::Applied) {
            applied.push((index, *message, parked_behind.is_some()));
        }
        claims.push(claim);
    }
    if applied.is_empty() && moves_on.is_empty() {
        transaction.rollback().await.map_err(Failure::from_store)?;
        return Ok(claims);
    }
    for message in moves_on {
        let stream_id = &message.envelope.stream_id;
        advance_park(transaction.connection(), &shared.queue, stream_id)
            .await
            .map_err(database)?;
    }
    for &(index, message, replaying_dead_letter) in &applied {
        // A panicking handler counts as a failed attempt; it must not free the stream
        // for the next message while this one is still unapplied.
        let handled = AssertUnwindSafe(shared.handler.handle(message, &mut transaction))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err("the handler panicked".into()));
        if let Err(error) = handled {
            // Dropping the transaction rolls back the claims with the handlers' writes.
            drop(transaction);
            return Err(Failed {
                failure: Failure::Handler(error.to_string()),
                culprit: Some(index),
            });
        }
        if replaying_dead_letter {
            let stream_id = &message.envelope.stream_id;
            advance_park(transaction.connection(), &shared.queue, stream_id)
                .await
                .map_err(database)?;
        }
    }
    transaction.commit().await.map_err(Failure::from_store)?;
    if !applied.is_empty() {
        shared.metrics.transaction(&shared.queue);
    }
    for &(_, message, _) in &applied {
        shared.handler.committed(message);
    }
    Ok(claims)
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

/// Decides which deliveries may start, and together: one at a time per key, each key's
/// deliveries in arrival order, at most `concurrency` batches at once, each of at most
/// `batch_size` deliveries with different keys. Generic so it can be tested without a
/// broker.
struct Dispatcher<T> {
    concurrency: usize,
    batch_size: usize,
    /// Batches being handled.
    running: usize,
    /// Messages being retried outside any batch.
    retrying: usize,
    /// Keys with a delivery being handled or ready, and what waits behind it.
    busy: HashMap<String, VecDeque<T>>,
    /// Deliveries free to start once a slot frees up, oldest first; no key twice.
    ready: VecDeque<(String, T)>,
}

impl<T> Dispatcher<T> {
    fn new(concurrency: usize, batch_size: usize) -> Self {
        Dispatcher {
            concurrency: concurrency.max(1),
            batch_size: batch_size.max(1),
            running: 0,
            retrying: 0,
            busy: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// Tasks still running: batches and retries.
    fn in_flight(&self) -> usize {
        self.running + self.retrying
    }

    /// A delivery arrived; [`startable`](Self::startable) says whether it may start.
    fn arrived(&mut self, key: String, item: T) {
        match self.busy.get_mut(&key) {
            Some(waiting) => waiting.push_back(item),
            None => {
                self.busy.insert(key.clone(), VecDeque::new());
                self.ready.push_back((key, item));
            }
        }
    }

    /// A task ended: its keys' next deliveries become ready, and a batch frees its
    /// slot.
    fn finished(&mut self, done: Done) {
        if done.slot {
            self.running -= 1;
            self.retrying += done.handed_off;
        } else {
            self.retrying -= 1;
        }
        for key in done.keys {
            match self.busy.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => self.ready.push_back((key, next)),
                None => {
                    self.busy.remove(&key);
                }
            }
        }
    }

    /// The batches that may start now, taking ready deliveries oldest first.
    fn startable(&mut self) -> Vec<Vec<(String, T)>> {
        let mut start = Vec::new();
        while self.running < self.concurrency && !self.ready.is_empty() {
            let size = self.batch_size.min(self.ready.len());
            start.push(self.ready.drain(..size).collect());
            self.running += 1;
        }
        start
    }
}

#[cfg(test)]
mod tests {
    use super::{Dispatcher, Done};

    fn items(batches: Vec<Vec<(String, u32)>>) -> Vec<Vec<u32>> {
        batches
            .into_iter()
            .map(|batch| batch.into_iter().map(|(_, item)| item).collect())
            .collect()
    }

    /// A batch of these keys ended, handing `handed_off` of them to retry tasks.
    fn batch(names: &[&str], handed_off: usize) -> Done {
        Done {
            keys: names.iter().map(|name| (*name).to_owned()).collect(),
            slot: true,
            handed_off,
        }
    }

    fn retry(name: &str) -> Done {
        Done {
            keys: vec![name.to_owned()],
            slot: false,
            handed_off: 0,
        }
    }

    #[test]
    fn one_key_runs_one_at_a_time_in_arrival_order() {
        let mut dispatcher = Dispatcher::new(8, 1);
        dispatcher.arrived("a".into(), 1);
        assert_eq!(items(dispatcher.startable()), vec![vec![1]]);
        dispatcher.arrived("a".into(), 2);
        dispatcher.arrived("a".into(), 3);
        assert!(dispatcher.startable().is_empty(), "a is busy");
        dispatcher.arrived("b".into(), 9);
        assert_eq!(items(dispatcher.startable()), vec![vec![9]]);
        dispatcher.finished(batch(&["a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![2]]);
        dispatcher.finished(batch(&["a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![3]]);
        dispatcher.finished(batch(&["a"], 0));
        assert!(dispatcher.startable().is_empty());
        assert_eq!(dispatcher.in_flight(), 1);
        // The key is free again.
        dispatcher.arrived("a".into(), 4);
        assert_eq!(items(dispatcher.startable()), vec![vec![4]]);
    }

    #[test]
    fn concurrency_caps_running_batches_and_frees_in_arrival_order() {
        let mut dispatcher = Dispatcher::new(2, 1);
        dispatcher.arrived("a".into(), 1);
        dispatcher.arrived("b".into(), 2);
        assert_eq!(items(dispatcher.startable()), vec![vec![1], vec![2]]);
        dispatcher.arrived("c".into(), 3);
        dispatcher.arrived("a".into(), 4);
        assert!(dispatcher.startable().is_empty());
        // "c" arrived before a's second delivery became ready.
        dispatcher.finished(batch(&["a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![3]]);
        dispatcher.finished(batch(&["b"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![4]]);
        assert_eq!(dispatcher.in_flight(), 2);
    }

    #[test]
    fn what_waits_for_a_slot_goes_together_with_one_delivery_per_key() {
        let mut dispatcher = Dispatcher::new(1, 3);
        dispatcher.arrived("a".into(), 1);
        assert_eq!(items(dispatcher.startable()), vec![vec![1]]);
        for (key, item) in [("a", 2), ("b", 3), ("a", 4), ("c", 5), ("d", 6), ("e", 7)] {
            dispatcher.arrived(key.into(), item);
        }
        assert!(dispatcher.startable().is_empty(), "the one slot is busy");
        dispatcher.finished(batch(&["a"], 0));
        // a's second delivery became ready after b..e: b, c, d go first, at most 3.
        assert_eq!(items(dispatcher.startable()), vec![vec![3, 5, 6]]);
        dispatcher.finished(batch(&["b", "c", "d"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![7, 2]]);
        dispatcher.finished(batch(&["e", "a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![4]]);
    }

    #[test]
    fn a_retried_message_frees_its_batch_slot_but_not_its_stream() {
        let mut dispatcher = Dispatcher::new(1, 4);
        dispatcher.arrived("a".into(), 1);
        dispatcher.arrived("b".into(), 2);
        assert_eq!(items(dispatcher.startable()), vec![vec![1, 2]]);
        dispatcher.arrived("a".into(), 3);
        dispatcher.arrived("c".into(), 4);
        // The batch failed for a; b was applied. a is retried on its own.
        dispatcher.finished(batch(&["b"], 1));
        assert_eq!(dispatcher.in_flight(), 1, "the retry");
        assert_eq!(
            items(dispatcher.startable()),
            vec![vec![4]],
            "a waits for its retry"
        );
        dispatcher.finished(batch(&["c"], 0));
        dispatcher.finished(retry("a"));
        assert_eq!(dispatcher.in_flight(), 0);
        assert_eq!(items(dispatcher.startable()), vec![vec![3]]);
    }
}
