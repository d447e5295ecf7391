//! The floor under issue 18's targets: what the machine spends on the I/O one order
//! must do under DESIGN §3–§6 (own events from the own store, the broker only between
//! services), done by plain sqlx and lapin with nothing of ours in between, at a steady
//! rate of orders.
//!
//! One two-line order that confirms, through order, inventory and payment, is in the
//! real system: 8 messages published with confirms (4 commands: ReserveStock,
//! AuthorizePayment, CommitStock, CapturePayment; 4 events: OrderStockReserved,
//! PaymentAuthorized, PaymentCaptured and OrderConfirmed, which no service of the
//! three consumes), 7 deliveries with an inbox row each, 9 events appended, 8 outbox
//! rows written and marked, and 11 events read by the subscriptions on the three
//! stores (the order's read models and the saga read OrderPlaced and OrderConfirmed,
//! inventory's read models its 5 events, payment's its 2), each batch applied with its
//! checkpoint in one transaction. Here every one of them happens, on the event-store
//! tables of a fresh database and quorum queues in a fresh virtual host, on a
//! connection per consumer and subscription and one for the publisher, as the services
//! have them, but cheaper than a real implementation does them: one database for the
//! three stores (a subscription skips the other stores' events), positions from the
//! writing transaction's id with the plain snapshot-xmin fence, no HTTP, no Avro, no
//! per-stream ordering check, no aggregate or saga decision, each consumer batching up
//! to 64 ready deliveries into one transaction of at most six statements (BEGIN and
//! COMMIT included), one consumer transaction at a time per queue, and every message
//! of an order published as soon as the order is due rather than each after the
//! transaction that queued it. It is a floor for this flow on these clients (sqlx,
//! lapin) and servers on this machine, not a proof that nothing could do better.
//!
//! `cargo bench -p tests --bench floor`. Settings: BENCH_RATES (orders/s, default
//! `100,200,300`), BENCH_SECONDS (measured, default 10) after BENCH_WARMUP (default 2).
//! Prints a markdown row per rate: orders handled per second in the measured window
//! (every delivery and every event a subscription reads counts its share of an
//! order), how long the backlog took to drain after the load, CPU busy, the CPU of
//! PostgreSQL, RabbitMQ and this process in cores, and the steal seen.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventstore::amqp;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use sqlx::PgPool;
use tests::bench::{cpu_times, env_or, idle_jiffies, steal_share};
use tests::{TestDb, Vhost};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const EXCHANGE: &str = "floor";
const BATCH: usize = 64;
/// Events a subscription reads per transaction.
const PAGE: i64 = 500;
/// Bytes in a message body and an event payload (the real Avro bodies are 60–300).
const BODY: usize = 160;
/// Ordinals of a transaction's outbox command rows start here (its events below it).
const COMMAND_ORDINALS: i64 = 512;

/// The consumers of the order's broker messages, each a queue.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Queue {
    Saga,
    InventoryCommands,
    PaymentCommands,
}

use Queue::*;

/// The three event stores (one `events` table here, told apart by `event_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    Order,
    Inventory,
    Payment,
}

/// Kinds of event (kept in `schema_fingerprint`).
const ORDER_PLACED: i64 = 1;
const ORDER_CONFIRMED: i64 = 2;
const STOCK_RESERVED: i64 = 3;
const ORDER_STOCK_RESERVED: i64 = 4;
const STOCK_COMMITTED: i64 = 5;
const PAYMENT_AUTHORIZED: i64 = 6;
const PAYMENT_CAPTURED: i64 = 7;

/// An event a handler appends: its store, its kind, and whether it crosses the broker
/// (an outbox row).
type Appended = (Store, i64, bool);

/// What a consumer's transaction writes for one delivery besides its inbox row.
struct Receiver {
    queue: Queue,
    events: &'static [Appended],
    commands: u8,
    /// The saga's state row.
    state: bool,
}

