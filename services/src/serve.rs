//! Running services until asked to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use eventstore::backoff::Backoff;
use eventstore::{
    AggregateStore, Consumer, ConsumerConfig, EventStore, Handler, Metrics, Relay, RelayConfig,
    SchemaRegistry, Subscriber, Subscription, SubscriptionConfig,
};
use projections::inventory::StockLevels;
use projections::order::{CustomerOrders, OrderSummaries};
use projections::payment::PaymentStatuses;
use projections::user::UserProfiles;
use projections::{ReadModels, Runner};
use sagas::runner::FulfilmentRunner;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Config, Service};
use crate::gateway::Gateway;
use crate::http::{self, Access, Base, Db, Health, ServiceState, SubscriptionWatch};
use crate::registry::{Instance, Registry};
use crate::setup::prepare_database;
use crate::workers::{InventoryCommands, PaymentCommands, SimulatedProvider};

/// Connections each service's HTTP pool may open (its consumers keep their own).
const POOL_SIZE: u32 = 10;
/// Streams whose committed state each service keeps in memory: the hot ones (stock
/// items, which every order touches twice per line) and the orders and payments in
/// flight; a few megabytes at most.
const STATE_CACHE_STREAMS: usize = 20_000;
/// How often projection lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(2);
/// Services started by [`start`]: where each listens, and how to stop them.
pub struct Running {
    pub addresses: Vec<(Service, SocketAddr)>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn address(&self, service: Service) -> Option<SocketAddr> {
        self.addresses
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, address)| *address)
    }

    /// Waits until the services stop (on shutdown, or when one server fails).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the services task panicked")?
    }

    /// Stops the services gracefully and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Runs `services` until Ctrl-C or SIGTERM.
pub async fn run(config: &Config, services: &[Service]) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    start(config, services, shutdown).await?.wait().await
}

/// A background worker before it is spawned.
type Worker = (String, Pin<Box<dyn Future<Output = ()> + Send>>);

