//! Shared plumbing of the drivers: payloads with a send timestamp, a progress
//! counter with stall detection, and the join logic that turns a set of producer
//! and consumer tasks into one timed result.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use tokio::task::JoinSet;

use crate::model::Sample;

/// Messages per batch on every path that batches (produce, receive, ack).
pub const BATCH: usize = 100;

/// How long one receive waits for the first message before a consumer loop looks
/// at its stop flag again.
pub const POLL: Duration = Duration::from_millis(100);

/// Nanoseconds since the Unix epoch: comparable across processes on one machine.
pub fn wall_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A payload of `size` bytes (at least 8) whose first 8 bytes are `stamp`
/// (little endian); the rest is filler.
pub fn payload(size: usize, stamp: u64) -> Bytes {
    let mut v = vec![b'x'; size.max(8)];
    v[..8].copy_from_slice(&stamp.to_le_bytes());
    Bytes::from(v)
}

/// The stamp of a payload built by [`payload`].
pub fn stamp_of(payload: &[u8]) -> Option<u64> {
    let head: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// Microseconds from `stamp` (wall nanos) to now.
pub fn latency_us(stamp: u64) -> f64 {
    wall_nanos().saturating_sub(stamp) as f64 / 1_000.0
}

/// What the handler of every subject does with a message: look at every byte once,
/// as a handler that parses its payload would, so that a subject which never
/// materializes the payload cannot look faster than it is.
pub fn handle(payload: &[u8]) -> u64 {
    std::hint::black_box(
        payload
            .iter()
            .fold(0u64, |a, &b| a.wrapping_add(u64::from(b))),
    )
}

/// Counts handled messages toward a target; consumer loops stop once it is reached.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    target: u64,
    stop: AtomicBool,
    /// Handled count when a capped run was stopped.
    capped: AtomicU64,
    reached: tokio::sync::Notify,
    latencies: Mutex<Vec<f64>>,
}

impl Progress {
    pub fn new(target: u64) -> Arc<Self> {
        Arc::new(Progress {
            done: AtomicU64::new(0),
            target,
            stop: AtomicBool::new(false),
            capped: AtomicU64::new(0),
            reached: tokio::sync::Notify::new(),
            latencies: Mutex::new(Vec::new()),
        })
    }