/// One broker message of an order and who receives it (nobody, for OrderConfirmed:
/// only the notification service consumes it).
struct Step {
    receiver: Option<Receiver>,
}

/// The order's 8 broker messages in the order the real flow sends them.
const STEPS: [Step; 8] = [
    // ReserveStock: both lines' stock streams, and one answer for the order.
    Step {
        receiver: Some(Receiver {
            queue: InventoryCommands,
            events: &[
                (Store::Inventory, STOCK_RESERVED, false),
                (Store::Inventory, STOCK_RESERVED, false),
                (Store::Inventory, ORDER_STOCK_RESERVED, true),
            ],
            commands: 0,
            state: false,
        }),
    },
    // OrderStockReserved: the saga asks for payment.
    Step {
        receiver: Some(Receiver {
            queue: Saga,
            events: &[],
            commands: 1,
            state: true,
        }),
    },
    // AuthorizePayment.
    Step {
        receiver: Some(Receiver {
            queue: PaymentCommands,
            events: &[(Store::Payment, PAYMENT_AUTHORIZED, true)],
            commands: 0,
            state: false,
        }),
    },
    // PaymentAuthorized: the saga confirms the order, commits the stock, captures.
    Step {
        receiver: Some(Receiver {
            queue: Saga,
            events: &[(Store::Order, ORDER_CONFIRMED, true)],
            commands: 2,
            state: true,
        }),
    },
    // CommitStock.
    Step {
        receiver: Some(Receiver {
            queue: InventoryCommands,
            events: &[
                (Store::Inventory, STOCK_COMMITTED, false),
                (Store::Inventory, STOCK_COMMITTED, false),
            ],
            commands: 0,
            state: false,
        }),
    },
    // CapturePayment.
    Step {
        receiver: Some(Receiver {
            queue: PaymentCommands,
            events: &[(Store::Payment, PAYMENT_CAPTURED, true)],
            commands: 0,
            state: false,
        }),
    },
    // PaymentCaptured: the saga records the capture.
    Step {
        receiver: Some(Receiver {
            queue: Saga,
            events: &[],
            commands: 0,
            state: true,
        }),
    },
    // OrderConfirmed: for the notification service, which is not running.
    Step { receiver: None },
];

const QUEUES: [Queue; 3] = [Saga, InventoryCommands, PaymentCommands];

/// A subscription on one store: what it does with an event of each kind (a state
/// row upserted, commands queued), `None` for a kind it skips.
#[derive(Clone, Copy, Debug)]
struct Subscription {
    name: &'static str,
    store: Store,
    applies: fn(i64) -> Option<u8>,
}

const SUBSCRIPTIONS: [Subscription; 4] = [
    Subscription {
        name: "order-read-models",
        store: Store::Order,
        applies: |_| Some(0),
    },
    // The saga hears OrderPlaced from the store and asks for the stock.
    Subscription {
        name: "order-saga",
        store: Store::Order,
        applies: |kind| (kind == ORDER_PLACED).then_some(1),
    },
    Subscription {
        name: "inventory-read-models",
        store: Store::Inventory,
        applies: |kind| (kind != ORDER_STOCK_RESERVED).then_some(0),
    },
    Subscription {
        name: "payment-read-models",
        store: Store::Payment,
        applies: |_| Some(0),
    },
];

fn queue_name(queue: Queue) -> String {
    format!("floor.{queue:?}")
}

/// Every event of the order's stores: OrderPlaced and what the handlers append.
fn events_of(store: Store) -> u64 {
    let appended = STEPS
        .iter()
        .filter_map(|step| step.receiver.as_ref())
        .flat_map(|receiver| receiver.events)
        .filter(|(s, _, _)| *s == store)
        .count() as u64;
    appended + u64::from(store == Store::Order)
}

