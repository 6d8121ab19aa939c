//! Duration arithmetic that never panics.
//!
//! `Instant + Duration` panics past the clock's range, and a user or a network can
//! hand us any duration (`Duration::MAX` as a delay, a lease extension, a shutdown
//! timeout, a poll wait, a dedup TTL). Everything in ferrymq that computes a point
//! in time from a duration it did not choose goes through [`deadline_after`].

use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: further than anything a queue schedules, near enough to be
/// representable on every platform's monotonic clock.
pub const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `now + d`, or — when that is past the clock's range — `now` plus [`FAR_FUTURE`]
/// (or `now` itself, should even that not fit). Never panics.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::time::deadline_after;
/// let now = tokio::time::Instant::now();
/// assert_eq!(deadline_after(now, Duration::from_secs(1)), now + Duration::from_secs(1));
/// assert!(deadline_after(now, Duration::MAX) > now);
/// ```
pub fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// [`deadline_after`] from the current time.
pub fn deadline_in(d: Duration) -> Instant {
    deadline_after(Instant::now(), d)
}
