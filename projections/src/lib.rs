//! Read models and the projection runner (DESIGN §5).
//!
//! - [`Projection`]: a named read model of one service — the events it reads and a pure
//!   `apply` that updates its tables through the connection it is given.
//! - [`ReadModels`]: the projections of one service, taken together: a projection, or a
//!   tuple of projections of the same events.
//! - [`Runner`]: runs a service's read models as one subscription on the service's own
//!   event store (`eventstore::subscription`), named `<service>.read-models`
//!   ([`queue`]): each event is read once for all of them, in global order, and every
//!   update commits in the same transaction as the subscription's checkpoint (never
//!   applied twice, never out of order). Read-your-writes, lag and stall detection come
//!   with the subscription.
//! - [`order`], [`inventory`], [`payment`], [`user`]: the read models — order
//!   summaries and customer order history, stock levels, payment statuses, user
//!   profiles — and their queries.
//! - [`rebuild`]: rebuilding a read model from the event store into fresh tables,
//!   swapped in atomically (`orderflow replay`).
//!
//! Invariant: only this crate knows the SQL of read-model tables; `apply` writes only
//! through the connection it is handed (the subscription's transaction).

pub mod inventory;
pub mod order;
pub mod payment;
pub mod rebuild;
pub mod user;

use std::future::Future;

use chrono::{DateTime, Utc};
use domain::wire::WireEvent;
use eventstore::{
    HandlerError, RecordedEvent, SchemaRegistry, StoreTransaction, Subscriber, SubscriptionConfig,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A read model: which events it reads and how each one changes its tables.
pub trait Projection: Send + Sync + 'static {
    /// Names the projection (for rebuilding it, and in documents).
    const NAME: &'static str;
    /// The service whose events it reads and whose database holds its tables.
    const SERVICE: &'static str;
    /// Its streams' id prefix (`order-`), for measuring lag in the event store.
    const STREAM_PREFIX: &'static str;
    /// The tables it writes, and only it: a rebuild builds fresh copies of them.
    const TABLES: &'static [&'static str];
    type Event: WireEvent + Send + Sync;

    /// Applies one event. Called once per event, in global order, inside the
    /// transaction that records the event as applied.
    fn apply(
        &self,
        event: &Self::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

/// The name of a service's read-model subscription (once its consumer queue's name):
/// its checkpoint, parked streams and metrics go by it.
pub fn queue(service: &str) -> String {
    format!("{service}.read-models")
}

/// What one consumer keeps up to date: a projection, or a tuple of projections of one
/// service's events, applied one after the other in the same transaction. One
/// delivery, one inbox claim and one commit per event serve them all, which halves the
/// broker's and the database's work for a service with two read models.
pub trait ReadModels: Send + Sync + 'static {
    const SERVICE: &'static str;
    const STREAM_PREFIX: &'static str;
    type Event: WireEvent + Send + Sync;

    fn apply_all(
        &self,
        event: &Self::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;

    fn queue() -> String {
        queue(Self::SERVICE)
    }
}

impl<P: Projection> ReadModels for P {
    const SERVICE: &'static str = P::SERVICE;
    const STREAM_PREFIX: &'static str = P::STREAM_PREFIX;
    type Event = P::Event;

    async fn apply_all(
        &self,
        event: &P::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.apply(event, context, connection).await
    }
}

impl<A: Projection, B: Projection<Event = A::Event>> ReadModels for (A, B) {
    const SERVICE: &'static str = A::SERVICE;
    const STREAM_PREFIX: &'static str = A::STREAM_PREFIX;
    type Event = A::Event;

    async fn apply_all(
        &self,
        event: &A::Event,
        context: &EventContext,
        connection: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        self.0.apply(event, context, &mut *connection).await?;
        self.1.apply(event, context, connection).await
    }
}

/// Where an event came from, as a projection needs it.
#[derive(Debug, Clone)]
pub struct EventContext {
    pub stream_id: String,
    pub stream_version: i64,
    pub global_position: i64,
    pub correlation_id: Uuid,
    pub recorded_at: DateTime<Utc>,
}

impl EventContext {
    /// The context of a recorded event, with its time to the millisecond (as an AMQP
    /// timestamp carries it, so rows written before projections read the store
    /// directly compare equal to a rebuild's).
    pub fn from_recorded(event: &eventstore::RecordedEvent) -> Result<Self, HandlerError> {
        Self::from_envelope(&eventstore::amqp::Envelope::from(event))
    }

    fn from_envelope(envelope: &eventstore::amqp::Envelope) -> Result<Self, HandlerError> {
        let stream_version = envelope
            .stream_version
            .ok_or("an event without a stream version cannot be projected")?;
        let recorded_at = i64::try_from(envelope.timestamp_ms)
            .ok()
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        Ok(EventContext {
            stream_id: envelope.stream_id.clone(),
            stream_version,
            global_position: envelope.global_position,
            correlation_id: envelope.correlation_id,
            recorded_at,
        })
    }
}

/// Runs a service's [`ReadModels`] as a subscription on its own event store
/// (`eventstore::subscription`): every event of its streams, in global order, applied
/// in the transaction that moves the subscription's checkpoint.
pub struct Runner<R> {
    read_models: R,
    registry: SchemaRegistry,
    /// Where writer schemas this code does not know are learnt from.
    pool: PgPool,
}

impl<R: ReadModels> Runner<R> {
    pub fn new(read_models: R, registry: SchemaRegistry, pool: PgPool) -> Self {
        Runner {
            read_models,
            registry,
            pool,
        }
    }

    /// The subscription's configuration (named [`queue`]`(service)`, as the consumer
    /// that kept the read models before was, so its metrics and parked streams keep
    /// their names).
    pub fn config() -> SubscriptionConfig {
        SubscriptionConfig::new(R::queue())
    }
}

impl<R: ReadModels> Subscriber for Runner<R> {
    fn wants(&self, event: &RecordedEvent) -> bool {
        event.stream_id.starts_with(R::STREAM_PREFIX)
    }

    async fn apply(
        &self,
        event: &RecordedEvent,
        transaction: &mut StoreTransaction<'_>,
    ) -> Result<(), HandlerError> {
        let decoded: R::Event = self
            .registry
            .decode_learning(&self.pool, &event.payload)
            .await?;
        let context = EventContext::from_recorded(event)?;
        self.read_models
            .apply_all(&decoded, &context, transaction.connection())
            .await?;
        Ok(())
    }
}
