//! Whether a worker is consuming, for health checks and alerts.
//!
//! A worker never stops on a receive error that retrying can fix: it pauses
//! (`receive_error_backoff`) and tries again, so after a broker restart or a network
//! partition it resumes by itself. What a health check needs to know is whether that
//! is happening *now*: a process can be alive while its worker has not received
//! anything for minutes (the BullMQ complaint: workers that silently stop after a
//! reconnect while health checks stay green). [`WorkerHealth`] says so.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{Error, ErrorKind};

/// Where a worker is, as seen by its receive loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HealthState {
    /// Built, not running yet (or running, before its first receive answered).
    Starting,
    /// The last receive succeeded (with or without messages).
    Running,
    /// The last receive failed with an error retrying can fix (connection lost,
    /// timeout, throttling, broker restarting); the worker keeps retrying.
    Degraded,
    /// The worker returned: shut down, its consumer closed, or a receive failed for
    /// good (auth, missing queue, bad configuration).
    Stopped,
}

/// A snapshot of a worker's health, from [`WorkerHealth::report`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// The state.
    pub state: HealthState,
    /// When the worker entered this state.
    pub since: SystemTime,
    /// Receives that failed in a row (0 while running).
    pub consecutive_errors: u64,
    /// The kind of the last receive error, if any since the last success.
    pub last_error_kind: Option<ErrorKind>,
    /// The last receive error's message (backends keep secrets out of messages).
    pub last_error: Option<String>,
    /// When a receive last succeeded.
    pub last_receive: Option<SystemTime>,
    /// Handlers the worker may run at once now: its configured concurrency, or
    /// where [`autoscale`](super::Worker::autoscale) has taken it.
    pub concurrency: usize,
}

/// A cloneable view of a worker's health, from
/// [`Worker::health`](super::Worker::health); cheap to poll from a health endpoint.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::memory::MemoryConfig;
/// use ferrymq_core::middleware::handler_fn;
/// use ferrymq_core::worker::{HealthState, Worker};
/// use ferrymq_core::{BoxError, Delivery};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ferrymq_core::Result<()> {
/// let (_producer, consumer) = MemoryConfig::new("health-doc").connect()?;
/// let worker = Worker::new(consumer).poll_wait(Duration::from_millis(10));
/// let health = worker.health();
/// assert_eq!(health.report().state, HealthState::Starting);
/// let handler = handler_fn(|_d: Delivery| async { Ok::<_, BoxError>(()) });
/// worker.run_until(handler, tokio::time::sleep(Duration::from_millis(50))).await?;
/// assert_eq!(health.report().state, HealthState::Stopped);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct WorkerHealth {
    inner: Arc<Mutex<HealthReport>>,
    gauge: Option<metrics::Gauge>,
}

impl fmt::Debug for WorkerHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WorkerHealth").field(&self.report()).finish()
    }
}

impl Default for WorkerHealth {
    fn default() -> Self {
        WorkerHealth::new()
    }
}

impl WorkerHealth {
    pub(super) fn new() -> Self {
        WorkerHealth {
            inner: Arc::new(Mutex::new(HealthReport {
                state: HealthState::Starting,
                since: SystemTime::now(),
                consecutive_errors: 0,
                last_error_kind: None,
                last_error: None,
                last_receive: None,
                concurrency: 0,
            })),
            gauge: None,
        }
    }

    /// The current state, when it began, and the last error.
    pub fn report(&self) -> HealthReport {
        self.lock().clone()
    }

    /// `true` while the last receive succeeded: what a readiness probe should check.
    pub fn is_healthy(&self) -> bool {
        self.lock().state == HealthState::Running
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthReport> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Report state changes as the gauge `ferrymq_worker_healthy` (1 running, 0
    /// otherwise), labelled with the queue.
    pub(super) fn with_gauge(mut self, queue: &str) -> Self {
        self.gauge = Some(metrics::gauge!("ferrymq_worker_healthy", "queue" => queue.to_string()));
        self
    }

    fn enter(&self, report: &mut HealthReport, state: HealthState) {
        if report.state != state {
            report.state = state;
            report.since = SystemTime::now();
            if let Some(g) = &self.gauge {
                g.set(if state == HealthState::Running {
                    1.0
                } else {
                    0.0
                });
            }
        }
    }

    pub(super) fn set_concurrency(&self, n: usize) {
        self.lock().concurrency = n;
    }

    pub(super) fn receive_succeeded(&self) {
        let mut report = self.lock();
        if report.state == HealthState::Running {
            // The hot path: one lock, one clock read.
            report.last_receive = Some(SystemTime::now());
            return;
        }
        let now = SystemTime::now();
        report.last_receive = Some(now);
        report.consecutive_errors = 0;
        report.last_error_kind = None;
        report.last_error = None;
        self.enter(&mut report, HealthState::Running);
    }

    pub(super) fn receive_failed(&self, error: &Error) {
        let mut report = self.lock();
        report.consecutive_errors = report.consecutive_errors.saturating_add(1);
        report.last_error_kind = Some(error.kind());
        report.last_error = Some(error.to_string());
        self.enter(&mut report, HealthState::Degraded);
    }

    pub(super) fn stopped(&self, error: Option<&Error>) {
        let mut report = self.lock();
        if let Some(e) = error {
            report.last_error_kind = Some(e.kind());
            report.last_error = Some(e.to_string());
        }
        self.enter(&mut report, HealthState::Stopped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_degrades_and_a_success_recovers() {
        let h = WorkerHealth::new();
        assert_eq!(h.report().state, HealthState::Starting);
        assert!(!h.is_healthy());
        h.receive_succeeded();
        assert!(h.is_healthy());
        let e = Error::new(ErrorKind::Connection, "broker gone");
        h.receive_failed(&e);
        h.receive_failed(&e);
        let r = h.report();
        assert_eq!(r.state, HealthState::Degraded);
        assert_eq!(r.consecutive_errors, 2);
        assert_eq!(r.last_error_kind, Some(ErrorKind::Connection));
        h.receive_succeeded();
        let r = h.report();
        assert_eq!(
            (r.state, r.consecutive_errors, r.last_error_kind),
            (HealthState::Running, 0, None)
        );
        h.stopped(None);
        assert_eq!(h.report().state, HealthState::Stopped);
    }
}