/// Starts `services`, each on its own port with its own database, outbox relay,
/// projections and command consumer, and returns once they listen. When `shutdown`
/// fires, every server stops accepting and finishes the requests in hand, every
/// worker finishes the message in hand, and the returned [`Running`] completes. If
/// one server fails, the others are stopped too.
pub async fn start(
    config: &Config,
    services: &[Service],
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    let registry = SchemaRegistry::builtin()?;
    let secrets = config.secrets()?;
    let tokens = Arc::new(crate::auth::Tokens::new(
        secrets.tokens.bytes(),
        config.jwt_lifetime,
    ));
    let digest_key = Arc::new(secrets.digests);
    let access = Access {
        trust_local_callers: config.trust_local_callers,
        anonymous_reads: config.anonymous_reads,
    };
    if config.anonymous_reads {
        tracing::warn!(
            "ORDERFLOW_ANONYMOUS_READS is set: anyone may read every user's profile, orders, payments and notifications"
        );
    }
    if config.trust_local_callers {
        tracing::info!(
            bind_address = %config.bind_address,
            "requests that reach a service directly without a token act as an operator (loopback only; ORDERFLOW_TRUST_LOCAL_CALLERS=false turns this off)"
        );
    }
    // One set per process: the notification service's sender and its HTTP controls.
    let providers = Arc::new(crate::notifications::Providers::new(&metrics));
    let instance_id = config
        .instance_id
        .clone()
        .unwrap_or_else(|| Uuid::now_v7().simple().to_string());
    let mut workers: Vec<Worker> = Vec::new();
    let mut consumer_configs = Vec::new();
    let mut relays = Vec::new();
    let mut listeners = Vec::new();
    for &service in services {
        let address = (config.bind_address, config.port(service));
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("{service}: cannot listen on {}:{}", address.0, address.1))?;
        let instance = Instance {
            service: service.name().to_owned(),
            instance_id: instance_id.clone(),
            address: listener.local_addr()?.to_string(),
        };
        // Which partitions of the service's event consumers this instance takes.
        let assignment = (config.consumer_partitions > 1).then(|| {
            crate::registry::assignments(
                config.redis_url.clone(),
                config.registry_namespace.clone(),
                config.registry_ttl,
                instance.clone(),
                config.consumer_partitions,
                shutdown.clone(),
            )
        });
        let mut health = Health::default();
        let app: Box<dyn FnOnce(ServiceState) -> axum::Router> = match service {
            Service::Gateway => {
                // No database, no workers of its own.
                let base = Base {
                    service,
                    metrics: metrics.clone(),
                    health: Arc::new(health),
                };
                let gateway = Arc::new(Gateway::new(config, tokens.clone(), &metrics)?);
                listeners.push((instance, listener, crate::gateway::app(base, gateway)));
                continue;
            }
            Service::Order => Box::new(http::order),
            Service::Inventory => Box::new(http::inventory),
            Service::Payment => Box::new(http::payment),
            Service::User => Box::new(http::user),
            Service::Notification => {
                let providers = providers.clone();
                Box::new(move |state| http::notification(state, providers))
            }
        };
        let options = config
            .database(service)?
            .with_context(|| format!("the {service} service has no database"))?;
        // Named, so an operator finds its sessions in pg_stat_activity (a reader held
        // back by an open writer names it).
        let options = options.application_name(&format!("orderflow {service}"));
        let pool = prepare_database(&options, POOL_SIZE).await?;
        let store = published_by(service, EventStore::new(pool.clone()));
        let aggregates = AggregateStore::new(store.clone(), registry.clone())
            .with_state_cache(STATE_CACHE_STREAMS);
        let mut plan = Plan {
            service,
            config,
            store: &store,
            registry: &registry,
            metrics: &metrics,
            shutdown: &shutdown,
            health: &mut health,
            workers: &mut workers,
            consumer_configs: &mut consumer_configs,
            providers: &providers,
            assignment: assignment.as_ref(),
        };
        relays.push(plan.relay());
        plan.service_workers(&aggregates);
        plan.retention();
        let pressure = plan.pressure();
        health.amqp_url = Some(config.amqp_url.clone());
        health.database = Some(pool.clone());
        let state = ServiceState {
            base: Base {
                service,
                metrics: metrics.clone(),
                health: Arc::new(health),
            },
            db: Db { pool, aggregates },
            tokens: tokens.clone(),
            digest_key: digest_key.clone(),
            access,
            pressure: Some(pressure),
        };
        listeners.push((instance, listener, app(state)));
    }
    // Every relay declares every consumer queue of the process before it publishes,
    // so no event is dropped as unroutable while a consumer is still connecting.
    for relay in relays {
        let mut relay_config = RelayConfig::new(relay.service.name(), &config.amqp_url);
        relay_config.queues = consumer_configs.clone();
        relay_config.command_partitions = config.consumer_partitions;
        let relay_worker = Relay::new(relay.store, relay_config, metrics.clone());
        workers.push(running(
            relay.name,
            relay.running,
            relay_worker.run(shutdown.clone()),
        ));
    }
    let mut running_workers = JoinSet::new();
    for (name, worker) in workers {
        tracing::debug!(worker = %name, "starting");
        running_workers.spawn(worker);
    }
    let mut servers = JoinSet::new();
    let mut addresses = Vec::new();
    for (instance, listener, router) in listeners {
        let address = listener.local_addr()?;
        let service = Service::parse(&instance.service).map_err(anyhow::Error::msg)?;
        tracing::info!(%service, %address, instance_id = %instance.instance_id, "listening");
        addresses.push((service, address));
        running_workers.spawn(register(config.clone(), instance, shutdown.clone()));
        let stop = shutdown.clone();
        servers.spawn(async move {
            let service_with_peers = router.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, service_with_peers)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .with_context(|| format!("{service}: server failed"))
        });
    }
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let mut outcome = Ok(());
        while let Some(finished) = servers.join_next().await {
            let result = finished.context("a server task panicked").and_then(|r| r);
            if let Err(error) = result {
                stop.cancel();
                if outcome.is_ok() {
                    outcome = Err(error);
                }
            }
        }
        stop.cancel();
        while running_workers.join_next().await.is_some() {}
        tracing::info!("stopped");
        outcome
    });
    Ok(Running {
        addresses,
        shutdown,
        task,
    })
}

/// Collects one service's background workers before anything is spawned.
struct Plan<'a> {
    service: Service,
    config: &'a Config,
    store: &'a EventStore,
    registry: &'a SchemaRegistry,
    metrics: &'a Metrics,
    shutdown: &'a CancellationToken,
    health: &'a mut Health,
    workers: &'a mut Vec<Worker>,
    consumer_configs: &'a mut Vec<ConsumerConfig>,
    providers: &'a Arc<crate::notifications::Providers>,
    /// The partitions of the service's event consumers this instance takes (when they
    /// are split).
    assignment: Option<&'a tokio::sync::watch::Receiver<Vec<u16>>>,
}

