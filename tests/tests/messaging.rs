//! The outbox relay and the consumer runtime against real RabbitMQ and PostgreSQL:
//! crashes between publish and mark, forced connection loss, relay failover, retries,
//! dead letters and parked streams, and commands between services. Each test has its
//! own database and its own RabbitMQ virtual host.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domain::inventory::StockEvent;
use domain::order::{OrderEvent, OrderLine};
use eventstore::amqp::{self, Envelope, dead_letter_headers};
use eventstore::parking::{skip, unpark};
use eventstore::{
    Consumer, ConsumerConfig, EventStore, ExpectedVersion, Handler, HandlerError, Message,
    Metadata, Metrics, NewEvent, OutgoingCommand, Permanent, Relay, RelayConfig, StoreTransaction,
};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use tests::{TestDb, Vhost, wait_for};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SERVICE: &str = "order";

/// A database, a virtual host, and a table the test handler writes its effects to.
struct World {
    db: TestDb,
    vhost: Vhost,
    store: EventStore,
    cancel: CancellationToken,
}

impl World {
    async fn new() -> World {
        // Logs (to the test's output) when RUST_LOG asks for them.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let db = TestDb::new(10).await.expect("test database");
        sqlx::query(
            "CREATE TABLE applied (seq BIGSERIAL PRIMARY KEY, message_id UUID NOT NULL, \
             stream_id TEXT NOT NULL, stream_version BIGINT, message_type TEXT NOT NULL)",
        )
        .execute(&db.pool)
        .await
        .expect("effects table");
        let vhost = tokio::task::spawn_blocking(Vhost::new)
            .await
            .expect("vhost task")
            .expect("test vhost");
        let store = db.store();
        World {
            db,
            vhost,
            store,
            cancel: CancellationToken::new(),
        }
    }

    fn relay_config(&self) -> RelayConfig {
        RelayConfig::new(SERVICE, &self.vhost.url)
    }

    fn consumer_config(&self) -> ConsumerConfig {
        ConsumerConfig::events(SERVICE, "recorder", &self.vhost.url, &["order.#"])
    }

    fn start_relay(&self, config: RelayConfig, metrics: &Metrics) -> JoinHandle<()> {
        let relay = Relay::new(self.store.clone(), config, metrics.clone());
        tokio::spawn(relay.run(self.cancel.clone()))
    }

    fn start_consumer(&self, config: ConsumerConfig, handler: Recorder, metrics: &Metrics) {
        let consumer = Consumer::new(
            config,
            self.store.clone(),
            TestDb::registry(),
            handler,
            metrics.clone(),
        );
        tokio::spawn(consumer.run(self.cancel.clone()));
    }

    /// Declares a consumer's queue before anything is published, so nothing is
    /// dropped as unroutable while the consumer is still connecting.
    async fn declare(&self, config: &ConsumerConfig) {
        let connection = amqp::connect(&self.vhost.url, "test-setup").await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        config.declare(&channel).await.unwrap();
        connection.close(200, "done".into()).await.unwrap();
    }

    async fn applied(&self) -> Vec<Applied> {
        sqlx::query_as::<_, (Uuid, String, Option<i64>, String)>(
            "SELECT message_id, stream_id, stream_version, message_type FROM applied ORDER BY seq",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(message_id, stream_id, version, message_type)| Applied {
            message_id,
            stream_id,
            version,
            message_type,
        })
        .collect()
    }

    async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn wait_applied(&self, count: usize, deadline: Duration) -> Vec<Applied> {
        wait_for(deadline, &format!("{count} applied messages"), || async {
            let applied = self.applied().await;
            assert!(
                applied.len() <= count,
                "more applied than sent: {}",
                applied.len()
            );
            (applied.len() == count).then_some(applied)
        })
        .await
    }

    async fn wait_outbox_published(&self) {
        wait_for(
            Duration::from_secs(30),
            "the outbox to be published",
            || async {
                let left = self
                    .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                    .await;
                (left == 0).then_some(())
            },
        )
        .await
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Debug, Clone)]
struct Applied {
    message_id: Uuid,
    stream_id: String,
    version: Option<i64>,
    message_type: String,
}

/// Stream `s` of `streams` gets versions 1..=per_stream; each stream was applied
/// exactly once per version, in version order.
fn assert_once_in_order(applied: &[Applied], streams: &[String], per_stream: i64) {
    let mut by_stream: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for row in applied {
        by_stream
            .entry(row.stream_id.as_str())
            .or_default()
            .push(row.version.expect("events have versions"));
    }
    assert_eq!(by_stream.len(), streams.len(), "streams applied");
    for stream in streams {
        let expected: Vec<i64> = (1..=per_stream).collect();
        assert_eq!(
            by_stream.get(stream.as_str()),
            Some(&expected),
            "stream {stream} applied once each, in order"
        );
    }
}

/// Given a message and its attempt number (from 1), whether the handler fails.
type FailurePolicy = dyn Fn(&Message, usize) -> bool + Send + Sync;

/// The test handler: records each attempt, fails as its policy says, and otherwise
/// writes one row to `applied` inside the consumer's transaction.
#[derive(Clone)]
struct Recorder {
    attempts: Arc<Mutex<HashMap<Uuid, Vec<Instant>>>>,
    fails: Arc<FailurePolicy>,
    /// How long each attempt takes before it writes its effect.
    work: Duration,
    /// Its failures say no attempt can succeed ([`Permanent`]).
    permanent: bool,
}

impl Recorder {
    fn new(fails: impl Fn(&Message, usize) -> bool + Send + Sync + 'static) -> Self {
        Recorder {
            attempts: Arc::default(),
            fails: Arc::new(fails),
            work: Duration::ZERO,
            permanent: false,
        }
    }

    /// Fails with [`Permanent`] errors.
    fn permanently(mut self) -> Self {
        self.permanent = true;
        self
    }

    fn never_failing() -> Self {
        Recorder::new(|_, _| false)
    }

    fn attempts_of(&self, message_id: Uuid) -> Vec<Instant> {
        self.attempts
            .lock()
            .unwrap()
            .get(&message_id)
            .cloned()
            .unwrap_or_default()
    }
}

