//! Bounded bookkeeping (DESIGN §8.8): a service's inbox rows, idempotency keys and
//! consumer progress are deleted once they are older than a retention that outlives
//! any redelivery; events are kept for ever.
//!
//! Why that is safe (ARCHITECTURE.md, "Retention", argues it in full): a message comes
//! again only (1) unacknowledged, when its channel closes, which RabbitMQ bounds by its
//! consumer timeout (30 min by default); (2) republished by the relay after a lost
//! publish mark, within seconds; (3) replayed from the dead-letter queue, which holds
//! only messages that were never applied, so there is no inbox row to match; (4) sent
//! again by `orderflow replay --republish`, which leaves out events older than the
//! retention unless told otherwise. A message that waits in a queue longer than the
//! retention (a consumer down for a week) was never applied either. Idempotency keys
//! answer a client retrying the same request, which a client does within minutes.
//!
//! One instance of a service prunes at a time (a transaction-scoped advisory lock);
//! each batch is its own short transaction, so pruning never holds locks for long.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::Metrics;

/// The class of the two-key advisory lock that lets one instance prune (class 1:
/// streams; 3: subscription leaders).
const PRUNE_LOCK_CLASS: i32 = 4;
/// Rows deleted per transaction.
/// Rows deleted per transaction: each holds a transaction id, which holds the store's
/// subscriptions back (their read fence) until it commits, so keep it short.
const BATCH: i64 = 1_000;

/// How long bookkeeping is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Inbox rows and consumer progress (default 7 days).
    pub messages: Duration,
    /// Idempotency keys (default 24 h).
    pub idempotency_keys: Duration,
    /// How often to prune (default 10 minutes).
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            messages: Duration::from_secs(7 * 24 * 3600),
            idempotency_keys: Duration::from_secs(24 * 3600),
            every: Duration::from_secs(600),
        }
    }
}

/// What one round of pruning deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub inbox: u64,
    pub consumer_streams: u64,
    pub idempotency_keys: u64,
}

/// A table, its age column and how long its rows are kept.
struct Target {
    table: &'static str,
    delete: &'static str,
    keep: Duration,
}

/// Prunes one service's database.
#[derive(Debug, Clone)]
pub struct Pruner {
    pool: PgPool,
    service: String,
    retention: Retention,
    metrics: Metrics,
}

impl Pruner {
    pub fn new(
        pool: PgPool,
        service: impl Into<String>,
        retention: Retention,
        metrics: Metrics,
    ) -> Self {
        Pruner {
            pool,
            service: service.into(),
            retention,
            metrics,
        }
    }

    /// Prunes now and then every [`Retention::every`] until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.retention.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self.prune_once().await {
                Ok(pruned) if pruned != Pruned::default() => {
                    tracing::info!(service = %self.service, ?pruned, "pruned bookkeeping");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(service = %self.service, %error, "cannot prune bookkeeping");
                }
            }
        }
    }

    /// Deletes every row past its retention, in batches; nothing when another
    /// instance is pruning the same database.
    pub async fn prune_once(&self) -> Result<Pruned, sqlx::Error> {
        let targets = [
            Target {
                table: "inbox",
                // The age test again outside: a row a claim touched meanwhile is
                // rechecked on its new version and kept.
                delete: "DELETE FROM inbox WHERE (consumer, message_id) IN \
                         (SELECT consumer, message_id FROM inbox \
                          WHERE handled_at < now() - make_interval(secs => $1) LIMIT $2) \
                         AND handled_at < now() - make_interval(secs => $1)",
                keep: self.retention.messages,
            },
            Target {
                table: "consumer_streams",
                // A parked stream keeps its applied version: the letter it waits for
                // may be replayed however late, and must still be judged against it.
                delete: "DELETE FROM consumer_streams c WHERE (consumer, stream_id) IN \
                         (SELECT consumer, stream_id FROM consumer_streams \
                          WHERE applied_at < now() - make_interval(secs => $1) LIMIT $2) \
                         AND applied_at < now() - make_interval(secs => $1) \
                         AND NOT EXISTS (SELECT 1 FROM parked_streams p \
                                         WHERE p.consumer = c.consumer AND p.stream_id = c.stream_id)",
                keep: self.retention.messages,
            },
            Target {
                table: "idempotency_keys",
                delete: "DELETE FROM idempotency_keys WHERE key IN \
                         (SELECT key FROM idempotency_keys \
                          WHERE created_at < now() - make_interval(secs => $1) LIMIT $2) \
                         AND created_at < now() - make_interval(secs => $1)",
                keep: self.retention.idempotency_keys,
            },
        ];
        let mut counts = [0_u64; 3];
        'targets: for (target, count) in targets.iter().zip(&mut counts) {
            loop {
                let mut transaction = self.pool.begin().await?;
                let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, 0)")
                    .bind(PRUNE_LOCK_CLASS)
                    .fetch_one(&mut *transaction)
                    .await?;
                if !ours {
                    break 'targets;
                }
                let deleted = sqlx::query(target.delete)
                    .bind(target.keep.as_secs_f64())
                    .bind(BATCH)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected();
                transaction.commit().await?;
                *count += deleted;
                self.metrics.pruned(&self.service, target.table, deleted);
                if deleted < BATCH.unsigned_abs() {
                    break;
                }
            }
        }
        let [inbox, consumer_streams, idempotency_keys] = counts;
        Ok(Pruned {
            inbox,
            consumer_streams,
            idempotency_keys,
        })
    }
}
