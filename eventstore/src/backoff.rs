//! The pause between attempts at something that failed for a reason outside the
//! program (a broker, a database or Redis away): one policy for every reconnect loop.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio_util::sync::CancellationToken;

/// The first pause.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest pause: an outage is noticed within this once it ends.
pub const LAST: Duration = Duration::from_secs(5);

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

    /// Sleeps the next pause; false (at once) when `cancel` fires first.
    pub async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Backoff, FIRST, LAST};

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
}
