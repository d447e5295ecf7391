//! Read models and the projection runner (DESIGN §5).
//!
//! - [`Projection`]: a named read model of one service — the events it reads and a pure
//!   `apply` that updates its tables through the connection it is given.
//! - [`ReadModels`]: the projections of one service, taken together: a projection, or a
//!   tuple of projections of the same events.
//! - [`Runner`]: runs a service's read models as one [`Handler`] of the consumer
//!   runtime, so each event is delivered once for all of them and every update commits
//!   in the same transaction as the message's inbox row (never applied twice, never out
//!   of order per stream). Its queue is `<service>.read-models` ([`queue`]).
//! - [`Progress`]: how far a runner got, for projection lag and stall detection
//!   ([`monitor`]), exported as metrics.
//! - [`wait_until_applied`]: read-your-writes — a query waits (bounded) until the
//!   projection has applied a given stream version.
//! - [`order`], [`inventory`], [`payment`], [`user`]: the read models — order
//!   summaries and customer order history, stock levels, payment statuses, user
//!   profiles — and their queries.
//! - [`rebuild`]: rebuilding a read model from the event store into fresh tables,
//!   swapped in atomically (`orderflow replay`).
//!
//! Invariant: only this crate knows the SQL of read-model tables; `apply` writes only
//! through the connection it is handed (the consumer's transaction).

