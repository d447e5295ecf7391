//! The `orderflow` binary's library: configuration, database set-up, and the HTTP
//! servers of each service.
//!
//! - [`auth`]: password hashes and access tokens (JWT).
//! - [`secrets`]: the token and digest secrets: given, from a file, or generated
//!   into the data folder.
//! - [`breaker`]: a circuit breaker.
//! - [`gateway`]: the single entry point, a router of its own: authentication, rate
//!   limits, routing to healthy instances.
//! - [`registry`]: the registry of running instances and the rate-limit counters, in
//!   Redis.
//! - [`notifications`]: the notification service's planner, sender and simulated
//!   providers.
//! - [`config`]: the services, their ports and databases, and the environment
//!   variables that configure them (every one with a working local default).
//! - [`setup`]: creating each service's database and migrating it.
//! - [`http`]: one router per concern, merged per service with its OpenAPI document;
//!   `http::order(state)` and the like build a service's router, on state typed for
//!   services, so tests can call it without a socket.
//! - [`serve`]: starts the chosen services (HTTP server, outbox relay, projections,
//!   command consumers) and runs them until Ctrl-C or SIGTERM, then shuts them down
//!   gracefully.
//! - [`load`]: the load generator behind `orderflow load`.
//! - [`ops`]: the operator's tools behind `orderflow events`, `dlq` and `sagas`.
//! - [`pressure`]: back-pressure: commands refused with 503 `overloaded` while a
//!   service's outbox, subscriptions or orders in flight are past their bounds.
//! - [`telemetry`]: log lines (text or JSON) and OpenTelemetry trace export over
//!   OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! - [`workers`]: the inventory and payment services' command handlers and the
//!   simulated payment provider.
//!
//! Invariant: only this crate knows HTTP and the command line.

pub mod auth;
pub mod breaker;
pub mod config;
pub mod gateway;
pub mod http;
pub mod load;
pub mod notifications;
pub mod ops;
pub mod pressure;
pub mod registry;
pub mod secrets;
pub mod serve;
pub mod setup;
pub mod telemetry;
pub mod workers;
