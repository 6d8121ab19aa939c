//! Middleware cases: the reliability patterns of `ferrymq_core::middleware` and the
//! `Worker`, run over each backend's real producers and consumers.
//!
//! These check the promises of issue 3 end to end: a poison message reaches the DLQ
//! after exactly N attempts with its reason and origin and is gone from the source;
//! a transient failure then success is handled once and not dead-lettered; dedup
//! holds under redelivery; a handler running 3x the visibility timeout with
//! ExtendVisibility is not delivered twice; graceful shutdown under load loses and
//! duplicates nothing; backpressure refuses at its bound; per-key order holds with
//! concurrency 8 (with retries where a retry keeps its place); a worker with slow
//! handlers and the default prefetch handles each message once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferrymq_core::middleware::{
    handler_fn, Backoff, BackpressureLayer, DedupLayer, ExtendVisibilityLayer, Outcome,
    RetryToDlqLayer,
};
use ferrymq_core::worker::{Worker, WorkerEvent};
use ferrymq_core::{reserved, BoxError, Consumer, Delivery, ErrorKind, Message, WorkerSummary};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::support::{expect_depth, expect_kind, expect_none, receive_n, send, send_all, text};
use crate::{ensure, CaseResult, Context, Failure};

/// A worker running in the background until [`Running::stop`].
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<ferrymq_core::Result<WorkerSummary>>,
    events: broadcast::Receiver<WorkerEvent>,
}

impl Running {
    fn start<S>(worker: Worker<Box<dyn Consumer>>, service: S) -> Running
    where
        S: Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let events = worker.subscribe();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run_until(service, async {
            let _ = stopped.await;
        }));
        Running { stop, task, events }
    }

    /// Collect events until `done` holds for them, failing after `within`.
    async fn until(
        &mut self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&[WorkerEvent]) -> bool,
    ) -> CaseResult<Vec<WorkerEvent>> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while !done(&seen) {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(e)) => seen.push(e),
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                    return Err(Failure::new(format!("{what}: lost {n} worker events")))
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(Failure::new(format!("{what}: the worker stopped early")))
                }
                Err(_) => {
                    return Err(Failure::new(format!(
                        "{what}: not done within {within:?}; outcomes so far: {:?}",
                        seen.iter().map(|e| e.outcome).collect::<Vec<_>>()
                    )))
                }
            }
        }
        Ok(seen)
    }

    /// Stop gracefully and return the summary.
    async fn stop(self) -> CaseResult<WorkerSummary> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(40), self.task).await {
            Ok(Ok(Ok(summary))) => Ok(summary),
            Ok(Ok(Err(e))) => Err(Failure::new(format!("worker failed: {e}"))),
            Ok(Err(e)) => Err(Failure::new(format!("worker task failed: {e}"))),
            Err(_) => Err(Failure::new("worker did not stop within 40 s")),
        }
    }
}

fn count(events: &[WorkerEvent], outcome: fn(&Outcome) -> bool) -> usize {
    events.iter().filter(|e| outcome(&e.outcome)).count()
}

fn fast_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100))
        .max(Duration::from_secs(1))
        .jitter(0.0)
}

fn parse_time(value: Option<&str>, what: &str) -> CaseResult<SystemTime> {
    let value = value.ok_or_else(|| Failure::new(format!("DLQ message lacks {what}")))?;
    humantime::parse_rfc3339_weak(value)
        .map_err(|e| Failure::new(format!("{what} {value:?} is not RFC 3339: {e}")))
}

