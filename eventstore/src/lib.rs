//! Events at rest: everything that stores, reads and encodes orderflow's events.
//!
//! - [`store`]: the PostgreSQL event store — append with an expected version
//!   (optimistic concurrency), idempotent by event id; the events and their outbox
//!   rows in one statement, then a coalesced `NOTIFY` to wake the relay; read a
//!   stream; read all events in gap-safe global order.
//! - [`codec`]: Avro single-object encoding (magic, fingerprint, body) and the schema
//!   registry that resolves an old writer's schema into the current reader schema.
//! - [`aggregates`]: load an aggregate (snapshot + newer events) and run a command on
//!   it; snapshots are a cache that can be deleted at any time.
//! - [`db`]: connecting, creating service databases, and running migrations.
//!
//! Invariants: only this crate knows the SQL of the event tables; nothing here knows
//! HTTP. Later issues add the outbox relay and RabbitMQ runtime here too.

pub mod aggregates;
pub mod codec;
pub mod db;
pub mod store;

pub use aggregates::{AggregateStore, ExecuteError, Executed, Loaded, Snapshot};
pub use codec::{CodecError, Encoded, SchemaRegistry};
pub use store::{
    AppendResult, EventStore, ExpectedVersion, Metadata, NewEvent, OUTBOX_CHANNEL, RecordedEvent,
    RelayWaker, StoreError, StoreTransaction, StoredVersion,
};
