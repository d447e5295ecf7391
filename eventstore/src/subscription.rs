//! Subscriptions on a service's own event store (DESIGN §3, §5): how a service's
//! projections and its saga hear the service's *own* events, read from the store in
//! global order, never back through the broker (which carries only what crosses a
//! service boundary).
//!
//! - [`Subscriber`]: what a subscription does with the events it wants, inside the
//!   transaction that also moves its checkpoint.
//! - [`Subscription`]: runs one subscriber. One process per database leads each
//!   subscription (a session advisory lock on the subscription's own connection);
//!   the others stand by and try again every second, so another takes over within
//!   about a second of the leader's death. The leader takes a [`Fence`], reads the
//!   events after its checkpoint and below the fence page by page, and applies each
//!   page's wanted events and the new checkpoint in one transaction: no inbox, no
//!   claim per message, and a crash between the effect and the checkpoint undoes both.
//!   The checkpoint is written only if it still holds what this leader last wrote, so
//!   a leader that lost its lock without noticing writes nothing.
//! - Failures: a page whose transaction fails is applied one event at a time; an event
//!   that fails three times (100 ms and 200 ms apart) parks its stream, exactly as the
//!   consumer runtime parks a dead letter's (`parked_streams`, `parked_messages`, keyed
//!   by the subscription's name and the event id): later events of that stream are
//!   recorded behind it, not applied, while other streams carry on. `orderflow dlq`
//!   lists them, replays them in order ([`replay_parked`]) or skips them. A database
//!   that is away is not an attempt: the leader waits for it.
//! - Waking: an append committed by this process wakes its subscriptions directly; one
//!   of another process arrives as the relay's `NOTIFY`; a slow poll covers a lost one.
//! - [`Progress`]: how far a subscription got, for read-your-writes queries (woken by
//!   the commit that gets there, or re-checked in the database when another process
//!   leads) and for [`monitor`]'s lag and stall figures; and the writer that holds it
//!   back, if one has for a while.
//!
//! Invariant: an event is applied by a subscription at most once, and every committed
//! event below the fence is either applied, passed over as unwanted, or parked with
//! its stream: the effect and the checkpoint commit together.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::consumer::HandlerError;
use crate::metrics::Metrics;
use crate::store::{
    Blocker, EventStore, Fence, OUTBOX_CHANNEL, RecordedEvent, StoreError, StoreTransaction,
    fence_on, read_below_on,
};

/// The class of the two-key advisory locks that elect each subscription's leader
/// (class 1 is streams).
pub const LEADER_LOCK_CLASS: i32 = 3;

/// What a subscription does with the events of its store.
pub trait Subscriber: Send + Sync + 'static {
    /// Whether the subscriber reads this event at all. Others are passed over: they
    /// move the checkpoint and cost no transaction.
    fn wants(&self, event: &RecordedEvent) -> bool;

    /// The streams `apply` appends to, locked before anything is written (see
    /// [`StoreTransaction::lock_streams`]).
    fn streams_to_lock(&self, _event: &RecordedEvent) -> Vec<String> {
        Vec::new()
    }

    /// Applies one event, inside the transaction that moves the checkpoint past it.
    fn apply(
        &self,
        event: &RecordedEvent,
        transaction: &mut StoreTransaction<'_>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    /// Names its checkpoint, its leadership, its parked streams and its metrics.
    pub name: String,
    /// Events read (and at most applied) per transaction.
    pub batch_size: i64,
    /// The fallback poll, for wake-ups that never came.
    pub poll_interval: Duration,
    /// How often a standby tries to take the lead.
    pub standby_interval: Duration,
    /// Pauses between the attempts at an event that fails: three attempts, then its
    /// stream is parked.
    pub retry_delays: Vec<Duration>,
    /// How long a writer may hold the subscription back before health and metrics
    /// name it.
    pub held_back_after: Duration,
    /// Fault injection for tests: once set, the leader stops (as if its process died)
    /// after applying its next batch's effects and before committing them with the
    /// checkpoint (which that transaction moves first).
    pub stop_before_checkpoint: Arc<AtomicBool>,
}

impl SubscriptionConfig {
    pub fn new(name: impl Into<String>) -> Self {
        SubscriptionConfig {
            name: name.into(),
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            standby_interval: Duration::from_secs(1),
            retry_delays: vec![Duration::from_millis(100), Duration::from_millis(200)],
            held_back_after: Duration::from_secs(5),
            stop_before_checkpoint: Arc::default(),
        }
    }
}