pub mod inventory;
pub mod order;
pub mod payment;
pub mod rebuild;
pub mod user;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::wire::WireEvent;
use eventstore::{ConsumerConfig, Handler, HandlerError, Message, Metrics, StoreTransaction};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A read model: which events it reads and how each one changes its tables.
pub trait Projection: Send + Sync + 'static {
    /// Names the projection (for rebuilding it, and in documents).
    const NAME: &'static str;
    /// The service whose events it reads and whose database holds its tables.
    const SERVICE: &'static str;
    /// Its streams' id prefix (`order-`), for measuring lag in the event store.
    const STREAM_PREFIX: &'static str;
    /// The tables it writes, and only it: a rebuild builds fresh copies of them.
    const TABLES: &'static [&'static str];
    type Event: WireEvent + Send + Sync;

    /// Applies one event. Called once per event, in stream order, inside the
    /// transaction that records the event as applied.
    fn apply(
        &self,
        event: &Self::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// The queue of a service's read-model consumer, which also names it in the inbox and
/// in metrics.
pub fn queue(service: &str) -> String {
    format!("{service}.read-models")
}

/// What one consumer keeps up to date: a projection, or a tuple of projections of one
/// service's events, applied one after the other in the same transaction. One
/// delivery, one inbox claim and one commit per event serve them all, which halves the
/// broker's and the database's work for a service with two read models.
pub trait ReadModels: Send + Sync + 'static {
    const SERVICE: &'static str;
    const STREAM_PREFIX: &'static str;
    type Event: WireEvent + Send + Sync;

    fn apply_all(
        &self,
        event: &Self::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    fn queue() -> String {
        queue(Self::SERVICE)
    }
}

impl<P: Projection> ReadModels for P {
    const SERVICE: &'static str = P::SERVICE;
    const STREAM_PREFIX: &'static str = P::STREAM_PREFIX;
    type Event = P::Event;

    async fn apply_all(
        &self,
        event: &P::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.apply(event, context, connection).await
    }
}

impl<A: Projection, B: Projection<Event = A::Event>> ReadModels for (A, B) {
    const SERVICE: &'static str = A::SERVICE;
    const STREAM_PREFIX: &'static str = A::STREAM_PREFIX;
    type Event = A::Event;

    async fn apply_all(
        &self,
        event: &A::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.0.apply(event, context, &mut *connection).await?;
        self.1.apply(event, context, connection).await
    }
}

/// Where an event came from, as a projection needs it.
#[derive(Debug, Clone)]
pub struct EventContext {
    pub stream_id: String,
    pub stream_version: i64,
    pub global_position: i64,
    pub correlation_id: Uuid,
    pub recorded_at: DateTime<Utc>,
}

impl EventContext {
    fn from_message(message: &Message) -> Result<Self, HandlerError> {
        Self::from_envelope(&message.envelope)
    }

    /// The context of a recorded event as the live consumer sees it once it travelled
    /// through RabbitMQ (times to the millisecond), so a rebuild writes the same rows.
    pub fn from_recorded(event: &eventstore::RecordedEvent) -> Result<Self, HandlerError> {
        Self::from_envelope(&eventstore::amqp::Envelope::from(event))
    }

    fn from_envelope(envelope: &eventstore::amqp::Envelope) -> Result<Self, HandlerError> {
        let stream_version = envelope
            .stream_version
            .ok_or("an event without a stream version cannot be projected")?;
        let recorded_at = i64::try_from(envelope.timestamp_ms)
            .ok()
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        Ok(EventContext {
            stream_id: envelope.stream_id.clone(),
            stream_version,
            global_position: envelope.global_position,
            correlation_id: envelope.correlation_id,
            recorded_at,
        })
    }
}

/// How far a projection's runner got in this process.
#[derive(Debug, Default)]
pub struct Progress {
    /// The highest global position applied (0: nothing yet, or not known yet).
    applied_position: AtomicI64,
    /// Milliseconds since `epoch` at the last applied event.
    progressed_at_ms: AtomicI64,
    epoch: std::sync::OnceLock<Instant>,
    /// Read-your-writes queries waiting for a stream to reach a version, woken by the
    /// commit that gets it there.
    waiters: std::sync::Mutex<HashMap<String, Vec<Waiter>>>,
    /// A task is re-checking the database for the waiters ([`wait_until_applied`]).
    rechecking: AtomicBool,
}

/// A query waiting for a stream version.
#[derive(Debug)]
struct Waiter {
    version: i64,
    wake: tokio::sync::oneshot::Sender<()>,
}

impl Progress {
    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(Instant::now)
    }

    fn record(&self, position: i64) {
        self.applied_position.fetch_max(position, Ordering::Relaxed);
        let now = self.epoch().elapsed().as_millis() as i64;
        self.progressed_at_ms.store(now, Ordering::Relaxed);
    }

    /// Registers interest in `stream_id` reaching `version`; the receiver completes
    /// when an update of this runner takes it there.
    fn watch(&self, stream_id: &str, version: i64) -> tokio::sync::oneshot::Receiver<()> {
        let (wake, woken) = tokio::sync::oneshot::channel();
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters
            .entry(stream_id.to_owned())
            .or_default()
            .push(Waiter { version, wake });
        woken
    }

    /// Wakes the waiters `stream_id` at `version` satisfies, and forgets those that
    /// gave up.
    fn applied(&self, stream_id: &str, version: i64) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = waiters.get_mut(stream_id) else {
            return;
        };
        let (ready, waiting) = std::mem::take(list)
            .into_iter()
            .filter(|waiter| !waiter.wake.is_closed())
            .partition::<Vec<_>, _>(|waiter| waiter.version <= version);
        for waiter in ready {
            let _ = waiter.wake.send(());
        }
        if waiting.is_empty() {
            waiters.remove(stream_id);
        } else {
            *list = waiting;
        }
    }

    /// The streams someone still waits for, forgetting waiters that gave up.
    fn awaited_streams(&self) -> Vec<String> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.retain(|_, list| {
            list.retain(|waiter| !waiter.wake.is_closed());
            !list.is_empty()
        });
        waiters.keys().cloned().collect()
    }

    /// Makes sure one task re-checks, every [`RECHECK_EVERY`] while anyone waits, in
    /// one statement for all waiters, whether their streams were applied by another
    /// instance of the service (whose commits do not wake this process).
    fn recheck_while_awaited(self: &Arc<Self>, pool: &PgPool, queue: &str) {
        if self.rechecking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (progress, pool, queue) = (self.clone(), pool.clone(), queue.to_owned());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RECHECK_EVERY).await;
                let mut streams = progress.awaited_streams();
                if streams.is_empty() {
                    progress.rechecking.store(false, Ordering::Release);
                    // A waiter that came in between found the flag still set.
                    streams = progress.awaited_streams();
                    if streams.is_empty() || progress.rechecking.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
                match eventstore::consumer::applied_versions(&pool, &queue, &streams).await {
                    Ok(applied) => {
                        for (stream_id, version) in applied {
                            progress.applied(&stream_id, version);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, %queue, "cannot re-check applied versions")
                    }
                }
            }
        });
    }

    pub fn applied_position(&self) -> i64 {
        self.applied_position.load(Ordering::Relaxed)
    }

    /// Time since the last applied event (or since the runner was made).
    pub fn idle_for(&self) -> Duration {
        let now = self.epoch().elapsed().as_millis() as i64;
        Duration::from_millis((now - self.progressed_at_ms.load(Ordering::Relaxed)).max(0) as u64)
    }
}

/// Runs a service's [`ReadModels`] on the consumer runtime.
pub struct Runner<R> {
    read_models: R,
    progress: Arc<Progress>,
}

impl<R: ReadModels> Runner<R> {
    pub fn new(read_models: R) -> Self {
        let progress = Arc::new(Progress::default());
        progress.record(0);
        Runner {
            read_models,
            progress,
        }
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// The consumer configuration: its queue, bound to every event of its service.
    pub fn config(amqp_url: &str) -> ConsumerConfig {
        let pattern = format!("{}.*", R::SERVICE);
        let config = ConsumerConfig::events(R::SERVICE, "read-models", amqp_url, &[&pattern]);
        debug_assert_eq!(config.queue(), R::queue());
        config
    }
}

impl<R: ReadModels> Handler for Runner<R> {
    async fn handle(
        &self,
        message: &Message,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let event: R::Event = message.decode()?;
        let context = EventContext::from_message(message)?;
        self.read_models
            .apply_all(&event, &context, transaction.connection())
            .await?;
        Ok(())
    }