/// Deliveries, and events read by subscriptions: the units of work of one order.
fn work_per_order() -> u64 {
    let deliveries = STEPS.iter().filter(|s| s.receiver.is_some()).count() as u64;
    let read: u64 = SUBSCRIPTIONS.iter().map(|s| events_of(s.store)).sum();
    deliveries + read
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rates: String = env_or("BENCH_RATES", "100,200,300".to_owned());
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let warmup: u64 = env_or("BENCH_WARMUP", 2);

    let db = TestDb::new(16).await?;
    sqlx::raw_sql(
        "CREATE TABLE floor_state (consumer TEXT, id UUID, version BIGINT NOT NULL, \
                                   PRIMARY KEY (consumer, id)); \
         CREATE TABLE floor_checkpoints (name TEXT PRIMARY KEY, position BIGINT NOT NULL)",
    )
    .execute(&db.pool)
    .await?;
    let vhost = Vhost::new()?;
    let connection = amqp::connect(&vhost.url, "floor-publisher").await?;
    declare(&connection).await?;

    let floor = Arc::new(Floor {
        pool: db.pool.clone(),
        handled: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        unpublished: Mutex::new(VecDeque::new()),
        appended: tokio::sync::Notify::new(),
    });
    let cancel = CancellationToken::new();
    let mut workers = Vec::new();
    for queue in QUEUES {
        let connection = amqp::connect(&vhost.url, &queue_name(queue)).await?;
        workers.push(tokio::spawn(consume(
            connection,
            floor.clone(),
            queue,
            cancel.clone(),
        )));
    }
    for subscription in SUBSCRIPTIONS {
        workers.push(tokio::spawn(subscribe(
            floor.clone(),
            subscription,
            cancel.clone(),
        )));
    }

    println!(
        "{} messages published, {} delivered and {} events read by subscriptions per order\n",
        STEPS.len(),
        STEPS.iter().filter(|s| s.receiver.is_some()).count(),
        work_per_order() - STEPS.iter().filter(|s| s.receiver.is_some()).count() as u64
    );
    println!(
        "| orders/s | handled orders/s | backlog drained after the load | CPU busy | PostgreSQL | RabbitMQ | this process | steal |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for rate in rates.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let rate: u64 = rate.parse()?;
        let row = run(&floor, &connection, rate, warmup, seconds).await?;
        println!("{row}");
    }
    cancel.cancel();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

async fn declare(connection: &Connection) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            EXCHANGE.into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for queue in QUEUES {
        let keys: Vec<String> = STEPS
            .iter()
            .enumerate()
            .filter(|(_, step)| step.receiver.as_ref().is_some_and(|r| r.queue == queue))
            .map(|(kind, _)| kind.to_string())
            .collect();
        let bindings: Vec<(&str, &str)> = keys.iter().map(|key| (EXCHANGE, key.as_str())).collect();
        amqp::declare_queue(&channel, &queue_name(queue), &bindings, true).await?;
    }
    Ok(())
}

/// What the driver, the relay, the consumers and the subscriptions share.
struct Floor {
    pool: PgPool,
    /// Units of work done (deliveries handled, events read by subscriptions), and the
    /// units the orders placed so far make.
    handled: AtomicU64,
    sent: AtomicU64,
    /// Outbox rows written and not yet marked, oldest first, as the relay sees them.
    unpublished: Mutex<VecDeque<i64>>,
    /// Woken on every commit that appended events, as the store wakes its
    /// subscriptions in process.
    appended: tokio::sync::Notify,
}

impl Floor {
    fn written(&self, positions: Vec<i64>) {
        self.unpublished
            .lock()
            .expect("not poisoned")
            .extend(positions);
    }
}

