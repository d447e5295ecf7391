//! Given/when/then for [`ProcessManager`] decisions, with no I/O:
//!
//! ```text
//! GivenWhenThen::<Fulfilment>::new(settings)
//!     .given(&[placed(), reserved("A")])
//!     .when(Input::PaymentDeclined)
//!     .then_commands(&[release(), cancel(EndReason::PaymentDeclined)]);
//! ```

use chrono::{DateTime, Duration, TimeZone, Utc};

use crate::{Deadline, Decision, ProcessManager};

/// A saga brought to a state by earlier inputs, then given one more.
pub struct GivenWhenThen<P: ProcessManager> {
    settings: P::Settings,
    state: P,
    now: DateTime<Utc>,
    /// The pending deadline after the `given` inputs.
    deadline: Option<DateTime<Utc>>,
}

/// What the `when` input decided.
pub struct Then<P: ProcessManager> {
    pub decision: Decision<P, P::Command>,
    /// When the input was decided.
    pub at: DateTime<Utc>,
}

impl<P: ProcessManager> GivenWhenThen<P> {
    pub fn new(settings: P::Settings) -> Self {
        GivenWhenThen {
            settings,
            state: P::default(),
            // A fixed clock, so deadlines in assertions are exact.
            now: Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap(),
            deadline: None,
        }
    }

    /// Applies `inputs` one second apart, keeping each new state and dropping the
    /// commands.
    pub fn given(mut self, inputs: &[P::Input]) -> Self {
        for input in inputs {
            let decision = self.state.decide(input, self.now, &self.settings);
            self.deadline = match decision.deadline {
                Deadline::Keep => self.deadline,
                Deadline::Set(at) => Some(at),
                Deadline::Clear => None,
            };
            self.state = decision.state;
            self.now += Duration::seconds(1);
        }
        self
    }

    /// The state the `given` inputs led to.
    pub fn state(&self) -> &P {
        &self.state
    }

    /// The deadline the `given` inputs left pending.
    pub fn pending_deadline(&self) -> Option<DateTime<Utc>> {
        self.deadline
    }

    pub fn when(self, input: P::Input) -> Then<P> {
        Then {
            decision: self.state.decide(&input, self.now, &self.settings),
            at: self.now,
        }
    }
}

impl<P> Then<P>
where
    P: ProcessManager + std::fmt::Debug + PartialEq,
    P::Command: std::fmt::Debug + PartialEq,
{
    pub fn then_commands(self, expected: &[P::Command]) -> Self {
        assert_eq!(self.decision.commands, expected, "commands");
        self
    }

    pub fn then_deadline(self, expected: Deadline) -> Self {
        assert_eq!(self.decision.deadline, expected, "deadline");
        self
    }

    /// Asserts something of the new state.
    pub fn then_state(self, check: impl FnOnce(&P)) -> Self {
        check(&self.decision.state);
        self
    }
}