impl Handler for Recorder {
    async fn handle(
        &self,
        message: &Message,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let times = attempts.entry(message.envelope.message_id).or_default();
            times.push(Instant::now());
            times.len()
        };
        if (self.fails)(message, attempt) {
            let error = format!("scripted failure on attempt {attempt}");
            return Err(if self.permanent {
                Permanent::error(error)
            } else {
                error.into()
            });
        }
        tokio::time::sleep(self.work).await;
        sqlx::query(
            "INSERT INTO applied (message_id, stream_id, stream_version, message_type) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(message.envelope.message_id)
        .bind(&message.envelope.stream_id)
        .bind(message.envelope.stream_version)
        .bind(&message.envelope.message_type)
        .execute(transaction.connection())
        .await?;
        Ok(())
    }
}

fn metadata() -> Metadata {
    Metadata::new(Uuid::now_v7(), Uuid::now_v7())
}

fn stock_event(sku: &str, quantity: u32) -> NewEvent {
    let event = StockEvent::StockAdded {
        sku: sku.to_owned(),
        quantity,
    };
    NewEvent::new(TestDb::registry().encode(&event).unwrap(), metadata())
}

fn streams(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// Appends `per_stream` events to every stream, `batch` at a time, going round the
/// streams so that their events interleave in the outbox.
async fn append_round_robin(
    store: &EventStore,
    streams: &[String],
    per_stream: usize,
    batch: usize,
) {
    let mut written = 0;
    while written < per_stream {
        let size = batch.min(per_stream - written);
        for stream in streams {
            let events: Vec<NewEvent> = (0..size).map(|_| stock_event(stream, 1)).collect();
            store
                .append(stream, ExpectedVersion::Exact(written as i64), &events)
                .await
                .unwrap();
        }
        written += size;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_dying_between_publish_and_mark_republishes_and_the_consumer_applies_once() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let streams = streams("stock-crash", 3);
    append_round_robin(&world.store, &streams, 10, 5).await;

    let crashed = Metrics::new();
    let faulty = RelayConfig {
        stop_before_marking: true,
        ..world.relay_config()
    };
    tokio::time::timeout(Duration::from_secs(30), world.start_relay(faulty, &crashed))
        .await
        .expect("the faulty relay stops after its first batch")
        .unwrap();
    assert_eq!(
        crashed.published_count(SERVICE),
        30,
        "confirmed by the broker"
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        30,
        "but never marked"
    );

    let metrics = Metrics::new();
    world.start_consumer(config.clone(), Recorder::never_failing(), &metrics);
    world.start_relay(world.relay_config(), &metrics);
    let applied = world.wait_applied(30, Duration::from_secs(30)).await;
    wait_for(
        Duration::from_secs(30),
        "the republished copies",
        || async { (metrics.duplicate_count(&config.queue()) == 30).then_some(()) },
    )
    .await;
    world.wait_outbox_published().await;
    assert_eq!(world.applied().await.len(), 30, "nothing applied twice");
    assert_once_in_order(&applied, &streams, 10);
    assert_eq!(
        world
            .count("SELECT count(*) FROM inbox WHERE consumer = 'order.recorder'")
            .await,
        30
    );
}

/// DESIGN §8.6, no message lost: events published before their consumer ever
/// connected still reach it, because the relay declares the consumer's queue before
/// its first publish (nobody declares it by hand here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_published_before_their_consumer_first_connects_are_not_lost() {
    let world = World::new().await;
    let config = world.consumer_config();
    let streams = streams("stock-early", 4);
    append_round_robin(&world.store, &streams, 5, 5).await;

    let metrics = Metrics::new();
    let relay_config = RelayConfig {
        queues: vec![config.clone()],
        ..world.relay_config()
    };
    world.start_relay(relay_config, &metrics);
    world.wait_outbox_published().await;

    world.start_consumer(config, Recorder::never_failing(), &metrics);
    let applied = world.wait_applied(20, Duration::from_secs(30)).await;
    assert_once_in_order(&applied, &streams, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_events_survive_forced_connection_closes_once_each_and_in_order() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let metrics = Metrics::new();
    world.start_consumer(config, Recorder::never_failing(), &metrics);
    world.start_relay(world.relay_config(), &metrics);
    let streams = streams("stock-chaos", 50);
    let writer = {
        let (store, streams) = (world.store.clone(), streams.clone());
        tokio::spawn(async move { append_round_robin(&store, &streams, 100, 5).await })
    };

    let mut closes = 0;
    for threshold in [800, 2_000, 3_500] {
        wait_for(
            Duration::from_secs(120),
            &format!("{threshold} applied"),
            || async {
                let applied = world.count("SELECT count(*) FROM applied").await;
                (applied >= threshold).then_some(())
            },
        )
        .await;
        tokio::task::block_in_place(|| world.vhost.close_all_connections())
            .expect("rabbitmqctl closes the test's connections");
        closes += 1;
    }
    writer.await.unwrap();
    let applied = world.wait_applied(5_000, Duration::from_secs(180)).await;
    world.wait_outbox_published().await;
    assert_eq!(closes, 3);
    assert_once_in_order(&applied, &streams, 100);
}

/// Under load the consumer applies ready messages of different streams together, many
/// to a transaction. A message whose handler fails takes only itself out of its batch:
/// the others are applied once and in order, and it uses its 3 attempts on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_is_applied_in_batches_and_a_failing_message_leaves_its_batch() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let healthy = streams("stock-backlog", 40);
    let poisoned = "stock-poisoned".to_owned();
    // Interleaved, as many small streams written side by side are.
    append_round_robin(&world.store, &healthy[..20], 10, 1).await;
    append_round_robin(&world.store, std::slice::from_ref(&poisoned), 3, 1).await;
    append_round_robin(&world.store, &healthy[20..], 10, 1).await;
    let metrics = Metrics::new();
    world.start_relay(world.relay_config(), &metrics);
    // The whole backlog waits in the queue before the consumer connects.
    world.wait_outbox_published().await;

    let recorder = Recorder::new(|message, _| {
        message.envelope.stream_id == "stock-poisoned" && message.envelope.stream_version == Some(2)
    });
    world.start_consumer(config.clone(), recorder.clone(), &metrics);
    let dead = read_dead_letters(&world, 2).await;
    let applied = world.wait_applied(401, Duration::from_secs(60)).await;

    let (poisoned_applied, rest): (Vec<Applied>, Vec<Applied>) = applied
        .into_iter()
        .partition(|row| row.stream_id == poisoned);
    assert_once_in_order(&rest, &healthy, 10);
    let versions: Vec<Option<i64>> = poisoned_applied.iter().map(|row| row.version).collect();
    assert_eq!(versions, vec![Some(1)], "v2 failed, v3 is parked behind it");
    let failed = dead
        .iter()
        .find(|letter| letter.parked_behind.is_none())
        .expect("the failing message is dead-lettered");
    assert_eq!(failed.envelope.stream_version, Some(2));
    assert_eq!(failed.attempts, Some(3));
    assert_eq!(
        recorder.attempts_of(failed.envelope.message_id).len(),
        3,
        "a failed batch neither spends nor adds attempts"
    );
    let transactions = metrics.transaction_count(&config.queue());
    assert!(
        transactions * 2 <= 401,
        "{transactions} transactions applied 401 messages: the backlog went in batches"
    );
}

/// A handler that says a message can never be applied sends it to the dead letters
/// after that one attempt, not three, and its stream waits behind it as for any other
/// dead letter; other streams flow on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_failure_is_dead_lettered_after_one_attempt() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let recorder = Recorder::new(|message, _| {
        message.envelope.stream_id == "stock-doomed" && message.envelope.stream_version == Some(1)
    })
    .permanently();
    let metrics = Metrics::new();
    world.start_consumer(config.clone(), recorder.clone(), &metrics);
    world.start_relay(world.relay_config(), &metrics);
    let both = ["stock-doomed".to_owned(), "stock-fine".to_owned()];
    append_round_robin(&world.store, &both, 2, 1).await;
    let dead = read_dead_letters(&world, 2).await;
    let applied = world.wait_applied(2, Duration::from_secs(30)).await;
    assert!(applied.iter().all(|row| row.stream_id == "stock-fine"));
    let failed = dead
        .iter()
        .find(|letter| letter.parked_behind.is_none())
        .expect("the failing message is dead-lettered");
    assert_eq!(failed.envelope.stream_version, Some(1));
    assert_eq!(failed.attempts, Some(1));
    assert!(
        failed.error.contains("scripted failure"),
        "{}",
        failed.error
    );
    assert_eq!(recorder.attempts_of(failed.envelope.message_id).len(), 1);
    let behind = dead
        .iter()
        .find(|letter| letter.parked_behind.is_some())
        .expect("v2 is parked behind it");
    assert_eq!(behind.envelope.stream_version, Some(2));
    assert_eq!(behind.parked_behind, Some(failed.envelope.message_id));
    assert_eq!(metrics.dead_lettered_count(&config.queue()), 2);
}

