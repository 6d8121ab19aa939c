use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter: attempt `n` (1-based) waits
/// `min(base * factor^(n-1), max)`, then jitter takes off a random fraction of up to
/// `jitter` of that, so that a burst of failures does not come back as a burst.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::middleware::Backoff;
///
/// let b = Backoff::new(Duration::from_secs(1)).max(Duration::from_secs(60)).jitter(0.0);
/// assert_eq!(b.delay(1), Duration::from_secs(1));
/// assert_eq!(b.delay(3), Duration::from_secs(4));
/// assert_eq!(b.delay(30), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    /// Starting at `base`, doubling, at most 15 minutes, 20 % jitter.
    pub fn new(base: Duration) -> Self {
        Backoff {
            base,
            factor: 2.0,
            max: Duration::from_secs(15 * 60),
            jitter: 0.2,
        }
    }

    /// Growth factor per attempt (at least 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            2.0
        };
        self
    }

    /// Upper bound of a delay.
    pub fn max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Fraction (0..=1) of the delay that is randomised away.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The delay after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let full = self.base.as_secs_f64() * self.factor.powi(exp);
        let capped = full.min(self.max.as_secs_f64());
        let cut = if self.jitter > 0.0 {
            rand::thread_rng().gen_range(0.0..=self.jitter)
        } else {
            0.0
        };
        Duration::try_from_secs_f64(capped * (1.0 - cut)).unwrap_or(self.max)
    }
}

impl Default for Backoff {
    /// One second, doubling, at most 15 minutes, 20 % jitter.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range() {
        let b = Backoff::new(Duration::from_millis(100)).jitter(0.5);
        for attempt in 1..6 {
            let full = 100.0 * 2f64.powi(attempt as i32 - 1);
            for _ in 0..50 {
                let d = b.delay(attempt).as_secs_f64() * 1000.0;
                assert!(d <= full + 1e-6 && d >= full * 0.5 - 1e-6, "{attempt}: {d}");
            }
        }
        assert_eq!(
            Backoff::default().jitter(0.0).delay(u32::MAX),
            Duration::from_secs(900)
        );
    }
}
