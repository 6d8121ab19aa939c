//! The worker loop.

use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{FutureExt, OptionFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;
use slab::Slab;
use tokio::task::{AbortHandle, JoinError};
use tokio::time::{sleep, sleep_until, Instant, Sleep};
use tower::Service;

use super::autoscale::{self, Autoscaler, Load};
use super::builder::{Config, Worker};
use super::pending::Pending;
use super::{WorkerEvent, WorkerSummary};
use crate::consumer::Consumer;
use crate::delivery::Delivery;
use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::middleware::outcome::{self, Outcome};
use crate::middleware::{BoxFuture, HandlerPanicked};

/// What a handler task reports back.
struct Finished {
    outcome: Outcome,
    error: Option<Arc<str>>,
    elapsed: Duration,
    panicked: bool,
    /// What the worker still has to do with the delivery. The handler task does not
    /// settle it itself: awaiting an ack would hold a handler slot for a round trip
    /// (and keep the backend's ack batching to `concurrency` acks at most).
    settle: Settle,
    /// The settle, when the handler's future already tried it.
    settling: Attempted,
    span: tracing::Span,
}

/// How far a settle got inside the handler's future.
enum Attempted {
    /// Not tried: the worker starts it.
    No,
    /// Answered on its first poll (an in-process backend), with the result.
    Done(Result<()>),
    /// Sent, not answered: the worker polls it alongside the next handlers.
    Waiting(BoxFuture<Result<()>>),
}

impl Finished {
    /// The report of a delivery given back without being started.
    fn unstarted() -> Self {
        Finished {
            outcome: Outcome::Released,
            error: None,
            elapsed: Duration::ZERO,
            panicked: false,
            settle: Settle::Release,
            settling: Attempted::No,
            span: tracing::Span::none(),
        }
    }
}

/// A settle left to the worker once the handler has finished.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// The middleware settled the delivery already.
    Done,
    Ack,
    Nack(Option<Duration>),
    /// Never started: give it back without counting an attempt.
    Release,
}

/// A settle that completed: the delivery, its handler's report, and the settle's result.
type Settled = (Delivery, Finished, Result<()>);

/// A settle on its way answers with its key in `State::settle_items` and its result.
type Settling = (usize, Result<()>);

/// A settle in `State::settling`: its key in `State::settle_items` and its future
/// (no second box around the first).
struct KeyedSettle {
    id: usize,
    future: BoxFuture<Result<()>>,
}

impl Future for KeyedSettle {
    type Output = Settling;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Settling> {
        let id = self.id;
        self.future.as_mut().poll(cx).map(|result| (id, result))
    }
}

/// The settle `settle` asks for, as a future of its own (`'static`: it holds a clone
/// of the handle, one `Arc`), with the errors that lose nothing mapped to `Ok`.
fn settle_future(handle: crate::delivery::AckHandle, settle: Settle) -> BoxFuture<Result<()>> {
    Box::pin(async move {
        let result = match settle {
            Settle::Ack => handle.ack().await,
            Settle::Nack(delay) => handle.nack(delay).await,
            Settle::Release => handle.release(None).await,
            Settle::Done => Ok(()),
        };
        match (settle, result) {
            // Given back already (its lease ran out, or the handler settled it
            // before it was cancelled): nothing was lost.
            (Settle::Nack(_) | Settle::Release, Err(e))
                if matches!(e.kind(), ErrorKind::LeaseExpired | ErrorKind::AlreadyAcked) =>
            {
                Ok(())
            }
            (_, other) => other,
        }
    })
}

/// A handler answers with its key in `State::in_flight` and its report (an error
/// only for a handler in a task of its own that was cancelled or panicked outside
/// the handler).
type Joined = (usize, std::result::Result<Finished, JoinError>);

/// Everything the loop keeps between iterations.
struct State<C> {
    consumer: Arc<C>,
    config: Config,
    queue: Arc<str>,
    events: tokio::sync::broadcast::Sender<WorkerEvent>,
    /// Events reported and not sent yet (see [`State::report`]).
    unsent: Vec<WorkerEvent>,
    summary: WorkerSummary,
    /// Received, not started (and, with per-key order, which of them may start).
    pending: Pending,
    /// Started: the delivery, and the abort handle of its task when handlers run in
    /// tasks of their own. The key is the handler's id in `running`.
    in_flight: Slab<(Delivery, Option<AbortHandle>)>,
    /// The running handlers, polled by the worker's own task (or, with
    /// `handler_tasks`, the joins of their tasks). Bounded by `concurrency`.
    running: FuturesUnordered<BoxFuture<Joined>>,
    /// Handled (or given back unstarted), being acked, nacked or released. Their
    /// leases count against the capacity like running and pending ones, so this set
    /// is bounded by `concurrency + prefetch`.
    settling: FuturesUnordered<KeyedSettle>,
    /// The delivery and report of each settle in `settling`, by id: kept out of the
    /// future so that one which never answers can still be accounted for at the
    /// shutdown deadline.
    settle_items: Slab<(Delivery, Finished)>,
    metrics: Metrics,
    pacing: Pacing,
}

