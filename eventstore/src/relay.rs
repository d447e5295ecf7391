//! The outbox relay: publishes what appends put in the outbox to RabbitMQ.
//!
//! One relay per service database leads (it holds a PostgreSQL advisory lock on a
//! connection of its own); any other instance stands by, retrying the lock every
//! `standby_interval`, and takes over when the leader's connection goes away. The
//! leader reads unpublished rows in position order and publishes them with publisher
//! confirms, several batches in flight; a row is marked published only once the
//! broker confirmed it. A crash in between republishes it: consumers deduplicate by
//! message id. Published rows are deleted on a schedule.
//!
//! Per-stream order: a stream's versions have increasing positions (the append's
//! ordering guard sees to that even inside longer transactions), and a version is only
//! appended once its predecessor committed, so of one stream's rows, a lower version is
//! always visible no later than a higher one. The relay never reads past a row that
//! could still commit (see `Relay::lead`'s cursor), so it publishes each stream in
//! version order. Rows of different streams may commit out of position order; that
//! only reorders unrelated streams.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, Row};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::amqp::{self, COMMANDS_EXCHANGE, EVENTS_EXCHANGE, Envelope};
use crate::backoff::{Backoff, TermEnd, another_term};
use crate::metrics::Metrics;
use crate::store::{EventStore, OUTBOX_CHANNEL};
use crate::trace;

/// The advisory lock whose holder is the relay of a database ("orderflw" in ASCII).
/// Advisory locks are per database, so each service database has its own leader.
pub const RELAY_LOCK: i64 = 0x6f72_6465_7266_6c77;

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The service whose events these are: their routing keys start with it.
    pub service: String,
    pub amqp_url: String,
    /// Rows published (and in flight) at once.
    pub batch_size: i64,
    /// The fallback poll, for wake-ups that never came (another process's append
    /// whose NOTIFY was lost).
    pub poll_interval: Duration,
    /// How often a standby relay tries to take the lead.
    pub standby_interval: Duration,
    /// How often the backlog metrics are refreshed and old published rows deleted.
    pub housekeeping_interval: Duration,
    /// How long published rows stay in the outbox for operators to see.
    pub retention: Duration,
    /// Consumer queues that must exist before anything is published, declared at the
    /// start of every term: an event published before its consumer's queue exists is
    /// unroutable and dropped by the broker, so it would never reach that consumer.
    pub queues: Vec<crate::consumer::ConsumerConfig>,
    /// Fault injection for tests: stop (as if the process died) after the broker
    /// confirmed a batch and before marking it published.
    pub stop_before_marking: bool,
    /// How many partitions every service's command queue is split into: a command's
    /// target queue is declared (so a command cannot be unroutable) as its consumer
    /// declares it.
    pub command_partitions: u16,
}

impl RelayConfig {
    pub fn new(service: &str, amqp_url: &str) -> Self {
        RelayConfig {
            service: service.to_owned(),
            amqp_url: amqp_url.to_owned(),
            batch_size: 512,
            poll_interval: Duration::from_secs(1),
            standby_interval: Duration::from_secs(1),
            housekeeping_interval: Duration::from_secs(5),
            retention: Duration::from_secs(60),
            queues: Vec::new(),
            stop_before_marking: false,
            command_partitions: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused message {0}")]
    Refused(Uuid),
    #[error("no confirm from the broker within {0:?}")]
    ConfirmTimeout(Duration),
    #[error("the confirming task stopped unexpectedly")]
    ConfirmerGone,
    #[error("could not connect to the broker within {0:?}")]
    ConnectTimeout(Duration),
}

/// A relay for one service database. Run it with [`Relay::run`].
pub struct Relay {
    store: EventStore,
    config: RelayConfig,
    metrics: Metrics,
}

/// A broker that has not confirmed a batch in this long is treated as gone.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Relay {
    pub fn new(store: EventStore, config: RelayConfig, metrics: Metrics) -> Self {
        metrics.track_service(&config.service);
        Relay {
            store,
            config,
            metrics,
        }
    }

    /// Stands by or leads until `cancel` fires; reconnects with backoff after the
    /// broker or the database went away. Returns early only for an injected fault.
    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::info_span!("relay", service = %self.config.service);
        self.run_terms(cancel).instrument(span).await
    }

