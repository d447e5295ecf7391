//! What the services share through Redis: the registry of running instances, and the
//! gateway's rate-limit counters.
//!
//! The registry keeps one sorted set per service (`<namespace>:registry:<service>`),
//! each member an instance (id and address) scored by when its registration expires.
//! An instance registers at start-up and heartbeats every third of the time-to-live;
//! it removes itself when it stops. One that dies without a word (`kill -9`) drops out
//! of every lookup once its score passes, within the time-to-live, and is swept from
//! the set by the next registration.
//!
//! Rate limits count requests per client per second in `<namespace>:rate:<client>:<s>`
//! (a fixed one-second window, expiring after two), so every gateway instance sharing
//! the Redis server enforces one limit together.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// A running instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service: String,
    pub instance_id: String,
    /// `host:port` its HTTP server listens on.
    pub address: String,
}

/// The registry and rate limits of one namespace.
#[derive(Clone)]
pub struct Registry {
    redis: ConnectionManager,
    namespace: String,
    ttl: Duration,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// What the rate limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Over the limit: try again after this many seconds.
    Limited {
        retry_after: u32,
    },
}

impl Registry {
    /// Connects to Redis at `url`. The connection reconnects by itself after a
    /// failure; calls made while Redis is away fail.
    pub async fn connect(url: &str, namespace: &str, ttl: Duration) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let redis = ConnectionManager::new(client).await?;
        Ok(Registry {
            redis,
            namespace: namespace.to_owned(),
            ttl,
        })
    }

    fn key(&self, service: &str) -> String {
        format!("{}:registry:{service}", self.namespace)
    }

    /// Registers (or refreshes) an instance until now + time-to-live.
    pub async fn register(&self, instance: &Instance) -> redis::RedisResult<()> {
        let key = self.key(&instance.service);
        let now = now_ms();
        let expires = now + self.ttl.as_millis() as i64;
        let member = member(instance);
        let mut redis = self.redis.clone();
        redis::pipe()
            .atomic()
            .zadd(&key, &member, expires)
            .ignore()
            .zrembyscore(&key, "-inf", now)
            .ignore()
            .exec_async(&mut redis)
            .await
    }

    pub async fn deregister(&self, instance: &Instance) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis
            .zrem(self.key(&instance.service), member(instance))
            .await
    }

    /// The instances of `service` whose registration has not expired.
    pub async fn instances(&self, service: &str) -> redis::RedisResult<Vec<Instance>> {
        let mut redis = self.redis.clone();
        let members: Vec<String> = redis
            .zrangebyscore(self.key(service), now_ms(), "+inf")
            .await?;
        Ok(members
            .iter()
            .filter_map(|text| serde_json::from_str(text).ok())
            .collect())
    }

    /// Keeps `instance` registered until `cancel`, then removes it. Failures (Redis
    /// away) are logged and retried at the next beat.
    pub async fn heartbeat(self, instance: Instance, cancel: CancellationToken) {
        let every = (self.ttl / 3).max(Duration::from_millis(100));
        loop {
            if let Err(error) = self.register(&instance).await {
                tracing::warn!(%error, service = %instance.service, "cannot register in Redis");
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        if let Err(error) = self.deregister(&instance).await {
            tracing::warn!(%error, "cannot deregister from Redis");
        }
    }

    /// Counts a request of `client` against `per_second`.
    pub async fn admit(&self, client: &str, per_second: u64) -> redis::RedisResult<Admission> {
        let second = now_ms() / 1000;
        let key = format!("{}:rate:{client}:{second}", self.namespace);
        let mut redis = self.redis.clone();
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .incr(&key, 1)
            .expire(&key, 2)
            .ignore()
            .query_async(&mut redis)
            .await?;
        Ok(if count <= per_second {
            Admission::Allowed
        } else {
            Admission::Limited { retry_after: 1 }
        })
    }
}

/// The partitions of a split consumer this instance takes: partition `p` goes to the
/// instance whose place among the service's registered instances (sorted by id) is
/// `p` modulo their number. Every instance works this out from the same registry, so
/// each partition has one taker once their views agree; while they do not, two may
/// both take one (its single-active-consumer queue lets only one of them consume) or
/// none may for a moment. Starts with every partition (so consuming starts even
/// without Redis) and follows the registry every `every`.
pub fn assignments(
    redis_url: String,
    namespace: String,
    ttl: Duration,
    instance: Instance,
    partitions: u16,
    cancel: CancellationToken,
) -> tokio::sync::watch::Receiver<Vec<u16>> {
    let all: Vec<u16> = (0..partitions).collect();
    let (sender, receiver) = tokio::sync::watch::channel(all);
    tokio::spawn(async move {
        let every = (ttl / 3).max(Duration::from_millis(100));
        let mut registry = None;
        loop {
            if registry.is_none() {
                registry = Registry::connect(&redis_url, &namespace, ttl).await.ok();
            }
            if let Some(registry) = &registry
                && let Ok(mut instances) = registry.instances(&instance.service).await
            {
                instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
                instances.dedup_by(|a, b| a.instance_id == b.instance_id);
                if let Some(place) = instances
                    .iter()
                    .position(|i| i.instance_id == instance.instance_id)
                {
                    let takers = instances.len();
                    let mine: Vec<u16> = (0..partitions)
                        .filter(|p| usize::from(*p) % takers == place)
                        .collect();
                    sender.send_if_modified(|current| {
                        let changed = *current != mine;
                        if changed {
                            tracing::info!(service = %instance.service, partitions = ?mine, "taking partitions");
                            current.clone_from(&mine);
                        }
                        changed
                    });
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    receiver
}

fn member(instance: &Instance) -> String {
    // Field order is fixed, so one instance is always the same member.
    serde_json::to_string(instance).unwrap_or_default()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as i64)
}