/// Keeps prefetched deliveries from outliving their leases.
///
/// A prefetched delivery waits its turn while holding a lease: with a 200 ms handler,
/// concurrency 1 and 32 prefetched, the last one waits 6.4 s — past a 2 s visibility
/// timeout, so the broker hands it to someone else while it is still queued here,
/// and it runs twice. Two rules prevent that:
///
/// - **prefetch bounded by time**: at most as many deliveries wait as the handlers
///   can start within half the visibility timeout, judged from the observed handler
///   time (a moving average). Until a handler time has been seen, nothing is
///   prefetched beyond the free slots.
/// - **never start a dying lease**: a delivery whose lease has less than a margin
///   left (the expected handler time plus a tenth of the visibility timeout for the
///   ack, at most half of the visibility timeout) is released unstarted, so the redelivery is the only run.
///
/// Extending every prefetched lease instead would cost a round trip per waiting
/// message per period (and money, on SQS) to keep messages that another consumer
/// could be handling; sizing the prefetch costs nothing.
struct Pacing {
    visibility: Option<Duration>,
    /// The largest [`start_margin`](Pacing::start_margin) can be (half the
    /// visibility timeout): a lease with that much left needs no closer look.
    most_margin: Duration,
    /// Moving average of handler time, in seconds; `None` before the first one.
    handler_secs: Option<f64>,
}

impl Pacing {
    fn new(visibility: Option<Duration>) -> Self {
        let visibility = visibility.filter(|v| !v.is_zero());
        Pacing {
            visibility,
            most_margin: visibility.map_or(Duration::ZERO, |v| v / 2),
            handler_secs: None,
        }
    }

    fn observe(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        self.handler_secs = Some(match self.handler_secs {
            None => secs,
            // Slow handlers count at once, fast ones bring the average down slowly:
            // waiting too little costs a receive, waiting too long a duplicate.
            Some(avg) if secs > avg => 0.5 * avg + 0.5 * secs,
            Some(avg) => 0.9 * avg + 0.1 * secs,
        });
    }

    /// How many deliveries may wait for a slot now, at most `configured`.
    fn prefetch(&self, configured: usize, concurrency: usize) -> usize {
        let Some(visibility) = self.visibility else {
            return configured;
        };
        let Some(handler) = self.handler_secs else {
            return 0;
        };
        let budget = visibility.as_secs_f64() / 2.0;
        if handler <= 0.0 {
            return configured;
        }
        let fits = (budget * concurrency as f64 / handler).floor();
        if fits >= configured as f64 {
            configured
        } else {
            fits.max(0.0) as usize
        }
    }

    /// The least lease a delivery must have left to be started.
    fn start_margin(&self) -> Duration {
        let Some(visibility) = self.visibility else {
            return Duration::ZERO;
        };
        let expected = self
            .handler_secs
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .unwrap_or_default();
        // Room for the handler and then its ack (a tenth of the lease).
        expected
            .saturating_add(visibility / 10)
            .clamp(visibility / 10, visibility / 2)
    }

    /// Whether `delivery` may be started at `now` (one clock read serves the
    /// liveness check, the lease margin and the handler's start time).
    fn may_start(&self, delivery: &Delivery, now: Instant) -> bool {
        let acker = delivery.acker();
        if !acker.is_live_at(now) {
            return false;
        }
        match acker.lease_deadline() {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(now);
                // Most leases start with far more left than any margin: skip its
                // floating-point arithmetic for those.
                left >= self.most_margin || left >= self.start_margin()
            }
            None => true,
        }
    }
}

/// Metric handles, registered once per worker rather than once per delivery: building
/// the `queue` label (a `String`) and looking the series up on every call cost more
/// than the rest of the bookkeeping of a delivery on a fast backend.
struct Metrics {
    queue: Arc<str>,
    received: metrics::Counter,
    in_flight: metrics::Gauge,
    /// Outcome counters and handler-time histograms, by [`outcome_index`], made on first use
    /// (so that outcomes a worker never sees export no empty series).
    outcomes: [Option<metrics::Counter>; OUTCOMES],
    handler_seconds: [Option<metrics::Histogram>; OUTCOMES],
}

const OUTCOMES: usize = 8;

fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Succeeded => 0,
        Outcome::Retried { .. } => 1,
        Outcome::DeadLettered => 2,
        Outcome::Deduplicated => 3,
        Outcome::Deferred => 4,
        Outcome::Failed => 5,
        Outcome::Released => 6,
        Outcome::Abandoned => 7,
    }
}

impl Metrics {
    fn new(queue: &Arc<str>) -> Self {
        Metrics {
            queue: queue.clone(),
            received: metrics::counter!("ferrymq_worker_received_total", "queue" => queue.to_string()),
            in_flight: metrics::gauge!("ferrymq_worker_in_flight", "queue" => queue.to_string()),
            outcomes: Default::default(),
            handler_seconds: Default::default(),
        }
    }

