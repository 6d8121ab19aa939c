//! The wall clock a scheduler reads: the system's, or one that follows tokio's
//! clock (paused and advanced in tests) from a given start.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::time::Instant;

/// A wall clock for schedules.
///
/// Cron expressions need calendar time, which tokio's (monotonic) clock does not
/// have; [`Clock::tokio_at`] gives calendar time that moves with tokio's clock, so
/// a test can run a day of schedules in milliseconds on a paused runtime.
#[derive(Debug, Clone)]
pub struct Clock(Kind);

#[derive(Debug, Clone)]
enum Kind {
    System,
    Tokio { start: DateTime<Utc>, base: Instant },
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock(Kind::System)
    }

    /// `start` now, then moving with tokio's clock (`tokio::time::pause` /
    /// `advance`, or `start_paused` tests). Must be created inside a runtime.
    pub fn tokio_at(start: DateTime<Utc>) -> Clock {
        Clock(Kind::Tokio {
            start,
            base: Instant::now(),
        })
    }

    /// The current time, in whole milliseconds (what stores keep and run ids name).
    pub fn now(&self) -> DateTime<Utc> {
        truncate_ms(self.now_exact())
    }

    fn now_exact(&self) -> DateTime<Utc> {
        match &self.0 {
            Kind::System => Utc::now(),
            Kind::Tokio { start, base } => TimeDelta::from_std(base.elapsed())
                .ok()
                .and_then(|d| start.checked_add_signed(d))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// Sleep (on tokio's timer) until `t` by this clock, at most `max`.
    pub(crate) async fn sleep_until(&self, t: Option<DateTime<Utc>>, max: Duration) {
        let wait = t
            .map(|t| (t - self.now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(max)
            .min(max);
        tokio::time::sleep_until(crate::time::deadline_in(wait)).await;
    }
}

/// `t` without its sub-millisecond part.
pub(crate) fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}
