//! A circuit breaker: after `threshold` consecutive failures it opens and refuses calls
//! for `open_for`, so a dead dependency is not hammered and callers fail (or wait) at
//! once; then it lets one probe through (half-open), closing on its success and
//! opening again on its failure.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out; everyone else waits for its outcome, for at most `open_for`
    /// (a probe whose outcome is never reported, because its caller gave up, must not
    /// keep the breaker shut for good).
    HalfOpen {
        since: Instant,
    },
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            open_for,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Whether a call may go ahead now. When it may, its outcome must be reported with
    /// [`success`](Self::success) or [`failure`](Self::failure).
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen {
                    since: Instant::now(),
                };
                true
            }
            State::HalfOpen { since } if since.elapsed() >= self.open_for => {
                *state = State::HalfOpen {
                    since: Instant::now(),
                };
                true
            }
            State::Open { .. } | State::HalfOpen { .. } => false,
        }
    }

    pub fn success(&self) {
        *self.lock() = State::Closed { failures: 0 };
    }

    pub fn failure(&self) {
        let mut state = self.lock();
        *state = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + self.open_for,
            },
        };
    }

    /// `closed`, `open` or `half-open`.
    pub fn state(&self) -> &'static str {
        match *self.lock() {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half-open",
        }
    }

    /// How long until an open breaker lets a probe through (zero otherwise).
    pub fn retry_in(&self) -> Duration {
        match *self.lock() {
            State::Open { until } => until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_once_before_closing() {
        let breaker = Breaker::new(3, Duration::from_millis(50));
        for _ in 0..2 {
            assert!(breaker.allow());
            breaker.failure();
        }
        breaker.success();
        assert_eq!(breaker.state(), "closed", "a success resets the count");
        for _ in 0..3 {
            assert!(breaker.allow());
            breaker.failure();
        }
        assert_eq!(breaker.state(), "open");
        assert!(!breaker.allow(), "refused while open");
        assert!(breaker.retry_in() > Duration::ZERO);
        // After open_for: exactly one probe.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !breaker.allow() {
            assert!(Instant::now() < deadline, "the breaker never half-opened");
            std::thread::yield_now();
        }
        assert_eq!(breaker.state(), "half-open");
        assert!(!breaker.allow(), "one probe at a time");
        breaker.failure();
        assert_eq!(breaker.state(), "open", "a failed probe opens it again");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !breaker.allow() {
            assert!(Instant::now() < deadline, "the breaker never half-opened");
            std::thread::yield_now();
        }
        breaker.success();
        assert_eq!(breaker.state(), "closed");
    }

    #[test]
    fn a_probe_never_reported_does_not_keep_it_shut() {
        let breaker = Breaker::new(1, Duration::from_millis(20));
        breaker.failure();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !breaker.allow() {
            assert!(Instant::now() < deadline, "the breaker never half-opened");
            std::thread::yield_now();
        }
        // The probe's caller went away without reporting: after open_for, another.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !breaker.allow() {
            assert!(
                Instant::now() < deadline,
                "a lost probe kept the breaker shut"
            );
            std::thread::yield_now();
        }
    }
}
