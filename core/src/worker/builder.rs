use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tower::Service;

use super::autoscale::{AutoscaleConfig, DEFAULT_INTERVAL};
use super::{run, WorkerEvent, WorkerHealth, WorkerSummary};
use crate::consumer::Consumer;
use crate::delivery::Delivery;
use crate::error::{BoxError, Result};
use crate::producer::Producer;

#[derive(Debug, Clone)]
pub(super) struct Config {
    pub(super) concurrency: usize,
    pub(super) prefetch: Option<usize>,
    pub(super) poll_wait: Duration,
    pub(super) ordered_by_key: bool,
    pub(super) shutdown_timeout: Duration,
    pub(super) nack_delay: Option<Duration>,
    pub(super) receive_error_backoff: Duration,
    pub(super) depth_interval: Option<Duration>,
    pub(super) close_consumer: bool,
    pub(super) autoscale: Option<AutoscaleConfig>,
    pub(super) autoscale_interval: Duration,
    pub(super) handler_tasks: bool,
}

/// Drives a handler service over a consumer; see the [module docs](super).
///
/// Configure with the builder methods, then [`run_until`](Worker::run_until) a shutdown
/// future or [`run`](Worker::run) until Ctrl-C / SIGTERM.
pub struct Worker<C> {
    pub(super) consumer: Arc<C>,
    pub(super) config: Config,
    pub(super) events: broadcast::Sender<WorkerEvent>,
    pub(super) flush: Vec<Arc<dyn Producer>>,
    pub(super) health: WorkerHealth,
}

impl<C> std::fmt::Debug for Worker<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("config", &self.config)
            .field("flush", &self.flush.len())
            .finish_non_exhaustive()
    }
}