    fn outcome(&mut self, outcome: Outcome) -> &metrics::Counter {
        let queue = &self.queue;
        self.outcomes[outcome_index(outcome)].get_or_insert_with(|| {
            let name = match outcome {
                Outcome::Succeeded => "ferrymq_worker_succeeded_total",
                Outcome::Retried { .. } => "ferrymq_worker_retried_total",
                Outcome::DeadLettered => "ferrymq_worker_dead_lettered_total",
                Outcome::Deduplicated => "ferrymq_worker_deduplicated_total",
                Outcome::Deferred => "ferrymq_worker_deferred_total",
                Outcome::Failed => "ferrymq_worker_failed_total",
                Outcome::Released | Outcome::Abandoned => "ferrymq_worker_released_total",
            };
            metrics::counter!(name, "queue" => queue.to_string())
        })
    }

    fn handler_seconds(&mut self, outcome: Outcome) -> &metrics::Histogram {
        let queue = &self.queue;
        self.handler_seconds[outcome_index(outcome)].get_or_insert_with(|| {
            metrics::histogram!("ferrymq_worker_handler_seconds", "queue" => queue.to_string(), "outcome" => outcome.as_str())
        })
    }
}

pub(super) async fn run<C, S, F>(
    worker: Worker<C>,
    mut service: S,
    shutdown: F,
) -> Result<WorkerSummary>
where
    C: Consumer + 'static,
    S: Service<Delivery, Response = ()> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    F: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let Worker {
        consumer,
        config,
        events,
        flush,
        health,
    } = worker;
    let queue: Arc<str> = consumer.queue().into();
    let max_batch = consumer.capabilities().max_batch.max(1);
    let prefetch = config.prefetch.unwrap_or_else(|| {
        default_prefetch(
            config.autoscale.map_or(config.concurrency, |a| a.max),
            max_batch,
        )
    });
    let pacing = Pacing::new(consumer.capabilities().visibility_timeout);
    let metrics = Metrics::new(&queue);
    let health = health.with_gauge(&queue);
    health.set_concurrency(config.concurrency);
    let concurrency_gauge =
        metrics::gauge!("ferrymq_worker_concurrency", "queue" => queue.to_string());
    concurrency_gauge.set(config.concurrency as f64);
    let mut scaler = config.autoscale.map(Autoscaler::new);
    let ready_watch = scaler
        .as_ref()
        .and_then(|_| autoscale::watch_ready(&consumer, config.autoscale_interval));
    let mut scale_tick = scaler.as_ref().map(|_| {
        let every = config.autoscale_interval;
        let mut t = tokio::time::interval_at(crate::time::deadline_in(every), every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let _depth_gauge = spawn_depth_gauge(&consumer, &config, &queue);
    let pending = Pending::new(config.ordered_by_key);
    let mut st = State {
        consumer,
        config,
        queue,
        events,
        unsent: Vec::new(),
        summary: WorkerSummary::default(),
        pending,
        in_flight: Slab::new(),
        running: FuturesUnordered::new(),
        settling: FuturesUnordered::new(),
        settle_items: Slab::new(),
        metrics,
        pacing,
    };
    tracing::info!(queue = %st.queue, concurrency = st.config.concurrency, prefetch, ordered_by_key = st.config.ordered_by_key, "worker started");

    let mut receiving: Option<BoxFuture<Result<Vec<Delivery>>>> = None;
    let mut spare: Spare<S::Future> = None;
    let mut receive_pause: Option<Pin<Box<Sleep>>> = None;
    let mut fatal: Option<Error> = None;
    let shutdown = shutdown.fuse();
    tokio::pin!(shutdown);

    loop {
        let prefetch = st.pacing.prefetch(prefetch, st.config.concurrency);
        let capacity = st.config.concurrency.saturating_add(prefetch);
        // Refill only once the prefetched buffer has drained to half: each receive then
        // brings a batch instead of the one delivery a finished handler made room for
        // (one round trip per message on a networked backend).
        let low_water = prefetch / 2;
        let held = st.running.len() + st.pending.len() + st.settling.len();
        if receiving.is_none()
            && receive_pause.is_none()
            && held < capacity
            && st.pending.len() <= low_water
        {
            let max = (capacity - held).min(max_batch);
            let consumer = st.consumer.clone();
            let wait = st.config.poll_wait;
            receiving = Some(Box::pin(async move { consumer.receive(max, wait).await }));
        }
        let can_start = st.can_start();

        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(settling) = st.settling.next(), if !st.settling.is_empty() => {
                st.settle_done(settling);
            }
            Some(joined) = st.running.next(), if !st.running.is_empty() => {
                st.finish(joined);
                // The others that finished in the same round, then the free slots
                // refilled, in this one pass: a delivery costs one turn of the loop
                // (and one poll of the shutdown future), not two. Polling without
                // this task's waker here is safe: the loop polls both again with it
                // before it can sleep.
                for _ in 0..st.running.len() {
                    match st.running.next().now_or_never() {
                        Some(Some(joined)) => st.finish(joined),
                        _ => break,
                    }
                }
                if st.can_start() {
                    if let Some(ready) = poll_fn(|cx| service.poll_ready(cx)).now_or_never() {
                        let filled = match ready {
                            Ok(()) => poll_fn(|cx| Poll::Ready(st.fill(cx, &mut service, &mut spare))).await,
                            Err(e) => Err(not_ready(e.into())),
                        };
                        if let Err(e) = filled {
                            fatal = Some(e);
                            break;
                        }
                    }
                }
            }
            ready = poll_fn(|cx| service.poll_ready(cx)), if can_start => {
                let filled = match ready {
                    Ok(()) => poll_fn(|cx| Poll::Ready(st.fill(cx, &mut service, &mut spare))).await,
                    Err(e) => Err(not_ready(e.into())),
                };
                if let Err(e) = filled {
                    fatal = Some(e);
                    break;
                }
            }
            Some(_) = OptionFuture::from(scale_tick.as_mut().map(|t| t.tick())), if scale_tick.is_some() => {
                if let Some(scaler) = scaler.as_mut() {
                    let ready = ready_watch
                        .as_ref()
                        .map(|(r, _)| r.load(std::sync::atomic::Ordering::Relaxed))
                        .filter(|&n| n != u64::MAX);
                    let next = scaler.tick(Load {
                        running: st.running.len(),
                        pending: st.pending.len(),
                        ready,
                        handler_secs: st.pacing.handler_secs,
                    });
                    if next != st.config.concurrency {
                        tracing::debug!(queue = %st.queue, from = st.config.concurrency, to = next, "autoscale");
                        st.config.concurrency = next;
                        concurrency_gauge.set(next as f64);
                        health.set_concurrency(next);
                    }
                }
            }
            Some(received) = OptionFuture::from(receiving.as_mut()), if receiving.is_some() => {
                receiving = None;
                match received {
                    Ok(deliveries) => {
                        health.receive_succeeded();
                        let n = deliveries.len() as u64;
                        st.summary.received += n;
                        st.metrics.received.increment(n);
                        for delivery in deliveries {
                            st.pending.push(delivery);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Closed => {
                        tracing::info!(queue = %st.queue, "consumer closed; worker stopping");
                        break;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::Auth | ErrorKind::NotFound | ErrorKind::InvalidConfig | ErrorKind::Unsupported) => {
                        tracing::error!(queue = %st.queue, error = %e, "receive failed for good; worker stopping");
                        fatal = Some(e);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(queue = %st.queue, error = %e, pause = ?st.config.receive_error_backoff, "receive failed; retrying");
                        health.receive_failed(&e);
                        receive_pause = Some(Box::pin(sleep(st.config.receive_error_backoff)));
                    }
                }
            }
            Some(()) = OptionFuture::from(receive_pause.as_mut()), if receive_pause.is_some() => {
                receive_pause = None;
            }
            // Last, so it runs only when nothing else is ready: the loop is about to
            // wait, and whatever it reported goes out before it does.
            () = std::future::ready(()), if !st.unsent.is_empty() => st.send_events(),
        }
    }
    st.send_events();

    // Graceful shutdown, all of it within one deadline. Nothing below waits on the
    // backend without it: a broker gone silent must not keep the process from
    // stopping (what is not given back returns after its visibility timeout).
    let deadline = crate::time::deadline_in(st.config.shutdown_timeout);
    // What giving back the handlers cancelled at the deadline may take past it.
    let grace = (st.config.shutdown_timeout / 10).min(Duration::from_secs(1));
    // 1: stop receiving. A receive cut short loses nothing: what it may have leased
    // comes back after the visibility timeout. Closing the consumer first stops its
    // own fetching (a Kafka poll loop, a Redis read-ahead buffer) before anything is
    // given back; deliveries already handed out can still be settled.
    drop(receiving);
    tracing::info!(queue = %st.queue, running = st.running.len(), prefetched = st.pending.len(), "worker shutting down");
    let mut closed = false;
    if st.config.close_consumer {
        match tokio::time::timeout_at(deadline, st.consumer.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(queue = %st.queue, error = %e, "closing the consumer failed")
            }
            Err(_) => {
                tracing::warn!(queue = %st.queue, "closing the consumer did not finish before the shutdown deadline")
            }
        }
        closed = true;
    }
    // 2: release what was received but not started, all at once (settled alongside
    // the running handlers), so other consumers get it now rather than after its
    // visibility timeout.
    for delivery in st.pending.drain() {
        st.push_settle(delivery, Finished::unstarted());
    }
    // 3: let running handlers finish, and every ack, nack and release complete, up
    // to the deadline.
    while !st.running.is_empty() || !st.settling.is_empty() {
        st.send_events();
        tokio::select! {
            biased;
            Some(settling) = st.settling.next(), if !st.settling.is_empty() => st.settle_done(settling),
            Some(joined) = st.running.next(), if !st.running.is_empty() => st.finish(joined),
            () = sleep_until(deadline) => break,
        }
    }
    // 4: cancel the stragglers; `finish` releases their deliveries. Those releases
    // get a short grace past the deadline (a tenth of the timeout, at most 1 s).
    let mut settle_deadline = deadline;
    if !st.running.is_empty() {
        tracing::warn!(queue = %st.queue, remaining = st.running.len(), "shutdown timeout: cancelling running handlers");
        st.cancel_running().await;
        settle_deadline = settle_deadline.max(crate::time::deadline_in(grace));
    }
    // 4b: the settles still on their way, until then; the rest is reported as given
    // back too late.
    while !st.settling.is_empty() {
        st.send_events();
        tokio::select! {
            biased;
            Some(settling) = st.settling.next() => st.settle_done(settling),
            () = sleep_until(settle_deadline) => break,
        }
    }
    if !st.settle_items.is_empty() {
        tracing::warn!(queue = %st.queue, count = st.settle_items.len(), "acks, nacks and releases did not finish before the shutdown deadline; those messages return after their visibility timeout");
        st.settling = FuturesUnordered::new();
        for (_, (delivery, finished)) in std::mem::take(&mut st.settle_items) {
            let late = Error::new(
                ErrorKind::Timeout,
                "it did not finish before the shutdown deadline",
            );
            st.settled((delivery, finished, Err(late)));
        }
    }
    // 5: flush downstream producers (bounded like the rest, with at least the grace).
    let flush_deadline = settle_deadline.max(crate::time::deadline_in(grace));
    for producer in &flush {
        match tokio::time::timeout_at(flush_deadline, producer.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(producer = %producer.queue(), error = %e, "flush at shutdown failed")
            }
            Err(_) => {
                tracing::warn!(producer = %producer.queue(), "flush at shutdown did not finish before the shutdown deadline")
            }
        }
    }
    if st.config.close_consumer && !closed {
        if let Err(e) = st.consumer.close().await {
            tracing::warn!(queue = %st.queue, error = %e, "closing the consumer failed");
        }
    }
    st.send_events();
    st.summary.elapsed = started.elapsed();
    tracing::info!(queue = %st.queue, summary = %st.summary, "worker stopped");
    health.stopped(fatal.as_ref());
    match fatal {
        Some(e) => Err(e),
        None => Ok(st.summary),
    }
}

impl<C: Consumer + 'static> State<C> {
    /// Whether a slot is free and a delivery may take it.
    fn can_start(&self) -> bool {
        self.running.len() < self.config.concurrency && self.pending.has_startable()
    }

    /// Start as many as there are free slots while the service stays ready, before
    /// the next poll of the running ones: the handlers of a batch then run (and
    /// their acks go out) together. The service has just been found ready; a
    /// readiness error after that stops the worker. `cx`: the worker task's, for
    /// the first poll of each handler (see [`State::start`]).
    fn fill<S>(
        &mut self,
        cx: &mut Context<'_>,
        service: &mut S,
        spare: &mut Spare<S::Future>,
    ) -> Result<()>
    where
        S: Service<Delivery, Response = ()>,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        loop {
            if let Some(delivery) = self.pending.pop() {
                let now = Instant::now();
                if self.pacing.may_start(&delivery, now) {
                    self.start(cx, service, spare, delivery, now);
                } else {
                    self.release_unstarted(delivery);
                }
            }
            if !self.can_start() {
                return Ok(());
            }
            match poll_fn(|cx| service.poll_ready(cx)).now_or_never() {
                Some(Ok(())) => {}
                Some(Err(e)) => return Err(not_ready(e.into())),
                // Not ready yet: the loop polls it again with this task's waker.
                None => return Ok(()),
            }
        }
    }

    fn start<S>(
        &mut self,
        cx: &mut Context<'_>,
        service: &mut S,
        spare: &mut Spare<S::Future>,
        delivery: Delivery,
        now: Instant,
    ) where
        S: Service<Delivery, Response = ()>,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        // `info_span!` formats nothing (not even the id) when no subscriber wants it.
        let span = tracing::info_span!(
            "ferrymq.delivery",
            queue = %self.queue,
            id = %delivery.id(),
            attempt = delivery.attempt(),
            outcome = tracing::field::Empty,
        );
        let future = {
            let _entered = span.enter();
            catch_unwind(AssertUnwindSafe(|| service.call(delivery.clone())))
        };
        let future = match future {
            Ok(future) => future,
            Err(payload) => {
                // The service panicked before returning a future: fail this delivery.
                let error = HandlerPanicked::from_payload(&*payload);
                tracing::error!(parent: &span, %error, "handler panicked in call");
                let finished = Finished {
                    outcome: Outcome::Failed,
                    error: Some(error.to_string().into()),
                    elapsed: Duration::ZERO,
                    panicked: true,
                    settle: Settle::Nack(self.config.nack_delay),
                    settling: Attempted::No,
                    span,
                };
                self.push_settle(delivery, finished);
                return;
            }
        };
        let acker = delivery.acker().clone();
        let nack_delay = self.config.nack_delay;
        let entry = self.in_flight.vacant_entry();
        let id = entry.key();
        let handling = |started| Handling {
            future,
            acker: Some(acker),
            nack_delay,
            started,
            span,
            recorded: None,
        };
        if self.config.handler_tasks {
            let task = tokio::spawn(handling(None));
            entry.insert((delivery, Some(task.abort_handle())));
            self.running.push(Box::pin(async move { (id, task.await) }));
        } else {
            entry.insert((delivery, None));
            let mut slot = spare
                .take()
                .unwrap_or_else(|| Box::pin(Slot { id, handling: None }));
            {
                let mut slot = slot.as_mut().project();
                *slot.id = id;
                slot.handling.set(Some(handling(Some(now))));
            }
            // Its first poll here, in the turn that started it: a handler that
            // finishes without waiting (most fast ones do) is finished and its ack
            // sent now, and never enters `running` (whose task allocation and
            // ready-queue turn cost a Kafka worker ~800 instructions a delivery);
            // its box is kept for the next one. One that waits registered this
            // task's waker; `running` polls it again with its own, which replaces it.
            self.metrics.in_flight.set(self.in_flight.len() as f64);
            match slot.as_mut().poll(cx) {
                Poll::Ready(joined) => {
                    slot.as_mut().project().handling.set(None);
                    *spare = Some(slot);
                    self.finish(joined);
                }
                Poll::Pending => self.running.push(slot),
            }
            return;
        }
        self.metrics.in_flight.set(self.in_flight.len() as f64);
    }

    /// Cancel every running handler (the shutdown deadline passed) and give their
    /// deliveries back.
    async fn cancel_running(&mut self) {
        if self.config.handler_tasks {
            for (_, (_, abort)) in &self.in_flight {
                if let Some(abort) = abort {
                    abort.abort();
                }
            }
            while let Some(joined) = self.running.next().await {
                self.finish(joined);
            }
            return;
        }
        // Handlers polled by this task: dropping their futures cancels them (and
        // their middleware's drop guards run, such as the heartbeat's).
        self.running = FuturesUnordered::new();
        let keys: Vec<usize> = self.in_flight.iter().map(|(k, _)| k).collect();
        for id in keys {
            self.finish((
                id,
                Ok(Finished {
                    outcome: Outcome::Abandoned,
                    error: Some("cancelled at the shutdown deadline".into()),
                    elapsed: Duration::ZERO,
                    panicked: false,
                    settle: Settle::Release,
                    settling: Attempted::No,
                    span: tracing::Span::none(),
                }),
            ));
        }
    }

    fn finish(&mut self, (id, joined): Joined) {
        let Some((delivery, _)) = self.in_flight.try_remove(id) else {
            return;
        };
        self.metrics.in_flight.set(self.in_flight.len() as f64);
        let finished = match joined {
            Ok(finished) => finished,
            Err(e) => {
                // Cancelled at the shutdown deadline (or, should it ever happen, a
                // panic outside the handler): give the delivery back.
                let (outcome, settle) = if e.is_cancelled() {
                    // Cut short by the shutdown deadline: not the message's fault.
                    (Outcome::Abandoned, Settle::Release)
                } else {
                    (Outcome::Failed, Settle::Nack(self.config.nack_delay))
                };
                Finished {
                    outcome,
                    error: Some(e.to_string().into()),
                    elapsed: Duration::ZERO,
                    panicked: e.is_panic(),
                    settle,
                    settling: Attempted::No,
                    span: tracing::Span::none(),
                }
            }
        };
        let mut finished = finished;
        match (
            finished.settle,
            std::mem::replace(&mut finished.settling, Attempted::No),
        ) {
            (Settle::Done, _) => self.settled((delivery, finished, Ok(()))),
            // Answered inside the handler's future.
            (_, Attempted::Done(result)) => self.settled((delivery, finished, result)),
            // Settled off the handler slot; `settle_done` accounts for it when done.
            (_, Attempted::Waiting(future)) => self.push_settling(delivery, finished, future),
            (_, Attempted::No) => self.push_settle(delivery, finished),
        }
    }

    /// Start settling `delivery` as `finished.settle` says, alongside the loop.
    fn push_settle(&mut self, delivery: Delivery, finished: Finished) {
        // The handle alone (one `Arc`), not a copy of the message.
        let future = settle_future(delivery.acker().clone(), finished.settle);
        self.push_settling(delivery, finished, future);
    }

    /// Poll `future`, a settle of `delivery`, alongside the loop.
    fn push_settling(
        &mut self,
        delivery: Delivery,
        finished: Finished,
        future: BoxFuture<Result<()>>,
    ) {
        let id = self.settle_items.insert((delivery, finished));
        self.settling.push(KeyedSettle { id, future });
    }

    /// A settle from `settling` answered.
    fn settle_done(&mut self, (id, result): Settling) {
        if let Some((delivery, finished)) = self.settle_items.try_remove(id) {
            self.settled((delivery, finished, result));
        }
    }

    /// Give back a delivery whose lease is gone or about to go, without running it:
    /// its redelivery will be the only run. Settled off the loop like an ack.
    fn release_unstarted(&mut self, delivery: Delivery) {
        tracing::debug!(queue = %self.queue, id = %delivery.id(), remaining = ?delivery.lease_remaining(), "lease too short to start; releasing");
        self.summary.expired += 1;
        self.push_settle(delivery, Finished::unstarted());
    }

    /// Account for a delivery whose handler finished and whose settle completed.
    fn settled(&mut self, (delivery, mut finished, result): Settled) {
        self.pending.key_done(&delivery);
        if !matches!(finished.settle, Settle::Release) {
            self.pacing.observe(finished.elapsed);
        }
        if let Err(e) = result {
            let what = match finished.settle {
                Settle::Ack => {
                    tracing::warn!(parent: &finished.span, error = %e, "handled, but the ack failed: the message will be delivered again");
                    finished.outcome = Outcome::Failed;
                    "acking it failed"
                }
                Settle::Nack(_) | Settle::Release => {
                    tracing::warn!(parent: &finished.span, queue = %self.queue, id = %delivery.id(), error = %e, "giving the message back failed: it returns after its visibility timeout");
                    self.summary.release_failed += 1;
                    "giving it back failed, it returns after its visibility timeout"
                }
                Settle::Done => "settling failed",
            };
            let note = format!("{what}: {}", e.message());
            finished.error = Some(match finished.error.take() {
                Some(error) => format!("{error}; {note}").into(),
                None => note.into(),
            });
            finished.span.record("outcome", finished.outcome.as_str());
        }
        if finished.panicked {
            self.summary.panics += 1;
        }
        self.metrics
            .handler_seconds(finished.outcome)
            .record(finished.elapsed.as_secs_f64());
        self.report(delivery, finished.outcome, finished.error, finished.elapsed);
    }

    /// Count, measure and broadcast one outcome.
    /// The event takes the delivery itself (the worker is done with it): no copy of
    /// its metadata or message is made, and none is dropped afterwards.
    ///
    /// Events go out in batches: when [`EVENT_BATCH`] have gathered, and whenever
    /// the loop is about to wait (so none waits longer than the worker is busy, and
    /// an idle worker holds none back). A send per delivery woke a listener that
    /// keeps up once per delivery, a thread wake-up each: that cost a Kafka worker
    /// draining a backlog a quarter of its throughput (issue 10).
    fn report(
        &mut self,
        delivery: Delivery,
        outcome: Outcome,
        error: Option<Arc<str>>,
        elapsed: Duration,
    ) {
        self.summary.count(outcome);
        self.metrics.outcome(outcome).increment(1);
        if self.events.receiver_count() == 0 {
            return;
        }
        self.unsent
            .push(WorkerEvent::new(outcome, delivery, error, elapsed));
        if self.unsent.len() >= EVENT_BATCH {
            self.send_events();
        }
    }

    /// Broadcast the events reported so far, in the order they were reported.
    fn send_events(&mut self) {
        for event in self.unsent.drain(..) {
            // No receiver left: the rest (dropped with the drain) would go nowhere.
            if self.events.send(event).is_err() {
                break;
            }
        }
    }
}

