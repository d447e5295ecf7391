//! The floor under issue 5's target: what the machine spends on the I/O one order
//! must do under DESIGN §3–§6, done by plain sqlx and lapin with nothing of ours in
//! between, at a steady rate of orders.
//!
//! One two-line order that confirms, through order, inventory and payment, is in the
//! real system: 12 messages published with confirms (8 events, 4 commands: the saga
//! sends one stock command per order, inventory answers with an event per SKU), 17
//! deliveries (each event reaches its service's read models and, for the saga's
//! inputs, the saga), 8 events appended, 12 outbox rows written and marked, 17 inbox
//! rows. Here every one of them happens, on the event-store tables of a fresh database
//! and quorum queues in a fresh virtual host, on a connection per consumer and one for
//! the publisher, as the services have them, but cheaper than a real implementation
//! does them: positions from a sequence (no gap-safe counter), no HTTP, no Avro, no
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
//! (every delivery of an order counts a seventeenth), how long the backlog took to
//! drain after the load, CPU busy, the CPU of PostgreSQL, RabbitMQ and this process in cores, and
//! the steal seen.

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
/// Bytes in a message body and an event payload (the real Avro bodies are 60–300).
const BODY: usize = 160;

/// The consumers of one order's messages, each a queue.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Queue {
    OrderReadModels,
    Saga,
    InventoryCommands,
    InventoryReadModels,
    PaymentCommands,
    PaymentReadModels,
}

/// One message of an order: who receives it, and per receiver what its transaction
/// writes besides the inbox row: (events appended, commands queued, state row upserted).
struct Step {
    receivers: &'static [(Queue, u8, u8, bool)],
}

use Queue::*;

/// The order's 12 messages in the order the real flow sends them. The saga sends one
/// stock command per order; inventory answers with an event per SKU stream.
const STEPS: [Step; 12] = [
    // OrderPlaced: the saga asks for the reservation of both lines.
    Step {
        receivers: &[(OrderReadModels, 0, 0, true), (Saga, 0, 1, true)],
    },
    // ReserveStock: an event on each line's stock stream.
    Step {
        receivers: &[(InventoryCommands, 2, 0, false)],
    },
    // StockReserved, one per line: the second one makes the saga ask for payment.
    Step {
        receivers: &[(InventoryReadModels, 0, 0, true), (Saga, 0, 0, true)],
    },
    Step {
        receivers: &[(InventoryReadModels, 0, 0, true), (Saga, 0, 1, true)],
    },
    // AuthorizePayment.
    Step {
        receivers: &[(PaymentCommands, 1, 0, false)],
    },
    // PaymentAuthorized: the saga confirms the order, commits the stock, captures.
    Step {
        receivers: &[(PaymentReadModels, 0, 0, true), (Saga, 1, 2, true)],
    },
    // OrderConfirmed.
    Step {
        receivers: &[(OrderReadModels, 0, 0, true)],
    },
    // CommitStock: an event on each line's stock stream.
    Step {
        receivers: &[(InventoryCommands, 2, 0, false)],
    },
    // CapturePayment.
    Step {
        receivers: &[(PaymentCommands, 1, 0, false)],
    },
    // StockCommitted, one per line.
    Step {
        receivers: &[(InventoryReadModels, 0, 0, true)],
    },
    Step {
        receivers: &[(InventoryReadModels, 0, 0, true)],
    },
    // PaymentCaptured: the saga records the capture.
    Step {
        receivers: &[(PaymentReadModels, 0, 0, true), (Saga, 0, 0, true)],
    },
];

const QUEUES: [Queue; 6] = [
    OrderReadModels,
    Saga,
    InventoryCommands,
    InventoryReadModels,
    PaymentCommands,
    PaymentReadModels,
];

fn queue_name(queue: Queue) -> String {
    format!("floor.{queue:?}")
}

fn deliveries_per_order() -> u64 {
    STEPS.iter().map(|step| step.receivers.len() as u64).sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rates: String = env_or("BENCH_RATES", "100,200,300".to_owned());
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let warmup: u64 = env_or("BENCH_WARMUP", 2);

    let db = TestDb::new(16).await?;
    sqlx::raw_sql(
        "CREATE SEQUENCE floor_position; \
         CREATE TABLE floor_state (consumer TEXT, id UUID, version BIGINT NOT NULL, \
                                   PRIMARY KEY (consumer, id))",
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
    });
    let cancel = CancellationToken::new();
    let mut consumers = Vec::new();
    for queue in QUEUES {
        let connection = amqp::connect(&vhost.url, &queue_name(queue)).await?;
        consumers.push(tokio::spawn(consume(
            connection,
            floor.clone(),
            queue,
            cancel.clone(),
        )));
    }

    println!(
        "{} messages published and {} delivered per order\n",
        STEPS.len(),
        deliveries_per_order()
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
    for consumer in consumers {
        consumer.await??;
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
            .filter(|(_, step)| step.receivers.iter().any(|r| r.0 == queue))
            .map(|(kind, _)| kind.to_string())
            .collect();
        let bindings: Vec<(&str, &str)> = keys.iter().map(|key| (EXCHANGE, key.as_str())).collect();
        amqp::declare_queue(&channel, &queue_name(queue), &bindings, true).await?;
    }
    Ok(())
}

