//! Process managers (issue 5): the order-fulfilment saga.
//!
//! - [`ProcessManager`]: a saga's decisions, pure: given its state and one input, the
//!   next state, the commands to send and what becomes of its deadline ([`Decision`]).
//!   The runner loads the state, applies the decision and sends the commands through
//!   the outbox in one transaction; the decisions do no I/O.
//! - [`fulfilment`]: the order-fulfilment saga of DESIGN §6.
//! - [`runner`]: runs the saga on the consumer runtime (events in, commands out
//!   through the outbox, state and history in `sagas`/`saga_steps`, one transaction
//!   per input) and fires its deadlines from PostgreSQL; [`runner::find`] reads a saga
//!   for `GET /sagas/{order_id}`.
//! - [`testing`]: a given/when/then harness for decisions.

pub mod fulfilment;
pub mod runner;
pub mod testing;

use chrono::{DateTime, Utc};

/// What a process manager decides on one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<S, C> {
    pub state: S,
    /// Sent, in this order, in the same transaction as the new state.
    pub commands: Vec<C>,
    pub deadline: Deadline,
}

/// What a decision does to the saga's single pending deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    Keep,
    /// Fire at this moment (replacing any pending one).
    Set(DateTime<Utc>),
    Clear,
}

/// A saga's decisions. Every input must be idempotent: an input the state has already
/// taken into account (a redelivery, a duplicate) decides nothing and changes nothing.
pub trait ProcessManager: Clone + Default {
    type Input;
    type Command;
    /// Fixed for a run: timeouts and the like.
    type Settings;

    fn decide(
        &self,
        input: &Self::Input,
        now: DateTime<Utc>,
        settings: &Self::Settings,
    ) -> Decision<Self, Self::Command>;
}