/// Drives `rate` orders/s for `warmup + seconds`, measures the last `seconds`, then
/// waits for the backlog to drain.
async fn run(
    floor: &Arc<Floor>,
    connection: &Connection,
    rate: u64,
    warmup: u64,
    seconds: u64,
) -> anyhow::Result<String> {
    let channel = amqp::confirming_channel(connection).await?;
    let orders = rate * (warmup + seconds);
    let started = Instant::now();
    let mut sample = None;
    let mut posts = tokio::task::JoinSet::new();
    // One relay marks, in publishing order, as the real one (leader-elected) does.
    let (to_mark, marking) = tokio::sync::mpsc::unbounded_channel();
    let marker = tokio::spawn(relay_marks(floor.clone(), marking));
    let handled = &floor.handled;
    for order in 0..orders {
        let due = started + Duration::from_secs_f64(order as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        if order == rate * warmup {
            sample = Some((Sample::take(), handled.load(Ordering::Relaxed)));
        }
        let id = Uuid::now_v7();
        posts.spawn(place(floor.clone(), id));
        let confirms = publish(&channel, id).await?;
        floor.sent.fetch_add(work_per_order(), Ordering::Relaxed);
        to_mark.send(confirms)?;
        while let Some(done) = posts.try_join_next() {
            done??;
        }
    }
    let (sample, handled_before) =
        sample.unwrap_or_else(|| (Sample::take(), handled.load(Ordering::Relaxed)));
    // Work done in the measured window, as whole orders per second.
    let throughput = handled
        .load(Ordering::Relaxed)
        .saturating_sub(handled_before) as f64
        / work_per_order() as f64
        / sample.at.elapsed().as_secs_f64();
    let measured = sample.since();
    let load_ended = Instant::now();
    let expected = floor.sent.load(Ordering::Relaxed);
    let deadline = load_ended + Duration::from_secs(60);
    while handled.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = expected.saturating_sub(handled.load(Ordering::Relaxed));
    let kept_up = if left == 0 {
        format!("{} ms", load_ended.elapsed().as_millis())
    } else {
        format!("not in 60 s: {left} units of work still waiting")
    };
    while posts.join_next().await.transpose()?.transpose()?.is_some() {}
    drop(to_mark);
    marker.await??;
    channel.close(200, "done".into()).await?;
    Ok(format!(
        "| {rate} | {throughput:.0} | {kept_up} | {:.0} % | {:.2} | {:.2} | {:.2} | {:.1} % |",
        measured.busy * 100.0,
        measured.postgres,
        measured.rabbitmq,
        measured.own,
        measured.steal * 100.0
    ))
}

/// The position of a transaction's `ordinal`-th row, as the event store numbers it.
const POSITION: &str = "(pg_current_xact_id()::text::bigint << 20) + ";

/// `POST /orders`'s write, as one autocommitted statement: OrderPlaced, which does not
/// cross the broker (the saga hears it from the store).
async fn place(floor: Arc<Floor>, order: Uuid) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO events (global_position, stream_id, stream_version, event_id, \
         event_type, schema_fingerprint, payload, correlation_id, causation_id) \
         VALUES ({POSITION}1, $1, 1, $2, 'Order', $3, $4, $2, $2)"
    )))
    .bind(format!("order-{order}"))
    .bind(order)
    .bind(ORDER_PLACED)
    .bind(vec![7u8; BODY])
    .execute(&floor.pool)
    .await?;
    floor.appended.notify_waiters();
    Ok(())
}

/// Publishes the order's messages without waiting for their confirms.
async fn publish(channel: &Channel, order: Uuid) -> anyhow::Result<Vec<lapin::PublisherConfirm>> {
    let mut confirms = Vec::with_capacity(STEPS.len());
    for kind in 0..STEPS.len() {
        let mut body = vec![kind as u8];
        body.extend_from_slice(order.as_bytes());
        body.resize(BODY, 0);
        let properties = BasicProperties::default()
            .with_message_id(Uuid::now_v7().to_string().into())
            .with_delivery_mode(2);
        confirms.push(
            channel
                .basic_publish(
                    EXCHANGE.into(),
                    kind.to_string().as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties,
                )
                .await?,
        );
    }
    Ok(confirms)
}