/// The most events held back before they are sent (see [`State::report`]): a
/// sixteenth of the channel's capacity, so a listener that keeps up never lags
/// because of the batching.
pub(super) const EVENT_BATCH: usize = 64;

/// The error that stops the worker when its service fails a readiness check.
fn not_ready(e: BoxError) -> Error {
    Error::new(
        ErrorKind::Backend,
        "the handler service failed its readiness check",
    )
    .with_source(e)
}

/// The prefetch when none is set: twice the concurrency, at least 128, raised to the
/// backend's `max_batch` up to [`DEFAULT_BATCH_PREFETCH`] — enough that receives come
/// in batches (refilled at half) of a size where a networked backend's round trip is
/// paid by hundreds of messages. The floor follows `max_batch` because the worker's
/// acks hold room too: with 128, a Redis worker's ~40–60 acks on the wire left
/// receives of ~50 (its handlers then waited on every receive round trip: 0.65–0.78
/// of the raw client at c=1, against 0.82–0.94 with 512 or 1,024; issue 11). The cap
/// is 512, not 1,024: each prefetched Redis delivery added ~4 KiB to the consumer's
/// peak RSS (16.7 MiB at 128, 18.2 at 512, 20.5 at 1,024, over issue 11's 20 MiB
/// bound), and 512 did as well as 1,024 on throughput. A backend that returns 10 a
/// call (SQS) keeps 128. The pacing still bounds it by time, so slow handlers
/// prefetch less.
pub(super) fn default_prefetch(concurrency: usize, max_batch: usize) -> usize {
    concurrency
        .saturating_mul(2)
        .max(DEFAULT_MIN_PREFETCH)
        .max(max_batch.min(DEFAULT_BATCH_PREFETCH))
}