/// One subscriber on one store. Run it with [`Subscription::run`].
pub struct Subscription<S> {
    config: SubscriptionConfig,
    store: EventStore,
    subscriber: Arc<S>,
    metrics: Metrics,
    progress: Arc<Progress>,
}

/// Why a leadership term ended without an error.
enum TermEnd {
    Cancelled,
    FaultInjected,
}

#[derive(Debug, thiserror::Error)]
enum TermError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("another process moved the checkpoint: no longer leading")]
    LostLead,
}

/// How a transaction that applied events failed.
enum Attempt {
    /// The database or the connection failed under it: not the events' fault.
    Infrastructure(TermError),
    /// The checkpoint was not where this leader left it.
    LostLead,
    /// The fault hook stopped it.
    FaultInjected,
    /// The subscriber (or the transaction's commit) failed: counts as an attempt.
    Failed(String),
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How soon a leader held back by an open writer looks again, first and at most.
const HELD_PAUSE_FIRST: Duration = Duration::from_millis(2);
const HELD_PAUSE_LAST: Duration = Duration::from_millis(50);
/// How long a checkpoint moved only over unwanted events may stay unwritten.
const PERSIST_SKIPPED_AFTER: Duration = Duration::from_secs(1);

impl<S: Subscriber> Subscription<S> {
    pub fn new(
        config: SubscriptionConfig,
        store: EventStore,
        subscriber: S,
        metrics: Metrics,
    ) -> Self {
        metrics.track_subscription(&config.name);
        let progress = Arc::new(Progress::new(&config.name));
        Subscription {
            config,
            store,
            subscriber: Arc::new(subscriber),
            metrics,
            progress,
        }
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Stands by or leads until `cancel` fires, starting again with backoff after the
    /// database went away. Returns early only for an injected fault.
    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::info_span!("subscription", name = %self.config.name);
        self.run_terms(cancel).instrument(span).await
    }

