//! The pure core of orderflow: what the business decides, with no I/O.
//!
//! - [`Aggregate`]: the shape every aggregate has — `decide` turns a command into
//!   events (all business rules live there), `evolve` folds one event into state and
//!   never fails.
//! - [`order`], [`inventory`], [`payment`], [`user`]: the four aggregates, each with its
//!   commands, events, one error enum, and given/when/then tests beside it.
//! - [`wire`]: the Avro records events are stored and sent as. They are separate types
//!   from the domain events (converted with `From`/`TryFrom`) so the domain can change
//!   without breaking stored history; every schema version lives in `domain/schemas/`.
//!
//! Invariant: nothing here is async or touches a database, a broker or a clock;
//! `domain` builds and tests in seconds.

pub mod ids;
pub mod inventory;
pub mod order;
pub mod payment;
pub mod user;
pub mod wire;

/// An event-sourced aggregate: its state is the fold of its events.
///
/// `decide` holds every business rule and may refuse a command; `evolve` only records
/// facts that were already decided, so it must accept any event `decide` produced.
/// A command that would change nothing (a repeated confirmation, say) decides no
/// events rather than failing, which makes retried commands harmless.
pub trait Aggregate: Default + Clone {
    /// Prefix of this aggregate's stream ids, e.g. `order` for `order-<uuid>`.
    const KIND: &'static str;
    type Command;
    type Event;
    type Error: std::error::Error + Send + Sync + 'static;

    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
    fn evolve(self, event: &Self::Event) -> Self;

    /// Folds a history into state, starting from `self`.
    fn replay<'a>(self, events: impl IntoIterator<Item = &'a Self::Event>) -> Self
    where
        Self::Event: 'a,
    {
        events.into_iter().fold(self, Self::evolve)
    }
}

/// Given/when/then for any aggregate: `given` events, `when` a command, `then` the
/// events (or the error) it decides. Used by every aggregate's tests.
#[cfg(test)]
pub(crate) fn given<A: Aggregate>(history: &[A::Event]) -> A {
    A::default().replay(history)
}
