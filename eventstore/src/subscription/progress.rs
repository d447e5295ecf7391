//! How far a subscription got (for read-your-writes queries, metrics and readiness),
//! and the writer that holds it back, if one has for a while.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{Subscriber, Subscription};
use crate::metrics::Metrics;
use crate::store::{Blocker, Fence};

impl<S: Subscriber> Subscription<S> {
    /// Notes a writer that holds the subscription back while events wait, and says so
    /// (health, metrics, a log line) once it has for [`SubscriptionConfig::held_back_after`].
    pub(super) fn watch_held_back(
        &self,
        fence: &Fence,
        position: i64,
        since: &mut Option<(i64, Instant)>,
    ) {
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
    pub(super) fn new(name: &str) -> Self {
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

    /// Whether this process leads the subscription now.
    pub(super) fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Release);
    }

    /// The writer holding the subscription back, once it has for a while.
    pub fn held_back(&self) -> Option<HeldBack> {
        self.held_back
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_held_back(&self, held: Option<HeldBack>, metrics: &Metrics) {
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
    pub(super) fn advance(&self, position: i64) {
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
    let mut connection = pool.acquire().await?;
    checkpoint_on(&mut connection, name).await
}

/// [`checkpoint`] on the caller's connection (or inside its transaction).
pub async fn checkpoint_on(
    connection: &mut sqlx::PgConnection,
    name: &str,
) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM subscription_checkpoints WHERE subscription = $1")
            .bind(name)
            .fetch_optional(connection)
            .await?;
    Ok(position.unwrap_or(0))
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
