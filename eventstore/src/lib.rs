//! Events at rest: everything that stores, reads and encodes orderflow's events.
//!
//! - [`store`]: the PostgreSQL event store — append with an expected version
//!   (optimistic concurrency), idempotent by event id; the events and their outbox
//!   rows in one statement, then a coalesced `NOTIFY` to wake the relay; read a
//!   stream; read all events in gap-safe global order.
//! - [`codec`]: Avro single-object encoding (magic, fingerprint, body) and the schema
//!   registry that resolves an old writer's schema into the current reader schema.
//! - [`aggregates`]: load an aggregate (snapshot + newer events) and run a command on
//!   it; snapshots are a cache that can be deleted at any time, and so is the
//!   in-memory state cache.
//! - [`cache`]: a bounded map of the latest committed state per stream or saga.
//! - [`db`]: connecting, creating service databases, and running migrations.
//! - [`amqp`]: the RabbitMQ topology and the AMQP properties every message carries.
//! - [`relay`]: the outbox relay, one leader per database, publishing with confirms.
//! - [`subscription`]: subscriptions on a service's own store (its projections, its
//!   saga's own events): gap-safe reads by global position, the effect and the
//!   checkpoint in one transaction, one leader per subscription, parked streams.
//! - [`consumer`]: the consumer runtime (inbox, per-stream order, retries, dead
//!   letters) for what arrives from other services: their events and commands.
//! - [`dlq`]: listing, replaying and purging a service's dead letters.
//! - [`republish`]: sending recorded events to RabbitMQ again.
//! - [`retention`]: pruning inbox rows, consumer progress and idempotency keys past
//!   their retention.
//! - [`metrics`]: Prometheus metrics of all of the above.
//! - [`backoff`]: the one pause policy of every reconnect loop.
//!
//! Invariants: only this crate knows the SQL of the event, outbox and inbox tables and
//! talks to RabbitMQ; nothing here knows HTTP.

pub mod aggregates;
pub mod amqp;
pub mod backoff;
pub mod cache;
pub mod codec;
pub mod consumer;
pub mod db;
pub mod dlq;
pub mod metrics;
pub mod parking;
pub mod relay;
pub mod republish;
pub mod retention;
pub mod store;
pub mod subscription;
pub mod trace;

pub use aggregates::{AggregateStore, ExecuteError, Executed, Loaded, Snapshot};
pub use codec::{CodecError, Encoded, SchemaRegistry};
pub use consumer::{Consumer, ConsumerConfig, Handler, HandlerError, Message, Permanent};
pub use metrics::Metrics;
pub use relay::{Relay, RelayConfig};
pub use store::{
    AppendResult, Blocker, EventStore, ExpectedVersion, Fence, Metadata, NewEvent, OUTBOX_CHANNEL,
    OutgoingCommand, RecordedEvent, RelayWaker, StoreError, StoreTransaction, StoredVersion,
};
pub use subscription::{Subscriber, Subscription, SubscriptionConfig};