/// A message failing every attempt reaches the DLQ after exactly `max_attempts`
/// handler calls, with reason, origin queue, attempts, message id and failure times,
/// and is gone from the source queue.
pub async fn poison_reaches_dlq_after_exactly_n_attempts(ctx: &Context) -> CaseResult {
    const ATTEMPTS: u32 = 3;
    let (queue, p, c) = ctx.fresh().await?;
    let (_dlq_name, dlq_p, dlq_c) = ctx.fresh().await?;
    send(&*p, Message::new("poison order").header("trace-id", "t-13")).await?;

    let calls = Arc::new(AtomicU32::new(0));
    let last_id = Arc::new(Mutex::new(String::new()));
    let (calls2, last_id2) = (calls.clone(), last_id.clone());
    let handler = handler_fn(move |d: Delivery| {
        calls2.fetch_add(1, Ordering::SeqCst);
        *last_id2.lock().unwrap_or_else(|e| e.into_inner()) = d.id().to_string();
        async { Err::<(), BoxError>("currency XXX is not supported".into()) }
    });
    let service = RetryToDlqLayer::new(dlq_p)
        .max_attempts(ATTEMPTS)
        .backoff(fast_backoff())
        .layer(handler);
    let mut worker = Running::start(Worker::new(c).concurrency(2), service);
    let events = worker
        .until("dead-lettering", ctx.prompt() * 2, |es| {
            count(es, |o| *o == Outcome::DeadLettered) == 1
        })
        .await?;
    let summary = worker.stop().await?;

    ensure!(
        calls.load(Ordering::SeqCst) == ATTEMPTS,
        "expected exactly {ATTEMPTS} handler calls, got {}",
        calls.load(Ordering::SeqCst)
    );
    ensure!(
        count(&events, |o| matches!(o, Outcome::Retried { .. })) == ATTEMPTS as usize - 1,
        "expected {} retries, got outcomes {:?}",
        ATTEMPTS - 1,
        events.iter().map(|e| e.outcome).collect::<Vec<_>>()
    );
    ensure!(summary.dead_lettered == 1, "summary: {summary}");

    let dead = receive_n(&*dlq_c, 1, ctx.prompt()).await?;
    let d = &dead[0];
    let h = d.headers();
    ensure!(text(d) == "poison order", "DLQ payload {:?}", text(d));
    ensure!(h.get("trace-id") == Some("t-13"), "user header lost: {h:?}");
    ensure!(
        h.get(reserved::FAILURE_REASON) == Some("currency XXX is not supported"),
        "reason header: {:?}",
        h.get(reserved::FAILURE_REASON)
    );
    ensure!(
        h.get(reserved::ORIGIN_QUEUE) == Some(queue.as_str()),
        "origin header {:?}, expected {queue:?}",
        h.get(reserved::ORIGIN_QUEUE)
    );
    ensure!(
        h.get(reserved::ATTEMPTS) == Some("3"),
        "attempts header: {:?}",
        h.get(reserved::ATTEMPTS)
    );
    let last = last_id.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(
        h.get(reserved::ORIGIN_MESSAGE_ID) == Some(last.as_str()),
        "origin message id {:?}, the last attempt had id {last:?}",
        h.get(reserved::ORIGIN_MESSAGE_ID)
    );
    let first = parse_time(h.get(reserved::FIRST_FAILURE_AT), "first-failure time")?;
    let dead_at = parse_time(h.get(reserved::DEAD_LETTERED_AT), "dead-lettered time")?;
    // Two backoffs (100 ms, 200 ms) separate the first failure from the last.
    let gap = dead_at.duration_since(first).unwrap_or_default();
    ensure!(
        gap >= Duration::from_millis(290),
        "first failure {first:?} only {gap:?} before dead-lettering: it was not kept across redeliveries"
    );
    d.ack().await?;

    // Gone from the source: nothing comes back, even after the visibility timeout.
    let source = ctx.consumer(&queue).await?;
    let watch = ctx.visibility().unwrap_or_default() + ctx.quiet();
    expect_none(
        &*source,
        watch,
        "the dead-lettered message must be gone from the source",
    )
    .await?;
    Ok(())
}

