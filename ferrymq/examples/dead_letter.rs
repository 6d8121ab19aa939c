//! Retry, dead-letter, inspect, redrive: the life of a poison message.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - a message whose handler keeps failing is retried with backoff (the broker
//!   redelivers it later; the other messages are handled meanwhile) and, after
//!   `max_attempts` (3), moved to the dead-letter queue: published there *before* it is
//!   acked in the source queue, so a crash can leave it in both, never in neither;
//! - the dead-lettered copy has the original payload plus the reserved headers
//!   `ferrymq-failure-reason`, `ferrymq-origin-queue`, `ferrymq-attempts`,
//!   `ferrymq-first-failure-at` and `ferrymq-dead-lettered-at`;
//! - redrive — send it back to the source queue, then ack it in the DLQ only once the
//!   send succeeded (at-least-once, exactly what `ferry dlq redrive` does) — brings
//!   it back with a fresh attempt count; once the bug is fixed it succeeds on attempt
//!   1 and both queues end empty.
//!
//! ```text
//! cargo run -p ferrymq --example dead_letter
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-orders?visibility=5s' \
//!     cargo run -p ferrymq --features redis --example dead_letter
//! ```

mod support;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrymq::middleware::{json_handler, Backoff, Outcome, RetryToDlqLayer};
use ferrymq::worker::Worker;
use ferrymq::{reserved, BoxError, Consumer, Delivery, Error, ErrorKind, Message, Producer};
use serde::{Deserialize, Serialize};
use support::Checks;
use tokio::sync::oneshot;
use tower::Layer;

const MAX_ATTEMPTS: u32 = 3;
const POISON: u32 = 3;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Order {
    id: u32,
    currency: String,
}

/// The invoicing service — with a bug: it rejects currency `XXX` until `fixed` is set.
fn handler(
    fixed: Arc<AtomicBool>,
) -> impl tower::Service<Delivery, Response = (), Error = BoxError, Future = impl Send + 'static>
       + Clone
       + Send
       + 'static {
    json_handler(move |order: Order, _delivery: Delivery| {
        let fixed = fixed.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if order.currency == "XXX" && !fixed.load(Ordering::SeqCst) {
                return Err::<(), BoxError>(
                    format!("currency {} is not supported", order.currency).into(),
                );
            }
            Ok(())
        }
    })
}

/// Run a worker on `queue` until `expected` deliveries reached a final outcome (or the
/// deadline); print each event; return the final outcomes as (order id, outcome, attempt).
async fn work(
    queue: &ferrymq::Config,
    dlq: Arc<dyn Producer>,
    fixed: Arc<AtomicBool>,
    expected: usize,
) -> ferrymq::Result<Vec<(u32, Outcome, u32)>> {
    let consumer = queue.consumer().await?;
    let visibility = consumer
        .capabilities()
        .visibility_timeout
        .unwrap_or(Duration::from_secs(1));
    let service = RetryToDlqLayer::from_arc(dlq.clone())
        .max_attempts(MAX_ATTEMPTS)
        .backoff(Backoff::new(Duration::from_millis(100)))
        .layer(handler(fixed));
    let worker = Worker::new(consumer)
        .concurrency(2)
        .poll_wait(Duration::from_millis(200))
        .depth_interval(None)
        .flush_on_shutdown(dlq);
    let mut events = worker.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(service, async {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + support::patience(visibility);
    let mut finals = Vec::new();
    while finals.len() < expected {
        let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv()).await else {
            break;
        };
        let id = event.message().decode_json::<Order>().map_or(0, |o| o.id);
        println!(
            "  order {id}  attempt {}  {:<13} {}",
            event.attempt(),
            event.outcome.to_string(),
            event.error.as_deref().unwrap_or("")
        );
        if matches!(event.outcome, Outcome::Succeeded | Outcome::DeadLettered) {
            finals.push((id, event.outcome, event.attempt()));
        }
    }
    let _ = stop.send(());
    match running.await {
        Ok(summary) => println!("  worker: {}", summary?),
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("worker failed: {e}"),
            ))
        }
    }
    Ok(finals)
}