/// The relay's part after the broker confirmed: mark as many outbox rows published,
/// by position, every confirmed batch that is ready in one statement.
async fn relay_marks(
    floor: Arc<Floor>,
    mut marking: tokio::sync::mpsc::UnboundedReceiver<Vec<lapin::PublisherConfirm>>,
) -> anyhow::Result<()> {
    // Messages confirmed whose outbox rows were not written yet (the floor publishes an
    // order's messages before its handlers write them).
    let mut owed = 0;
    while let Some(first) = marking.recv().await {
        let mut batches = vec![first];
        while let Ok(next) = marking.try_recv() {
            batches.push(next);
        }
        for confirm in batches.into_iter().flatten() {
            anyhow::ensure!(confirm.await?.is_ack(), "nacked");
            owed += 1;
        }
        let positions: Vec<i64> = {
            let mut unpublished = floor.unpublished.lock().expect("not poisoned");
            let take = owed.min(unpublished.len());
            unpublished.drain(..take).collect()
        };
        owed -= positions.len();
        mark(&floor.pool, &positions).await?;
    }
    // The run has drained: every row is written, so what was confirmed is marked.
    let positions: Vec<i64> = {
        let mut unpublished = floor.unpublished.lock().expect("not poisoned");
        let take = owed.min(unpublished.len());
        unpublished.drain(..take).collect()
    };
    mark(&floor.pool, &positions).await
}

async fn mark(pool: &PgPool, positions: &[i64]) -> anyhow::Result<()> {
    if !positions.is_empty() {
        sqlx::query("UPDATE outbox SET published_at = now() WHERE global_position = ANY($1)")
            .bind(positions)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Queues `keys.len()` commands in the outbox within `transaction`.
async fn queue_commands(
    transaction: &mut sqlx::PgConnection,
    keys: &[String],
) -> anyhow::Result<Vec<i64>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let positions = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO outbox (global_position, message_id, message_type, target_service, \
                             ordering_key, schema_fingerprint, payload, correlation_id, \
                             causation_id) \
         SELECT {POSITION}{COMMAND_ORDINALS} + n, gen_random_uuid(), 'Command', 'floor', k, 1, \
                $2, gen_random_uuid(), gen_random_uuid() \
         FROM unnest($1::text[]) WITH ORDINALITY AS c (k, n) RETURNING global_position"
    )))
    .bind(keys)
    .bind(vec![7u8; BODY])
    .fetch_all(&mut *transaction)
    .await?;
    Ok(positions)
}

/// Upserts a state row per id (its version moved by the count) within `transaction`.
async fn upsert_states(
    transaction: &mut sqlx::PgConnection,
    consumer: &str,
    states: HashMap<Uuid, i64>,
) -> anyhow::Result<()> {
    if states.is_empty() {
        return Ok(());
    }
    let mut states: Vec<(Uuid, i64)> = states.into_iter().collect();
    states.sort();
    let (ids, counts): (Vec<Uuid>, Vec<i64>) = states.into_iter().unzip();
    sqlx::query(
        "INSERT INTO floor_state (consumer, id, version) \
         SELECT $1, * FROM unnest($2::uuid[], $3::bigint[]) \
         ON CONFLICT (consumer, id) DO UPDATE \
         SET version = floor_state.version + excluded.version",
    )
    .bind(consumer)
    .bind(&ids)
    .bind(&counts)
    .execute(&mut *transaction)
    .await?;
    Ok(())
}