    async fn run_terms(self, cancel: CancellationToken) {
        let mut standby = self.store.waker().standby();
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            let outcome = match self.acquire(&cancel).await {
                Ok(None) => return,
                Ok(Some(reader)) => {
                    tracing::info!("leading");
                    standby.leading(true);
                    self.progress.leading.store(true, Ordering::Release);
                    self.metrics.subscription_leading(&self.config.name, true);
                    let started = Instant::now();
                    let outcome = self.lead(reader, &cancel).await;
                    standby.leading(false);
                    self.progress.leading.store(false, Ordering::Release);
                    self.metrics.subscription_leading(&self.config.name, false);
                    self.progress.set_held_back(None, &self.metrics);
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff = Duration::from_millis(100);
                    }
                    outcome
                }
                Err(error) => Err(TermError::Database(error)),
            };
            match outcome {
                Ok(TermEnd::Cancelled) => return,
                Ok(TermEnd::FaultInjected) => {
                    tracing::warn!("stopping before the checkpoint, as the fault hook asked");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "subscription interrupted; starting again");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Waits for the lead: a connection holding the subscription's lock, or `None` if
    /// cancelled first.
    async fn acquire(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<PgConnection>, sqlx::Error> {
        let lock = crate::db::LeaderLock::Named(LEADER_LOCK_CLASS, &self.config.name);
        crate::db::wait_to_lead(&self.options(), lock, self.config.standby_interval, cancel).await
    }

    /// The store's connection options, for a leader's connections.
    fn options(&self) -> sqlx::postgres::PgConnectOptions {
        crate::db::leader_options((*self.store.pool().connect_options()).clone())
    }

    /// One leadership term: read, apply and wait, until cancelled or something breaks.
    async fn lead(
        &self,
        mut reader: PgConnection,
        cancel: &CancellationToken,
    ) -> Result<TermEnd, TermError> {
        let name = self.config.name.as_str();
        let mut writer = PgConnection::connect_with(&self.options()).await?;
        let mut listener = PgListener::connect_with(self.store.pool()).await?;
        listener.listen(OUTBOX_CHANNEL).await?;
        let mut commits = self.store.waker().commits();
        sqlx::query(
            "INSERT INTO subscription_checkpoints (subscription, position) VALUES ($1, 0) \
             ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .execute(&mut reader)
        .await?;
        let mut stored: i64 = sqlx::query_scalar(
            "SELECT position FROM subscription_checkpoints WHERE subscription = $1",
        )
        .bind(name)
        .fetch_one(&mut reader)
        .await?;
        let mut parked: HashSet<String> =
            sqlx::query_scalar("SELECT stream_id FROM parked_streams WHERE consumer = $1")
                .bind(name)
                .fetch_all(&mut reader)
                .await?
                .into_iter()
                .collect();
        // Read up to here; `stored` lags behind it over events nobody wanted.
        let mut checkpoint = stored;
        let mut skipped_since: Option<Instant> = None;
        self.progress.advance(checkpoint);
        let mut held_back: Option<(i64, Instant)> = None;
        // While committed events wait behind an open writer, look again soon: the
        // writer may end without appending (a rollback, a read model's own commit),
        // which wakes nobody.
        let mut held_pause = HELD_PAUSE_FIRST;
        loop {
            if cancel.is_cancelled() {
                self.persist(&mut writer, &mut stored, checkpoint).await?;
                return Ok(TermEnd::Cancelled);
            }
            commits.borrow_and_update();
            let fence = fence_on(&mut reader).await?;
            self.watch_held_back(&fence, checkpoint, &mut held_back);
            let waiting_behind_writer = fence.blocker.as_ref().is_some_and(|b| b.events_waiting);
            loop {
                let page =
                    read_below_on(&mut reader, checkpoint, &fence, self.config.batch_size).await?;
                let Some(last) = page.last().map(|event| event.global_position) else {
                    break;
                };
                let wanted: Vec<&RecordedEvent> = page
                    .iter()
                    .filter(|event| self.subscriber.wants(event))
                    .collect();
                if wanted.is_empty() {
                    skipped_since.get_or_insert_with(Instant::now);
                } else {
                    match self
                        .apply_page(&mut writer, &wanted, last, &mut stored, &mut parked)
                        .await?
                    {
                        Some(end) => return Ok(end),
                        None => skipped_since = None,
                    }
                }
                checkpoint = last;
                self.progress.advance(checkpoint);
                if (page.len() as i64) < self.config.batch_size {
                    break;
                }
            }
            let mut persist_in = match skipped_since {
                Some(since) if stored < checkpoint => {
                    PERSIST_SKIPPED_AFTER.saturating_sub(since.elapsed())
                }
                _ => self.config.poll_interval,
            };
            if waiting_behind_writer {
                persist_in = persist_in.min(held_pause);
                held_pause = (held_pause * 2).min(HELD_PAUSE_LAST);
            } else {
                held_pause = HELD_PAUSE_FIRST;
            }
            if persist_in.is_zero() {
                self.persist(&mut writer, &mut stored, checkpoint).await?;
                skipped_since = None;
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                changed = commits.changed() => { let _ = changed; }
                notification = listener.recv() => {
                    notification?;
                    // One look serves every wake-up that came meanwhile.
                    while listener.next_buffered().is_some() {}
                }
                _ = tokio::time::sleep(persist_in.min(self.config.poll_interval)) => {}
            }
        }
    }

    /// Applies one page's wanted events with the checkpoint `last`: in one transaction,
    /// or, if that fails, one event at a time, parking the stream of an event that
    /// keeps failing. `Some` when the term must end.
    async fn apply_page(
        &self,
        writer: &mut PgConnection,
        wanted: &[&RecordedEvent],
        last: i64,
        stored: &mut i64,
        parked: &mut HashSet<String>,
    ) -> Result<Option<TermEnd>, TermError> {
        let whole = self.attempt(writer, wanted, *stored, last, parked).await;
        let failure = match whole {
            Ok(()) => {
                *stored = last;
                return Ok(None);
            }
            Err(Attempt::Failed(error)) => error,
            Err(other) => return self.end_term(other),
        };
        tracing::debug!(%failure, events = wanted.len(), "a batch failed; applying its events one by one");
        for &event in wanted {
            let mut tries = 0;
            loop {
                match self
                    .attempt(writer, &[event], *stored, event.global_position, parked)
                    .await
                {
                    Ok(()) => {
                        *stored = event.global_position;
                        break;
                    }
                    Err(Attempt::Failed(error)) => {
                        self.metrics.subscription_failed(&self.config.name);
                        let Some(pause) = self.config.retry_delays.get(tries) else {
                            self.park(writer, event, &error, stored).await?;
                            parked.insert(event.stream_id.clone());
                            break;
                        };
                        tracing::debug!(%error, position = event.global_position, "applying failed; trying again");
                        tries += 1;
                        tokio::time::sleep(*pause).await;
                    }
                    Err(other) => return self.end_term(other),
                }
            }
        }
        // The rest of the page was not wanted: the checkpoint moves past it.
        self.persist(writer, stored, last).await?;
        Ok(None)
    }

    /// How an attempt that was not the events' fault ends the term.
    fn end_term(&self, attempt: Attempt) -> Result<Option<TermEnd>, TermError> {
        match attempt {
            Attempt::Infrastructure(error) => Err(error),
            Attempt::LostLead => Err(TermError::LostLead),
            Attempt::FaultInjected => Ok(Some(TermEnd::FaultInjected)),
            Attempt::Failed(error) => Err(TermError::Database(sqlx::Error::Protocol(error))),
        }
    }

    /// One transaction: lock the events' streams, apply each (or record it behind its
    /// parked stream), move the checkpoint from `from` to `to`, commit.
    async fn attempt(
        &self,
        writer: &mut PgConnection,
        events: &[&RecordedEvent],
        from: i64,
        to: i64,
        parked: &mut HashSet<String>,
    ) -> Result<(), Attempt> {
        let outcome = self.transaction(writer, events, from, to, parked).await;
        match outcome {
            Err(Attempt::Failed(error)) if !alive(writer).await => {
                Err(Attempt::Infrastructure(TermError::Database(
                    sqlx::Error::Protocol(format!("the connection failed while applying: {error}")),
                )))
            }
            other => other,
        }
    }

    async fn transaction(
        &self,
        writer: &mut PgConnection,
        events: &[&RecordedEvent],
        from: i64,
        to: i64,
        parked: &mut HashSet<String>,
    ) -> Result<(), Attempt> {
        let name = self.config.name.as_str();
        let failed = |error: &dyn std::fmt::Display| Attempt::Failed(error.to_string());
        let mut transaction = self.store.begin_on(writer).await.map_err(|e| failed(&e))?;
        // The checkpoint moves first, in one statement with the locks of the streams
        // the subscriber appends to: the locks are taken before anything is written
        // (so the transaction id, which orders global positions, comes after those
        // streams' previous writers committed), and a leader that lost its lead learns
        // it before applying anything. The effects commit with it or not at all.
        let streams = transaction.streams_to_lock_in_next_statement(
            events
                .iter()
                .flat_map(|event| self.subscriber.streams_to_lock(event)),
        );
        if !move_checkpoint(transaction.connection(), name, from, to, &streams)
            .await
            .map_err(|e| failed(&e))?
        {
            return Err(Attempt::LostLead);
        }
        // Streams parked here may have been let go by an operator since (or be being
        // replayed now: the share lock waits for that to finish).
        let mut parked_now = HashSet::new();
        let touched: Vec<&str> = events
            .iter()
            .map(|event| event.stream_id.as_str())
            .filter(|stream| parked.contains(*stream))
            .collect();
        if !touched.is_empty() {
            let still: Vec<String> = sqlx::query_scalar(
                "SELECT stream_id FROM parked_streams WHERE consumer = $1 \
                 AND stream_id = ANY($2) FOR SHARE",
            )
            .bind(name)
            .bind(&touched)
            .fetch_all(transaction.connection())
            .await
            .map_err(|e| failed(&e))?;
            for stream in touched {
                if !still.iter().any(|s| s == stream) {
                    parked.remove(stream);
                }
            }
            parked_now.extend(still);
        }
        let mut applied = 0;
        for &event in events {
            if parked_now.contains(&event.stream_id) {
                park_behind(transaction.connection(), name, event)
                    .await
                    .map_err(|e| failed(&e))?;
                continue;
            }
            AssertUnwindSafe(self.subscriber.apply(event, &mut transaction))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err("the subscriber panicked".into()))
                .map_err(|error| {
                    let text = format!("event at {}: {error}", event.global_position);
                    if transient(error.as_ref()) {
                        // A deadlock, a lock or pool timeout: not the event's fault.
                        Attempt::Infrastructure(TermError::Database(sqlx::Error::Protocol(text)))
                    } else {
                        Attempt::Failed(text)
                    }
                })?;
            applied += 1;
        }
        if self.config.stop_before_checkpoint.load(Ordering::Acquire) {
            return Err(Attempt::FaultInjected);
        }
        transaction.commit().await.map_err(|e| failed(&e))?;
        self.metrics.subscription_applied(name, applied);
        Ok(())
    }

    /// Parks `event`'s stream behind it and moves the checkpoint past it.
    async fn park(
        &self,
        writer: &mut PgConnection,
        event: &RecordedEvent,
        error: &str,
        stored: &mut i64,
    ) -> Result<(), TermError> {
        let name = self.config.name.as_str();
        tracing::warn!(
            stream = %event.stream_id,
            position = event.global_position,
            %error,
            "an event failed for good; its stream is parked"
        );
        let mut transaction = writer.begin().await?;
        let parked = sqlx::query(
            "INSERT INTO parked_streams (consumer, stream_id, blocking_message_id, error) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (consumer, stream_id) DO NOTHING",
        )
        .bind(name)
        .bind(&event.stream_id)
        .bind(event.event_id)
        .bind(error)
        .execute(&mut *transaction)
        .await?;
        if parked.rows_affected() == 0 {
            // Parked already (by an earlier process under this name): behind that.
            park_behind(&mut transaction, name, event).await?;
        }
        if !move_checkpoint(&mut transaction, name, *stored, event.global_position, &[]).await? {
            return Err(TermError::LostLead);
        }
        transaction.commit().await?;
        *stored = event.global_position;
        self.metrics.subscription_parked(name);
        Ok(())
    }

    /// Writes a checkpoint that moved over unwanted events only.
    async fn persist(
        &self,
        writer: &mut PgConnection,
        stored: &mut i64,
        checkpoint: i64,
    ) -> Result<(), TermError> {
        if *stored >= checkpoint {
            return Ok(());
        }
        if !move_checkpoint(writer, &self.config.name, *stored, checkpoint, &[]).await? {
            return Err(TermError::LostLead);
        }
        *stored = checkpoint;
        Ok(())
    }

    /// Notes a writer that holds the subscription back while events wait, and says so
    /// (health, metrics, a log line) once it has for [`SubscriptionConfig::held_back_after`].
    fn watch_held_back(&self, fence: &Fence, position: i64, since: &mut Option<(i64, Instant)>) {
        let Some(blocker) = fence.blocker.as_ref().filter(|b| b.events_waiting) else {
            *since = None;
            self.progress.set_held_back(None, &self.metrics);
            return;
        };
        let started = match *since {
            Some((xid, started)) if xid == blocker.xid => started,
            _ => {
                *since = Some((blocker.xid, Instant::now()));
                return;
            }
        };
        if started.elapsed() >= self.config.held_back_after {
            let held = HeldBack {
                position,
                blocker: blocker.clone(),
                for_seconds: started.elapsed().as_secs_f64(),
            };
            self.progress.set_held_back(Some(held), &self.metrics);
        }
    }
}

/// Records `event` behind its stream's parked event, in order, unapplied.
async fn park_behind(
    connection: &mut PgConnection,
    name: &str,
    event: &RecordedEvent,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO parked_messages (consumer, stream_id, message_id) \
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(&event.stream_id)
    .bind(event.event_id)
    .execute(connection)
    .await
    .map(drop)
}

/// Moves a subscription's checkpoint from `from` to `to`, first taking the locks of
/// `streams` (none: an empty slice); false when it was not at `from` (another leader
/// moved it).
async fn move_checkpoint(
    connection: &mut PgConnection,
    name: &str,
    from: i64,
    to: i64,
    streams: &[String],
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(concat!(
        "WITH locked AS (SELECT ",
        crate::store::stream_locks!("$4"),
        ") UPDATE subscription_checkpoints SET position = $3, updated_at = now() \
         FROM locked WHERE subscription = $1 AND position = $2 AND locked.locks >= 0",
    ))
    .bind(name)
    .bind(from)
    .bind(to)
    .bind(streams)
    .execute(connection)
    .await?;
    Ok(moved.rows_affected() == 1)
}

/// Whether an error says the database could not do it now rather than that the event
/// cannot be applied: a lost connection, a pool or lock timeout, a deadlock, a
/// serialization failure, a server shutting down.
fn transient(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        let database = error.downcast_ref::<sqlx::Error>().or_else(|| {
            match error.downcast_ref::<StoreError>() {
                Some(StoreError::Database(database)) => Some(database),
                _ => None,
            }
        });
        if let Some(database) = database {
            return match database {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
                sqlx::Error::Database(database) => database.code().is_some_and(|code| {
                    ["40001", "40P01", "55P03", "57014"].contains(&code.as_ref())
                        || code.starts_with("08")
                        || code.starts_with("57P0")
                }),
                _ => false,
            };
        }
        cause = error.source();
    }
    false
}

/// Whether a connection still answers (after a failed transaction).
async fn alive(connection: &mut PgConnection) -> bool {
    tokio::time::timeout(Duration::from_secs(5), connection.ping())
        .await
        .is_ok_and(|pinged| pinged.is_ok())
}

/// A writer that has held a subscription back for a while.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldBack {
    /// The subscription's position: what it applied up to.
    pub position: i64,
    pub blocker: Blocker,
    pub for_seconds: f64,
}

impl std::fmt::Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let blocker = &self.blocker;
        write!(
            f,
            "held back at position {} for {:.0} s by transaction {} (pid {}, application_name {:?}",
            self.position,
            self.for_seconds,
            blocker.xid,
            blocker
                .pid
                .map_or_else(|| "none".to_owned(), |pid| pid.to_string()),
            blocker.application_name,
        )?;
        if let Some(started) = blocker.transaction_started {
            write!(f, ", open since {}", started.format("%Y-%m-%dT%H:%M:%SZ"))?;
        }
        f.write_str("); see pg_stat_activity")
    }
}

