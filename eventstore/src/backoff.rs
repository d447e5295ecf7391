//! The pause between attempts at something that failed for a reason outside the
//! program (a broker, a database or Redis away): one policy for every reconnect loop.

use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;

/// The first pause.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest pause: an outage is noticed within this once it ends.
pub const LAST: Duration = Duration::from_secs(5);
/// A session (a leadership term, a broker connection) that lasted this long before it
/// failed counts as a success: the next pause is the first again.
pub const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// Pauses that double from [`FIRST`] up to [`LAST`], with jitter (so instances that
/// lost one server together do not come back in step), for ever. [`reset`](Self::reset)
/// after a success.
#[derive(Debug)]
pub struct Backoff {
    delays: backon::ExponentialBackoff,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        let delays = backon::ExponentialBuilder::new()
            .with_min_delay(FIRST)
            .with_max_delay(LAST)
            .with_jitter()
            .without_max_times()
            .build();
        Backoff { delays }
    }

    /// The next pause (the jitter is capped at [`LAST`] too).
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(LAST).min(LAST)
    }

    /// Starts again from the first pause.
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// The pause after a session that started at `started` failed: the first one
    /// again if the session ran for [`HEALTHY_RUN`], else the next.
    pub fn after_run(&mut self, started: Instant) -> Duration {
        if started.elapsed() >= HEALTHY_RUN {
            self.reset();
        }
        self.next_delay()
    }

    /// Sleeps the next pause; false (at once) when `cancel` fires first.
    pub async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        sleep(self.next_delay(), cancel).await
    }
}

/// How a leadership term (the relay's, a subscription's) ended, when not by an error.
#[derive(Debug)]
pub(crate) enum TermEnd {
    /// Shut down.
    Cancelled,
    /// Stopped by a test's fault hook.
    FaultInjected,
}

/// Whether the loop around a term (begun at `started`) starts another after
/// `outcome`: not after a cancel or the fault hook (the log names the point the hook
/// stopped at); after the next pause when the term failed, unless a cancel cuts the
/// pause short.
pub(crate) async fn another_term(
    outcome: Result<TermEnd, impl std::fmt::Display>,
    backoff: &mut Backoff,
    started: Instant,
    cancel: &CancellationToken,
    stopped_at: &str,
) -> bool {
    match outcome {
        Ok(TermEnd::Cancelled) => false,
        Ok(TermEnd::FaultInjected) => {
            tracing::warn!("stopping {stopped_at}, as the fault hook asked");
            false
        }
        Err(error) => {
            let delay = backoff.after_run(started);
            tracing::warn!(%error, ?delay, "interrupted; starting again");
            sleep(delay, cancel).await
        }
    }
}

/// Sleeps `delay`; false (at once) when `cancel` fires first.
pub async fn sleep(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::{Backoff, FIRST, HEALTHY_RUN, LAST};

    #[test]
    fn pauses_grow_to_the_ceiling_and_start_again_after_a_reset() {
        let mut backoff = Backoff::new();
        let pauses: Vec<_> = (0..12).map(|_| backoff.next_delay()).collect();
        // Jitter adds up to one more delay's worth on top of each.
        assert!(pauses[0] >= FIRST && pauses[0] <= FIRST * 2, "{pauses:?}");
        assert!(
            pauses.windows(2).all(|pair| pair[1] * 2 >= pair[0]),
            "{pauses:?}"
        );
        assert!(pauses.iter().all(|pause| *pause <= LAST), "{pauses:?}");
        assert_eq!(pauses[11], LAST, "reaches the ceiling: {pauses:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= FIRST * 2);
    }

    #[test]
    fn a_session_that_ran_long_enough_starts_the_pauses_again() {
        let mut backoff = Backoff::new();
        for _ in 0..10 {
            backoff.next_delay();
        }
        let brief = backoff.after_run(Instant::now());
        assert_eq!(
            brief, LAST,
            "a session that failed at once keeps backing off"
        );
        let long_ago = Instant::now() - HEALTHY_RUN;
        assert!(backoff.after_run(long_ago) <= FIRST * 2);
    }
}
