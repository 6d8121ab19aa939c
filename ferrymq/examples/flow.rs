//! Flows: the article's invoice → email chain — an email job that runs only after
//! its order's invoice and PDF jobs completed, with their results.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - no email job is on its queue before both of its children completed: the
//!   email worker starts only once the invoice worker is done, and finds the
//!   emails queue holding exactly one parent per healthy order;
//! - each email job reads its children's results (the invoice number and the PDF's
//!   name) from its delivery — they are what the invoice worker returned;
//! - each healthy order gets exactly one email;
//! - the poison order's invoice is dead-lettered, so its email is never sent and
//!   its flow is recorded `dead_lettered` with the child's error (policy
//!   `fail_parent`, the default).
//!
//! What holds under a worker kill -9 (tested in ferrymq-core and
//! backend-redis/tests/jobs.rs): a child is acked only after its result is recorded
//! and, if it was the last, the parent was sent; a kill in between redelivers the
//! child, whose rerun completes the flow, and the parent's dedup id (its flow id)
//! makes a second send a no-op on queues that deduplicate (memory, Redis, SQS FIFO).
//!
//! ```text
//! cargo run -p ferrymq --example flow
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-orders?visibility=5s' \
//!     cargo run -p ferrymq --features redis --example flow
//! ```

mod support;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq::jobs::{
    self, json_job_handler, Flow, JobMessage, JobState, JobStore, Keep, MemoryJobStore,
    TrackJobsLayer,
};
use ferrymq::middleware::{json_handler, Backoff, RetryToDlqLayer};
use ferrymq::{BoxError, Consumer, Delivery, ErrorKind, Message, Producer, Worker};
use serde::{Deserialize, Serialize};
use support::Checks;
use tower::ServiceBuilder;

const ORDERS: u64 = 4;
const POISON: u64 = 3;

/// A job of the invoices queue.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Work {
    Invoice { order: u64, currency: String },
    Pdf { order: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
struct Email {
    order: u64,
    to: String,
}

async fn store_for(config: &ferrymq::Config) -> ferrymq::Result<Box<dyn JobStore>> {
    match ferrymq::job_store(config).await {
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            println!(
                "  ({}: flows recorded in this process's memory)",
                e.message()
            );
            Ok(Box::new(MemoryJobStore::named(config.queue())))
        }
        other => other,
    }
}