/// How far a subscription got, as this process knows it.
#[derive(Debug)]
pub struct Progress {
    name: String,
    /// The highest position known applied: this process's commits while it leads,
    /// the checkpoint re-read from the database otherwise.
    position: AtomicI64,
    /// Read-your-writes queries waiting for a position, woken by the commit (or the
    /// re-check) that gets there.
    waiters: Mutex<BTreeMap<i64, Vec<tokio::sync::oneshot::Sender<()>>>>,
    /// A task re-checks the database for the waiters ([`Progress::wait_for`]).
    rechecking: AtomicBool,
    /// This process leads the subscription.
    leading: AtomicBool,
    held_back: Mutex<Option<HeldBack>>,
}

/// How often waiting read-your-writes queries re-check the checkpoint together, for
/// positions another process applied.
const RECHECK_EVERY: Duration = Duration::from_millis(25);

impl Progress {
    fn new(name: &str) -> Self {
        Progress {
            name: name.to_owned(),
            position: AtomicI64::new(0),
            waiters: Mutex::default(),
            rechecking: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            held_back: Mutex::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The highest position this process knows the subscription applied.
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::Acquire)
    }

    pub fn leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// The writer holding the subscription back, once it has for a while.
    pub fn held_back(&self) -> Option<HeldBack> {
        self.held_back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_held_back(&self, held: Option<HeldBack>, metrics: &Metrics) {
        let mut current = self.held_back.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() && current.is_none() {
            return;
        }
        if let Some(held) = &held
            && current
                .as_ref()
                .is_none_or(|now| now.blocker.xid != held.blocker.xid)
        {
            tracing::warn!(
                xid = held.blocker.xid,
                pid = ?held.blocker.pid,
                application_name = %held.blocker.application_name,
                position = held.position,
                "an open transaction in this store's database holds the subscription back"
            );
        }
        metrics.subscription_held_back(&self.name, held.as_ref());
        *current = held;
    }

    /// Records that everything up to `position` is applied, and wakes who waited.
    fn advance(&self, position: i64) {
        let before = self.position.fetch_max(position, Ordering::AcqRel);
        if position <= before {
            return;
        }
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let later = waiters.split_off(&(position + 1));
        for (_, list) in std::mem::replace(&mut *waiters, later) {
            for waiter in list {
                let _ = waiter.send(());
            }
        }
    }

    /// Waits until the subscription has applied everything up to `position`, for at
    /// most `timeout`; true when it has. A commit of the leader in this process wakes
    /// it; while anyone waits, one task re-reads the checkpoint every 25 ms for
    /// positions another process applied.
    pub async fn wait_for(
        self: &Arc<Self>,
        pool: &PgPool,
        position: i64,
        timeout: Duration,
    ) -> Result<bool, sqlx::Error> {
        if self.position() >= position {
            return Ok(true);
        }
        let (wake, woken) = tokio::sync::oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(position)
            .or_default()
            .push(wake);
        // Registered before this second look, so an advance in between still wakes us.
        if self.position() >= position {
            return Ok(true);
        }
        self.recheck_while_awaited(pool);
        match tokio::time::timeout(timeout, woken).await {
            Ok(Ok(())) => Ok(true),
            _ => {
                let stored = checkpoint(pool, &self.name).await?;
                self.advance(stored);
                Ok(stored >= position)
            }
        }
    }

    /// Makes sure one task re-reads the checkpoint while anyone waits.
    fn recheck_while_awaited(self: &Arc<Self>, pool: &PgPool) {
        if self.rechecking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (progress, pool) = (self.clone(), pool.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RECHECK_EVERY).await;
                if progress.forget_gone_waiters() {
                    progress.rechecking.store(false, Ordering::Release);
                    // A waiter that came in between found the flag still set.
                    if progress.forget_gone_waiters()
                        || progress.rechecking.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
                match checkpoint(&pool, &progress.name).await {
                    Ok(stored) => progress.advance(stored),
                    Err(error) => tracing::debug!(%error, "cannot re-check the checkpoint"),
                }
            }
        });
    }

    /// Drops waiters that gave up; true when none is left.
    fn forget_gone_waiters(&self) -> bool {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.retain(|_, list| {
            list.retain(|waiter| !waiter.is_closed());
            !list.is_empty()
        });
        waiters.is_empty()
    }
}