impl Plan<'_> {
    /// The outbox relay, registered with the service's health now and built once
    /// every consumer queue it must declare is known. It declares the exchanges and
    /// queues, then publishes the outbox, retrying on its own while the broker is away.
    fn relay(&mut self) -> PendingRelay {
        let name = format!("relay {}", self.service);
        let running = Arc::new(AtomicBool::new(true));
        self.health.workers.push((name.clone(), running.clone()));
        PendingRelay {
            service: self.service,
            store: self.store.clone(),
            name,
            running,
        }
    }

    /// The projections and command handlers the service runs.
    fn service_workers(&mut self, aggregates: &AggregateStore) {
        match self.service {
            Service::Order => {
                self.read_models((OrderSummaries, CustomerOrders));
                let saga = FulfilmentRunner::new(
                    aggregates.clone(),
                    sagas::fulfilment::Settings {
                        payment_deadline: self.config.payment_deadline,
                        capture_retry: self.config.capture_retry,
                    },
                )
                .with_metrics(self.metrics);
                let deadlines = saga.clone().run_deadlines(self.shutdown.clone());
                self.worker("saga deadlines".to_owned(), deadlines);
                // The order's own events from the order store; the other services'
                // answers from the broker.
                self.subscription(FulfilmentRunner::subscription_config(), saga.clone());
                self.consumer(FulfilmentRunner::config(&self.config.amqp_url), saga);
            }
            Service::Inventory => {
                self.read_models(StockLevels);
                let handler = InventoryCommands {
                    aggregates: aggregates.clone(),
                };
                let config = self.commands_config();
                self.consumer(config, handler);
            }
            Service::Payment => {
                self.read_models(PaymentStatuses);
                let handler = PaymentCommands {
                    aggregates: aggregates.clone(),
                    provider: SimulatedProvider,
                    calls: crate::telemetry::provider_calls(self.metrics),
                };
                let config = self.commands_config();
                self.consumer(config, handler);
            }
            Service::User => self.read_models(UserProfiles),
            Service::Notification => {
                let wake = Arc::new(tokio::sync::Notify::new());
                let sender = crate::notifications::Sender {
                    pool: self.store.pool().clone(),
                    providers: self.providers.clone(),
                    wake: wake.clone(),
                };
                self.worker(
                    "notification sender".to_owned(),
                    sender.run(self.shutdown.clone()),
                );
                let planner = crate::notifications::Planner { sender: wake };
                self.consumer(
                    crate::notifications::Planner::config(&self.config.amqp_url),
                    planner,
                );
            }
            Service::Gateway => {}
        }
    }

    /// The service's back-pressure and its sampler, over the subscriptions planned so
    /// far (so call it after [`Plan::service_workers`]).
    fn pressure(&mut self) -> Arc<crate::pressure::Pressure> {
        let pressure = crate::pressure::Pressure::new(
            self.service.name(),
            self.config.pressure,
            self.metrics.clone(),
        );
        let lags = self
            .health
            .subscriptions
            .iter()
            .map(|watch| watch.lag.clone())
            .collect();
        let sampler = pressure.clone().run(
            self.store.pool().clone(),
            lags,
            self.service == Service::Order,
            self.shutdown.clone(),
        );
        self.worker(format!("back-pressure {}", self.service), sampler);
        pressure
    }

    /// Prunes the service's bookkeeping after its retention.
    fn retention(&mut self) {
        let pruner = eventstore::retention::Pruner::new(
            self.store.pool().clone(),
            self.service.name(),
            self.config.retention,
            self.metrics.clone(),
        );
        self.worker(
            format!("retention {}", self.service),
            pruner.run(self.shutdown.clone()),
        );
    }

    /// The service's command consumer (the default few connections: PostgreSQL's
    /// default allows 100 in all, and batches carry the load).
    fn commands_config(&self) -> ConsumerConfig {
        ConsumerConfig::commands(self.service.name(), &self.config.amqp_url)
    }

    /// The service's read models, kept by one subscription on its own store.
    fn read_models<R: ReadModels>(&mut self, read_models: R) {
        let runner = Runner::new(
            read_models,
            self.registry.clone(),
            self.store.pool().clone(),
        );
        self.subscription(Runner::<R>::config(), runner);
    }

    /// A subscription on the service's own store, with its lag monitor, registered
    /// with the service's health (readiness, read-your-writes).
    fn subscription<S: Subscriber>(&mut self, config: SubscriptionConfig, subscriber: S) {
        let name = format!("subscription {}", config.name);
        let lag = eventstore::subscription::monitor(
            self.store.pool().clone(),
            config.name.clone(),
            self.metrics.clone(),
            LAG_EVERY,
            self.shutdown.clone(),
        );
        let subscription =
            Subscription::new(config, self.store.clone(), subscriber, self.metrics.clone());
        self.health.subscriptions.push(SubscriptionWatch {
            lag,
            progress: subscription.progress(),
        });
        self.worker(name, subscription.run(self.shutdown.clone()));
    }

    fn consumer<H: Handler>(&mut self, mut config: ConsumerConfig, handler: H) {
        let name = format!("consumer {}", config.queue());
        // Split (when configured) so the service's instances share the work.
        config.partitions = self.config.consumer_partitions;
        self.consumer_configs.push(config.clone());
        let mut consumer = Consumer::new(
            config,
            self.store.clone(),
            self.registry.clone(),
            handler,
            self.metrics.clone(),
        );
        if let Some(assignment) = self.assignment {
            consumer = consumer.with_assignment(assignment.clone());
        }
        self.worker(name, consumer.run(self.shutdown.clone()));
    }

    /// Registers a worker with the service's health, which reports it stopped once
    /// its future ends.
    fn worker(&mut self, name: String, work: impl Future<Output = ()> + Send + 'static) {
        let flag = Arc::new(AtomicBool::new(true));
        self.health.workers.push((name.clone(), flag.clone()));
        self.workers.push(running(name, flag, work));
    }
}