/// What the driver, the relay and the consumers share.
struct Floor {
    pool: PgPool,
    /// Deliveries handled, and deliveries the published messages will make.
    handled: AtomicU64,
    sent: AtomicU64,
    /// Outbox rows written and not yet marked, oldest first, as the relay sees them.
    unpublished: Mutex<VecDeque<i64>>,
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
        floor
            .sent
            .fetch_add(deliveries_per_order(), Ordering::Relaxed);
        to_mark.send(confirms)?;
        while let Some(done) = posts.try_join_next() {
            done??;
        }
    }
    let (sample, handled_before) =
        sample.unwrap_or_else(|| (Sample::take(), handled.load(Ordering::Relaxed)));
    // Deliveries handled in the measured window, as whole orders per second.
    let throughput = handled
        .load(Ordering::Relaxed)
        .saturating_sub(handled_before) as f64
        / deliveries_per_order() as f64
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
        format!("not in 60 s: {left} deliveries still queued")
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

/// `POST /orders`'s write, as one autocommitted statement: the event and its outbox row.
async fn place(floor: Arc<Floor>, order: Uuid) -> anyhow::Result<()> {
    let position: i64 = sqlx::query_scalar(
        "WITH e AS (INSERT INTO events (global_position, stream_id, stream_version, event_id, \
                    event_type, schema_fingerprint, payload, correlation_id, causation_id) \
                    VALUES (nextval('floor_position'), $1, 1, $2, 'OrderPlaced', 1, $3, $2, $2) \
                    RETURNING global_position) \
         INSERT INTO outbox (global_position) SELECT global_position FROM e \
         RETURNING global_position",
    )
    .bind(format!("order-{order}"))
    .bind(order)
    .bind(vec![7u8; BODY])
    .fetch_one(&floor.pool)
    .await?;
    floor.written(vec![position]);
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
    // order's messages before its consumers write them).
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
        if !positions.is_empty() {
            sqlx::query("UPDATE outbox SET published_at = now() WHERE global_position = ANY($1)")
                .bind(&positions)
                .execute(&floor.pool)
                .await?;
        }
    }
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
        let mut event_streams = Vec::new();
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
            let &(_, events, commands, state) = STEPS[kind]
                .receivers
                .iter()
                .find(|r| r.0 == queue)
                .ok_or_else(|| anyhow::anyhow!("{consumer} got kind {kind}"))?;
            for event in 0..events {
                event_streams.push(format!("{consumer}-{order}-{kind}-{event}"));
            }
            for command in 0..commands {
                command_keys.push(format!("{order}-{kind}-{command}"));
            }
            if state {
                *states.entry(order).or_default() += 1;
            }
        }
        let mut transaction = floor.pool.begin().await?;
        let mut positions = Vec::new();
        sqlx::query("INSERT INTO inbox (consumer, message_id) SELECT $1, unnest($2::uuid[])")
            .bind(&consumer)
            .bind(&message_ids)
            .execute(&mut *transaction)
            .await?;
        if !states.is_empty() {
            let mut states: Vec<(Uuid, i64)> = states.into_iter().collect();
            states.sort();
            let (ids, counts): (Vec<Uuid>, Vec<i64>) = states.into_iter().unzip();
            sqlx::query(
                "INSERT INTO floor_state (consumer, id, version) \
                 SELECT $1, * FROM unnest($2::uuid[], $3::bigint[]) \
                 ON CONFLICT (consumer, id) DO UPDATE \
                 SET version = floor_state.version + excluded.version",
            )
            .bind(&consumer)
            .bind(&ids)
            .bind(&counts)
            .execute(&mut *transaction)
            .await?;
        }
        if !event_streams.is_empty() {
            let written: Vec<i64> = sqlx::query_scalar(
                "WITH e AS (INSERT INTO events (global_position, stream_id, stream_version, \
                            event_id, event_type, schema_fingerprint, payload, correlation_id, \
                            causation_id) \
                            SELECT nextval('floor_position'), s, 1, gen_random_uuid(), 'Event', 1, \
                                   $2, gen_random_uuid(), gen_random_uuid() \
                            FROM unnest($1::text[]) s RETURNING global_position) \
                 INSERT INTO outbox (global_position) SELECT global_position FROM e \
                 RETURNING global_position",
            )
            .bind(&event_streams)
            .bind(vec![7u8; BODY])
            .fetch_all(&mut *transaction)
            .await?;
            positions.extend(written);
        }
        if !command_keys.is_empty() {
            let written: Vec<i64> = sqlx::query_scalar(
                "INSERT INTO outbox (global_position, message_id, message_type, target_service, \
                                     ordering_key, schema_fingerprint, payload, correlation_id, \
                                     causation_id) \
                 SELECT nextval('floor_position'), gen_random_uuid(), 'Command', 'floor', k, 1, \
                        $2, gen_random_uuid(), gen_random_uuid() \
                 FROM unnest($1::text[]) k RETURNING global_position",
            )
            .bind(&command_keys)
            .bind(vec![7u8; BODY])
            .fetch_all(&mut *transaction)
            .await?;
            positions.extend(written);
        }
        transaction.commit().await?;
        floor.written(positions);
        let last = batch.last().expect("a batch holds at least one delivery");
        last.acker.ack(BasicAckOptions { multiple: true }).await?;
        floor
            .handled
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
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