/// A subscription's stored checkpoint (0 before it ever ran).
pub async fn checkpoint(pool: &PgPool, name: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM subscription_checkpoints WHERE subscription = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}

/// Whether `stream_id` is parked for the subscription (its later events are held).
pub async fn is_parked(pool: &PgPool, name: &str, stream_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM parked_streams WHERE consumer = $1 AND stream_id = $2)",
    )
    .bind(name)
    .bind(stream_id)
    .fetch_one(pool)
    .await
}

/// A subscription's health as its monitor last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Events recorded after its checkpoint (at most [`LAG_COUNT_LIMIT`]).
    pub events: i64,
    /// Events wait, yet the checkpoint has not moved for [`STALL_AFTER`].
    pub stalled: bool,
}

/// Counting stops here: beyond it the exact figure does not matter.
pub const LAG_COUNT_LIMIT: i64 = 100_000;
/// A subscription with events to apply and no progress for this long is stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// Measures a subscription's lag every `every` from its stored checkpoint (so every
/// process agrees, whichever leads) until `cancel` fires: metrics, and the returned
/// channel for readiness.
pub fn monitor(
    pool: PgPool,
    name: String,
    metrics: Metrics,
    every: Duration,
    cancel: CancellationToken,
) -> tokio::sync::watch::Receiver<Lag> {
    let (sender, receiver) = tokio::sync::watch::channel(Lag::default());
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(i64, Instant)> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let measured: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
                "SELECT c.position, (SELECT count(*) FROM (SELECT 1 FROM events \
                 WHERE global_position > c.position LIMIT $2) AS waiting) \
                 FROM (SELECT coalesce((SELECT position FROM subscription_checkpoints \
                 WHERE subscription = $1), 0) AS position) AS c",
            )
            .bind(&name)
            .bind(LAG_COUNT_LIMIT)
            .fetch_one(&pool)
            .await;
            match measured {
                Ok((position, events)) => {
                    let since = match last {
                        Some((at, since)) if at == position => since,
                        _ => Instant::now(),
                    };
                    last = Some((position, since));
                    let lag = Lag {
                        events,
                        stalled: events > 0 && since.elapsed() >= STALL_AFTER,
                    };
                    metrics.subscription_lag(&name, lag.events, lag.stalled);
                    let _ = sender.send(lag);
                }
                Err(error) => tracing::warn!(%error, subscription = %name, "cannot measure lag"),
            }
        }
    });
    receiver
}