    async fn run_terms(self, cancel: CancellationToken) {
        let signal = self.store.relay_signal();
        let mut backoff = Backoff::new();
        while !cancel.is_cancelled() {
            let mut started = Instant::now();
            let outcome = match self.acquire(&cancel).await {
                Ok(Some(mut lock)) => {
                    tracing::info!("leading");
                    // The term, not the wait for it, is what must have lasted.
                    started = Instant::now();
                    // Cleared however the term ends (an aborted task included), or this
                    // process's appends would stop notifying a leader elsewhere.
                    let leading =
                        LeadingFlag::raise(&signal.leading, &self.metrics, &self.config.service);
                    let outcome = self.lead(&mut lock, &signal.wakes, &cancel).await;
                    drop(leading);
                    // Closing the connection releases the lock for a standby.
                    drop(lock);
                    outcome
                }
                Ok(None) => return,
                Err(error) => Err(RelayError::Database(error)),
            };
            if !another_term(outcome, &mut backoff, started, &cancel, "before marking").await {
                return;
            }
        }
    }

    /// Waits for the lead: a connection holding the relay lock, or `None` if
    /// cancelled first.
    async fn acquire(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<PgConnection>, sqlx::Error> {
        let options = crate::db::leader_options((*self.store.pool().connect_options()).clone())
            // The outbox churns: a generic plan cached while it was empty (before
            // autovacuum first analyses it) would scan every retained row on each
            // fetch. Plans made for the actual cursor use the unpublished-rows index.
            .options([("plan_cache_mode", "force_custom_plan")]);
        let lock = crate::db::LeaderLock::Key(RELAY_LOCK);
        crate::db::wait_to_lead(&options, lock, self.config.standby_interval, cancel).await
    }

    /// One leadership term: publish until cancelled or something breaks.
    ///
    /// Publishing and confirming overlap: this loop reads and publishes batch after
    /// batch, while a second task waits for each batch's confirms in order and marks
    /// its rows. Up to `BATCHES_IN_FLIGHT` batches are unconfirmed at once; reads skip
    /// their rows. Reads start after a cursor that never passes the oldest running
    /// transaction (`pg_snapshot_xmin`): below it every row has committed or never
    /// will, so no row can appear behind the cursor later. A cursor at the last row
    /// read would skip a row whose transaction took a lower position and committed
    /// after that read, and so publish its stream's next event before it.
    async fn lead(
        &self,
        lock: &mut PgConnection,
        wakes: &tokio::sync::Notify,
        cancel: &CancellationToken,
    ) -> Result<TermEnd, RelayError> {
        let name = format!("{}.relay", self.config.service);
        let setup = async {
            let broker = amqp::connect(&self.config.amqp_url, &name).await?;
            let channel = amqp::confirming_channel(&broker).await?;
            amqp::declare_service(&channel, &self.config.service).await?;
            for queue in &self.config.queues {
                queue.declare(&channel).await?;
            }
            Ok::<_, lapin::Error>((broker, channel))
        };
        let (broker, channel) = tokio::select! {
            _ = cancel.cancelled() => return Ok(TermEnd::Cancelled),
            connected = tokio::time::timeout(CONNECT_TIMEOUT, setup) => {
                connected.map_err(|_| RelayError::ConnectTimeout(CONNECT_TIMEOUT))??
            }
        };
        // Wake-ups from appends in other processes; ours arrive through `wakes`.
        let mut listener = PgListener::connect_with(self.store.pool()).await?;
        listener.listen(OUTBOX_CHANNEL).await?;
        // The confirmer marks on a connection of its own: through the pool, every mark
        // would also pay the pool's ping on release. Custom plans, as on the lock
        // connection: a generic plan for `= ANY($1)` cached while the outbox was empty
        // scans the whole table. Marks do not wait for the disk: a mark lost in a
        // server crash only republishes rows the consumers' inboxes already hold
        // (ARCHITECTURE.md, "Relay").
        let marks_options = (*self.store.pool().connect_options()).clone().options([
            ("plan_cache_mode", "force_custom_plan"),
            ("synchronous_commit", "off"),
        ]);
        let marks = PgConnection::connect_with(&marks_options).await?;
        let (to_confirmer, batches) = tokio::sync::mpsc::channel(BATCHES_IN_FLIGHT);
        let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();
        let mut confirmer = AbortOnDrop(tokio::spawn(confirm_and_mark(
            Confirmer {
                marks,
                metrics: self.metrics.clone(),
                config: self.config.clone(),
                in_flight: in_flight.clone(),
            },
            batches,
        )));
        let mut after: i64 = -1;
        // Services whose command queue this term has declared (see `publish`).
        let mut declared: HashSet<String> = HashSet::new();
        let mut last_housekeeping: Option<Instant> = None;
        let end = loop {
            if cancel.is_cancelled() {
                // Let what is in flight be confirmed and marked, then stop.
                let (done, flushed) = tokio::sync::oneshot::channel();
                if to_confirmer.send(ToConfirmer::Flush(done)).await.is_ok() {
                    let _ = flushed.await;
                }
                break TermEnd::Cancelled;
            }
            if last_housekeeping.is_none_or(|at| at.elapsed() >= self.config.housekeeping_interval)
            {
                let in_flight = lock_set(&in_flight).len();
                self.housekeep(lock, after, in_flight).await?;
                last_housekeeping = Some(Instant::now());
            }
            // Only rows past the cursor can be read again; usually none are in flight.
            let skip: Vec<i64> = lock_set(&in_flight)
                .iter()
                .copied()
                .filter(|&position| position > after)
                .collect();
            let (batch, horizon) = unpublished(lock, self.config.batch_size, after, &skip).await?;
            if let Some(last) = batch.last() {
                after = after.max(last.envelope.global_position.min(horizon - 1));
                lock_set(&in_flight).extend(batch.iter().map(|row| row.envelope.global_position));
                let published = self.publish(&channel, &batch, &mut declared).await?;
                tokio::select! {
                    sent = to_confirmer.send(ToConfirmer::Batch(published)) => {
                        if sent.is_err() {
                            break (&mut confirmer.0).await.unwrap_or(Err(RelayError::ConfirmerGone))?;
                        }
                    }
                    result = &mut confirmer.0 => {
                        break result.unwrap_or(Err(RelayError::ConfirmerGone))?;
                    }
                }
                if batch.len() as i64 == self.config.batch_size {
                    continue; // more may be waiting right now
                }
            }
            // Caught up: wait for a wake-up (one that came while publishing is kept).
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = wakes.notified() => {}
                notification = listener.recv() => { notification?; }
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                result = &mut confirmer.0 => {
                    break result.unwrap_or(Err(RelayError::ConfirmerGone))?;
                }
            }
        };
        if !matches!(end, TermEnd::FaultInjected) {
            let _ = broker.close(200, "relay stopping".into()).await;
        }
        Ok(end)
    }