    fn committed(&self, message: &Message) {
        self.progress.record(message.envelope.global_position);
        if let Some(version) = message.envelope.stream_version {
            self.progress.applied(&message.envelope.stream_id, version);
        }
    }
}

/// How often waiting read-your-writes queries re-check the database together.
const RECHECK_EVERY: Duration = Duration::from_millis(25);

/// Waits until the projection with queue `queue` has applied `stream_id` up to
/// `version`, for at most `timeout`. True when it has.
///
/// With the `progress` of the projection's runner in this process, the commit that
/// applies the version wakes it, with no polling. Another instance of the service may
/// apply it instead, so one task re-checks the database for all waiting queries at
/// once every 25 ms (a statement per query and recheck was, under load, most of the
/// database's statements: BENCHMARKS.md). Without a local runner it polls, every 1 ms
/// at first and at most every 16 ms.
pub async fn wait_until_applied(
    pool: &PgPool,
    queue: &str,
    stream_id: &str,
    version: i64,
    timeout: Duration,
    progress: Option<&Arc<Progress>>,
) -> Result<bool, sqlx::Error> {
    let deadline = Instant::now() + timeout;
    let applied = || eventstore::consumer::applied_version(pool, queue, stream_id);
    if let Some(progress) = progress {
        // Registered before the first check, so a commit in between still wakes us.
        let woken = progress.watch(stream_id, version);
        if applied().await? >= version {
            return Ok(true);
        }
        progress.recheck_while_awaited(pool, queue);
        match tokio::time::timeout_at(deadline.into(), woken).await {
            Ok(Ok(())) => return Ok(true),
            // Out of time: a last look, since the re-check runs only now and then.
            Err(_) => return Ok(applied().await? >= version),
            // The runner is gone: poll from now on.
            Ok(Err(_)) => {}
        }
    }
    let mut pause = Duration::from_millis(1);
    loop {
        if applied().await? >= version {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(16));
    }
}

/// A projection's health as the monitor last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Events recorded after the highest position the projection applied (at most
    /// [`LAG_COUNT_LIMIT`]).
    pub events: i64,
    /// Events wait, yet the projection applied none for [`STALL_AFTER`].
    pub stalled: bool,
}

/// Counting stops here: beyond it the exact figure does not matter.
pub const LAG_COUNT_LIMIT: i64 = 100_000;
/// A projection with events to apply and no progress for this long is stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// Measures projection lag every `every` until `cancel` fires, exporting it as metrics
/// and publishing it on the returned watch channel (for readiness checks).
pub fn monitor(
    pool: PgPool,
    queue: String,
    stream_prefix: &'static str,
    progress: Arc<Progress>,
    metrics: Metrics,
    every: Duration,
    cancel: CancellationToken,
) -> tokio::sync::watch::Receiver<Lag> {
    let (sender, receiver) = tokio::sync::watch::channel(Lag::default());
    tokio::spawn(async move {
        metrics.projection(&queue, 0, false);
        // Where this runner starts: the last event applied by any earlier run.
        if let Ok(position) = last_applied_position(&pool, &queue).await {
            progress
                .applied_position
                .fetch_max(position, Ordering::Relaxed);
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match events_after(&pool, stream_prefix, progress.applied_position()).await {
                Ok(events) => {
                    let lag = Lag {
                        events,
                        stalled: events > 0 && progress.idle_for() >= STALL_AFTER,
                    };
                    metrics.projection(&queue, lag.events, lag.stalled);
                    let _ = sender.send(lag);
                }
                Err(error) => tracing::warn!(%error, %queue, "cannot measure projection lag"),
            }
        }
    });
    receiver
}

/// The position of the newest event the consumer `queue` applied, by its per-stream
/// progress (0 if none).
async fn last_applied_position(pool: &PgPool, queue: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce(max(e.global_position), 0)::bigint FROM consumer_streams c \
         JOIN events e ON e.stream_id = c.stream_id AND e.stream_version = c.last_version \
         WHERE c.consumer = $1",
    )
    .bind(queue)
    .fetch_one(pool)
    .await
}

async fn events_after(
    pool: &PgPool,
    stream_prefix: &str,
    position: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM events WHERE global_position > $1 \
         AND stream_id LIKE $2 || '%' LIMIT $3) AS waiting",
    )
    .bind(position)
    .bind(stream_prefix)
    .bind(LAG_COUNT_LIMIT)
    .fetch_one(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_wakes_once_its_stream_reaches_its_version() {
        let progress = Progress::default();
        let mut third = progress.watch("order-1", 3);
        let mut other = progress.watch("order-2", 1);
        let gave_up = progress.watch("order-1", 9);
        drop(gave_up);
        progress.applied("order-1", 2);
        assert!(third.try_recv().is_err(), "version 2 is not 3");
        progress.applied("order-1", 3);
        assert!(third.try_recv().is_ok());
        assert!(other.try_recv().is_err(), "another stream");
        // The waiter that gave up is forgotten with the last live one of its stream.
        let waiters = progress.waiters.lock().unwrap();
        assert!(!waiters.contains_key("order-1"));
        assert_eq!(waiters["order-2"].len(), 1);
    }
}