/// An event parked for a subscription, as `orderflow dlq` shows it.
#[derive(Debug, Clone)]
pub struct ParkedEvent {
    pub subscription: String,
    pub event: RecordedEvent,
    /// Why it failed (for the event its stream waits for).
    pub error: Option<String>,
    /// The event it waits behind, if it was never tried.
    pub parked_behind: Option<Uuid>,
    pub parked_at: Option<DateTime<Utc>>,
}

/// Every event parked for the named subscriptions, stream by stream: the one each
/// stream waits for first, then those behind it in order.
pub async fn parked_events(
    pool: &PgPool,
    subscriptions: &[&str],
) -> Result<Vec<ParkedEvent>, StoreError> {
    type Row = (
        String,
        String,
        Uuid,
        Option<String>,
        Option<DateTime<Utc>>,
        Option<Uuid>,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
            "SELECT s.consumer, s.stream_id, s.blocking_message_id, s.error, s.parked_at, NULL::uuid, \
                    0::bigint AS seq \
             FROM parked_streams s WHERE s.consumer = ANY($1) \
             UNION ALL \
             SELECT m.consumer, m.stream_id, m.message_id, NULL, NULL, s.blocking_message_id, m.seq \
             FROM parked_messages m JOIN parked_streams s \
               ON s.consumer = m.consumer AND s.stream_id = m.stream_id \
             WHERE m.consumer = ANY($1) AND m.message_id <> s.blocking_message_id \
             ORDER BY 1, 2, 7",
        )
    .bind(subscriptions)
    .fetch_all(pool)
    .await?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.2).collect();
    let events = crate::store::events_by_id(pool, &ids).await?;
    Ok(rows
        .into_iter()
        .filter_map(
            |(subscription, _, id, error, parked_at, parked_behind, _)| {
                let event = events.iter().find(|event| event.event_id == id)?.clone();
                Some(ParkedEvent {
                    subscription,
                    event,
                    error,
                    parked_behind,
                    parked_at,
                })
            },
        )
        .collect())
}