/// A message that fails twice then succeeds is retried, handled, acked once, and
/// never dead-lettered.
pub async fn transient_failure_then_success_not_dead_lettered(ctx: &Context) -> CaseResult {
    let (queue, p, c) = ctx.fresh().await?;
    let (_dlq_name, dlq_p, dlq_c) = ctx.fresh().await?;
    send(&*p, Message::new("flaky order")).await?;
    let calls = Arc::new(AtomicU32::new(0));
    let calls2 = calls.clone();
    let handler = handler_fn(move |_d: Delivery| {
        let n = calls2.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                return Err::<(), BoxError>("payment gateway timed out".into());
            }
            Ok(())
        }
    });
    let service = RetryToDlqLayer::new(dlq_p)
        .max_attempts(3)
        .backoff(fast_backoff())
        .layer(handler);
    let mut worker = Running::start(Worker::new(c), service);
    worker
        .until("success", ctx.prompt() * 2, |es| {
            count(es, |o| *o == Outcome::Succeeded) == 1
        })
        .await?;
    let summary = worker.stop().await?;
    ensure!(
        calls.load(Ordering::SeqCst) == 3,
        "handler calls: {}",
        calls.load(Ordering::SeqCst)
    );
    ensure!(
        (summary.retried, summary.succeeded, summary.dead_lettered) == (2, 1, 0),
        "summary: {summary}"
    );
    expect_none(&*dlq_c, ctx.quiet(), "nothing may be dead-lettered").await?;
    let source = ctx.consumer(&queue).await?;
    expect_none(
        &*source,
        ctx.visibility().unwrap_or_default() + ctx.quiet(),
        "the handled message must be acked",
    )
    .await?;
    Ok(())
}

/// A handled message that comes back (its ack was lost) is acked without calling the
/// handler again; so is a second send of the same content.
pub async fn dedup_under_redelivery(ctx: &Context) -> CaseResult {
    let (queue, p, c) = ctx.fresh().await?;
    send(&*p, Message::new("order 7").key("customer-7")).await?;
    let calls = Arc::new(AtomicU32::new(0));
    let calls2 = calls.clone();
    // The first time, the message comes back after it was handled, as when a consumer
    // crashes between handling and acking: the handler releases its own delivery.
    let store = ctx.dedup_store(&queue).await?;
    // Content hashing (an opt-in): without it a second send is a new message.
    let service = DedupLayer::from_arc(store)
        .content_hash(true)
        .layer(handler_fn(move |d: Delivery| {
            let first = calls2.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    d.nack(None).await?;
                }
                Ok::<(), BoxError>(())
            }
        }));
    let mut worker = Running::start(Worker::new(c), service);
    worker
        .until("redelivery deduplicated", ctx.prompt() * 2, |es| {
            count(es, |o| *o == Outcome::Deduplicated) == 1
        })
        .await?;
    // A retrying client sends the same order again.
    send(&*p, Message::new("order 7").key("customer-7")).await?;
    worker
        .until("second send deduplicated", ctx.prompt(), |es| {
            count(es, |o| *o == Outcome::Deduplicated) == 1
        })
        .await?;
    let summary = worker.stop().await?;
    ensure!(
        calls.load(Ordering::SeqCst) == 1,
        "handler called {} times",
        calls.load(Ordering::SeqCst)
    );
    ensure!(summary.deduplicated == 2, "summary: {summary}");
    let source = ctx.consumer(&queue).await?;
    expect_none(
        &*source,
        ctx.visibility().unwrap_or_default() + ctx.quiet(),
        "both copies must be acked",
    )
    .await?;
    Ok(())
}

