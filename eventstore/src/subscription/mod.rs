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
//!   about a second of the leader's death. The leader takes a [`Fence`](crate::Fence), reads the
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
//!
//! The parts: this file runs a leadership term (wait for the lead, read below the
//! fence, wait for a wake-up); `apply` applies a page with its checkpoint and parks
//! what keeps failing; `progress` is how far a subscription got and what holds it back;
//! `parked` lists and replays parked events for `orderflow dlq`.

mod apply;
mod parked;
mod progress;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use parked::{ParkedEvent, is_parked, parked_events, replay_parked};
pub use progress::{
    HeldBack, LAG_COUNT_LIMIT, Lag, Progress, STALL_AFTER, checkpoint, checkpoint_on, monitor,
};

use crate::backoff::{Backoff, TermEnd, another_term};
use crate::consumer::HandlerError;
use crate::metrics::Metrics;
use crate::store::{
    EventStore, OUTBOX_CHANNEL, RecordedEvent, StoreError, StoreTransaction, fence_on,
    read_below_on,
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
    /// The subscriber said no attempt can succeed ([`crate::Permanent`]) for the event
    /// at this position: it is parked without another attempt.
    Permanent(String, i64),
}

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
        let mut backoff = Backoff::new();
        while !cancel.is_cancelled() {
            let mut started = Instant::now();
            let outcome = match self.acquire(&cancel).await {
                Ok(None) => return,
                Ok(Some(reader)) => {
                    tracing::info!("leading");
                    // The term, not the wait for it, is what must have lasted.
                    started = Instant::now();
                    standby.leading(true);
                    self.progress.set_leading(true);
                    self.metrics.subscription_leading(&self.config.name, true);
                    let outcome = self.lead(reader, &cancel).await;
                    standby.leading(false);
                    self.progress.set_leading(false);
                    self.metrics.subscription_leading(&self.config.name, false);
                    self.progress.set_held_back(None, &self.metrics);
                    outcome
                }
                Err(error) => Err(TermError::Database(error)),
            };
            if !another_term(
                outcome,
                &mut backoff,
                started,
                &cancel,
                "before the checkpoint",
            )
            .await
            {
                return;
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
}