/// One consumer: takes what is ready (up to `BATCH`), writes it in one transaction,
/// acknowledges the batch with one ack.
async fn consume(
    connection: Connection,
    floor: Arc<Floor>,
    queue: Queue,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    amqp::set_prefetch(&channel, 256).await?;
    let mut deliveries = channel
        .basic_consume(
            queue_name(queue).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = format!("{queue:?}");
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = deliveries.next() => next,
        };
        let Some(first) = first else { return Ok(()) };
        let mut batch = vec![first?];
        while batch.len() < BATCH {
            match deliveries.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery?),
                _ => break,
            }
        }
        let mut message_ids = Vec::new();
        let (mut streams, mut stores, mut kinds, mut crossing) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut command_keys = Vec::new();
        let mut states: HashMap<Uuid, i64> = HashMap::new();
        for delivery in &batch {
            let kind = usize::from(delivery.data[0]);
            let order = Uuid::from_slice(&delivery.data[1..17])?;
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().parse::<Uuid>())
                .transpose()?
                .unwrap_or_else(Uuid::now_v7);
            message_ids.push(message_id);
            let receiver = STEPS[kind]
                .receiver
                .as_ref()
                .filter(|r| r.queue == queue)
                .ok_or_else(|| anyhow::anyhow!("{consumer} got kind {kind}"))?;
            for (event, (store, event_kind, crosses)) in receiver.events.iter().enumerate() {
                streams.push(format!("{store:?}-{order}-{kind}-{event}"));
                stores.push(format!("{store:?}"));
                kinds.push(*event_kind);
                crossing.push(*crosses);
            }
            for command in 0..receiver.commands {
                command_keys.push(format!("{order}-{kind}-{command}"));
            }
            if receiver.state {
                *states.entry(order).or_default() += 1;
            }
        }
        let mut transaction = floor.pool.begin().await?;
        sqlx::query("INSERT INTO inbox (consumer, message_id) SELECT $1, unnest($2::uuid[])")
            .bind(&consumer)
            .bind(&message_ids)
            .execute(&mut *transaction)
            .await?;
        upsert_states(&mut transaction, &consumer, states).await?;
        let mut positions = Vec::new();
        if !streams.is_empty() {
            // The events, and an outbox row for each that crosses the broker.
            let written: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "WITH e AS (INSERT INTO events (global_position, stream_id, stream_version, \
                            event_id, event_type, schema_fingerprint, payload, correlation_id, \
                            causation_id) \
                            SELECT {POSITION}n, s, 1, gen_random_uuid(), t, k, \
                                   $4, gen_random_uuid(), gen_random_uuid() \
                            FROM unnest($1::text[], $2::text[], $3::bigint[]) \
                                 WITH ORDINALITY AS e (s, t, k, n) \
                            RETURNING global_position, stream_id) \
                 INSERT INTO outbox (global_position) \
                 SELECT e.global_position FROM e \
                 JOIN unnest($1::text[], $5::bool[]) AS c (s, crosses) ON c.s = e.stream_id \
                 WHERE c.crosses RETURNING global_position"
            )))
            .bind(&streams)
            .bind(&stores)
            .bind(&kinds)
            .bind(vec![7u8; BODY])
            .bind(&crossing)
            .fetch_all(&mut *transaction)
            .await?;
            positions.extend(written);
        }
        positions.extend(queue_commands(&mut transaction, &command_keys).await?);
        transaction.commit().await?;
        if !streams.is_empty() {
            floor.appended.notify_waiters();
        }
        floor.written(positions);
        let last = batch.last().expect("a batch holds at least one delivery");
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        floor
            .handled
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
}

