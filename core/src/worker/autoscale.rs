//! Concurrency that follows the backlog: [`Worker::autoscale`](super::Worker::autoscale).
//!
//! Once per interval the worker looks at three things: whether every handler slot is
//! busy, how much work waits (deliveries prefetched here plus the queue's ready
//! depth, where the backend can count it), and how long a handler takes (the moving
//! average the prefetch pacing keeps). From them:
//!
//! - **up** at once when every slot is busy and work waits: to what would drain the
//!   backlog within [`DRAIN_TARGET`] at the observed handler time (Little's law),
//!   at most doubling per step, at least one more;
//! - **down** only after [`IDLE_TICKS`] intervals in a row with nothing waiting and
//!   fewer than half the slots busy, by a quarter (at least one) per step.
//!
//! The gap between the two conditions (all busy *and* a backlog, against half idle
//! *and* none for several intervals) is the hysteresis: a steady load does not make
//! the concurrency flap. Bounds are the caller's `min..=max`; the current value is
//! in [`HealthReport::concurrency`](super::HealthReport::concurrency) and the gauge
//! `ferrymq_worker_concurrency`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::consumer::Consumer;

/// How soon a scale-up aims to have drained the backlog it saw.
pub const DRAIN_TARGET: Duration = Duration::from_secs(2);

/// Intervals in a row of low load before the concurrency shrinks.
pub const IDLE_TICKS: u32 = 3;

/// Default interval between decisions.
pub(super) const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Bounds and pace of autoscaling, as configured.
#[derive(Debug, Clone, Copy)]
pub(super) struct AutoscaleConfig {
    pub(super) min: usize,
    pub(super) max: usize,
}

/// What the worker saw at one tick.
#[derive(Debug, Clone, Copy)]
pub(super) struct Load {
    /// Handlers running now.
    pub(super) running: usize,
    /// Received here, waiting for a slot.
    pub(super) pending: usize,
    /// Ready in the queue, where the backend can count it.
    pub(super) ready: Option<u64>,
    /// Moving average of handler time, seconds.
    pub(super) handler_secs: Option<f64>,
}

/// The decision rule (pure: tested without a worker).
#[derive(Debug)]
pub(super) struct Autoscaler {
    config: AutoscaleConfig,
    current: usize,
    idle_ticks: u32,
}

impl Autoscaler {
    pub(super) fn new(config: AutoscaleConfig) -> Self {
        Autoscaler {
            config,
            current: config.min,
            idle_ticks: 0,
        }
    }

    #[cfg(test)]
    pub(super) fn current(&self) -> usize {
        self.current
    }

    /// The concurrency to run with from now on.
    pub(super) fn tick(&mut self, load: Load) -> usize {
        let backlog = (load.pending as u64).saturating_add(load.ready.unwrap_or(0));
        let saturated = load.running >= self.current;
        if saturated && backlog > 0 {
            self.idle_ticks = 0;
            let by_latency = match load.handler_secs {
                Some(h) if h > 0.0 => {
                    // Handlers needed to drain `backlog` (plus what runs) in the target.
                    let needed =
                        (backlog as f64 + load.running as f64) * h / DRAIN_TARGET.as_secs_f64();
                    if needed >= usize::MAX as f64 {
                        usize::MAX
                    } else {
                        needed.ceil() as usize
                    }
                }
                _ => self.current.saturating_add(1),
            };
            let step_cap = self.current.saturating_mul(2);
            let next = by_latency
                .min(step_cap)
                .max(self.current.saturating_add(1))
                .min(self.config.max);
            self.current = next.max(self.current);
        } else if backlog == 0 && load.running.saturating_mul(2) < self.current {
            self.idle_ticks = self.idle_ticks.saturating_add(1);
            if self.idle_ticks >= IDLE_TICKS {
                let step = (self.current / 4).max(1);
                self.current = self.current.saturating_sub(step).max(self.config.min);
                self.idle_ticks = 0;
            }
        } else {
            self.idle_ticks = 0;
        }
        self.current
    }
}

