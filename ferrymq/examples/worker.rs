//! A `Worker` with the recommended middleware stack, five handlers at a time, shut down
//! gracefully once every message is settled; prints the `WorkerSummary`.
//!
//! The stack, outermost first: `ExtendVisibility` (heartbeat keeping the lease),
//! `Dedup` (skip what was already handled), `RetryToDlq` (nack with backoff, dead-letter
//! at the end), `CatchPanic` (a panic is an error, not a dead worker), tower's `Timeout`.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - every order is handled to success exactly once, although one is sent twice
//!   (`Dedup` acks the copy without calling the handler);
//! - a handler panic fails only that delivery: it is caught, retried after a backoff,
//!   and succeeds on attempt 2, while the other orders keep flowing;
//! - a job running 1.5× the visibility timeout keeps its lease (the heartbeat extends
//!   it): it is not redelivered to a second handler meanwhile, and it finishes on
//!   attempt 1;
//! - never more than 5 handlers run at once;
//! - graceful shutdown: the worker stops receiving, lets running handlers finish,
//!   flushes, and leaves the queue empty — nothing in flight, nothing lost.
//!
//! ```text
//! cargo run -p ferrymq --example worker
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-orders?visibility=5s' \
//!     cargo run -p ferrymq --features redis --example worker
//! ```

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq::middleware::{
    json_handler, Backoff, CatchPanicLayer, DedupLayer, ExtendVisibilityLayer, MemoryDedupStore,
    Outcome, RetryToDlqLayer,
};
use ferrymq::worker::Worker;
use ferrymq::{BoxError, Consumer, Delivery, Message, Producer};
use serde::{Deserialize, Serialize};
use support::Checks;
use tokio::sync::{broadcast, oneshot};
use tower::ServiceBuilder;

const ORDERS: u32 = 20;
const CONCURRENCY: usize = 5;
/// Panics on its first attempt.
const PANICS: u32 = 7;
/// Runs for 1.5× the visibility timeout.
const SLOW: u32 = 13;
/// Sent twice.
const DUPLICATE: u32 = 3;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u32,
    amount_cents: u64,
}

/// What the handler saw, to check the guarantees against.
#[derive(Debug, Default)]
struct Seen {
    running: usize,
    max_running: usize,
    /// Order id -> handler calls started.
    started: HashMap<u32, u32>,
    /// Order id -> (successful completions, attempt of the last one).
    completed: HashMap<u32, (u32, u32)>,
}

/// Counts a handler as running until dropped — also when it panics.
struct Running(Arc<Mutex<Seen>>);

