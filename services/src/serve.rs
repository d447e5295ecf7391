//! Running services until asked to stop.

use anyhow::Context;
use eventstore::{EventStore, Metrics, Relay, RelayConfig};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Service};
use crate::http::{AppState, app};
use crate::setup::prepare_database;

/// Connections each service's pool may open.
const POOL_SIZE: u32 = 16;

/// Runs `services`, each on its own port with its own database and outbox relay,
/// until Ctrl-C or SIGTERM; then every server stops accepting, finishes the requests
/// in hand, every relay finishes its batch, and it returns. If one server fails, the
/// others are stopped too.
pub async fn run(config: &Config, services: &[Service]) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    let metrics = Metrics::new();
    let mut servers = JoinSet::new();
    let mut workers = JoinSet::new();
    for &service in services {
        let pool = match config.database(service)? {
            Some(options) => Some(prepare_database(&options, POOL_SIZE).await?),
            None => None,
        };
        let address = (config.bind_address, service.port());
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("{service}: cannot listen on {}:{}", address.0, address.1))?;
        tracing::info!(%service, address = %listener.local_addr()?, "listening");
        if let Some(pool) = &pool {
            // The relay declares the service's exchanges and queues, then publishes
            // its outbox; it retries on its own while the broker is away.
            let relay = Relay::new(
                EventStore::new(pool.clone()),
                RelayConfig::new(service.name(), &config.amqp_url),
                metrics.clone(),
            );
            workers.spawn(relay.run(shutdown.clone()));
        }
        let router = app(AppState {
            service,
            pool,
            metrics: metrics.clone(),
        });
        let stop = shutdown.clone();
        servers.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .with_context(|| format!("{service}: server failed"))
        });
    }
    let mut outcome = Ok(());
    while let Some(finished) = servers.join_next().await {
        let result = finished.context("a server task panicked").and_then(|r| r);
        if let Err(error) = result {
            shutdown.cancel();
            if outcome.is_ok() {
                outcome = Err(error);
            }
        }
    }
    shutdown.cancel();
    while workers.join_next().await.is_some() {}
    tracing::info!("stopped");
    outcome
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