/// The queue's ready count, read in the background every `interval` (a depth call
/// is a round trip: never on the worker loop itself). `u64::MAX` while unknown.
pub(super) fn watch_ready<C: Consumer + 'static>(
    consumer: &Arc<C>,
    interval: Duration,
) -> Option<(Arc<AtomicU64>, super::run::AbortOnDrop)> {
    if !consumer.capabilities().depth.is_available() {
        return None;
    }
    let ready = Arc::new(AtomicU64::new(u64::MAX));
    let out = ready.clone();
    let consumer = consumer.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let n = match consumer.depth().await {
                Ok(d) => d.waiting,
                Err(_) => u64::MAX,
            };
            ready.store(n, Ordering::Relaxed);
        }
    });
    Some((out, super::run::AbortOnDrop(task.abort_handle())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler(min: usize, max: usize) -> Autoscaler {
        Autoscaler::new(AutoscaleConfig { min, max })
    }

    fn load(running: usize, pending: usize, ready: u64, handler: f64) -> Load {
        Load {
            running,
            pending,
            ready: Some(ready),
            handler_secs: Some(handler),
        }
    }

    #[test]
    fn grows_at_most_doubling_towards_what_drains_the_backlog() {
        let mut s = scaler(1, 64);
        // 1000 waiting, 0.1 s each: 50 handlers drain it in 2 s; doubling caps the step.
        assert_eq!(s.tick(load(1, 10, 990, 0.1)), 2);
        assert_eq!(s.tick(load(2, 10, 990, 0.1)), 4);
        assert_eq!(s.tick(load(4, 10, 990, 0.1)), 8);
        assert_eq!(s.tick(load(8, 10, 990, 0.1)), 16);
        assert_eq!(s.tick(load(16, 10, 990, 0.1)), 32);
        assert_eq!(s.tick(load(32, 10, 990, 0.1)), 52);
        assert_eq!(
            s.tick(load(52, 10, 990, 0.1)),
            53,
            "at least one more while saturated"
        );
        let mut s = scaler(1, 8);
        for _ in 0..10 {
            s.tick(load(s.current(), 100, 1_000_000, 10.0));
        }
        assert_eq!(s.current(), 8, "never above max");
    }

    #[test]
    fn a_small_backlog_of_fast_work_grows_by_one() {
        let mut s = scaler(2, 64);
        assert_eq!(s.tick(load(2, 1, 0, 0.001)), 3);
    }

    #[test]
    fn shrinks_only_after_several_quiet_ticks_and_not_below_min() {
        let mut s = scaler(2, 64);
        for _ in 0..6 {
            s.tick(load(s.current(), 100, 10_000, 0.5));
        }
        let high = s.current();
        assert!(high >= 32, "{high}");
        // One quiet tick, then a busy one: no change (hysteresis).
        assert_eq!(s.tick(load(1, 0, 0, 0.5)), high);
        assert_eq!(
            s.tick(load(high, 0, 0, 0.5)),
            high,
            "busy without backlog: hold"
        );
        assert_eq!(s.tick(load(1, 0, 0, 0.5)), high);
        assert_eq!(s.tick(load(1, 0, 0, 0.5)), high);
        let after = s.tick(load(1, 0, 0, 0.5));
        assert_eq!(after, high - high / 4);
        for _ in 0..100 {
            s.tick(load(0, 0, 0, 0.5));
        }
        assert_eq!(s.current(), 2);
    }

    #[test]
    fn half_busy_with_a_backlog_holds() {
        let mut s = scaler(1, 64);
        for _ in 0..4 {
            s.tick(load(s.current(), 10, 100, 0.1));
        }
        let c = s.current();
        for _ in 0..10 {
            assert_eq!(s.tick(load(c / 2, 5, 5, 0.1)), c);
        }
    }

    #[test]
    fn unknown_depth_and_latency_still_scale_on_local_signals() {
        let mut s = scaler(1, 4);
        let l = Load {
            running: 1,
            pending: 3,
            ready: None,
            handler_secs: None,
        };
        assert_eq!(s.tick(l), 2);
        let huge = Load {
            running: 2,
            pending: usize::MAX,
            ready: Some(u64::MAX),
            handler_secs: Some(f64::MAX),
        };
        assert_eq!(s.tick(huge), 4, "no overflow, capped");
    }
}
