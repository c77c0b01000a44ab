//! The delay between reconnect attempts, for every loop that reconnects:
//! the event source's connection (`db::listener::keep_connected`)
//! and `tail`'s WebSocket.
//!
//! Exponential with *equal jitter*: the ceiling starts at `base` and
//! doubles after each attempt up to `cap`, and each delay is drawn between
//! half the ceiling and the ceiling. Equal rather than full jitter (0 to
//! the ceiling) because the lower half is what keeps the promise of not
//! storming a server that is down: with full jitter one process may retry
//! a few milliseconds apart again and again, with equal jitter it never
//! retries sooner than half the schedule. The upper half still spreads
//! processes that lost the same server at the same instant, so they do not
//! come back in lockstep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// Delays of at most `base` first, doubling to at most `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, ceiling: base }
    }

    /// The delay before the next attempt, between half the current ceiling
    /// and the ceiling; the ceiling then doubles, up to `cap`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(self.cap);
        // Non-secret randomness: fastrand, seeded once per thread.
        ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Back to `base`, once a connection worked.
    pub fn reset(&mut self) {
        self.ceiling = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_to_the_cap_each_between_half_the_ceiling_and_the_ceiling() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        for ceiling in [100, 200, 400, 800, 1000, 1000, 1000].map(|ms| ms * MS) {
            let delay = backoff.next_delay();
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{delay:?} for a ceiling of {ceiling:?}");
        }
        backoff.reset();
        let delay = backoff.next_delay();
        assert!(delay >= 50 * MS && delay <= 100 * MS, "after reset: {delay:?}");
    }

    #[test]
    fn delays_are_spread_over_the_upper_half() {
        let delays: Vec<Duration> = (0..200).map(|_| Backoff::new(1000 * MS, 1000 * MS).next_delay()).collect();
        let below = delays.iter().filter(|d| **d < 750 * MS).count();
        // 200 fair draws put about 100 in each quarter of a second; fewer than
        // 40 on one side (a clock, a constant or a broken generator) fails.
        assert!((40..=160).contains(&below), "{below} of 200 delays below 750 ms: not spread");
    }
}