    /// Publishes a batch with every message in flight at once; the confirms are
    /// awaited by [`confirm_and_mark`].
    ///
    /// Commands are published `mandatory` after declaring the target service's
    /// command queue (once per term), so a command can neither be dropped for want of
    /// a queue nor be marked published when the broker returned it. Events are not:
    /// an event nobody subscribes to yet is simply not delivered.
    async fn publish(
        &self,
        channel: &lapin::Channel,
        batch: &[OutboxRow],
        declared: &mut HashSet<String>,
    ) -> Result<InFlight, RelayError> {
        let started = Instant::now();
        let mut confirms = Vec::with_capacity(batch.len());
        for row in batch {
            let (exchange, routing_key, mandatory) = match &row.target_service {
                Some(target) => {
                    if !declared.contains(target) {
                        let mut commands =
                            crate::ConsumerConfig::commands(target, &self.config.amqp_url);
                        commands.partitions = self.config.command_partitions;
                        commands.declare(channel).await?;
                        declared.insert(target.clone());
                    }
                    let key = format!("{target}.{}", row.envelope.message_type);
                    (COMMANDS_EXCHANGE, key, true)
                }
                None => {
                    let key = format!("{}.{}", self.config.service, row.envelope.message_type);
                    (EVENTS_EXCHANGE, key, false)
                }
            };
            let options = BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            };
            // One span per message, open until the broker confirms it: the message
            // carries it as its parent, so the consumer's span hangs below it.
            let span = tracing::info_span!(
                "publish",
                otel.kind = "producer",
                orderflow.service = %self.config.service,
                messaging.destination.name = exchange,
                messaging.rabbitmq.destination.routing_key = %routing_key,
                messaging.message.id = %row.envelope.message_id,
                trace_id = tracing::field::Empty,
            );
            let trace = trace::continue_trace(&span, row.envelope.trace, None);
            let properties = Envelope {
                trace: Some(trace),
                ..row.envelope.clone()
            }
            .properties();
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    amqp::short_string(&routing_key),
                    options,
                    &row.payload,
                    properties,
                )
                .instrument(span.clone())
                .await?;
            let id = row.envelope.message_id;
            confirms.push((id, row.envelope.global_position, confirm, span));
        }
        Ok(InFlight { confirms, started })
    }

    /// Refreshes the backlog metrics and deletes published rows past retention.
    /// Unconfirmed rows are the unpublished ones past the cursor (rows below it are
    /// all published) plus the `in_flight` ones.
    async fn housekeep(
        &self,
        lock: &mut PgConnection,
        cursor: i64,
        in_flight: usize,
    ) -> Result<(), sqlx::Error> {
        let row = sqlx::query(
            "SELECT count(*) AS backlog, \
             coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)::float8 AS oldest \
             FROM outbox WHERE global_position > $1 AND published_at IS NULL",
        )
        .bind(cursor)
        .fetch_one(&mut *lock)
        .await?;
        let oldest: f64 = row.try_get("oldest")?;
        let backlog: i64 = row.try_get("backlog")?;
        self.metrics.outbox(
            &self.config.service,
            backlog + in_flight as i64,
            Duration::from_secs_f64(oldest.max(0.0)),
        );
        let deleted = sqlx::query(
            "DELETE FROM outbox WHERE global_position <= $1 \
             AND published_at < now() - make_interval(secs => $2)",
        )
        .bind(cursor)
        .bind(self.config.retention.as_secs_f64())
        .execute(&mut *lock)
        .await?;
        if deleted.rows_affected() > 0 {
            tracing::debug!(
                rows = deleted.rows_affected(),
                "deleted published outbox rows"
            );
        }
        Ok(())
    }
}