impl<C: Consumer + 'static> Worker<C> {
    /// A worker on `consumer`: concurrency 1, prefetch 128 to 512 by the backend's batch size (see [`prefetch`](Worker::prefetch)), 1 s long polls,
    /// no per-key ordering, 30 s shutdown timeout, failed deliveries nacked without
    /// delay, depth gauge every 15 s.
    pub fn new(consumer: C) -> Self {
        Worker::from_arc(Arc::new(consumer))
    }

    /// A worker on a shared consumer.
    pub fn from_arc(consumer: Arc<C>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Worker {
            consumer,
            config: Config {
                concurrency: 1,
                prefetch: None,
                poll_wait: Duration::from_secs(1),
                ordered_by_key: false,
                shutdown_timeout: Duration::from_secs(30),
                nack_delay: None,
                receive_error_backoff: Duration::from_secs(1),
                depth_interval: Some(Duration::from_secs(15)),
                close_consumer: true,
                autoscale: None,
                autoscale_interval: DEFAULT_INTERVAL,
                handler_tasks: false,
            },
            events,
            flush: Vec::new(),
            health: WorkerHealth::new(),
        }
    }

    /// At most `n` handlers run at once (at least 1). Turns off
    /// [`autoscale`](Worker::autoscale).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n.max(1);
        self.config.autoscale = None;
        self
    }

    /// Let the concurrency follow the load within `range` (BullMQ users add workers
    /// when the queue grows; this does it inside one worker): it starts at the
    /// lower bound, grows while every slot is busy and work waits (the prefetched
    /// deliveries plus the queue's ready depth where the backend counts it, sized
    /// by the observed handler time), and shrinks after a few quiet intervals. See
    /// [`autoscale`](super::autoscale) for the rule. The current value is in
    /// [`HealthReport::concurrency`](super::HealthReport::concurrency) and the gauge
    /// `ferrymq_worker_concurrency`. Replaces [`concurrency`](Worker::concurrency);
    /// the default prefetch follows the upper bound.
    ///
    /// ```
    /// # use ferrymq_core::memory::MemoryConfig;
    /// # use ferrymq_core::worker::Worker;
    /// # let consumer = MemoryConfig::new("autoscale-doc").consumer().unwrap();
    /// let worker = Worker::new(consumer).autoscale(1..=32);
    /// # let _ = worker;
    /// ```
    pub fn autoscale(mut self, range: std::ops::RangeInclusive<usize>) -> Self {
        let min = (*range.start()).max(1);
        let max = (*range.end()).max(min);
        self.config.autoscale = Some(AutoscaleConfig { min, max });
        self.config.concurrency = min;
        self
    }

    /// How often [`autoscale`](Worker::autoscale) decides (default 1 s; at least
    /// 10 ms). Also how often it reads the queue depth.
    pub fn autoscale_interval(mut self, every: Duration) -> Self {
        self.config.autoscale_interval = every.max(Duration::from_millis(10));
        self
    }

    /// At most `n` received deliveries wait for a free handler slot (default: twice
    /// the concurrency, at least 128, and at least the backend's `max_batch` up to
    /// 512: Redis, memory and Kafka 512, SQS 128 — a batch-sized prefetch
    /// keeps receives large while acks are on the wire). The worker receives again only once fewer than
    /// half of them are left, and then in one batch (up to the backend's `max_batch`)
    /// for the room there is, so a networked backend sees one receive per batch rather
    /// than per message. Never more than `concurrency + n` deliveries are held.
    /// 0 receives only when a slot is free. Prefetched deliveries hold a lease, so keep
    /// this well below what a handler can finish within the visibility timeout: with
    /// slow handlers (seconds each) and a short visibility timeout, lower it.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.config.prefetch = Some(n);
        self
    }

    /// Long-poll wait of each receive call (how quickly an idle worker notices a
    /// shutdown does not depend on it: receiving is cancelled).
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.config.poll_wait = wait;
        self
    }

    /// Run deliveries with the same [key](crate::Delivery::key) one at a time, in the
    /// order received; different keys still run in parallel.
    pub fn ordered_by_key(mut self, ordered: bool) -> Self {
        self.config.ordered_by_key = ordered;
        self
    }

    /// How long running handlers may take to finish after shutdown is requested;
    /// also the bound on giving back what was prefetched and settling what finished
    /// (a backend that never answers cannot hold the shutdown up). Handlers still
    /// running then are cancelled, and their releases get a further tenth of this
    /// (at most 1 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Redelivery delay when the worker itself nacks a failed delivery (one the
    /// middleware left unsettled). Default `None`: at once.
    pub fn nack_delay(mut self, delay: Option<Duration>) -> Self {
        self.config.nack_delay = delay;
        self
    }

    /// Pause after a failed receive (connection trouble) before trying again.
    pub fn receive_error_backoff(mut self, pause: Duration) -> Self {
        self.config.receive_error_backoff = pause;
        self
    }

    /// How often to read the queue depth into the `ferrymq_queue_depth` gauge
    /// (`None`: never).
    pub fn depth_interval(mut self, every: Option<Duration>) -> Self {
        self.config.depth_interval = every;
        self
    }

    /// Run each handler in a tokio task of its own (default false).
    ///
    /// By default the worker polls its running handlers itself, from its own task:
    /// starting a delivery then costs no spawn, no task and no join, which on a fast
    /// backend is most of the per-message overhead. The price is that the handlers of
    /// one worker share one thread at a time, as the futures of any one task do:
    /// handlers that wait (I/O) overlap as before, but synchronous CPU work in one
    /// handler delays the others. Set this for CPU-heavy handlers (or move that work
    /// to `tokio::task::spawn_blocking`), so handlers spread over the runtime's
    /// threads. Either way a handler that panics fails only its delivery.
    pub fn handler_tasks(mut self, spawn: bool) -> Self {
        self.config.handler_tasks = spawn;
        self
    }

    /// Close the consumer when the worker stops (default true).
    pub fn close_consumer(mut self, close: bool) -> Self {
        self.config.close_consumer = close;
        self
    }

    /// Flush this producer during shutdown, after the last handler finished (for a
    /// DLQ or next-stage producer that batches).
    pub fn flush_on_shutdown(mut self, producer: Arc<dyn Producer>) -> Self {
        self.flush.push(producer);
        self
    }

    /// A receiver of [`WorkerEvent`]s, one per finished delivery. Subscribe before
    /// running. A receiver that falls more than 1024 events behind loses the oldest
    /// (tokio broadcast semantics).
    ///
    /// Events are sent in the order deliveries finish, in batches of up to 64,
    /// and every batch goes out before the worker waits for anything: a busy
    /// worker delays an event by at most 63 deliveries' work, an idle one not at
    /// all.
    ///
    /// Events cost nothing until someone subscribes. Then every delivery is a
    /// broadcast send, and each batch a task wake-up of a receiver that keeps up.
    /// A Kafka worker draining a backlog ran at 0.46× the raw client with a
    /// subscriber and 0.57× without one (issue 10, `consume_cost` with and
    /// without `EVENTS=0`; a wake-up per event had made it 0.42×). For counts
    /// alone, the worker's `metrics` and its [`WorkerSummary`] cost less.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkerEvent> {
        self.events.subscribe()
    }

    /// A handle on this worker's health: whether its last receive succeeded, since
    /// when, and the last error. The worker retries receive errors that retrying can
    /// fix (so it resumes by itself after a broker restart); this says whether it is
    /// consuming right now. Take it before running; it stays valid after.
    pub fn health(&self) -> WorkerHealth {
        self.health.clone()
    }

    /// Run until `shutdown` completes, then shut down gracefully and return the
    /// summary. Also stops (gracefully) when the consumer is closed. Errors only when
    /// receiving fails for a reason retrying cannot fix (`Auth`, `NotFound`,
    /// `InvalidConfig`, `Unsupported`) or the service fails its readiness check —
    /// after releasing everything, as in a normal shutdown.
    pub async fn run_until<S, F>(self, service: S, shutdown: F) -> Result<WorkerSummary>
    where
        S: Service<Delivery, Response = ()> + Send,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        F: Future<Output = ()> + Send,
    {
        run::run(self, service, shutdown).await
    }

    /// Run until Ctrl-C (or SIGTERM on Unix), then shut down gracefully.
    pub async fn run<S>(self, service: S) -> Result<WorkerSummary>
    where
        S: Service<Delivery, Response = ()> + Send,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.run_until(service, shutdown_signal()).await
    }
}

/// Completes on Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