/// Lower bound of the default prefetch.
pub(super) const DEFAULT_MIN_PREFETCH: usize = 128;

/// The default prefetch a backend with large receive batches gets at least.
pub(super) const DEFAULT_BATCH_PREFETCH: usize = 512;

pin_project! {
    /// One delivery run through the service, polled by the worker (or, with
    /// `handler_tasks`, by a task of its own): the handler stack's future inside
    /// the outcome scope and a panic guard, then, in the poll that finishes it,
    /// the start of the settle the worker has left to do.
    ///
    /// A named future rather than an `async fn` so that the worker can keep the
    /// box it runs in ([`Slot`]) for the next delivery. A handler that finishes in
    /// the poll that starts it (most fast ones) then costs no allocation; the box,
    /// its free and the copy into it cost the memory backend's Worker ~500
    /// instructions a delivery, a tenth of its whole cost.
    struct Handling<F> {
        #[pin]
        future: F,
        // `None` once finished.
        acker: Option<crate::delivery::AckHandle>,
        nack_delay: Option<Duration>,
        // When the worker started it; read at the first poll when `None` (the
        // handler waited for a task of its own).
        started: Option<Instant>,
        span: tracing::Span,
        // What the middleware recorded in the polls so far.
        recorded: Option<Outcome>,
    }
}