/// Applies a parked stream's events again, in order, through `subscriber`, and lets
/// the stream go on (`orderflow dlq replay`): all in one transaction that holds the
/// stream's parking row, so the live subscription (which takes it shared) neither
/// applies nor parks an event of the stream meanwhile. If one fails again, nothing
/// changes and the error is returned. Returns the events applied.
pub async fn replay_parked<S: Subscriber>(
    store: &EventStore,
    subscriber: &S,
    name: &str,
    stream_id: &str,
) -> Result<usize, HandlerError> {
    let mut transaction = store.begin().await?;
    let locks = events_of_stream_locks(subscriber, store, name, stream_id).await?;
    transaction.lock_streams(&locks).await?;
    let blocking: Option<Uuid> = sqlx::query_scalar(
        "SELECT blocking_message_id FROM parked_streams \
         WHERE consumer = $1 AND stream_id = $2 FOR UPDATE",
    )
    .bind(name)
    .bind(stream_id)
    .fetch_optional(transaction.connection())
    .await?;
    let Some(blocking) = blocking else {
        return Ok(0);
    };
    let behind: Vec<Uuid> = sqlx::query_scalar(
        "SELECT message_id FROM parked_messages WHERE consumer = $1 AND stream_id = $2 \
         AND message_id <> $3 ORDER BY seq",
    )
    .bind(name)
    .bind(stream_id)
    .bind(blocking)
    .fetch_all(transaction.connection())
    .await?;
    let ids: Vec<Uuid> = std::iter::once(blocking).chain(behind).collect();
    let events = crate::store::events_by_id(store.pool(), &ids).await?;
    let mut applied = 0;
    for id in &ids {
        let Some(event) = events.iter().find(|event| event.event_id == *id) else {
            continue;
        };
        subscriber
            .apply(event, &mut transaction)
            .await
            .map_err(|error| format!("event at {} failed again: {error}", event.global_position))?;
        applied += 1;
    }
    crate::parking::unpark_in(transaction.connection(), name, stream_id).await?;
    transaction.commit().await?;
    Ok(applied)
}