/// What `orderflow dlq` does: list dead letters (leaving the queue as it was) with
/// error, attempts and failure times; replay a parked stream's letters, which applies
/// them in order; purge a poison message, which lets its stream flow on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dlq_tools_list_replay_in_order_and_purge() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let healed = Arc::new(AtomicBool::new(false));
    let recorder = {
        let healed = healed.clone();
        Recorder::new(move |message, _| {
            // A replayed letter must look as first routed, or handlers that tell
            // messages apart by routing key (the saga does) would misread it.
            let misrouted = message.routing_key != "order.StockAdded";
            let broken = message.envelope.stream_id == "stock-dlq"
                && message.envelope.stream_version == Some(2)
                && !healed.load(Ordering::SeqCst);
            misrouted || broken
        })
    };
    let metrics = Metrics::new();
    world.start_consumer(config.clone(), recorder, &metrics);
    world.start_relay(world.relay_config(), &metrics);
    append_round_robin(&world.store, &["stock-dlq".to_owned()], 4, 1).await;
    world.wait_applied(1, Duration::from_secs(30)).await;
    let garbage = publish_garbage(&world).await;

    let url = world.vhost.url.as_str();
    let letters = wait_for(Duration::from_secs(30), "4 dead letters", || async {
        let letters = eventstore::dlq::list(url, SERVICE).await.unwrap();
        (letters.len() == 4).then_some(letters)
    })
    .await;
    let again = eventstore::dlq::list(url, SERVICE).await.unwrap();
    let ids = |letters: &[eventstore::dlq::DeadLetter]| -> Vec<Option<Uuid>> {
        letters.iter().map(|letter| letter.message_id).collect()
    };
    assert_eq!(
        ids(&again),
        ids(&letters),
        "listing leaves the queue as it was"
    );
    let dlq_letters: Vec<_> = letters
        .iter()
        .filter(|l| {
            l.envelope
                .as_ref()
                .is_some_and(|e| e.stream_id == "stock-dlq")
        })
        .collect();
    let versions: Vec<Option<i64>> = dlq_letters
        .iter()
        .map(|l| l.envelope.as_ref().and_then(|e| e.stream_version))
        .collect();
    assert_eq!(
        versions,
        [Some(2), Some(3), Some(4)],
        "in the order first published"
    );
    let failed = dlq_letters[0];
    assert_eq!(failed.attempts, Some(3));
    assert!(
        failed
            .error
            .as_deref()
            .unwrap_or("")
            .contains("scripted failure")
    );
    assert_eq!(failed.queue.as_deref(), Some("order.recorder"));
    let (first, last) = (
        failed.first_failed_at.unwrap(),
        failed.last_failed_at.unwrap(),
    );
    assert!(first <= last && last <= chrono::Utc::now());
    assert!(
        dlq_letters[1..]
            .iter()
            .all(|l| l.parked_behind == failed.message_id)
    );

    // A message already applied that comes again while its stream is parked (a
    // republish, a redelivery) is a duplicate: never parked, never waited for.
    let v1 = world.store.read_stream("stock-dlq", 1, 1).await.unwrap();
    let selection = eventstore::republish::Selection {
        after: 0,
        up_to: Some(v1[0].global_position),
        stream: Some("stock-dlq".to_owned()),
        recorded_since: None,
    };
    eventstore::republish::republish(&world.store, url, SERVICE, &selection, |_, _| {})
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the duplicate", || async {
        (metrics.duplicate_count(&config.queue()) == 1).then_some(())
    })
    .await;
    assert_eq!(eventstore::dlq::list(url, SERVICE).await.unwrap().len(), 4);

    // A dry run changes nothing; the real replay applies v2, v3, v4 in order.
    let is_dlq_stream = |letter: &eventstore::dlq::DeadLetter| {
        letter
            .envelope
            .as_ref()
            .is_some_and(|e| e.stream_id == "stock-dlq")
    };
    let dry = eventstore::dlq::replay(url, SERVICE, is_dlq_stream, true)
        .await
        .unwrap();
    assert_eq!((dry.done.len(), dry.others), (3, 1));
    assert_eq!(eventstore::dlq::list(url, SERVICE).await.unwrap().len(), 4);
    healed.store(true, Ordering::SeqCst);
    let replayed = eventstore::dlq::replay(url, SERVICE, is_dlq_stream, false)
        .await
        .unwrap();
    assert_eq!(replayed.done.len(), 3);
    let applied = world.wait_applied(4, Duration::from_secs(30)).await;
    let order: Vec<Option<i64>> = applied.iter().map(|row| row.version).collect();
    assert_eq!(order, [Some(1), Some(2), Some(3), Some(4)]);

    // The poison message: purged, and its stream is no longer parked.
    let is_garbage = |letter: &eventstore::dlq::DeadLetter| letter.message_id == Some(garbage);
    let purged = eventstore::dlq::purge(url, SERVICE, &world.db.pool, is_garbage, false)
        .await
        .unwrap();
    assert_eq!(purged.done.len(), 1);
    assert!(
        eventstore::dlq::list(url, SERVICE)
            .await
            .unwrap()
            .is_empty()
    );
    wait_for(Duration::from_secs(10), "no parked stream", || async {
        let parked = world.count("SELECT count(*) FROM parked_streams").await;
        (parked == 0).then_some(())
    })
    .await;
}