impl Running {
    fn start(seen: &Arc<Mutex<Seen>>, id: u32) -> Running {
        let mut s = lock(seen);
        s.running += 1;
        s.max_running = s.max_running.max(s.running);
        *s.started.entry(id).or_default() += 1;
        Running(seen.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        lock(&self.0).running -= 1;
    }
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

#[tokio::main]
async fn main() -> ferrymq::Result<ExitCode> {
    // The simulated panic is expected: print it as one line, without a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(non-string panic)");
        eprintln!("  (a handler panicked: {message})");
    }));
    let base = support::base_config("memory://example-orders?visibility=1s")?;
    let run = support::run_id();
    let orders_queue = support::queue(&base, &format!("worker-{run}"))?;
    let dlq_queue = support::queue(&base, &format!("worker-{run}-dlq"))?;
    let (producer, consumer) = orders_queue.connect().await?;
    let dlq: Arc<dyn Producer> = Arc::from(dlq_queue.producer().await?);
    let caps = consumer.capabilities().clone();
    let visibility = caps.visibility_timeout.unwrap_or(Duration::from_secs(1));
    let slow_for = visibility * 3 / 2;
    println!(
        "worker example on {} (queue {}, visibility timeout {visibility:?})",
        caps.backend,
        producer.queue()
    );

    for id in 1..=ORDERS {
        let order = Order {
            id,
            amount_cents: 1_000 * u64::from(id),
        };
        producer.send(Message::json(&order)?).await?;
    }
    // A client retried a send that had in fact gone through: same content again.
    let again = Order {
        id: DUPLICATE,
        amount_cents: 1_000 * u64::from(DUPLICATE),
    };
    producer.send(Message::json(&again)?).await?;
    let sent = ORDERS + 1;
    println!(
        "sent {sent} messages: orders 1..={ORDERS}, order {DUPLICATE} twice; order {PANICS} \
         panics on attempt 1, order {SLOW} takes {slow_for:?}\n"
    );

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        json_handler(move |order: Order, delivery: Delivery| {
            let seen = seen.clone();
            async move {
                let _running = Running::start(&seen, order.id);
                if order.id == PANICS && delivery.attempt() == 1 {
                    panic!("simulated bug while handling order {}", order.id);
                }
                let work = if order.id == SLOW {
                    slow_for
                } else {
                    Duration::from_millis(20 + u64::from(order.id % 5) * 10)
                };
                tokio::time::sleep(work).await;
                let mut s = lock(&seen);
                let done = s.completed.entry(order.id).or_default();
                done.0 += 1;
                done.1 = delivery.attempt();
                Ok::<(), BoxError>(())
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(ExtendVisibilityLayer::from_capabilities(&caps))
        .layer(
            // Each order's payload carries its id, so its content names it: content
            // hashing (an opt-in) catches the re-sent copy, which has no dedup id.
            DedupLayer::new(MemoryDedupStore::new(Duration::from_secs(3600)))
                .content_hash(true)
                .retry_in_progress_after(Duration::from_millis(200)),
        )
        .layer(
            RetryToDlqLayer::from_arc(dlq.clone())
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_millis(100))),
        )
        .layer(CatchPanicLayer::new())
        .timeout(visibility * 3)
        .service(handler);

    let worker = Worker::new(consumer)
        .concurrency(CONCURRENCY)
        .poll_wait(Duration::from_millis(200))
        .shutdown_timeout(visibility * 3)
        .depth_interval(None)
        .flush_on_shutdown(dlq.clone());
    let mut events = worker.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(service, async {
        let _ = stopped.await;
    }));

    // Watch the events; once every message sent has a final outcome, shut down.
    let mut settled = 0;
    let mut deliveries_of_slow = 0;
    let deadline = tokio::time::Instant::now() + support::patience(visibility);
    let mut timed_out = false;
    while settled < sent {
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => {
                timed_out = true;
                break;
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) => break,
            Ok(Ok(e)) => e,
        };
        let id = event
            .message()
            .decode_json::<Order>()
            .map_or(0, |o: Order| o.id);
        let error = event.error.as_deref().unwrap_or("");
        if id == SLOW {
            deliveries_of_slow += 1;
        }
        match event.outcome {
            Outcome::Succeeded | Outcome::Deduplicated | Outcome::DeadLettered => settled += 1,
            _ => {}
        }
        println!(
            "  order {id:>2}  attempt {}  {:<13} {:>5} ms  {error}",
            event.attempt(),
            event.outcome.to_string(),
            event.elapsed.as_millis()
        );
    }
    println!("\nall {settled} messages settled; shutting down gracefully");
    let _ = stop.send(());
    let summary = match running.await {
        Ok(result) => result?,
        Err(e) => {
            return Err(ferrymq::Error::new(
                ferrymq::ErrorKind::Backend,
                format!("worker task failed: {e}"),
            ))
        }
    };
    let depth = producer.depth().await?;
    println!("summary: {summary}");
    println!(
        "queue after shutdown: waiting {}, in flight {}, delayed {}\n",
        depth.waiting, depth.in_flight, depth.delayed
    );
    producer.close().await?;
    dlq.close().await?;
    support::delete_queues(&[&orders_queue, &dlq_queue]).await;

    let seen = lock(&seen);
    let mut checks = Checks::new();
    checks.check(!timed_out, "every message settled within the deadline");
    let once = (1..=ORDERS).all(|id| seen.completed.get(&id).map(|c| c.0) == Some(1));
    checks.check(
        once && seen.completed.len() == ORDERS as usize,
        format!("each of the {ORDERS} orders handled to success exactly once"),
    );
    checks.check(
        summary.succeeded == u64::from(ORDERS) && summary.deduplicated == 1,
        format!(
            "the duplicate send was acked without calling the handler (succeeded {}, deduplicated {})",
            summary.succeeded, summary.deduplicated
        ),
    );
    checks.check(
        summary.panics == 1
            && summary.retried >= 1
            && seen.completed.get(&PANICS).map(|c| c.1) == Some(2),
        format!(
            "the panic was caught and order {PANICS} succeeded on attempt 2 (panics {})",
            summary.panics
        ),
    );
    checks.check(
        deliveries_of_slow == 1
            && seen.started.get(&SLOW) == Some(&1)
            && seen.completed.get(&SLOW).map(|c| c.1) == Some(1),
        format!(
            "order {SLOW} ({slow_for:?}, longer than the {visibility:?} lease) kept its lease: \
             delivered once ({deliveries_of_slow}), done on attempt 1"
        ),
    );
    checks.check(
        seen.max_running <= CONCURRENCY && seen.max_running > 1,
        format!(
            "at most {CONCURRENCY} handlers at once (peak {})",
            seen.max_running
        ),
    );
    checks.check(
        summary.dead_lettered == 0
            && summary.failed == 0
            && summary.released == 0
            && summary.abandoned == 0
            && summary.received == summary.settled(),
        "nothing failed, dead-lettered, released or abandoned; every delivery accounted for",
    );
    checks.check(
        depth.total() == 0,
        "the queue is empty after shutdown (nothing lost, nothing left in flight)",
    );
    Ok(checks.exit_code())
}
