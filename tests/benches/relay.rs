//! Messages in flight, end to end against the real PostgreSQL and RabbitMQ:
//!
//! 1. relay throughput: a pre-filled outbox published to a quorum queue, next to the
//!    ceiling, a plain lapin publisher sending the same messages (same payloads and
//!    properties, same number in flight) with confirms; run as alternating pairs;
//! 2. consumer throughput with the inbox (claim + commit per message, no-op handler),
//!    next to a plain lapin consumer that only acknowledges;
//! 3. latency from an append's commit to the handler finishing, with the relay and a
//!    consumer running and events appended at a steady rate (on a dedicated
//!    connection, as a hot writer does).
//!
//! `cargo bench -p tests --bench relay`. Settings: BENCH_MESSAGES (per throughput
//! run, default 30000), BENCH_REPEATS (pairs, default 3), BENCH_RATE (events/s for the
//! latency run, default 1000), BENCH_SECONDS (latency run length, default 10),
//! BENCH_PARTS (which of `relay,consumer,latency` to run, default all), and the
//! consumer's BENCH_CONCURRENCY and BENCH_BATCH (default: the consumer's defaults).
//! Prints markdown rows with medians and the CPU steal seen during each part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use domain::inventory::StockEvent;
use eventstore::amqp::{self, EVENTS_EXCHANGE};
use eventstore::{
    Consumer, ConsumerConfig, EventStore, ExpectedVersion, Handler, HandlerError, Message,
    Metadata, Metrics, NewEvent, Relay, RelayConfig, StoreTransaction,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use tests::bench::{cpu_times, env_or, median, steal_share};
use tests::{TestDb, Vhost};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SERVICE: &str = "order";
/// Messages in flight per batch, for the relay (its default) and the ceiling alike.
const IN_FLIGHT: usize = 512;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let messages: usize = env_or("BENCH_MESSAGES", 30_000);
    let repeats: usize = env_or("BENCH_REPEATS", 3);
    let rate: u64 = env_or("BENCH_RATE", 1_000);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let parts: String = env_or("BENCH_PARTS", "relay,consumer,latency".to_owned());
    let runs = |part: &str| parts.split(',').any(|listed| listed == part);

    let db = TestDb::new(16).await?;
    let vhost = Vhost::new()?;
    let store = db.store();
    let sink = consumer_config("sink", &vhost.url);
    let connection = amqp::connect(&vhost.url, "bench").await?;
    let channel = amqp::confirming_channel(&connection).await?;
    sink.declare(&channel).await?;

    println!(
        "relay benchmark: {messages} messages per throughput run, {repeats} pairs, quorum queue, {IN_FLIGHT} in flight"
    );
    println!();
    println!(
        "| run | ceiling msg/s | relay msg/s | relay/ceiling | relay confirm latency (mean per batch) | steal |"
    );
    println!("|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    for run in (1..=repeats).filter(|_| runs("relay")) {
        let before = cpu_times();
        fill_outbox(&store, messages).await?;
        let ceiling = plain_publisher(&store, &channel, messages).await?;
        purge(&channel, &sink.queue()).await?;
        fill_outbox(&store, messages).await?;
        let (relay, confirm_p50) = relay_throughput(&store, &vhost, messages).await?;
        purge(&channel, &sink.queue()).await?;
        let steal = steal_share(before, cpu_times());
        ratios.push(relay / ceiling);
        println!(
            "| {run} | {ceiling:.0} | {relay:.0} | {:.2} | {confirm_p50} | {:.1} % |",
            relay / ceiling,
            steal * 100.0
        );
    }
    if !ratios.is_empty() {
        println!("\nmedian relay/ceiling: {:.2}", median(ratios));
    }

    // Consumer throughput: the queue is filled by the relay, then drained; for the
    // consumer with the inbox, with 1,000 streams interleaved (its messages of one
    // stream are handled one at a time, so 100 streams in runs of 100 would measure
    // the round trip of one stream rather than the consumer).
    println!();
    println!(
        "| run | plain consume+ack msg/s | consumer with inbox msg/s | ratio | messages per transaction | steal |"
    );
    println!("|---|---|---|---|---|---|");
    for run in (1..=repeats).filter(|_| runs("consumer")) {
        let before = cpu_times();
        fill_outbox(&store, messages).await?;
        relay_throughput(&store, &vhost, messages).await?;
        let plain = plain_consumer(&connection, &sink.queue(), messages).await?;
        fill_outbox_interleaved(&store, messages).await?;
        relay_throughput(&store, &vhost, messages).await?;
        let (inbox, per_transaction) = consumer_throughput(&store, &sink, messages).await?;
        println!(
            "| {run} | {plain:.0} | {inbox:.0} | {:.2} | {per_transaction:.1} | {:.1} % |",
            inbox / plain,
            steal_share(before, cpu_times()) * 100.0
        );
    }

    // Latency at a steady rate, relay and consumer running together.
    if !runs("latency") {
        connection.close(200, "done".into()).await?;
        return Ok(());
    }
    let before = cpu_times();
    let (sent, latencies) = latency(&store, &vhost, rate, seconds).await?;
    let steal = steal_share(before, cpu_times());
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index]
    };
    println!();
    println!("| target rate | events | p50 | p90 | p99 | max | steal |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {rate}/s | {sent} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} % |",
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        latencies.last().copied().unwrap_or(0.0),
        steal * 100.0
    );
    connection.close(200, "done".into()).await?;
    Ok(())
}