/// A consumer split into partitions (by a hash of the stream id) shares its work
/// between instances, each taking the partitions assigned to it; when one lets its
/// partitions go, the other takes them up where they stood. Every event is applied
/// once, each stream in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_share_a_consumers_work_and_are_handed_over_in_order() {
    let world = World::new().await;
    let mut config = world.consumer_config();
    config.partitions = 4;
    world.declare(&config).await;
    let metrics = (Metrics::new(), Metrics::new());
    let (first, first_assignment) = tokio::sync::watch::channel(vec![0, 2]);
    let (second, second_assignment) = tokio::sync::watch::channel(vec![1, 3]);
    // One event fails until healed: its dead letter must find its partition again.
    let healed = Arc::new(AtomicBool::new(false));
    let recorder = {
        let healed = healed.clone();
        Recorder::new(move |message, _| {
            message.envelope.stream_id == "stock-part-7"
                && message.envelope.stream_version == Some(5)
                && !healed.load(Ordering::SeqCst)
        })
    };
    for (assignment, metrics) in [
        (first_assignment, &metrics.0),
        (second_assignment, &metrics.1),
    ] {
        let consumer = Consumer::new(
            config.clone(),
            world.store.clone(),
            TestDb::registry(),
            recorder.clone(),
            metrics.clone(),
        )
        .with_assignment(assignment);
        tokio::spawn(consumer.run(world.cancel.clone()));
    }
    world.start_relay(world.relay_config(), &metrics.0);
    let streams = streams("stock-part", 40);
    append_round_robin(&world.store, &streams, 10, 1).await;
    // stock-part-7 stops at v4: v5 is dead, v6..v10 parked behind it.
    world.wait_applied(394, Duration::from_secs(60)).await;
    let url = world.vhost.url.as_str();
    let letters = wait_for(Duration::from_secs(30), "6 dead letters", || async {
        let letters = eventstore::dlq::list(url, SERVICE).await.unwrap();
        (letters.len() == 6).then_some(letters)
    })
    .await;
    let exchange = Some("order.recorder.partitions");
    assert!(
        letters
            .iter()
            .all(|l| l.replay_exchange.as_deref() == exchange)
    );
    healed.store(true, Ordering::SeqCst);
    let replayed = eventstore::dlq::replay(url, SERVICE, |_| true, false)
        .await
        .unwrap();
    assert_eq!(replayed.done.len(), 6);
    world.wait_applied(400, Duration::from_secs(60)).await;
    let queue = config.queue();
    // A message counts once acknowledged, a moment after its effect committed.
    let (a, b) = wait_for(Duration::from_secs(10), "400 acknowledged", || async {
        let counts = (
            metrics.0.consumed_count(&queue),
            metrics.1.consumed_count(&queue),
        );
        (counts.0 + counts.1 >= 400).then_some(counts)
    })
    .await;
    assert_eq!(a + b, 400);
    assert!(a > 50 && b > 50, "both instances worked: {a} and {b}");

    // The second instance lets go of its partitions while events keep coming; the
    // first takes them up.
    let writer = {
        let (store, streams) = (world.store.clone(), streams.clone());
        tokio::spawn(async move {
            for round in 10..20 {
                for stream in &streams {
                    store
                        .append(
                            stream,
                            ExpectedVersion::Exact(round),
                            &[stock_event(stream, 1)],
                        )
                        .await
                        .unwrap();
                }
            }
        })
    };
    second.send(vec![]).unwrap();
    first.send(vec![0, 1, 2, 3]).unwrap();
    writer.await.unwrap();
    let applied = world.wait_applied(800, Duration::from_secs(60)).await;
    assert_once_in_order(&applied, &streams, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_relay_takes_over_within_five_seconds_of_the_leader_dying() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let consumed = Metrics::new();
    world.start_consumer(config, Recorder::never_failing(), &consumed);
    let (first, second) = (Metrics::new(), Metrics::new());
    let first_relay = world.start_relay(world.relay_config(), &first);
    let second_relay = world.start_relay(world.relay_config(), &second);

    let streams = streams("stock-failover", 10);
    append_round_robin(&world.store, &streams, 10, 5).await;
    world.wait_applied(100, Duration::from_secs(30)).await;
    world.wait_outbox_published().await;
    let (leader, standby, leader_task, standby_task) = match (
        first.published_count(SERVICE),
        second.published_count(SERVICE),
    ) {
        (100, 0) => (first, second, first_relay, second_relay),
        (0, 100) => (second, first, second_relay, first_relay),
        other => panic!("exactly one relay publishes, got {other:?}"),
    };

    // The leader dies: its task and connections are gone without a goodbye.
    leader_task.abort();
    let died = Instant::now();
    for stream in &streams {
        let events: Vec<NewEvent> = (0..10).map(|_| stock_event(stream, 1)).collect();
        world
            .store
            .append(stream, ExpectedVersion::Exact(10), &events)
            .await
            .unwrap();
    }
    wait_for(Duration::from_secs(5), "the standby to publish", || async {
        (standby.published_count(SERVICE) > 0).then_some(())
    })
    .await;
    let took = died.elapsed();
    let applied = world.wait_applied(200, Duration::from_secs(30)).await;
    assert_once_in_order(&applied, &streams, 20);
    assert_eq!(leader.published_count(SERVICE), 100);
    assert!(took < Duration::from_secs(5), "took over after {took:?}");
    assert!(!standby_task.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_handlers_retry_with_backoff_then_dead_letter_and_park_their_stream() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let healed = Arc::new(AtomicBool::new(false));
    let recorder = {
        let healed = healed.clone();
        Recorder::new(move |message, attempt| {
            match (
                message.envelope.stream_id.as_str(),
                message.envelope.stream_version,
            ) {
                ("stock-flaky", Some(1)) => attempt < 3,
                ("stock-broken", Some(2)) => !healed.load(Ordering::SeqCst),
                _ => false,
            }
        })
    };
    let metrics = Metrics::new();
    world.start_consumer(config.clone(), recorder.clone(), &metrics);
    world.start_relay(world.relay_config(), &metrics);

    let healthy = streams("stock-healthy", 3);
    let all: Vec<String> = ["stock-flaky".to_owned(), "stock-broken".to_owned()]
        .into_iter()
        .chain(healthy.iter().cloned())
        .collect();
    append_round_robin(&world.store, &healthy, 5, 1).await;
    append_round_robin(&world.store, &all[..1], 1, 1).await;
    append_round_robin(&world.store, &all[1..2], 4, 1).await;
    // A payload that is not Avro, with a well-formed envelope: straight to the DLQ.
    let garbage = publish_garbage(&world).await;

    // stock-broken: v1 applied, v2 dead after 3 attempts, v3 and v4 parked behind it.
    let dead = read_dead_letters(&world, 4).await;
    let broken_v2 = dead
        .iter()
        .find(|letter| {
            letter.parked_behind.is_none() && letter.envelope.stream_id == "stock-broken"
        })
        .expect("stock-broken's failing event is dead-lettered");
    assert_eq!(broken_v2.envelope.stream_version, Some(2));
    assert_eq!(broken_v2.attempts, Some(3));
    assert!(
        broken_v2.error.contains("scripted failure on attempt 3"),
        "{}",
        broken_v2.error
    );
    assert_eq!(broken_v2.queue.as_deref(), Some("order.recorder"));
    assert_eq!(broken_v2.routing_key.as_deref(), Some("order.StockAdded"));
    let garbage_letter = dead
        .iter()
        .find(|letter| letter.envelope.message_id == garbage)
        .expect("the garbage message is dead-lettered");
    assert_eq!(garbage_letter.attempts, Some(0));
    assert!(
        garbage_letter.error.contains("undecodable"),
        "{}",
        garbage_letter.error
    );
    let parked: Vec<_> = dead
        .iter()
        .filter(|letter| letter.parked_behind.is_some())
        .collect();
    assert_eq!(parked.len(), 2, "v3 and v4 are parked: {dead:#?}");
    for (letter, version) in parked.iter().zip([3, 4]) {
        assert_eq!(letter.envelope.stream_version, Some(version));
        assert_eq!(letter.parked_behind, Some(broken_v2.envelope.message_id));
    }
    assert_eq!(recorder.attempts_of(broken_v2.envelope.message_id).len(), 3);
    assert!(
        recorder
            .attempts_of(parked[0].envelope.message_id)
            .is_empty()
    );

    // Everything else flowed: the healthy streams, flaky after two failures, broken v1.
    let applied = world
        .wait_applied(5 * 3 + 1 + 1, Duration::from_secs(30))
        .await;
    let flaky = applied
        .iter()
        .find(|row| row.stream_id == "stock-flaky")
        .expect("flaky applied");
    let attempts = recorder.attempts_of(flaky.message_id);
    assert_eq!(attempts.len(), 3, "two failures, then success");
    let first_gap = attempts[1] - attempts[0];
    let second_gap = attempts[2] - attempts[1];
    assert!(
        first_gap >= Duration::from_millis(95) && first_gap < Duration::from_millis(600),
        "about 100 ms before the second attempt, was {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(195) && second_gap < Duration::from_millis(900),
        "about 200 ms before the third attempt, was {second_gap:?}"
    );
    assert_eq!(
        world
            .count("SELECT count(*) FROM parked_streams WHERE stream_id = 'stock-broken'")
            .await,
        1
    );

    // A new event of the parked stream queues behind the parked ones.
    world
        .store
        .append(
            "stock-broken",
            ExpectedVersion::Exact(4),
            &[stock_event("stock-broken", 1)],
        )
        .await
        .unwrap();
    let live = read_dead_letters(&world, 1).await;
    assert_eq!(live[0].envelope.stream_version, Some(5));
    assert_eq!(live[0].parked_behind, Some(broken_v2.envelope.message_id));

    // Once the cause is fixed, replaying the dead letters in order lets the stream's
    // messages through one by one: v2, v3, v4, then v5.
    healed.store(true, Ordering::SeqCst);
    replay(&world, &config.queue(), &dead).await;
    replay(&world, &config.queue(), &live).await;
    let applied = world
        .wait_applied(5 * 3 + 1 + 5, Duration::from_secs(30))
        .await;
    let broken: Vec<i64> = applied
        .iter()
        .filter(|row| row.stream_id == "stock-broken")
        .filter_map(|row| row.version)
        .collect();
    assert_eq!(broken, vec![1, 2, 3, 4, 5]);
    wait_for(
        Duration::from_secs(10),
        "stock-broken to flow again",
        || async {
            let parked = world
                .count("SELECT count(*) FROM parked_streams WHERE stream_id = 'stock-broken'")
                .await;
            (parked == 0).then_some(())
        },
    )
    .await;
    assert_eq!(world.count("SELECT count(*) FROM parked_messages").await, 0);
    // The garbage message, dead-lettered again by the replay, still holds its stream;
    // skipping it releases the stream.
    let again = read_dead_letters(&world, 1).await;
    assert_eq!(again[0].envelope.message_id, garbage);
    let garbage_stream = "stock-garbage";
    assert_eq!(
        skip(&world.db.pool, "order.recorder", garbage_stream)
            .await
            .unwrap(),
        None
    );
    assert_eq!(world.count("SELECT count(*) FROM parked_streams").await, 0);
    assert!(
        !unpark(&world.db.pool, "order.recorder", garbage_stream)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_sent_through_the_outbox_is_handled_once_by_the_target_service() {
    let world = World::new().await;
    let commands = ConsumerConfig::commands("inventory", &world.vhost.url);
    world.declare(&commands).await;
    let metrics = Metrics::new();
    world.start_consumer(commands.clone(), Recorder::never_failing(), &metrics);
    world.start_relay(world.relay_config(), &metrics);

    let registry = TestDb::registry();
    let order_id = Uuid::now_v7();
    let reserve = OutgoingCommand::new(
        "inventory",
        "stock-SKU-1",
        registry
            .encode(&StockEvent::StockReserved {
                sku: "SKU-1".into(),
                order_id,
                quantity: 2,
            })
            .unwrap(),
        metadata(),
    );
    let placed = OrderEvent::OrderPlaced {
        order_id,
        customer_id: Uuid::now_v7(),
        lines: vec![OrderLine {
            sku: "SKU-1".into(),
            quantity: 2,
            unit_price_cents: 500,
        }],
        total_cents: 1_000,
        currency: "EUR".into(),
        card_token: "tok_visa".into(),
    };
    let stream = format!("order-{order_id}");
    let mut transaction = world.store.begin().await.unwrap();
    transaction
        .append(
            &stream,
            ExpectedVersion::NoStream,
            &[NewEvent::new(registry.encode(&placed).unwrap(), metadata())],
        )
        .await
        .unwrap();
    transaction.send_command(&reserve).await.unwrap();
    transaction.commit().await.unwrap();

    // Sent again by a retrying sender, and once more in a transaction that rolls back.
    let mut again = world.store.begin().await.unwrap();
    again.send_command(&reserve).await.unwrap();
    again.commit().await.unwrap();
    let lost = OutgoingCommand {
        command_id: Uuid::now_v7(),
        ..reserve.clone()
    };
    let mut rolled_back = world.store.begin().await.unwrap();
    rolled_back.send_command(&lost).await.unwrap();
    rolled_back.rollback().await.unwrap();

    let applied = world.wait_applied(1, Duration::from_secs(30)).await;
    assert_eq!(applied[0].message_id, reserve.command_id);
    assert_eq!(applied[0].message_type, "StockReserved");
    assert_eq!(applied[0].stream_id, "stock-SKU-1");
    assert_eq!(applied[0].version, None, "commands have no stream version");
    wait_for(Duration::from_secs(30), "the repeated command", || async {
        (metrics.duplicate_count("inventory.commands") == 1).then_some(())
    })
    .await;
    world.wait_outbox_published().await;
    assert_eq!(world.applied().await.len(), 1);
    assert!(
        metrics
            .render()
            .contains("orderflow_relay_published_total{service=\"order\"}")
    );
}

/// Publishes a message whose envelope is fine but whose payload is not Avro.
async fn publish_garbage(world: &World) -> Uuid {
    let envelope = poison_envelope("stock-garbage", "StockAdded");
    publish_raw(
        world,
        "order.StockAdded",
        b"definitely not avro",
        envelope.properties(),
    )
    .await;
    envelope.message_id
}

/// A well-formed envelope for a message of `message_type` on `stream_id`.
fn poison_envelope(stream_id: &str, message_type: &str) -> Envelope {
    Envelope {
        message_id: Uuid::now_v7(),
        message_type: message_type.into(),
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
        stream_id: stream_id.into(),
        stream_version: Some(1),
        global_position: 1,
        schema_fingerprint: 0,
        timestamp_ms: 0,
        trace: None,
    }
}

/// Publishes `body` with `properties` to the events exchange, confirmed.
async fn publish_raw(
    world: &World,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let connection = amqp::connect(&world.vhost.url, "test-raw").await.unwrap();
    let channel = amqp::confirming_channel(&connection).await.unwrap();
    channel
        .basic_publish(
            amqp::EVENTS_EXCHANGE.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_once_and_the_consumer_carries_on() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let metrics = Metrics::new();
    world.start_consumer(config.clone(), Recorder::never_failing(), &metrics);

    let valid = TestDb::registry()
        .encode(&StockEvent::StockAdded {
            sku: "SKU-1".into(),
            quantity: 1,
        })
        .unwrap()
        .payload;
    // Single-object encoding: 2 magic bytes, an 8-byte fingerprint, then the body.
    let mut wrong_fingerprint = valid.clone();
    wrong_fingerprint[2..10].copy_from_slice(&0x0bad_f00d_dead_beef_u64.to_le_bytes());
    let truncated = valid[..valid.len() - 2].to_vec();
    // A string claiming about 2^62 bytes: a decoder must refuse, not allocate.
    let mut huge_length = valid[..10].to_vec();
    huge_length.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let big: Vec<u8> = (0..4 << 20)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let poisons: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "stock-poison-unknown-type",
            "NoSuchEvent",
            b"\xc3\x01garbage".to_vec(),
        ),
        ("stock-poison-fingerprint", "StockAdded", wrong_fingerprint),
        ("stock-poison-truncated", "StockAdded", truncated),
        ("stock-poison-length", "StockAdded", huge_length),
        ("stock-poison-big", "StockAdded", big),
    ];
    let mut poisoned = Vec::new();
    for (stream, message_type, body) in &poisons {
        let envelope = poison_envelope(stream, message_type);
        let routing_key = format!("order.{message_type}");
        publish_raw(&world, &routing_key, body, envelope.properties()).await;
        poisoned.push(envelope.message_id);
    }
    // No envelope at all: no message id, no stream, nothing but a body.
    publish_raw(
        &world,
        "order.StockAdded",
        b"{\"hello\":1}",
        lapin::BasicProperties::default(),
    )
    .await;

    // Healthy events published after the poison still flow.
    world.start_relay(world.relay_config(), &metrics);
    let healthy = streams("stock-healthy", 3);
    append_round_robin(&world.store, &healthy, 3, 1).await;
    let applied = world.wait_applied(9, Duration::from_secs(30)).await;
    assert!(
        applied
            .iter()
            .all(|row| row.stream_id.starts_with("stock-healthy"))
    );

    // Each poison message is dead-lettered once, straight away, with its reason.
    wait_for(Duration::from_secs(30), "six dead letters", || async {
        (metrics.dead_lettered_count("order.recorder") >= 6).then_some(())
    })
    .await;
    let letters = eventstore::dlq::list(&world.vhost.url, SERVICE)
        .await
        .unwrap();
    assert_eq!(letters.len(), 6, "{letters:#?}");
    let mut ids: Vec<Uuid> = letters.iter().filter_map(|l| l.message_id).collect();
    ids.sort();
    poisoned.sort();
    assert_eq!(ids, poisoned, "the enveloped poison, each once");
    for letter in &letters {
        let error = letter.error.clone().unwrap_or_default();
        assert!(
            error.starts_with("undecodable payload") || error.starts_with("malformed message"),
            "{error}"
        );
        assert_eq!(letter.attempts, Some(0), "no handler ran for {error}");
    }
    assert!(
        letters
            .iter()
            .any(|l| l.message_id.is_none() && l.payload == b"{\"hello\":1}")
    );
    // Nothing went round again: the count is still six after the healthy traffic.
    world
        .store
        .append(
            &healthy[0],
            ExpectedVersion::Exact(3),
            &[stock_event(&healthy[0], 1)],
        )
        .await
        .unwrap();
    world.wait_applied(10, Duration::from_secs(30)).await;
    assert_eq!(metrics.dead_lettered_count("order.recorder"), 6);
    assert_eq!(world.applied().await.len(), 10);
}

#[derive(Debug)]
struct DeadLetter {
    envelope: Envelope,
    payload: Vec<u8>,
    properties: lapin::BasicProperties,
    error: String,
    attempts: Option<i64>,
    queue: Option<String>,
    routing_key: Option<String>,
    parked_behind: Option<Uuid>,
}

/// Takes `count` messages off the dead-letter queue, in queue order.
async fn read_dead_letters(world: &World, count: usize) -> Vec<DeadLetter> {
    let connection = amqp::connect(&world.vhost.url, "test-dlq").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = amqp::dead_letter_queue(SERVICE);
    let mut letters = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while letters.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} dead letters: {letters:#?}",
            letters.len()
        );
        let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let properties = message.delivery.properties.clone();
        let headers = properties.headers().clone().unwrap_or_default();
        letters.push(DeadLetter {
            envelope: Envelope::from_properties(&properties).unwrap(),
            payload: message.delivery.data.clone(),
            error: amqp::header_string(&headers, dead_letter_headers::ERROR).unwrap_or_default(),
            attempts: amqp::header_integer(&headers, dead_letter_headers::ATTEMPTS),
            queue: amqp::header_string(&headers, dead_letter_headers::QUEUE),
            routing_key: amqp::header_string(&headers, dead_letter_headers::ROUTING_KEY),
            parked_behind: amqp::header_string(&headers, dead_letter_headers::PARKED_BEHIND)
                .and_then(|id| Uuid::parse_str(&id).ok()),
            properties,
        });
    }
    connection.close(200, "done".into()).await.unwrap();
    letters
}