/// The streams a replay of a parked stream appends to, by its parked events.
async fn events_of_stream_locks<S: Subscriber>(
    subscriber: &S,
    store: &EventStore,
    name: &str,
    stream_id: &str,
) -> Result<Vec<String>, StoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT blocking_message_id FROM parked_streams WHERE consumer = $1 AND stream_id = $2 \
         UNION ALL SELECT message_id FROM parked_messages WHERE consumer = $1 AND stream_id = $2",
    )
    .bind(name)
    .bind(stream_id)
    .fetch_all(store.pool())
    .await?;
    let events = crate::store::events_by_id(store.pool(), &ids).await?;
    Ok(events
        .iter()
        .flat_map(|event| subscriber.streams_to_lock(event))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_wake_once_their_position_is_applied() {
        let progress = Progress::new("test");
        let (first, mut first_woken) = tokio::sync::oneshot::channel();
        let (second, mut second_woken) = tokio::sync::oneshot::channel();
        {
            let mut waiters = progress.waiters.lock().unwrap();
            waiters.entry(5).or_default().push(first);
            waiters.entry(9).or_default().push(second);
        }
        progress.advance(4);
        assert!(first_woken.try_recv().is_err());
        progress.advance(5);
        assert!(first_woken.try_recv().is_ok());
        assert!(second_woken.try_recv().is_err());
        progress.advance(3);
        assert_eq!(progress.position(), 5, "never goes back");
        progress.advance(12);
        assert!(second_woken.try_recv().is_ok());
        assert!(progress.waiters.lock().unwrap().is_empty());
    }
}