/// One subscription: reads its store's committed events after its checkpoint (below
/// the oldest running writer), and applies a page with the checkpoint in one
/// transaction, on a connection of its own.
async fn subscribe(
    floor: Arc<Floor>,
    subscription: Subscription,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut connection = floor.pool.acquire().await?;
    let store = format!("{:?}", subscription.store);
    let mut checkpoint = 0_i64;
    loop {
        // Registered before the read, so a commit during it is not missed.
        let woken = floor.appended.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        // The fence: below the oldest writer running in this database (not the whole
        // server), taken in a statement of its own so the read that follows sees
        // every transaction that ended before it.
        let fence: i64 = sqlx::query_scalar(
            "WITH h AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next) \
             SELECT coalesce((SELECT min(orderflow_xid8(h.next, a.backend_xid)) \
                              FROM pg_stat_activity a \
                              WHERE a.backend_xid IS NOT NULL \
                                AND a.datname = current_database()), h.next) << 20 \
             FROM h",
        )
        .fetch_one(&mut *connection)
        .await?;
        let page: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT global_position, stream_id, schema_fingerprint FROM events \
             WHERE global_position > $1 AND global_position < $2 AND event_type = $3 \
             ORDER BY global_position LIMIT $4",
        )
        .bind(checkpoint)
        .bind(fence)
        .bind(&store)
        .bind(PAGE)
        .fetch_all(&mut *connection)
        .await?;
        let Some(&(last, _, _)) = page.last() else {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                () = &mut woken => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        };
        let mut states: HashMap<Uuid, i64> = HashMap::new();
        let mut command_keys = Vec::new();
        for (position, stream, kind) in &page {
            let Some(commands) = (subscription.applies)(*kind) else {
                continue;
            };
            // The order's row (every stream here is `<prefix>-<order id>…`).
            let id = stream
                .split_once('-')
                .and_then(|(_, rest)| rest.get(..36))
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| Uuid::from_u64_pair(0, *position as u64));
            *states.entry(id).or_default() += 1;
            for command in 0..commands {
                command_keys.push(format!("{stream}-{command}"));
            }
        }
        let mut transaction = sqlx::Connection::begin(&mut *connection).await?;
        upsert_states(&mut transaction, subscription.name, states).await?;
        let positions = queue_commands(&mut transaction, &command_keys).await?;
        sqlx::query(
            "INSERT INTO floor_checkpoints (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(subscription.name)
        .bind(last)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        checkpoint = last;
        floor.written(positions);
        floor
            .handled
            .fetch_add(page.len() as u64, Ordering::Relaxed);
    }
}

/// CPU readings at the start of the measured window.
struct Sample {
    at: Instant,
    machine: (u64, u64, u64),
    processes: (u64, u64, u64),
}

struct Measured {
    busy: f64,
    steal: f64,
    postgres: f64,
    rabbitmq: f64,
    own: f64,
}

impl Sample {
    fn take() -> Sample {
        let (steal, total) = cpu_times();
        Sample {
            at: Instant::now(),
            machine: (steal, total, idle_jiffies()),
            processes: process_jiffies(),
        }
    }

    fn since(self) -> Measured {
        let now = Sample::take();
        let total = now.machine.1.saturating_sub(self.machine.1).max(1) as f64;
        let idle = now.machine.2.saturating_sub(self.machine.2) as f64;
        let steal = steal_share(
            (self.machine.0, self.machine.1),
            (now.machine.0, now.machine.1),
        );
        // Jiffies are 1/100 s; a share of one core over the window.
        let cores = |after: u64, before: u64| {
            after.saturating_sub(before) as f64
                / 100.0
                / now.at.duration_since(self.at).as_secs_f64()
        };
        Measured {
            busy: 1.0 - idle / total - steal,
            steal,
            postgres: cores(now.processes.0, self.processes.0),
            rabbitmq: cores(now.processes.1, self.processes.1),
            own: cores(now.processes.2, self.processes.2),
        }
    }
}

/// utime + stime of every PostgreSQL process, of RabbitMQ (beam.smp) and of this one.
fn process_jiffies() -> (u64, u64, u64) {
    let own = std::process::id().to_string();
    let (mut postgres, mut rabbitmq, mut this) = (0, 0, 0);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, 0, 0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces; the fields after it are plain.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let fields: Vec<&str> = tail.split_whitespace().collect();
        let jiffies = fields
            .get(11)
            .and_then(|u| u.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
        if pid == own {
            this += jiffies;
        } else if comm == "postgres" {
            postgres += jiffies;
        } else if comm.starts_with("beam") {
            rabbitmq += jiffies;
        }
    }
    (postgres, rabbitmq, this)
}