/// Run `worker` with `service` until `done` deliveries were reported (or patience
/// ran out).
async fn drain<C, S>(
    worker: Worker<C>,
    service: S,
    done: usize,
    patience: Duration,
) -> ferrymq::Result<()>
where
    C: Consumer + 'static,
    S: tower::Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    let mut events = worker.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(service, async {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + patience;
    let mut finished = 0;
    while finished < done {
        let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv()).await else {
            break;
        };
        if matches!(
            event.outcome,
            ferrymq::middleware::Outcome::Succeeded | ferrymq::middleware::Outcome::DeadLettered
        ) {
            finished += 1;
        }
    }
    let _ = stop.send(());
    match running.await {
        Ok(summary) => println!("  worker: {}", summary?),
        Err(e) => {
            return Err(ferrymq::Error::new(
                ErrorKind::Backend,
                format!("worker failed: {e}"),
            ))
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ferrymq::Result<ExitCode> {
    let base = support::base_config("memory://example-orders?visibility=1s")?;
    let run = support::run_id();
    let invoices_q = support::queue(&base, &format!("flow-{run}-invoices"))?;
    let emails_q = support::queue(&base, &format!("flow-{run}-emails"))?;
    let dlq_q = support::queue(&base, &format!("flow-{run}-dlq"))?;
    let (invoices_out, invoices_in) = invoices_q.connect().await?;
    let (emails_out, emails_in) = emails_q.connect().await?;
    let dlq = dlq_q.producer().await?;
    println!(
        "flow example on {} (invoices {}, emails {})",
        invoices_out.capabilities().backend,
        invoices_out.queue(),
        emails_out.queue()
    );
    let visibility = invoices_in
        .capabilities()
        .visibility_timeout
        .unwrap_or(Duration::from_secs(1));
    let patience = support::patience(visibility);
    // Flows live in the invoices queue's job store; the email worker needs none.
    let store: Arc<dyn JobStore> = Arc::from(store_for(&invoices_q).await?);

    println!("\n1. one flow per order: email-N waits for invoice-N and pdf-N");
    for order in 1..=ORDERS {
        let currency = if order == POISON { "XXX" } else { "EUR" };
        let email = Email {
            order,
            to: format!("customer-{order}@example.com"),
        };
        Flow::new(
            format!("email-{order}"),
            emails_out.queue(),
            Message::json(&email)?,
        )
        .child(
            &*invoices_out,
            Message::json(&Work::Invoice {
                order,
                currency: currency.into(),
            })?
            .job_id(format!("invoice-{order}")),
        )
        .child(
            &*invoices_out,
            Message::json(&Work::Pdf { order })?.job_id(format!("pdf-{order}")),
        )
        .add(&*store)
        .await?;
    }
    let emails_before = emails_in.depth().await?.total();
    println!("  emails queued before any child ran: {emails_before}");

    println!("\n2. the invoice worker runs the children (order {POISON}'s currency is rejected):");
    let service = ServiceBuilder::new()
        .layer(
            TrackJobsLayer::new(store.clone())
                .keep_completed(Keep::Count(100))
                .keep_failed(Keep::Count(100))
                .flows(emails_out),
        )
        .layer(
            RetryToDlqLayer::new(dlq)
                .max_attempts(2)
                .backoff(Backoff::new(Duration::from_millis(100))),
        )
        .service(json_job_handler(|work: Work, _d: Delivery| async move {
            match work {
                Work::Invoice { currency, order } if currency == "XXX" => {
                    Err::<serde_json::Value, BoxError>(
                        format!("order {order}: currency XXX is not supported").into(),
                    )
                }
                Work::Invoice { order, .. } => {
                    Ok(serde_json::json!({ "number": format!("INV-{}", 1000 + order) }))
                }
                Work::Pdf { order } => {
                    Ok(serde_json::json!({ "file": format!("invoice-{order}.pdf") }))
                }
            }
        }));
    // Two children per order; the poison invoice is dead-lettered.
    drain(
        Worker::new(invoices_in)
            .concurrency(4)
            .poll_wait(Duration::from_millis(200))
            .depth_interval(None),
        service,
        (2 * ORDERS) as usize,
        patience,
    )
    .await?;
    let emails_after_children = emails_in.depth().await?.total();
    println!("  emails queued now: {emails_after_children}");

    println!("\n3. the email worker sends each email with its children's results:");
    let sent: Arc<Mutex<BTreeMap<u64, Vec<String>>>> = Arc::default();
    let log = sent.clone();
    let email_service = json_handler(move |email: Email, d: Delivery| {
        let log = log.clone();
        async move {
            let kids = jobs::children(&d)?;
            let invoice: serde_json::Value = kids.get(&format!("invoice-{}", email.order))?;
            let pdf: serde_json::Value = kids.get(&format!("pdf-{}", email.order))?;
            let line = format!(
                "to {} — invoice {} attached as {}",
                email.to, invoice["number"], pdf["file"]
            );
            println!("  email-{}: {line}", email.order);
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(email.order)
                .or_default()
                .push(line);
            Ok::<_, BoxError>(())
        }
    });
    drain(
        Worker::new(emails_in)
            .concurrency(2)
            .poll_wait(Duration::from_millis(200))
            .depth_interval(None),
        email_service,
        (ORDERS - 1) as usize,
        patience,
    )
    .await?;

    let sent = sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let flow_failed = store.get(&format!("email-{POISON}")).await?;
    let counts = store.counts().await?;
    println!(
        "\n4. job counts (invoices store): completed {}  dead-lettered {}",
        counts.completed, counts.dead_lettered
    );

    let mut checks = Checks::new();
    println!();
    checks.check(
        emails_before == 0,
        "no email is queued before its children ran",
    );
    checks.check(
        emails_after_children == ORDERS - 1,
        format!(
            "after the children, one email per healthy order is queued ({emails_after_children})"
        ),
    );
    for order in (1..=ORDERS).filter(|o| *o != POISON) {
        let lines = sent.get(&order).cloned().unwrap_or_default();
        let expected = format!(
            "to customer-{order}@example.com — invoice \"INV-{}\" attached as \"invoice-{order}.pdf\"",
            1000 + order
        );
        checks.check(
            lines == [expected.clone()],
            format!("order {order}: exactly one email, with its children's results ({lines:?})"),
        );
    }
    checks.check(
        !sent.contains_key(&POISON),
        format!("order {POISON}: no email"),
    );
    checks.check(
        flow_failed.as_ref().is_some_and(|r| {
            r.state == JobState::DeadLettered
                && r.failure
                    .as_deref()
                    .unwrap_or("")
                    .contains("currency XXX is not supported")
        }),
        format!("email-{POISON} is recorded dead_lettered with its invoice's error"),
    );
    checks.check(
        counts.completed == 2 * ORDERS - 1 && counts.dead_lettered == 2,
        format!(
            "counts: {} children completed, the poison invoice and its email dead-lettered",
            2 * ORDERS - 1
        ),
    );

    support::delete_queues(&[&invoices_q, &emails_q, &dlq_q]).await;
    Ok(checks.exit_code())
}