    pub fn add(&self, n: u64) {
        let before = self.done.fetch_add(n, Ordering::AcqRel);
        if before < self.target && before + n >= self.target {
            // notify_one keeps a permit, so a waiter that registers later still wakes.
            self.reached.notify_one();
        }
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    pub fn target(&self) -> u64 {
        self.target
    }

    /// Handled count at the moment a capped run was stopped.
    pub fn capped_at(&self) -> u64 {
        self.capped.load(Ordering::Acquire)
    }

    /// Consumer loops exit when this turns true (target reached, or the run failed).
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.done() >= self.target
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn record_latencies(&self, mut batch: Vec<f64>) {
        if let Ok(mut all) = self.latencies.lock() {
            all.append(&mut batch);
        }
    }

    pub fn take_latencies(&self) -> Vec<f64> {
        self.latencies
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// Run `tasks` until `progress` reaches its target. Returns the time from `start`
/// to that moment. Fails when a task fails, or when progress does not move for
/// `stall`. Every task is told to stop and then awaited (aborted past 10 s), so
/// nothing outlives the measurement.
pub async fn run_until_done(
    tasks: JoinSet<Result<()>>,
    progress: &Arc<Progress>,
    start: Instant,
    stall: Duration,
) -> Result<Duration> {
    drive(tasks, progress, start, stall, None)
        .await
        .map(|(elapsed, _)| elapsed)
}

/// A throughput run: like [`run_until_done`], but a run still going at `start + cap`
/// is stopped there and its rate taken over what it handled so far (marked capped),
/// so that one slow subject cannot eat the whole time budget of a run.
pub async fn timed_run(
    tasks: JoinSet<Result<()>>,
    progress: &Arc<Progress>,
    start: Instant,
    stall: Duration,
    cap: Duration,
) -> Result<Sample> {
    let (elapsed, capped) = drive(tasks, progress, start, stall, Some(cap)).await?;
    let done = if capped {
        progress.capped_at()
    } else {
        progress.target()
    };
    Ok(Sample::throughput_capped(done, elapsed, capped))
}

pub async fn drive(
    mut tasks: JoinSet<Result<()>>,
    progress: &Arc<Progress>,
    start: Instant,
    stall: Duration,
    cap: Option<Duration>,
) -> Result<(Duration, bool)> {
    let mut last = progress.done();
    let mut last_move = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = cap.map(|c| tokio::time::Instant::from_std(start + c));
    let outcome = loop {
        tokio::select! {
            joined = tasks.join_next(), if !tasks.is_empty() => {
                match joined {
                    Some(Ok(Ok(()))) | None => {}
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => break Err(anyhow!("task panicked or was cancelled: {e}")),
                }
            }
            _ = progress.reached.notified() => {}
            _ = tick.tick() => {}
            _ = sleep_until_opt(deadline) => {}
        }
        let done = progress.done();
        if done >= progress.target() {
            break Ok((start.elapsed(), false));
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            progress.capped.store(done, Ordering::Release);
            break Ok((start.elapsed(), true));
        }
        if done != last {
            last = done;
            last_move = Instant::now();
        } else if last_move.elapsed() > stall {
            break Err(anyhow!(
                "stalled: {done} of {} messages handled, no progress for {} s",
                progress.target(),
                stall.as_secs()
            ));
        }
    };
    progress.stop();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(Err(e)) = joined {
                if outcome.is_ok() {
                    return Err(e);
                }
            }
        }
        Ok(())
    })
    .await;
    tasks.abort_all();
    match drained {
        Ok(Err(e)) => Err(e.context("a task failed after the run ended")),
        _ => outcome,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sleep until message `i` of a paced sender is due.
pub async fn pace(start: tokio::time::Instant, i: u64, rate: u64) {
    let due = start + Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate.max(1));
    tokio::time::sleep_until(due).await;
}

/// Fail with the per-entry error of a batch send, if any.
pub fn check_batch<T, E: std::fmt::Display>(results: &[std::result::Result<T, E>]) -> Result<()> {
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        bail!("batch entry failed: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let p = payload(100, 42);
        assert_eq!(p.len(), 100);
        assert_eq!(stamp_of(&p), Some(42));
        assert_eq!(payload(3, 1).len(), 8);
        assert_eq!(stamp_of(b"short"), None);
    }

    #[tokio::test]
    async fn stalls_are_reported() {
        let progress = Progress::new(10);
        let mut tasks = JoinSet::new();
        let p = progress.clone();
        tasks.spawn(async move {
            p.add(3);
            Ok(())
        });
        let err = run_until_done(tasks, &progress, Instant::now(), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("3 of 10"), "{err}");
    }

    #[tokio::test]
    async fn task_errors_end_the_run() {
        let progress = Progress::new(10);
        let mut tasks = JoinSet::new();
        tasks.spawn(async { Err(anyhow!("boom")) });
        let err = run_until_done(tasks, &progress, Instant::now(), Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }

    #[tokio::test]
    async fn capped_runs_report_partial_rates() {
        let progress = Progress::new(1_000_000);
        let mut tasks = JoinSet::new();
        let p = progress.clone();
        tasks.spawn(async move {
            while !p.should_stop() {
                p.add(1);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        });
        let sample = timed_run(
            tasks,
            &progress,
            Instant::now(),
            Duration::from_secs(5),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        let Sample::Throughput {
            messages,
            secs,
            capped,
            ..
        } = sample
        else {
            panic!("not a throughput sample");
        };
        assert!(capped);
        assert!(messages > 10 && messages < 1_000, "{messages}");
        assert!((0.29..1.0).contains(&secs), "{secs}");
    }

    #[tokio::test]
    async fn completes_at_target() {
        let progress = Progress::new(5);
        let mut tasks = JoinSet::new();
        let p = progress.clone();
        tasks.spawn(async move {
            while !p.should_stop() {
                p.add(1);
                tokio::task::yield_now().await;
            }
            Ok(())
        });
        run_until_done(tasks, &progress, Instant::now(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(progress.done() >= 5);
    }
}
