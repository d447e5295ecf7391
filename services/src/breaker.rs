//! A circuit breaker: after `threshold` consecutive failures it opens and refuses calls
//! for `open_for`, so a dead dependency is not hammered and callers fail (or wait) at
//! once; then it lets one probe through (half-open), closing on its success and
//! opening again on its failure.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use eventstore::Metrics;
use eventstore::metrics::Labels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<State>,
    /// Where its state is reported, under which name.
    observer: Option<(BreakerMetrics, String)>,
}

/// The breakers' series: `orderflow_breaker_state{breaker}` (0 closed, 1 half-open,
/// 2 open) and `orderflow_breaker_transitions_total{breaker, to}`.
#[derive(Debug, Clone)]
pub struct BreakerMetrics {
    state: Family<Labels, Gauge>,
    transitions: Family<Labels, Counter>,
}

impl BreakerMetrics {
    pub fn new(metrics: &Metrics) -> BreakerMetrics {
        BreakerMetrics {
            state: metrics.family(
                "breaker_state",
                "A circuit breaker's state: 0 closed, 1 half-open, 2 open",
                Family::default,
            ),
            transitions: metrics.family(
                "breaker_transitions",
                "A circuit breaker's changes of state, by the state it went to",
                Family::default,
            ),
        }
    }
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

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Closed { .. } => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half-open",
        }
    }

    /// The `orderflow_breaker_state` value.
    fn level(self) -> i64 {
        match self {
            State::Closed { .. } => 0,
            State::HalfOpen { .. } => 1,
            State::Open { .. } => 2,
        }
    }
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            open_for,
            state: Mutex::new(State::Closed { failures: 0 }),
            observer: None,
        }
    }

    /// The same breaker, reporting its state as `name` (an upstream's address, a
    /// provider's channel).
    pub fn observed(mut self, metrics: &BreakerMetrics, name: impl Into<String>) -> Self {
        let name = name.into();
        let labels = vec![("breaker", name.clone())];
        metrics.state.get_or_create(&labels).set(0);
        // Every transition's series from zero, so its rate is computable at once.
        for to in ["closed", "open", "half-open"] {
            let mut labels = labels.clone();
            labels.push(("to", to.to_owned()));
            let _ = metrics.transitions.get_or_create(&labels);
        }
        self.observer = Some((metrics.clone(), name));
        self
    }

    /// Sets the state, reporting a change of kind (closed, open, half-open).
    fn set(&self, state: &mut State, new: State) {
        let (before, after) = (state.name(), new.name());
        *state = new;
        if before != after
            && let Some((metrics, name)) = &self.observer
        {
            let labels = vec![("breaker", name.clone())];
            metrics.state.get_or_create(&labels).set(new.level());
            let mut labels = labels;
            labels.push(("to", after.to_owned()));
            metrics.transitions.get_or_create(&labels).inc();
        }
    }

    /// Whether a call may go ahead now. When it may, its outcome must be reported with
    /// [`success`](Self::success) or [`failure`](Self::failure).
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                let since = Instant::now();
                self.set(&mut state, State::HalfOpen { since });
                true
            }
            State::HalfOpen { since } if since.elapsed() >= self.open_for => {
                let since = Instant::now();
                self.set(&mut state, State::HalfOpen { since });
                true
            }
            State::Open { .. } | State::HalfOpen { .. } => false,
        }
    }

    pub fn success(&self) {
        let mut state = self.lock();
        self.set(&mut state, State::Closed { failures: 0 });
    }

    pub fn failure(&self) {
        let mut state = self.lock();
        let new = match *state {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            _ => State::Open {
                until: Instant::now() + self.open_for,
            },
        };
        self.set(&mut state, new);
    }

    /// `closed`, `open` or `half-open`.
    pub fn state(&self) -> &'static str {
        self.lock().name()
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

    #[test]
    fn an_observed_breaker_reports_its_state_and_transitions() {
        let metrics = eventstore::Metrics::new();
        let breaker = Breaker::new(2, Duration::from_secs(60))
            .observed(&BreakerMetrics::new(&metrics), "provider:email");
        breaker.failure();
        let text = metrics.render();
        assert!(
            text.contains("orderflow_breaker_state{breaker=\"provider:email\"} 0"),
            "{text}"
        );
        breaker.failure();
        breaker.failure();
        let text = metrics.render();
        assert!(
            text.contains("orderflow_breaker_state{breaker=\"provider:email\"} 2"),
            "{text}"
        );
        let opened =
            "orderflow_breaker_transitions_total{breaker=\"provider:email\",to=\"open\"} 1";
        assert!(
            text.contains(opened),
            "opened once, not on every failure: {text}"
        );
        breaker.success();
        let closed =
            "orderflow_breaker_transitions_total{breaker=\"provider:email\",to=\"closed\"} 1";
        assert!(metrics.render().contains(closed));
    }
}