/// A handler that runs three times the visibility timeout, under ExtendVisibility, with
/// a second worker competing for the queue, is called exactly once.
pub async fn extend_visibility_long_handler_delivered_once(ctx: &Context) -> CaseResult {
    let visibility = ctx
        .visibility()
        .ok_or_else(|| Failure::new("needs a visibility timeout"))?;
    let (queue, p, _c) = ctx.fresh().await?;
    send(&*p, Message::new("slow job")).await?;
    let calls = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let calls = calls.clone();
        let service = ExtendVisibilityLayer::from_capabilities(ctx.caps()).layer(handler_fn(
            move |_d: Delivery| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(visibility * 3).await;
                    Ok::<(), BoxError>(())
                }
            },
        ));
        let consumer = ctx.consumer(&queue).await?;
        workers.push(Running::start(
            Worker::new(consumer).poll_wait(Duration::from_millis(100)),
            service,
        ));
    }
    // Wait for the one success, then watch a while longer for a second delivery.
    let within = visibility * 3 + ctx.prompt();
    let mut first = workers.remove(0);
    let mut second = workers.remove(0);
    let done = tokio::select! {
        r = first.until("handling", within, |es| !es.is_empty()) => r?,
        r = second.until("handling", within, |es| !es.is_empty()) => r?,
    };
    ensure!(
        done[0].outcome == Outcome::Succeeded,
        "outcome {:?} ({:?})",
        done[0].outcome,
        done[0].error
    );
    tokio::time::sleep(visibility + ctx.slack()).await;
    first.stop().await?;
    second.stop().await?;
    ensure!(
        calls.load(Ordering::SeqCst) == 1,
        "the handler ran {} times: the lease was not kept",
        calls.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Shutdown in the middle of a backlog: nothing lost, nothing that was acked handled
/// again, released deliveries picked up at once by the next worker.
pub async fn graceful_shutdown_under_load_loses_nothing(ctx: &Context) -> CaseResult {
    const N: usize = 60;
    let (queue, p, c) = ctx.fresh().await?;
    send_all(&*p, (0..N).map(|i| Message::new(format!("m{i}"))).collect()).await?;
    let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = |handled: Arc<Mutex<HashMap<String, u32>>>| {
        handler_fn(move |d: Delivery| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                *handled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(text(&d))
                    .or_default() += 1;
                Ok::<(), BoxError>(())
            }
        })
    };
    let mut first = Running::start(
        Worker::new(c).concurrency(4).prefetch(8),
        handler(handled.clone()),
    );
    // Stop after some, not all, were handled.
    first
        .until("some handled", ctx.prompt(), |es| es.len() >= 10)
        .await?;
    let s1 = first.stop().await?;
    ensure!(
        (s1.succeeded as usize) < N,
        "the first worker handled everything before the shutdown: {s1}"
    );
    ensure!(
        s1.succeeded + s1.released + s1.abandoned == s1.received,
        "the first worker left deliveries unaccounted for: {s1}"
    );
    let rest = N - s1.succeeded as usize;
    let consumer = ctx.consumer(&queue).await?;
    let mut second = Running::start(
        Worker::new(consumer).concurrency(4),
        handler(handled.clone()),
    );
    // Released deliveries are available at once: no visibility timeout in this bound.
    second
        .until("the rest handled", ctx.prompt(), |es| {
            count(es, |o| *o == Outcome::Succeeded) == rest
        })
        .await?;
    let s2 = second.stop().await?;
    ensure!(s2.succeeded as usize == rest, "second worker: {s2}");
    let handled = handled.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(
        handled.len() == N,
        "{} of {N} messages handled",
        handled.len()
    );
    let twice: Vec<_> = handled.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "handled more than once: {twice:?}");
    let last = ctx.consumer(&queue).await?;
    expect_none(
        &*last,
        ctx.visibility().unwrap_or_default() + ctx.quiet(),
        "every message must be acked",
    )
    .await?;
    Ok(())
}

/// Backpressure refuses with `QueueFull` once the queue holds its bound, enqueues
/// nothing past it, and lets sends through again once consumers caught up.
pub async fn backpressure_refuses_at_bound(ctx: &Context) -> CaseResult {
    const BOUND: u64 = 5;
    let (_queue, p, c) = ctx.fresh().await?;
    let refresh = Duration::from_millis(200);
    let bp = BackpressureLayer::new(BOUND).refresh(refresh).layer(p);
    for i in 0..BOUND {
        send(&bp, Message::new(format!("m{i}"))).await?;
    }
    expect_kind(
        "send past the bound",
        ferrymq_core::Producer::send(&bp, Message::new("one too many")).await,
        ErrorKind::QueueFull,
    )?;
    let probe = &bp;
    expect_depth(
        "nothing enqueued past the bound",
        crate::support::depth(BOUND, 0, 0),
        ctx.prompt(),
        || async move { ferrymq_core::Producer::depth(probe).await },
    )
    .await?;
    // Consumers catch up by two; after a refresh there is room for two.
    for d in receive_n(&*c, 2, ctx.prompt()).await? {
        d.ack().await?;
    }
    let deadline = Instant::now() + ctx.prompt();
    let mut sent = 0;
    while sent < 2 {
        match ferrymq_core::Producer::send(&bp, Message::new(format!("again{sent}"))).await {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == ErrorKind::QueueFull && Instant::now() < deadline => {
                tokio::time::sleep(refresh / 2).await;
            }
            Err(e) => return Err(Failure::new(format!("send after the drain: {e}"))),
        }
    }
    expect_kind(
        "send past the bound again",
        ferrymq_core::Producer::send(&bp, Message::new("over again")).await,
        ErrorKind::QueueFull,
    )?;
    Ok(())
}

