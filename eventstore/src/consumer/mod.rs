//! The consumer runtime that projections, sagas and command handlers run on.
//!
//! A [`Consumer`] owns one quorum queue (`<service>.<name>`) and hands each message to
//! a [`Handler`] inside a [`StoreTransaction`](crate::StoreTransaction) that also claims the message's inbox row,
//! so a message's effect and the record that it was applied commit together: a second
//! delivery finds the row and changes nothing.
//!
//! Order: messages with one stream id (an event's stream, a command's ordering key) are
//! handled one at a time, in delivery order; different streams run in parallel, up to
//! `concurrency` transactions at once. Messages of different streams that are ready
//! while every transaction is busy go together into the next one (up to
//! `batch_size`): one claim statement, one commit, one connection for all of them, so
//! under load the per-message cost of a transaction is divided, and an idle consumer
//! still handles each message at once. If a batch fails, each of its messages is tried
//! again on its own, so batching never changes a message's outcome. A failing handler
//! is retried in process (3 attempts, 100 ms then 200 ms apart), blocking only its own
//! stream. After the last attempt the message goes
//! to `dlq.<service>.retry` with the error, the attempt count and its original routing
//! in headers, and its stream is parked: the stream's later messages follow it into the
//! dead-letter queue untried, so none is applied ahead of it, until the dead letter is
//! replayed successfully or skipped ([`crate::parking`]). An undecodable message goes straight
//! to the dead-letter queue. A lost broker connection is re-established with backoff;
//! unacknowledged messages come back and the inbox absorbs the repeats.
//!
//! The parts, one job each: `config` (settings and topology), `handler` (what a
//! handler sees and implements), `session` (one broker session and its partitions),
//! `dispatch` (which deliveries start, and together), `attempt` (tries, retries and
//! verdicts), `inbox` (the claim statement and the transaction around the handlers),
//! `dead_letter` (the dead-letter queue), `connections` (the database connections
//! messages are applied on). Parked streams are administered in [`crate::parking`].

mod attempt;
mod config;
mod connections;
mod dead_letter;
mod dispatch;
mod handler;
mod inbox;
mod session;

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::ConsumerConfig;
pub use handler::{
    Handler, HandlerError, Message, Permanent, applied_version, applied_versions, is_permanent,
};

use crate::backoff::Backoff;
use crate::codec::SchemaRegistry;
use crate::metrics::Metrics;
use crate::store::EventStore;
use connections::Connections;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker cancelled the consumer")]
    CancelledByBroker,
}

/// Runs a [`Handler`] on a queue. See the module documentation.
pub struct Consumer<H> {
    shared: Arc<Shared<H>>,
    /// The partitions this instance takes, when the consumer is split; all of them
    /// when no one says.
    assignment: Option<tokio::sync::watch::Receiver<Vec<u16>>>,
}

struct Shared<H> {
    config: ConsumerConfig,
    connections: Connections,
    queue: String,
    store: EventStore,
    registry: SchemaRegistry,
    handler: H,
    metrics: Metrics,
    cancel: CancellationToken,
}

impl<H: Handler> Consumer<H> {
    pub fn new(
        config: ConsumerConfig,
        store: EventStore,
        registry: SchemaRegistry,
        handler: H,
        metrics: Metrics,
    ) -> Self {
        let queue = config.queue();
        metrics.track_consumer(&queue);
        let options = store.pool().connect_options().as_ref().clone();
        let connections = Connections::new(options, config.concurrency);
        Consumer {
            shared: Arc::new(Shared {
                connections,
                config,
                queue,
                store,
                registry,
                handler,
                metrics,
                cancel: CancellationToken::new(),
            }),
            assignment: None,
        }
    }

    /// Takes only the partitions `assignment` names (and follows its changes: a
    /// partition let go is handed back to the broker, whose single-active-consumer
    /// queue then delivers to the instance that took it up, starting with what was
    /// unacknowledged, in order).
    pub fn with_assignment(mut self, assignment: tokio::sync::watch::Receiver<Vec<u16>>) -> Self {
        self.assignment = Some(assignment);
        self
    }

    /// Declares the topology and consumes until `cancel` fires, reconnecting with
    /// backoff whenever the broker connection is lost. On cancel it stops taking
    /// messages, lets the ones being handled finish, and returns.
    pub async fn run(mut self, cancel: CancellationToken) {
        let span = tracing::info_span!("consumer", queue = %self.shared.queue);
        async move {
            // Tasks watch the consumer's own token, so it can be cancelled from here.
            let _stop_tasks = self.shared.cancel.clone().drop_guard();
            let mut backoff = Backoff::new();
            while !cancel.is_cancelled() {
                let started = Instant::now();
                match self.session(&cancel).await {
                    Ok(()) => return,
                    Err(error) => {
                        let delay = backoff.after_run(started);
                        tracing::warn!(%error, ?delay, "consumer lost its broker session; reconnecting");
                        if !crate::backoff::sleep(delay, &cancel).await {
                            return;
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}