/// The events of `service` that another service consumes (by the routing keys every
/// cross-service consumer binds), `None` when a consumer takes them all: only these
/// go to the broker (DESIGN §3); the service's own subscriptions read the store.
pub fn crossing_events(service: Service) -> Option<Vec<String>> {
    let consumers = [
        FulfilmentRunner::config(""),
        crate::notifications::Planner::config(""),
    ];
    let mut types = Vec::new();
    for (exchange, pattern) in consumers.iter().flat_map(|consumer| &consumer.bindings) {
        if exchange != eventstore::amqp::EVENTS_EXCHANGE {
            continue;
        }
        let Some((owner, event_type)) = pattern.split_once('.') else {
            continue;
        };
        if owner == service.name() {
            if event_type.contains(['*', '#']) {
                return None;
            }
            types.push(event_type.to_owned());
        }
    }
    Some(types)
}

/// `store`, publishing only what [`crossing_events`] says leaves `service`.
pub fn published_by(service: Service, store: EventStore) -> EventStore {
    match crossing_events(service) {
        Some(types) => store.publishing(types),
        None => store,
    }
}

/// Keeps an instance registered in Redis until `shutdown`, connecting (and
/// reconnecting) with backoff: a service runs without the registry, it is only not
/// found through the gateway meanwhile.
async fn register(config: Config, instance: Instance, shutdown: CancellationToken) {
    let mut backoff = Backoff::new();
    loop {
        let connect = Registry::connect(
            &config.redis_url,
            &config.registry_namespace,
            config.registry_ttl,
        );
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(registry)) => return registry.heartbeat(instance, shutdown).await,
            Ok(Err(error)) => tracing::warn!(%error, "cannot reach Redis to register; retrying"),
            Err(_) => tracing::warn!("Redis did not answer; retrying"),
        }
        if !backoff.pause(&shutdown).await {
            return;
        }
    }
}

/// A relay whose configuration waits for the full list of consumer queues.
struct PendingRelay {
    service: Service,
    store: EventStore,
    name: String,
    running: Arc<AtomicBool>,
}

/// A worker that clears its health flag when its future ends.
fn running(
    name: String,
    flag: Arc<AtomicBool>,
    work: impl Future<Output = ()> + Send + 'static,
) -> Worker {
    (
        name,
        Box::pin(async move {
            work.await;
            flag.store(false, Ordering::Relaxed);
        }),
    )
}

/// Resolves on Ctrl-C or SIGTERM, and cancels `shutdown`.
pub async fn shutdown_signal(shutdown: CancellationToken) {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
        () = shutdown.cancelled() => return,
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_another_service_consumes_crosses_the_broker() {
        let crossing = |service| crossing_events(service).unwrap();
        assert_eq!(
            crossing(Service::Order),
            ["OrderConfirmed", "OrderRejected", "OrderCancelled"]
        );
        assert_eq!(
            crossing(Service::Inventory),
            ["OrderStockReserved", "OrderStockUnavailable"]
        );
        assert_eq!(
            crossing(Service::Payment),
            [
                "PaymentAuthorized",
                "PaymentDeclined",
                "PaymentCaptured",
                "PaymentCaptureFailed"
            ]
        );
        assert_eq!(
            crossing(Service::User),
            [
                "UserRegistered",
                "ProfileChanged",
                "NotificationPreferencesChanged"
            ]
        );
        assert!(crossing(Service::Notification).is_empty());
    }
}
