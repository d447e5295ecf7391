//! The `orderflow` binary's library: configuration, database set-up, and the HTTP
//! servers of each service.
//!
//! - [`config`]: the services, their ports and databases, and the environment
//!   variables that configure them (every one with a working local default).
//! - [`setup`]: creating each service's database and migrating it.
//! - [`http`]: one router per concern, merged per service; `app(state)` builds a
//!   service's router so tests can call it without a socket.
//! - [`serve`]: runs the chosen services until Ctrl-C or SIGTERM, then shuts them down
//!   gracefully.
//!
//! Invariant: only this crate knows HTTP and the command line. At this stage a service
//! serves its health endpoints; the command and query APIs arrive with issue 4.

pub mod config;
pub mod http;
pub mod serve;
pub mod setup;