/// Sends dead letters back to the queue that gave up on them, in order.
async fn replay(world: &World, queue: &str, letters: &[DeadLetter]) {
    let connection = amqp::connect(&world.vhost.url, "test-replay")
        .await
        .unwrap();
    let channel = amqp::confirming_channel(&connection).await.unwrap();
    for letter in letters {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &letter.payload,
                letter.properties.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    connection.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_committing_transaction_is_not_overtaken_by_its_streams_next_event() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let metrics = Metrics::new();
    world.start_consumer(config.clone(), Recorder::never_failing(), &metrics);
    world.start_relay(world.relay_config(), &metrics);
    let store = &world.store;
    let first = store
        .append(
            "stock-late",
            ExpectedVersion::NoStream,
            &[stock_event("stock-late", 1)],
        )
        .await
        .unwrap();
    world.wait_applied(1, Duration::from_secs(30)).await;

    // An older transaction (it wrote first, as a consumer's inbox claim does) appends
    // v2, but commits only after a younger one was published.
    let mut older = store.begin().await.unwrap();
    older
        .append(
            "stock-elsewhere",
            ExpectedVersion::NoStream,
            &[stock_event("stock-elsewhere", 1)],
        )
        .await
        .unwrap();
    older
        .append(
            "stock-late",
            first.next_expected(),
            &[stock_event("stock-late", 1)],
        )
        .await
        .unwrap();
    store
        .append(
            "stock-younger",
            ExpectedVersion::NoStream,
            &[stock_event("stock-younger", 1)],
        )
        .await
        .unwrap();
    world.wait_applied(2, Duration::from_secs(30)).await;
    older.commit().await.unwrap();
    store
        .append(
            "stock-late",
            ExpectedVersion::Exact(2),
            &[stock_event("stock-late", 1)],
        )
        .await
        .unwrap();

    let applied = world.wait_applied(5, Duration::from_secs(30)).await;
    let late: Vec<i64> = applied
        .iter()
        .filter(|row| row.stream_id == "stock-late")
        .filter_map(|row| row.version)
        .collect();
    assert_eq!(late, vec![1, 2, 3], "v3 must not overtake the late v2");
    assert_eq!(metrics.dead_lettered_count(&config.queue()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_asked_to_stop_finishes_the_message_in_hand() {
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let recorder = Recorder {
        work: Duration::from_millis(500),
        ..Recorder::never_failing()
    };
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let consumer = Consumer::new(
        config.clone(),
        world.store.clone(),
        TestDb::registry(),
        recorder.clone(),
        metrics.clone(),
    );
    let consumer = tokio::spawn(consumer.run(stop.clone()));
    world.start_relay(world.relay_config(), &metrics);
    world
        .store
        .append(
            "stock-stop",
            ExpectedVersion::NoStream,
            &[stock_event("stock-stop", 1)],
        )
        .await
        .unwrap();
    wait_for(Duration::from_secs(30), "the handler to start", || async {
        (!recorder.attempts.lock().unwrap().is_empty()).then_some(())
    })
    .await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("the consumer stops")
        .unwrap();
    // By the time it returned, the message in hand was applied and acknowledged.
    assert_eq!(world.applied().await.len(), 1);
    assert_eq!(metrics.consumed_count(&config.queue()), 1);
}

/// DESIGN §8.8, bounded bookkeeping: inbox rows, consumer progress and idempotency
/// keys past their retention are pruned (by one instance at a time, with a metric),
/// and a message redelivered inside the retention is still recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bookkeeping_past_its_retention_is_pruned_and_a_recent_redelivery_is_still_a_duplicate() {
    use eventstore::retention::{Pruned, Pruner, Retention};
    let world = World::new().await;
    let config = world.consumer_config();
    world.declare(&config).await;
    let old = "stock-retired".to_owned();
    let recent = "stock-recent".to_owned();
    append_round_robin(&world.store, &[old.clone(), recent.clone()], 3, 3).await;
    let metrics = Metrics::new();
    world.start_consumer(config.clone(), Recorder::never_failing(), &metrics);
    world.start_relay(world.relay_config(), &metrics);
    world.wait_applied(6, Duration::from_secs(30)).await;

    // One stream's bookkeeping is eight days old, one idempotency key two days.
    let backdate = |sql: &'static str| {
        let pool = world.db.pool.clone();
        let old = old.clone();
        async move {
            sqlx::query(sql).bind(old).execute(&pool).await.unwrap();
        }
    };
    backdate(
        "UPDATE inbox SET handled_at = now() - interval '8 days' WHERE message_id IN \
         (SELECT event_id FROM events WHERE stream_id = $1)",
    )
    .await;
    backdate(
        "UPDATE consumer_streams SET applied_at = now() - interval '8 days' WHERE stream_id = $1",
    )
    .await;
    for (key, age) in [("stale-key", "2 days"), ("fresh-key", "1 hour")] {
        sqlx::query(
            "INSERT INTO idempotency_keys (key, request, status, body, created_at) \
             VALUES ($1, '\\x00', 202, '{}', now() - $2::interval)",
        )
        .bind(key)
        .bind(age)
        .execute(&world.db.pool)
        .await
        .unwrap();
    }

    let pruner = Pruner::new(
        world.db.pool.clone(),
        SERVICE,
        Retention::default(),
        metrics.clone(),
    );
    // While another instance prunes (it holds the lock), this one leaves it be.
    let mut other = world.db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(4, 0)")
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(pruner.prune_once().await.unwrap(), Pruned::default());
    other.rollback().await.unwrap();

    let pruned = pruner.prune_once().await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            inbox: 3,
            consumer_streams: 1,
            idempotency_keys: 1,
        }
    );
    assert_eq!(
        world.count("SELECT count(*) FROM inbox").await,
        3,
        "the recent stream's inbox rows stay"
    );
    let keys: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency_keys")
        .fetch_all(&world.db.pool)
        .await
        .unwrap();
    assert_eq!(keys, ["fresh-key"]);
    let exposition = metrics.render();
    assert!(
        exposition.contains(r#"orderflow_pruned_rows_total{service="order",table="inbox"} 3"#),
        "{exposition}"
    );
    assert_eq!(pruner.prune_once().await.unwrap(), Pruned::default());

    // The recent stream's events come again: recognised, applied once.
    let again = eventstore::republish::Selection {
        stream: Some(recent),
        ..Default::default()
    };
    let url = &world.vhost.url;
    let sent = eventstore::republish::republish(&world.store, url, SERVICE, &again, |_, _| {})
        .await
        .unwrap();
    assert_eq!(sent, 3);
    wait_for(Duration::from_secs(30), "the duplicates", || async {
        (metrics.duplicate_count(&config.queue()) == 3).then_some(())
    })
    .await;
    assert_eq!(world.applied().await.len(), 6, "nothing applied twice");
    // A republish leaves out what is older than the retention (here: everything).
    let too_old = eventstore::republish::Selection {
        stream: Some(old),
        recorded_since: Some(chrono::Utc::now() + chrono::Duration::seconds(1)),
        ..Default::default()
    };
    let sent = eventstore::republish::republish(&world.store, url, SERVICE, &too_old, |_, _| {})
        .await
        .unwrap();
    assert_eq!(sent, 0);
}