/// A consumer of every `order` event, with BENCH_CONCURRENCY and BENCH_BATCH applied.
fn consumer_config(name: &str, url: &str) -> ConsumerConfig {
    let mut config = ConsumerConfig::events(SERVICE, name, url, &["order.#"]);
    config.concurrency = env_or("BENCH_CONCURRENCY", config.concurrency);
    config.batch_size = env_or("BENCH_BATCH", config.batch_size);
    config
}

fn event(stream: &str) -> NewEvent {
    let event = StockEvent::StockAdded {
        sku: stream.to_owned(),
        quantity: 1,
    };
    NewEvent::new(
        TestDb::registry().encode(&event).expect("encodes"),
        Metadata::new(Uuid::now_v7(), Uuid::now_v7()),
    )
}

/// Empties the outbox, appends `count` events (100 streams, batches of 100), and
/// vacuums, so that every timed run starts from the same table state. Untimed.
async fn fill_outbox(store: &EventStore, count: usize) -> anyhow::Result<()> {
    empty_outbox(store).await?;
    for batch in 0..count.div_ceil(100) {
        let stream = format!("stock-bench-{}", batch % 100);
        let size = 100.min(count - batch * 100);
        let events: Vec<NewEvent> = (0..size).map(|_| event(&stream)).collect();
        store.append(&stream, ExpectedVersion::Any, &events).await?;
    }
    vacuum(store).await
}

/// As [`fill_outbox`], but as many small streams written side by side are (orders,
/// say): `count` events over 1,000 streams, one event per stream in turn, so that
/// the queue interleaves them. Untimed.
async fn fill_outbox_interleaved(store: &EventStore, count: usize) -> anyhow::Result<()> {
    empty_outbox(store).await?;
    let streams: Vec<String> = (0..1_000).map(|i| format!("stock-many-{i}")).collect();
    let mut transaction = store.begin().await?;
    for i in 0..count {
        let stream = &streams[i % streams.len()];
        transaction
            .append(stream, ExpectedVersion::Any, &[event(stream)])
            .await?;
        if i % 100 == 99 {
            transaction.commit().await?;
            transaction = store.begin().await?;
        }
    }
    transaction.commit().await?;
    vacuum(store).await
}

async fn empty_outbox(store: &EventStore) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM outbox")
        .execute(store.pool())
        .await?;
    Ok(())
}