/// With a worker running 8 handlers at once and `ordered_by_key`, each key's
/// messages are handled in send order while different keys run in parallel. Every
/// handler succeeds: no retry, so this holds for `Ordering::PerKeyPipelined` too (the
/// backend hands a key's messages out in order, several at a time, and the worker
/// runs one per key at a time). With retries see
/// [`per_key_order_with_concurrency_8_and_retries`].
pub async fn per_key_order_with_concurrency_8(ctx: &Context) -> CaseResult {
    worker_key_order(ctx, false).await
}

/// As [`per_key_order_with_concurrency_8`], but about one handler in four fails on its
/// message's first attempt (the worker nacks it): the successful handling of each
/// key is still in send order, as `Ordering::PerKey` promises a nacked message is
/// delivered again before any later message of its key. Not for
/// `Ordering::PerKeyPipelined`, where a retry goes behind later messages of its key.
pub async fn per_key_order_with_concurrency_8_and_retries(ctx: &Context) -> CaseResult {
    worker_key_order(ctx, true).await
}

async fn worker_key_order(ctx: &Context, retries: bool) -> CaseResult {
    const KEYS: usize = 8;
    const PER_KEY: usize = 10;
    let (_queue, p, c) = ctx.fresh().await?;
    let mut messages = Vec::new();
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            messages.push(Message::new(format!("{seq}")).key(format!("key-{k}")));
        }
    }
    send_all(&*p, messages).await?;
    let log: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let failed_once: Arc<Mutex<std::collections::HashSet<(String, usize)>>> = Arc::default();
    let (log2, failed2) = (log.clone(), failed_once.clone());
    let handler = handler_fn(move |d: Delivery| {
        let (log, failed) = (log2.clone(), failed2.clone());
        async move {
            let seq: usize = text(&d).parse()?;
            let key = d.key().unwrap_or_default().to_string();
            let k: u64 = key.trim_start_matches("key-").parse().unwrap_or(0);
            // Uneven durations: without ordering, later messages would overtake.
            let ms = 5 * ((seq as u64 * 7 + k * 13) % 10 + 1);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if retries
                && (seq as u64 * 3 + k) % 4 == 1
                && failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((key.clone(), seq))
            {
                return Err::<(), BoxError>(format!("{key}/{seq}: first attempt fails").into());
            }
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((key, seq));
            Ok::<(), BoxError>(())
        }
    });
    let mut worker = Running::start(
        Worker::new(c)
            .concurrency(8)
            .prefetch(16)
            .ordered_by_key(true),
        handler,
    );
    worker
        .until("all handled", ctx.prompt() * 2, |es| {
            count(es, |o| *o == Outcome::Succeeded) == KEYS * PER_KEY
        })
        .await?;
    let summary = worker.stop().await?;
    ensure!(
        summary.succeeded as usize == KEYS * PER_KEY,
        "summary: {summary}"
    );
    let failures = failed_once.lock().unwrap_or_else(|e| e.into_inner()).len();
    if retries {
        ensure!(
            failures > 0,
            "no handler failed: the retries were not exercised"
        );
        ensure!(
            summary.failed as usize == failures,
            "{failures} first attempts failed, summary: {summary}"
        );
    }
    let log = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut next: HashMap<&str, usize> = HashMap::new();
    for (key, seq) in &log {
        let expected = next.entry(key).or_default();
        ensure!(
            seq == expected,
            "key {key}: handled message {seq} when {expected} was next"
        );
        *expected += 1;
    }
    Ok(())
}

/// A worker with the default settings but `concurrency(1)` and a handler taking a
/// tenth of the visibility timeout: every message handled exactly once, the queue
/// empty at the end. See [`slow_handler_worker_handles_each_once_c4`].
pub async fn slow_handler_worker_handles_each_once_c1(ctx: &Context) -> CaseResult {
    slow_handler_each_once(ctx, 1).await
}