impl<F, E> Future for Handling<F>
where
    F: Future<Output = std::result::Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Finished;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Finished> {
        let this = self.project();
        if this.acker.is_none() {
            // Polled after it finished: it has nothing more to give.
            return Poll::Pending;
        }
        let started = *this.started.get_or_insert_with(Instant::now);
        let _entered = this.span.enter();
        let mut future = this.future;
        let (polled, recorded) = outcome::poll_scoped(*this.recorded, || {
            catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)))
        });
        *this.recorded = recorded;
        let (result, mut panicked) = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => (result.map_err(Into::into), false),
            Err(payload) => {
                let error: BoxError = Box::new(HandlerPanicked::from_payload(&*payload));
                (Err(error), true)
            }
        };
        let Some(acker) = this.acker.take() else {
            return Poll::Pending;
        };
        // Finished: what the worker has left to do with the delivery, its outcome
        // and its settle, is worked out (and the settle started) in this poll.
        let (elapsed, nack_delay) = (started.elapsed(), *this.nack_delay);
        let span = this.span.clone();
        // A CatchPanic layer turns panics into errors before they get here: count those too.
        panicked |= result
            .as_ref()
            .err()
            .is_some_and(|e| e.is::<HandlerPanicked>());
        let settled = acker.is_settled();
        let (outcome, settle) = match &result {
            Ok(()) if settled => (recorded.unwrap_or(Outcome::Succeeded), Settle::Done),
            Ok(()) => (recorded.unwrap_or(Outcome::Succeeded), Settle::Ack),
            Err(_) if settled => (recorded.unwrap_or(Outcome::Failed), Settle::Done),
            Err(error) => {
                tracing::warn!(parent: &span, %error, "handler failed");
                (Outcome::Failed, Settle::Nack(nack_delay))
            }
        };
        if !span.is_disabled() {
            span.record("outcome", outcome.as_str());
        }
        // Start the ack or nack here, in the poll that finished the handler: an
        // in-process backend answers at once, and the worker then has nothing left to
        // schedule for this delivery (no settle to push, poll and account for apart). A
        // backend that has to ask over the network answers `Pending`; the future sent
        // is handed to the worker as it is (never started twice), and the handler's
        // slot frees all the same. An ack the backend settles without waiting needs
        // no future at all.
        let acked_now = match settle {
            Settle::Ack => acker.try_ack_now(),
            _ => None,
        };
        let settling = match (settle, acked_now) {
            (_, Some(result)) => Attempted::Done(result),
            (Settle::Ack | Settle::Nack(_), None) => {
                let mut future = settle_future(acker, settle);
                match future.as_mut().poll(cx) {
                    Poll::Ready(result) => Attempted::Done(result),
                    Poll::Pending => Attempted::Waiting(future),
                }
            }
            (Settle::Done | Settle::Release, None) => Attempted::No,
        };
        Poll::Ready(Finished {
            outcome,
            error: result.err().map(|e| Arc::from(e.to_string())),
            elapsed,
            panicked,
            settle,
            settling,
            span,
        })
    }
}