/// Says "a relay of this process leads" while it lives (to appends, and in the
/// `relay_leading` gauge).
struct LeadingFlag<'a> {
    flag: &'a AtomicBool,
    metrics: &'a Metrics,
    service: &'a str,
}

impl<'a> LeadingFlag<'a> {
    fn raise(flag: &'a AtomicBool, metrics: &'a Metrics, service: &'a str) -> Self {
        flag.store(true, Ordering::Release);
        metrics.relay_leading(service, true);
        LeadingFlag {
            flag,
            metrics,
            service,
        }
    }
}

impl Drop for LeadingFlag<'_> {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::Release);
        self.metrics.relay_leading(self.service, false);
    }
}

/// Batches published and not yet confirmed, at most: the window that overlaps the
/// broker's confirm latency with reading and publishing the next batches.
const BATCHES_IN_FLIGHT: usize = 4;

/// A published batch awaiting its confirms.
struct InFlight {
    /// (message id, outbox position, confirm, the publish span that closes with the
    /// confirm), in publishing order.
    confirms: Vec<(Uuid, i64, lapin::PublisherConfirm, tracing::Span)>,
    started: Instant,
}

enum ToConfirmer {
    Batch(InFlight),
    /// Answered once every batch sent before it is confirmed and marked.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Aborts the confirmer when a leadership term ends, however it ends: its unmarked
/// batches are republished by the next leader.
struct AbortOnDrop(tokio::task::JoinHandle<Result<TermEnd, RelayError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the confirming task of a leadership term works with.
struct Confirmer {
    /// Where rows are marked published.
    marks: PgConnection,
    metrics: Metrics,
    config: RelayConfig,
    /// Positions published and not yet marked: the publishing loop skips them.
    in_flight: Arc<Mutex<HashSet<i64>>>,
}

/// Waits for each batch's confirms, in order, and only then marks its rows.
async fn confirm_and_mark(
    confirmer: Confirmer,
    mut batches: tokio::sync::mpsc::Receiver<ToConfirmer>,
) -> Result<TermEnd, RelayError> {
    let Confirmer {
        mut marks,
        metrics,
        config,
        in_flight,
    } = confirmer;
    // Confirmed rows wait here to be marked together: at low rates a batch is one or
    // two rows, and an UPDATE for each would double the relay's database work.
    let mut confirmed: Vec<i64> = Vec::new();
    let mut mark_by: Option<tokio::time::Instant> = None;
    loop {
        let item = match mark_by {
            None => batches.recv().await,
            Some(deadline) => match tokio::time::timeout_at(deadline, batches.recv()).await {
                Ok(item) => item,
                Err(_) => {
                    mark(&mut marks, &mut confirmed, &in_flight).await?;
                    mark_by = None;
                    continue;
                }
            },
        };
        let batch = match item {
            None => break,
            Some(ToConfirmer::Flush(done)) => {
                mark(&mut marks, &mut confirmed, &in_flight).await?;
                mark_by = None;
                let _ = done.send(());
                continue;
            }
            Some(ToConfirmer::Batch(batch)) => batch,
        };
        let mut positions = Vec::with_capacity(batch.confirms.len());
        let all_confirmed = async {
            for (message_id, position, confirm, _span) in batch.confirms {
                match confirm.await? {
                    Confirmation::Ack(None) => positions.push(position),
                    // Returned as unroutable (a mandatory command), refused, or
                    // unconfirmed: not delivered, so not marked; the term restarts.
                    _ => return Err(RelayError::Refused(message_id)),
                }
            }
            Ok(())
        };
        tokio::time::timeout(CONFIRM_TIMEOUT, all_confirmed)
            .await
            .map_err(|_| RelayError::ConfirmTimeout(CONFIRM_TIMEOUT))??;
        metrics.published(
            &config.service,
            positions.len() as u64,
            batch.started.elapsed(),
        );
        if config.stop_before_marking {
            return Ok(TermEnd::FaultInjected);
        }
        confirmed.extend(positions);
        if confirmed.len() >= config.batch_size as usize {
            mark(&mut marks, &mut confirmed, &in_flight).await?;
            mark_by = None;
        } else if mark_by.is_none() {
            mark_by = Some(tokio::time::Instant::now() + MARK_INTERVAL);
        }
    }
    mark(&mut marks, &mut confirmed, &in_flight).await?;
    Ok(TermEnd::Cancelled)
}

/// Confirmed rows are marked published at the latest this long after their confirm.
const MARK_INTERVAL: Duration = Duration::from_millis(10);

/// Marks `confirmed` rows published and stops skipping them.
async fn mark(
    marks: &mut PgConnection,
    confirmed: &mut Vec<i64>,
    in_flight: &Mutex<HashSet<i64>>,
) -> Result<(), sqlx::Error> {
    if confirmed.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE outbox SET published_at = now() WHERE global_position = ANY($1)")
        .bind(&*confirmed)
        .execute(&mut *marks)
        .await?;
    let mut in_flight = lock_set(in_flight);
    for position in confirmed.drain(..) {
        in_flight.remove(&position);
    }
    Ok(())
}

/// An outbox row ready to publish: an event (joined from `events`) or a command.
struct OutboxRow {
    envelope: Envelope,
    payload: Vec<u8>,
    /// Set for commands: the service whose command queue receives it.
    target_service: Option<String>,
}

fn lock_set(set: &Mutex<HashSet<i64>>) -> MutexGuard<'_, HashSet<i64>> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Unpublished rows in position order after `after`, except those in `skip`, and the
/// position below which every transaction has ended (the cursor's limit).
async fn unpublished(
    connection: &mut PgConnection,
    limit: i64,
    after: i64,
    skip: &[i64],
) -> Result<(Vec<OutboxRow>, i64), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT o.global_position, o.target_service, e.stream_version, \
                coalesce(e.event_id, o.message_id) AS message_id, \
                coalesce(e.event_type, o.message_type) AS message_type, \
                coalesce(e.stream_id, o.ordering_key) AS stream_id, \
                coalesce(e.schema_fingerprint, o.schema_fingerprint) AS schema_fingerprint, \
                coalesce(e.payload, o.payload) AS payload, \
                coalesce(e.correlation_id, o.correlation_id) AS correlation_id, \
                coalesce(e.causation_id, o.causation_id) AS causation_id, \
                coalesce(e.recorded_at, o.enqueued_at) AS recorded_at, \
                coalesce(e.traceparent, o.traceparent) AS traceparent, \
                pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 20 AS horizon \
         FROM outbox o LEFT JOIN events e ON e.global_position = o.global_position \
         WHERE o.published_at IS NULL AND o.global_position > $2 \
           AND o.global_position <> ALL($3) \
         ORDER BY o.global_position LIMIT $1",
    )
    .bind(limit)
    .bind(after)
    .bind(skip)
    .fetch_all(connection)
    .await?;
    let horizon = match rows.first() {
        Some(row) => row.try_get("horizon")?,
        None => after + 1,
    };
    let rows = rows
        .iter()
        .map(|row| {
            let recorded_at: chrono::DateTime<chrono::Utc> = row.try_get("recorded_at")?;
            Ok(OutboxRow {
                envelope: Envelope {
                    message_id: row.try_get("message_id")?,
                    message_type: row.try_get("message_type")?,
                    correlation_id: row.try_get("correlation_id")?,
                    causation_id: row.try_get("causation_id")?,
                    stream_id: row.try_get("stream_id")?,
                    stream_version: row.try_get("stream_version")?,
                    global_position: row.try_get("global_position")?,
                    schema_fingerprint: row.try_get("schema_fingerprint")?,
                    timestamp_ms: u64::try_from(recorded_at.timestamp_millis()).unwrap_or(0),
                    trace: trace::stored(row)?,
                },
                payload: row.try_get("payload")?,
                target_service: row.try_get("target_service")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok((rows, horizon))
}

/// The events and commands recorded but not yet published, counted no further than
/// `limit` (through the partial index `outbox_unpublished`): what back-pressure asks
/// every 100 ms while commands arrive, so it stops early.
pub async fn backlog_up_to(
    executor: impl sqlx::PgExecutor<'_>,
    limit: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM outbox WHERE published_at IS NULL LIMIT $1) AS unpublished",
    )
    .bind(limit)
    .fetch_one(executor)
    .await
}
