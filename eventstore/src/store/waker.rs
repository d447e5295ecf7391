//! Waking the relay and the store's subscriptions after a commit: directly in this
//! process, by a coalesced `NOTIFY` in others.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use super::OUTBOX_CHANNEL;
use crate::backoff::Backoff;

/// Wakes the outbox relay after appends commit, with a `NOTIFY` on its own connection.
///
/// Why not `NOTIFY` inside the writer's transaction: PostgreSQL serialises the commits
/// of all notifying transactions behind one lock held through the WAL flush, which
/// throws away group commit. Measured here (see BENCHMARKS.md), it cut 8 concurrent
/// writers from about 8k to 4.7k appends/s and 32 writers to 2.9k. A wake-up is only a
/// hint: a lost one (a crash between commit and notify) delays publication until the
/// relay's fallback poll; nothing is lost, because the outbox row committed with the
/// events. Wake-ups are coalesced to at most one `NOTIFY` per millisecond, sent with
/// `synchronous_commit = off` since a notification needs no durability.
#[derive(Clone, Debug)]
pub struct RelayWaker {
    /// Wakes a relay in this process directly: no round trip through PostgreSQL.
    pub(super) local: Arc<tokio::sync::Notify>,
    /// Counts the commits of this process that appended: the store's subscriptions in
    /// this process wait on it (each sees every change, unlike a `Notify`).
    pub(super) commits: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set while a relay of this process leads.
    pub(super) local_leader: Arc<AtomicBool>,
    /// Subscriptions of this store in this process that stand by (another process
    /// leads them). While none does and the relay leads here, no other process reads
    /// this store, and no NOTIFY is needed.
    pub(super) standing_by: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) wakes: tokio::sync::mpsc::Sender<()>,
    /// Taken by the first wake, which starts the task that sends the notifications
    /// (starting it lazily keeps `EventStore::new` free of a runtime requirement).
    pub(super) pending_task: Arc<Mutex<Option<WakeTask>>>,
    pub(super) started: Arc<AtomicBool>,
}

/// What the wake-sending task needs: where wakes arrive, and how to connect.
pub(super) type WakeTask = (tokio::sync::mpsc::Receiver<()>, PgConnectOptions);

/// At most one NOTIFY per this interval; wakes in between are merged.
pub(super) const WAKE_INTERVAL: Duration = Duration::from_millis(1);

impl RelayWaker {
    pub(super) fn new(options: PgConnectOptions) -> Self {
        // Capacity one: a wake while one is pending is merged into it.
        let (wakes, receiver) = tokio::sync::mpsc::channel(1);
        RelayWaker {
            local: Arc::new(tokio::sync::Notify::new()),
            commits: Arc::new(tokio::sync::watch::Sender::new(0)),
            local_leader: Arc::new(AtomicBool::new(false)),
            standing_by: Arc::default(),
            wakes,
            pending_task: Arc::new(Mutex::new(Some((receiver, options)))),
            started: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(super) fn wake(&self) {
        self.local.notify_one();
        self.commits
            .send_modify(|count| *count = count.wrapping_add(1));
        if self.local_leader.load(Ordering::Acquire)
            && self.standing_by.load(Ordering::Acquire) == 0
        {
            return;
        }
        // After the first wake this is one atomic load: appends never contend here.
        if !self.started.load(Ordering::Acquire) {
            let mut pending = self
                .pending_task
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((receiver, options)) = pending.take() {
                tokio::spawn(send_wakes(receiver, options));
            }
            self.started.store(true, Ordering::Release);
        }
        let _ = self.wakes.try_send(());
    }
}

/// What a relay in this process uses to be woken directly and to say it leads.
#[derive(Clone, Debug)]
pub(crate) struct LocalRelaySignal {
    pub(crate) wakes: Arc<tokio::sync::Notify>,
    pub(crate) leading: Arc<AtomicBool>,
}

impl RelayWaker {
    pub(crate) fn local_signal(&self) -> LocalRelaySignal {
        LocalRelaySignal {
            wakes: self.local.clone(),
            leading: self.local_leader.clone(),
        }
    }

    /// Changes whenever an append of this process commits.
    pub(crate) fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Counts a subscription of this process as standing by until the returned guard
    /// says it leads (or is dropped): appends then notify other processes.
    pub(crate) fn standby(&self) -> Standby {
        self.standing_by.fetch_add(1, Ordering::AcqRel);
        Standby {
            standing_by: self.standing_by.clone(),
            counted: true,
        }
    }
}

/// A subscription of this process standing by, counted until it leads.
#[derive(Debug)]
pub(crate) struct Standby {
    pub(super) standing_by: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) counted: bool,
}

impl Standby {
    /// Whether the subscription leads here now.
    pub(crate) fn leading(&mut self, leading: bool) {
        if leading == self.counted {
            if leading {
                self.standing_by.fetch_sub(1, Ordering::AcqRel);
            } else {
                self.standing_by.fetch_add(1, Ordering::AcqRel);
            }
            self.counted = !leading;
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if self.counted {
            self.standing_by.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Sends one NOTIFY per merged wake until every store handle is gone.
pub(super) async fn send_wakes(
    mut wakes: tokio::sync::mpsc::Receiver<()>,
    options: PgConnectOptions,
) {
    let mut connection: Option<PgConnection> = None;
    let mut backoff = Backoff::new();
    while wakes.recv().await.is_some() {
        if connection.is_none() {
            connection = connect_for_wakes(&options).await;
        }
        if let Some(live) = connection.as_mut()
            && let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                .bind(OUTBOX_CHANNEL)
                .execute(&mut *live)
                .await
        {
            tracing::warn!(%error, "relay wake-up failed; reconnecting");
            connection = None;
        }
        // Healthy: merge the wakes of the next interval. Failing: back off, doubling.
        let pause = if connection.is_some() {
            backoff.reset();
            WAKE_INTERVAL
        } else {
            backoff.next_delay()
        };
        tokio::time::sleep(pause).await;
    }
}

/// A connection for wake-ups: notifications need no durability, so they do not wait
/// for the WAL flush. `None` (logged) when it cannot be had; the relay's poll covers.
pub(super) async fn connect_for_wakes(options: &PgConnectOptions) -> Option<PgConnection> {
    let attempt = async {
        let mut connection = PgConnection::connect_with(options).await?;
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut connection)
            .await?;
        Ok::<_, sqlx::Error>(connection)
    };
    match attempt.await {
        Ok(connection) => Some(connection),
        Err(error) => {
            tracing::warn!(%error, "relay waker cannot connect; the relay's poll will cover");
            None
        }
    }
}