/// The worker's spare [`Slot`], if it has one.
type Spare<F> = Option<Pin<Box<Slot<F>>>>;

pin_project! {
    /// The box a [`Handling`] runs in, with its key in `State::in_flight`. The
    /// worker keeps one spare: a handler that finishes in the poll that starts it
    /// gives its box back for the next delivery; one that waits is pushed, box and
    /// all, into the running set.
    struct Slot<F> {
        id: usize,
        #[pin]
        handling: Option<Handling<F>>,
    }
}

impl<F, E> Future for Slot<F>
where
    F: Future<Output = std::result::Result<(), E>>,
    E: Into<BoxError>,
{
    type Output = Joined;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Joined> {
        let this = self.project();
        match this.handling.as_pin_mut() {
            Some(handling) => handling.poll(cx).map(|finished| (*this.id, Ok(finished))),
            None => Poll::Pending,
        }
    }
}

/// Reads the queue depth into a gauge every `depth_interval`; aborted on drop.
fn spawn_depth_gauge<C: Consumer + 'static>(
    consumer: &Arc<C>,
    config: &Config,
    queue: &Arc<str>,
) -> Option<AbortOnDrop> {
    let every = config.depth_interval?;
    if !consumer.capabilities().depth.is_available() || every.is_zero() {
        return None;
    }
    let consumer = consumer.clone();
    let queue = queue.to_string();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match consumer.depth().await {
                Ok(d) => {
                    for (state, n) in [
                        ("waiting", d.waiting),
                        ("in_flight", d.in_flight),
                        ("delayed", d.delayed),
                    ] {
                        metrics::gauge!("ferrymq_queue_depth", "queue" => queue.clone(), "state" => state)
                            .set(n as f64);
                    }
                }
                Err(e) => tracing::debug!(%queue, error = %e, "depth unavailable"),
            }
        }
    });
    Some(AbortOnDrop(task.abort_handle()))
}

pub(super) struct AbortOnDrop(pub(super) AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