/// A worker with the default settings but `concurrency(4)`, whose handlers are slow
/// enough that a prefetch of 32 (below every default: 128 and up, 512 on backends
/// with large receive batches) would keep deliveries waiting for twice the
/// visibility timeout: every message is handled exactly once, and the queue is empty
/// at the end.
///
/// A worker that prefetches by count alone starts deliveries whose lease already ran
/// out; the broker has handed them out again meanwhile, so they are handled twice
/// (and their acks fail). The worker must bound its prefetch by time and never start
/// a delivery with too little lease left (it gives those back unstarted).
pub async fn slow_handler_worker_handles_each_once_c4(ctx: &Context) -> CaseResult {
    slow_handler_each_once(ctx, 4).await
}

async fn slow_handler_each_once(ctx: &Context, concurrency: usize) -> CaseResult {
    /// Below the Worker's default prefetch at any concurrency, so the case can fail
    /// whatever the default is: a larger prefetch only waits longer.
    const DEFAULT_PREFETCH: u32 = 32;
    let visibility = ctx
        .visibility()
        .ok_or_else(|| Failure::new("needs a visibility timeout"))?;
    let c = u32::try_from(concurrency).unwrap_or(u32::MAX);
    // Slow enough that a full default prefetch waits twice the visibility timeout
    // for a handler slot, and at least a tenth of the timeout.
    let handler_time = (visibility / 10).max(visibility.saturating_mul(2 * c) / DEFAULT_PREFETCH);
    ensure!(
        handler_time.saturating_mul(DEFAULT_PREFETCH) / c > visibility,
        "the case cannot fail: {DEFAULT_PREFETCH} x {handler_time:?} / {c} is within {visibility:?}"
    );
    // Fewer messages on slow backends: about 20 s of handler time in all.
    let budget = Duration::from_secs(20);
    let n = ((budget.as_secs_f64() * f64::from(c) / handler_time.as_secs_f64()) as usize)
        .clamp(20, 100);
    let (queue, p, consumer) = ctx.fresh().await?;
    let chunk = ctx.caps().max_batch.clamp(1, 100);
    let messages: Vec<Message> = (0..n).map(|i| Message::new(format!("m{i:03}"))).collect();
    for batch in messages.chunks(chunk) {
        send_all(&*p, batch.to_vec()).await?;
    }
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let runs2 = runs.clone();
    let handler = handler_fn(move |d: Delivery| {
        let runs = runs2.clone();
        async move {
            *runs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(text(&d))
                .or_default() += 1;
            tokio::time::sleep(handler_time).await;
            Ok::<(), BoxError>(())
        }
    });
    let mut worker = Running::start(Worker::new(consumer).concurrency(concurrency), handler);
    let expected = handler_time.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX)) / c;
    let within = expected
        .saturating_mul(3)
        .saturating_add(visibility.saturating_mul(2))
        .saturating_add(ctx.prompt());
    let waited = worker
        .until("every message handled", within, |es| {
            count(es, |o| *o == Outcome::Succeeded) >= n
        })
        .await;
    let summary = worker.stop().await?;
    let runs = runs.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let twice: Vec<(&String, &u32)> = {
        let mut v: Vec<_> = runs.iter().filter(|(_, r)| **r > 1).collect();
        v.sort();
        v
    };
    ensure!(
        twice.is_empty(),
        "{} of {n} messages were handled more than once (handler {handler_time:?}, \
         visibility {visibility:?}, concurrency {concurrency}; first: {:?}); worker: {summary}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    waited?;
    ensure!(
        runs.len() == n,
        "{} of {n} messages were handled; worker: {summary}",
        runs.len()
    );
    ensure!(
        summary.succeeded as usize == n,
        "the worker reports {} successes for {n} messages: {summary}",
        summary.succeeded
    );
    let last = ctx.consumer(&queue).await?;
    expect_none(
        &*last,
        visibility + ctx.slack(),
        "every message was handled and acked",
    )
    .await?;
    if ctx.caps().depth.is_available() {
        expect_depth(
            "the queue after the worker",
            crate::support::depth(0, 0, 0),
            ctx.depth_bound(),
            || last.depth(),
        )
        .await?;
    }
    Ok(())
}