async fn vacuum(store: &EventStore) -> anyhow::Result<()> {
    sqlx::query("VACUUM ANALYZE outbox, events")
        .execute(store.pool())
        .await?;
    Ok(())
}

/// The ceiling: the unpublished messages, read in one (untimed) query and published by
/// plain lapin with confirms, `IN_FLIGHT` at a time.
async fn plain_publisher(
    store: &EventStore,
    channel: &lapin::Channel,
    count: usize,
) -> anyhow::Result<f64> {
    let rows: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(
        "SELECT o.global_position, e.event_type, e.payload FROM outbox o \
         JOIN events e USING (global_position) WHERE o.published_at IS NULL \
         ORDER BY o.global_position",
    )
    .fetch_all(store.pool())
    .await?;
    anyhow::ensure!(rows.len() == count, "outbox holds {} rows", rows.len());
    let properties = amqp::Envelope {
        message_id: Uuid::now_v7(),
        message_type: "StockAdded".into(),
        correlation_id: Uuid::now_v7(),
        causation_id: Uuid::now_v7(),
        stream_id: "stock-bench-0".into(),
        stream_version: Some(1),
        global_position: 1,
        schema_fingerprint: 1,
        timestamp_ms: 1,
        trace: None,
    };
    let started = Instant::now();
    for chunk in rows.chunks(IN_FLIGHT) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (position, event_type, payload) in chunk {
            let envelope = amqp::Envelope {
                global_position: *position,
                ..properties.clone()
            };
            confirms.push(
                channel
                    .basic_publish(
                        EVENTS_EXCHANGE.into(),
                        format!("{SERVICE}.{event_type}").as_str().into(),
                        BasicPublishOptions::default(),
                        payload,
                        envelope.properties(),
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            anyhow::ensure!(confirm.await?.is_ack(), "nacked");
        }
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Runs a relay until it has published the whole outbox, and returns messages/s
/// (including the relay's start-up: connecting, declaring, taking the lock) and its
/// mean confirm latency per batch.
async fn relay_throughput(
    store: &EventStore,
    vhost: &Vhost,
    count: usize,
) -> anyhow::Result<(f64, String)> {
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(store.pool())
            .await?;
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let relay = spawn_relay(store, vhost, &metrics, &cancel);
    while metrics.published_count(SERVICE) < unpublished as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    cancel.cancel();
    relay.await?;
    sqlx::query("DELETE FROM outbox")
        .execute(store.pool())
        .await?;
    let confirm = metrics
        .render()
        .lines()
        .find(|line| line.starts_with("orderflow_relay_confirm_latency_seconds_sum"))
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|sum| {
            format!(
                "{:.1} ms mean",
                sum * 1000.0 / (count as f64 / IN_FLIGHT as f64).ceil()
            )
        })
        .unwrap_or_default();
    Ok((rate, confirm))
}

async fn purge(channel: &lapin::Channel, queue: &str) -> anyhow::Result<()> {
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await?;
    Ok(())
}

/// The consumer ceiling: receive and acknowledge each message, nothing else.
async fn plain_consumer(
    connection: &lapin::Connection,
    queue: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let channel = connection.create_channel().await?;
    amqp::set_prefetch(&channel, 256).await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    for _ in 0..count {
        let delivery = deliveries
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("consumer ended"))??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    channel.close(200, "done".into()).await?;
    Ok(rate)
}

/// Does nothing but let the runtime claim the inbox row and commit.
struct NoOp;

impl Handler for NoOp {
    async fn handle(&self, _: &Message, _: &mut StoreTransaction<'_>) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Drains `count` messages; returns messages/s and messages per transaction.
async fn consumer_throughput(
    store: &EventStore,
    sink: &ConsumerConfig,
    count: usize,
) -> anyhow::Result<(f64, f64)> {
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let consumer = Consumer::new(
        sink.clone(),
        store.clone(),
        TestDb::registry(),
        NoOp,
        metrics.clone(),
    );
    let started = Instant::now();
    let task = tokio::spawn(consumer.run(cancel.clone()));
    while metrics.consumed_count(&sink.queue()) < count as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    cancel.cancel();
    task.await?;
    let transactions = metrics.transaction_count(&sink.queue()).max(1);
    Ok((rate, count as f64 / transactions as f64))
}

/// Records when each message's handler finished (before the consumer's commit).
#[derive(Clone, Default)]
struct Stopwatch {
    done: Arc<Mutex<HashMap<Uuid, Instant>>>,
}

impl Handler for Stopwatch {
    async fn handle(
        &self,
        message: &Message,
        _: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        self.done
            .lock()
            .map_err(|_| "poisoned")?
            .insert(message.envelope.message_id, Instant::now());
        Ok(())
    }
}

/// Appends single events at `rate`/s for `seconds`, with the relay and a consumer
/// running; returns how many were sent and the sorted latencies in ms.
async fn latency(
    store: &EventStore,
    vhost: &Vhost,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(usize, Vec<f64>)> {
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let config = consumer_config("latency", &vhost.url);
    let stopwatch = Stopwatch::default();
    let consumer = Consumer::new(
        config.clone(),
        store.clone(),
        TestDb::registry(),
        stopwatch.clone(),
        metrics.clone(),
    );
    let consumer = tokio::spawn(consumer.run(cancel.clone()));
    let relay = spawn_relay(store, vhost, &metrics, &cancel);
    // Let both connect and the consumer declare its queue before measuring.
    while metrics.consumed_count(&config.queue()) == 0 {
        store
            .append(
                "stock-warmup",
                ExpectedVersion::Any,
                &[event("stock-warmup")],
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The load generator writes like a hot writer: on a connection of its own, so the
    // pool's ping on every release does not add to the machine's load.
    let mut writer = store.pool().acquire().await?.detach();
    let mut committed: HashMap<Uuid, Instant> = HashMap::new();
    let mut ticks = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = (rate * seconds) as usize;
    for i in 0..total {
        ticks.tick().await;
        let stream = format!("stock-latency-{}", i % 64);
        let event = event(&stream);
        let id = event.event_id;
        store
            .append_on(&mut writer, &stream, ExpectedVersion::Any, &[event])
            .await?;
        committed.insert(id, Instant::now());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let all_done = || {
        stopwatch
            .done
            .lock()
            .map(|done| committed.keys().all(|id| done.contains_key(id)))
            .unwrap_or(false)
    };
    while !all_done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    consumer.await?;
    relay.await?;
    eprintln!(
        "consumer processing (delivery to commit), from its histogram: {}",
        histogram_summary(
            &metrics.render(),
            "orderflow_consumer_processing_seconds_bucket"
        )
    );
    let done = stopwatch
        .done
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| {
            Some(done.get(id)?.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(
        latencies.len() == total,
        "only {} of {total} handled",
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    Ok((total, latencies))
}

/// "p50 ≤ x ms, p99 ≤ y ms" read off a Prometheus histogram's cumulative buckets.
fn histogram_summary(exposition: &str, bucket: &str) -> String {
    let buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter(|line| line.starts_with(bucket))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, line.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let quantile = |q: f64| {
        buckets
            .iter()
            .find(|(_, count)| *count >= total * q)
            .map_or(f64::NAN, |(bound, _)| bound * 1000.0)
    };
    format!(
        "p50 ≤ {:.2} ms, p99 ≤ {:.2} ms",
        quantile(0.5),
        quantile(0.99)
    )
}

fn spawn_relay(
    store: &EventStore,
    vhost: &Vhost,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let config = RelayConfig::new(SERVICE, &vhost.url);
    let relay = Relay::new(store.clone(), config, metrics.clone());
    tokio::spawn(relay.run(cancel.clone()))
}