#[tokio::main]
async fn main() -> ferrymq::Result<ExitCode> {
    let base = support::base_config("memory://example-orders?visibility=1s")?;
    let run = support::run_id();
    let orders_queue = support::queue(&base, &format!("dl-{run}"))?;
    let dlq_queue = support::queue(&base, &format!("dl-{run}-dlq"))?;
    let orders = orders_queue.producer().await?;
    let (dlq_out, dlq_in) = dlq_queue.connect().await?;
    let dlq_out: Arc<dyn Producer> = Arc::from(dlq_out);
    let fixed = Arc::new(AtomicBool::new(false));
    println!(
        "dead-letter example on {} (queue {}, DLQ {})",
        orders.capabilities().backend,
        orders.queue(),
        dlq_out.queue()
    );

    let poison = Order {
        id: POISON,
        currency: "XXX".into(),
    };
    for id in 1..=4 {
        let order = if id == POISON {
            Order {
                id,
                currency: poison.currency.clone(),
            }
        } else {
            Order {
                id,
                currency: "EUR".into(),
            }
        };
        orders
            .send(Message::json(&order)?.header("tenant", "acme"))
            .await?;
    }
    println!("sent orders 1..=4; order {POISON} has currency XXX, which the handler rejects\n");

    println!("1. the worker retries order {POISON} with backoff, then dead-letters it:");
    let first = work(&orders_queue, dlq_out.clone(), fixed.clone(), 4).await?;

    println!("\n2. the dead-letter queue holds:");
    let dead = dlq_in.receive(10, Duration::from_secs(5)).await?;
    for d in &dead {
        println!("  {}", String::from_utf8_lossy(d.payload()));
        for (name, value) in d.headers().iter() {
            println!("    {name:<28} {value}");
        }
    }
    let header = |name: &str| {
        dead.first()
            .and_then(|d| d.headers().get(name))
            .unwrap_or("")
            .to_string()
    };
    let reason = header(reserved::FAILURE_REASON);
    let origin = header(reserved::ORIGIN_QUEUE);
    let attempts = header(reserved::ATTEMPTS);
    let first_failure = header(reserved::FIRST_FAILURE_AT);
    let dead_lettered = header(reserved::DEAD_LETTERED_AT);
    let dead_payload_ok = dead
        .first()
        .and_then(|d| d.json::<Order>().ok())
        .is_some_and(|o| o == poison);
    let user_header_kept = header("tenant") == "acme";

    println!(
        "\n3. the bug is fixed; redrive: send back to {}, then ack in the DLQ",
        orders.queue()
    );
    fixed.store(true, Ordering::SeqCst);
    let mut redriven = 0;
    for d in &dead {
        let mut message = d.message().clone();
        // The backend's own attempt counter (where it keeps one in a header) restarts.
        message.headers_mut().remove(reserved::ATTEMPT);
        let receipt = orders.send(message).await?;
        d.ack().await?; // only after the send succeeded: at-least-once
        println!(
            "  moved {} -> {} (new id {})",
            d.id(),
            orders.queue(),
            receipt.id()
        );
        redriven += 1;
    }

    println!("\n4. the worker handles the redriven order:");
    let second = work(&orders_queue, dlq_out.clone(), fixed.clone(), 1).await?;

    // SQS counts receives, not deliveries (`ApproximateReceiveCount`): a receive whose
    // answer came after its consumer closed counts too, so there the redriven copy's
    // first handling may say attempt 2. Exact counters must say 1.
    let approximate = orders.capabilities().attempts == ferrymq::Attempts::Approximate;
    let second_ok = match second.as_slice() {
        [(order, Outcome::Succeeded, attempt)] if *order == POISON => {
            *attempt == 1 || (approximate && *attempt <= 2)
        }
        _ => false,
    };
    let approx_note = if approximate {
        " (or 2: the backend's attempts are approximate)"
    } else {
        ""
    };
    let orders_depth = orders.depth().await?;
    let dlq_depth = dlq_in.depth().await?;
    orders.close().await?;
    dlq_out.close().await?;
    dlq_in.close().await?;
    support::delete_queues(&[&orders_queue, &dlq_queue]).await;

    println!();
    let mut checks = Checks::new();
    let good_first = first
        .iter()
        .filter(|(id, o, _)| *id != POISON && *o == Outcome::Succeeded)
        .count();
    let poison_first: Vec<_> = first.iter().filter(|(id, _, _)| *id == POISON).collect();
    checks.check(
        good_first == 3,
        "the three good orders succeeded (retries of the poison one wait in the broker, not in the worker)",
    );
    checks.check(
        poison_first.len() == 1
            && poison_first[0].1 == Outcome::DeadLettered
            && poison_first[0].2 == MAX_ATTEMPTS,
        format!("order {POISON} was dead-lettered on attempt {MAX_ATTEMPTS}"),
    );
    checks.check(
        dead.len() == 1 && dead_payload_ok && user_header_kept,
        "the DLQ holds exactly that message, payload and headers intact",
    );
    checks.check(
        reason.contains("currency XXX is not supported"),
        format!("{} says why: {reason:?}", reserved::FAILURE_REASON),
    );
    checks.check(
        origin == orders.queue(),
        format!(
            "{} names the source queue: {origin:?}",
            reserved::ORIGIN_QUEUE
        ),
    );
    checks.check(
        attempts == MAX_ATTEMPTS.to_string(),
        format!("{} = {attempts:?}", reserved::ATTEMPTS),
    );
    // RFC 3339 UTC with milliseconds: text order is time order.
    checks.check(
        !first_failure.is_empty() && !dead_lettered.is_empty() && first_failure <= dead_lettered,
        format!("first failure {first_failure} <= dead-lettered {dead_lettered}"),
    );
    checks.check(
        redriven == 1 && second_ok,
        format!("after the redrive order {POISON} succeeded on attempt 1{approx_note}"),
    );
    checks.check(
        orders_depth.total() == 0 && dlq_depth.total() == 0,
        format!(
            "both queues are empty (source {}, DLQ {})",
            orders_depth.total(),
            dlq_depth.total()
        ),
    );
    Ok(checks.exit_code())
}
