//! `ferry demo`: the order pipeline from "Message Queue Patterns" end to end.
//!
//! ```text
//! order service --orders--> invoice worker (x5) --invoices--> email worker (x2)
//!                                  \--orders-dlq (after 3 attempts, with the reason)
//! ```
//!
//! Scripted along the way: every fourth order meets a payment-gateway timeout once
//! (retried with backoff, then fine), one order times out twice (succeeds on its last
//! attempt), one order has a currency the invoicing service rejects (poison: dead-
//! lettered after 3 attempts with its reason), and one order is sent twice by a
//! retrying client (deduplicated: invoiced once).

mod model;
mod stages;

use std::sync::Arc;
use std::time::Duration;

use ferrymq::jobs::{
    JobCounts, JobStore, Keep, MemoryJobStore, TrackJobsLayer, DEFAULT_MAX_PER_STATE,
};
use ferrymq::middleware::{BackpressureLayer, BatchingLayer, Outcome};
use ferrymq::worker::{Worker, WorkerEvent};
use ferrymq::{
    reserved, Config, Consumer, Error, ErrorKind, Message, Producer, Result, WorkerSummary,
};
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;
use tower::Layer;

use model::{money, Invoice, Order, Script};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backend URL. The demo's three queues live on its server, with its settings; the
    /// queue name in the URL (or `{queue}`) only stands for them.
    #[arg(long, default_value = "memory://{queue}?visibility=2s")]
    url: String,
    /// Orders the order service enqueues (plus one duplicate send).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(3..=100_000))]
    orders: u32,
    /// Give up on the pipeline after this long.
    #[arg(long, default_value = "60s")]
    timeout: humantime::Duration,
    /// Print only the summary.
    #[arg(long, short)]
    quiet: bool,
}

struct Clock(Instant);

impl Clock {
    fn stamp(&self) -> String {
        format!("[{:>6.2}s]", self.0.elapsed().as_secs_f64())
    }
}

/// What the progress loop tallies.
#[derive(Debug, Default)]
struct Tally {
    /// Order deliveries with a final outcome (invoiced, dead-lettered, skipped).
    orders_done: u64,
    invoiced: u64,
    emailed: u64,
    retries: u64,
    dead_lettered: Vec<String>,
    deduplicated: Vec<String>,
}

pub async fn run(args: Args) -> Result<()> {
    let clock = Clock(Instant::now());
    let n = args.orders as usize;
    let script = Script::new(n);
    let run_id = run_id();
    // `{queue}` is a placeholder for a name; with_queue then names each queue, the
    // same way on every backend. An SQS FIFO queue's name must end in `.fifo`, so
    // `sqs://{queue}.fifo` gives FIFO queues throughout.
    let base = Config::from_url(&args.url.replace("{queue}", "ferry-demo"))?;
    let fifo = if base.queue().ends_with(".fifo") {
        ".fifo"
    } else {
        ""
    };
    let name = |q: &str| format!("ferry-demo-{run_id}-{q}{fifo}");
    let orders_cfg = base.with_queue(&name("orders"))?;
    let invoices_cfg = base.with_queue(&name("invoices"))?;
    let (orders_out, orders_in) = orders_cfg.connect().await?;
    let (invoices_out, invoices_in) = invoices_cfg.connect().await?;
    let orders_jobs = job_store(&orders_cfg).await?;
    let invoices_jobs = job_store(&invoices_cfg).await?;
    let (dlq_out, dlq_in) = base.with_queue(&name("orders-dlq"))?.connect().await?;
    let dlq_out: Arc<dyn Producer> = Arc::from(dlq_out);

    println!(
        "ferry demo: the order pipeline on {} ({} orders)",
        orders_in.capabilities().backend,
        n
    );
    println!(
        "  order service --{}--> invoice worker x5 --{}--> email worker x2",
        name("orders"),
        name("invoices")
    );
    println!(
        "                        \\--> {} (after 3 attempts)",
        name("orders-dlq")
    );
    println!();

    // The invoice worker writes invoices through a batching producer (one round trip per
    // batch), flushed when the worker shuts down.
    let invoices_out: Arc<dyn Producer> = Arc::new(
        BatchingLayer::new()
            .linger(Duration::from_millis(10))
            .layer(invoices_out),
    );
    let orders_caps = orders_in.capabilities().clone();
    let invoices_caps = invoices_in.capabilities().clone();
    let invoice_worker = Worker::new(orders_in)
        .concurrency(5)
        .poll_wait(Duration::from_millis(200))
        .flush_on_shutdown(invoices_out.clone());
    let invoice_svc = stages::invoice_service(
        &orders_caps,
        dlq_out.clone(),
        keep_all(&orders_jobs),
        invoices_out,
    );
    let email_worker = Worker::new(invoices_in)
        .concurrency(2)
        .poll_wait(Duration::from_millis(200));
    let email_svc =
        stages::email_service(&invoices_caps, dlq_out.clone(), keep_all(&invoices_jobs));

    let mut invoice_events = invoice_worker.subscribe();
    let mut email_events = email_worker.subscribe();
    let (stop_invoices, invoices_stopped) = oneshot::channel::<()>();
    let (stop_emails, emails_stopped) = oneshot::channel::<()>();
    let invoice_run = tokio::spawn(invoice_worker.run_until(invoice_svc, async {
        let _ = invoices_stopped.await;
    }));
    let email_run = tokio::spawn(email_worker.run_until(email_svc, async {
        let _ = emails_stopped.await;
    }));

    // The order service: backpressure keeps it from burying a slow pipeline.
    let order_service = BackpressureLayer::new(10_000).layer(orders_out);
    for (i, order) in script.orders.iter().enumerate() {
        let message = Message::json(order)?.key(order.customer.clone());
        order_service.send(message.clone()).await?;
        if i == script.duplicate {
            // The client's HTTP call timed out after we enqueued; it retries.
            order_service.send(message).await?;
        }
    }
    let sent = n as u64 + 1;
    if !args.quiet {
        println!(
            "{} order service   enqueued {n} orders, {} sent twice by a retrying client",
            clock.stamp(),
            script.orders[script.duplicate].order_id
        );
    }

    // Progress, until every order has a final outcome and every invoice was emailed.
    let mut tally = Tally::default();
    let mut stop_invoices = Some(stop_invoices);
    let mut stop_emails = Some(stop_emails);
    let deadline = tokio::time::sleep(args.timeout.into());
    tokio::pin!(deadline);
    let mut timed_out = false;
    while stop_emails.is_some() {
        tokio::select! {
            event = invoice_events.recv() => {
                if let Some(e) = received(event) {
                    on_invoice_event(&e, &mut tally, &clock, args.quiet);
                }
            }
            event = email_events.recv() => {
                if let Some(e) = received(event) {
                    on_email_event(&e, &mut tally, &clock, args.quiet);
                }
            }
            () = &mut deadline => {
                timed_out = true;
                break;
            }
        }
        if tally.orders_done >= sent {
            if let Some(stop) = stop_invoices.take() {
                let _ = stop.send(());
            }
        }
        if stop_invoices.is_none() && tally.emailed >= tally.invoiced {
            if let Some(stop) = stop_emails.take() {
                let _ = stop.send(());
            }
        }
    }
    drop((stop_invoices, stop_emails));
    let invoice_summary = joined(invoice_run.await)?;
    let email_summary = joined(email_run.await)?;
    let elapsed = clock.0.elapsed();

    let dead = dlq_in.receive(100, Duration::from_millis(500)).await?;
    println!();
    println!("Summary ({:.2} s)", elapsed.as_secs_f64());
    println!("  orders sent      {sent:>5}  ({n} orders + 1 duplicate send)");
    println!("  invoiced         {:>5}", tally.invoiced);
    println!(
        "  retried          {:>5}  (transient failures, redelivered after a backoff)",
        tally.retries
    );
    println!(
        "  dead-lettered    {:>5}  {}",
        tally.dead_lettered.len(),
        tally.dead_lettered.join(", ")
    );
    println!(
        "  deduplicated     {:>5}  {}",
        tally.deduplicated.len(),
        tally.deduplicated.join(", ")
    );
    println!("  emails sent      {:>5}", tally.emailed);
    println!("  invoice worker   {invoice_summary}");
    println!("  email worker     {email_summary}");
    for (cfg, store) in [(&orders_cfg, &orders_jobs), (&invoices_cfg, &invoices_jobs)] {
        println!(
            "  jobs             {}: {}",
            cfg.queue(),
            job_counts(cfg, &**store).await?
        );
    }
    println!();
    println!(
        "Dead-letter queue {} ({} message{}):",
        name("orders-dlq"),
        dead.len(),
        if dead.len() == 1 { "" } else { "s" }
    );
    for d in &dead {
        let h = d.headers();
        let order: Option<Order> = d.json().ok();
        println!(
            "  {}",
            order.map_or_else(
                || "(undecodable)".to_string(),
                |o| format!(
                    "{} {} for {}",
                    o.order_id,
                    money(o.total_cents, &o.currency),
                    o.customer
                )
            )
        );
        for (label, header) in [
            ("reason", reserved::FAILURE_REASON),
            ("origin queue", reserved::ORIGIN_QUEUE),
            ("attempts", reserved::ATTEMPTS),
            ("first failure", reserved::FIRST_FAILURE_AT),
            ("dead-lettered", reserved::DEAD_LETTERED_AT),
        ] {
            println!("    {label:<14} {}", h.get(header).unwrap_or("-"));
        }
        // Leave it for inspection (`ferry receive --url <dlq url>`).
        d.nack(None).await?;
    }

    for p in [&*dlq_out] {
        p.close().await?;
    }
    order_service.close().await?;
    dlq_in.close().await?;

    // The demo checks its own story, so that it doubles as a smoke test.
    let expected_invoices = n as u64 - 1;
    let ok = !timed_out
        && tally.invoiced == expected_invoices
        && tally.emailed == expected_invoices
        && tally.dead_lettered == [script.orders[script.poison].order_id.clone()]
        && tally.deduplicated == [script.orders[script.duplicate].order_id.clone()]
        && dead.len() == 1
        && dead[0].headers().get(reserved::ATTEMPTS) == Some("3");
    if ok {
        println!();
        println!("ok: every order invoiced and emailed once, the poison order dead-lettered with its reason, the duplicate skipped.");
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Backend,
            format!(
                "demo check failed{}: invoiced {} (expected {expected_invoices}), emailed {}, dead-lettered {}, deduplicated {}, in DLQ {}",
                if timed_out { " (timed out)" } else { "" },
                tally.invoiced,
                tally.emailed,
                tally.dead_lettered.len(),
                tally.deduplicated.len(),
                dead.len()
            ),
        ))
    }
}

fn received(
    event: std::result::Result<WorkerEvent, broadcast::error::RecvError>,
) -> Option<WorkerEvent> {
    match event {
        Ok(e) => Some(e),
        Err(broadcast::error::RecvError::Lagged(n)) => {
            eprintln!("(progress display skipped {n} events)");
            None
        }
        Err(broadcast::error::RecvError::Closed) => {
            // The worker stopped; wait for the other branch or the deadline.
            None
        }
    }
}

fn on_invoice_event(e: &WorkerEvent, tally: &mut Tally, clock: &Clock, quiet: bool) {
    let order: Option<Order> = e.message().decode_json().ok();
    let id = order
        .as_ref()
        .map_or("?", |o| o.order_id.as_str())
        .to_string();
    let error = e.error.as_deref().unwrap_or("");
    let line = match e.outcome {
        Outcome::Succeeded => {
            tally.orders_done += 1;
            tally.invoiced += 1;
            let amount = order
                .as_ref()
                .map_or(String::new(), |o| money(o.total_cents, &o.currency));
            format!(
                "ok     {id} invoiced ({amount}, attempt {}, {} ms)",
                e.attempt(),
                e.elapsed.as_millis()
            )
        }
        Outcome::Retried { after } => {
            tally.retries += 1;
            format!(
                "retry  {id} attempt {} failed: {error}; redelivery in {} ms",
                e.attempt(),
                after.as_millis()
            )
        }
        Outcome::DeadLettered => {
            tally.orders_done += 1;
            tally.dead_lettered.push(id.clone());
            format!(
                "DLQ    {id} dead-lettered after {} attempts: {error}",
                e.attempt()
            )
        }
        Outcome::Deduplicated => {
            tally.orders_done += 1;
            tally.deduplicated.push(id.clone());
            format!("dup    {id} already invoiced: duplicate acked, handler skipped")
        }
        Outcome::Deferred => format!("wait   {id} being handled by another worker; deferred"),
        other => format!("{other:<6} {id} {error}"),
    };
    if !quiet {
        println!("{} invoice worker  {line}", clock.stamp());
    }
}

fn on_email_event(e: &WorkerEvent, tally: &mut Tally, clock: &Clock, quiet: bool) {
    let invoice: Option<Invoice> = e.message().decode_json().ok();
    let line = match (&e.outcome, &invoice) {
        (Outcome::Succeeded, Some(inv)) => {
            tally.emailed += 1;
            format!("sent   {} to {}", inv.invoice_id, inv.email)
        }
        (other, _) => format!("{other:<6} {}", e.error.as_deref().unwrap_or("")),
    };
    if !quiet {
        println!("{} email worker    {line}", clock.stamp());
    }
}

/// The queue's job store; an in-process one where the backend has none (SQS, Kafka).
async fn job_store(config: &Config) -> Result<Arc<dyn JobStore>> {
    match ferrymq::job_store(config).await {
        Ok(store) => Ok(Arc::from(store)),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            Ok(Arc::new(MemoryJobStore::named(config.queue())))
        }
        Err(e) => Err(e),
    }
}

/// Record every job, keeping finished ones (up to the store's per-state cap).
fn keep_all(store: &Arc<dyn JobStore>) -> TrackJobsLayer {
    TrackJobsLayer::new(store.clone())
        .keep_completed(Keep::Count(DEFAULT_MAX_PER_STATE))
        .keep_failed(Keep::Count(DEFAULT_MAX_PER_STATE))
}

/// BullMQ's `getJobCounts`: the queue's depth (where the backend reports one) and
/// the store's completed / failed / dead-lettered.
async fn job_counts(config: &Config, store: &dyn JobStore) -> Result<JobCounts> {
    let depth = match config.producer().await {
        Ok(p) => p.depth().await.unwrap_or_default(),
        Err(_) => Default::default(),
    };
    Ok(JobCounts::new(depth, store.counts().await?))
}

fn joined(
    result: std::result::Result<Result<WorkerSummary>, tokio::task::JoinError>,
) -> Result<WorkerSummary> {
    result.map_err(|e| Error::new(ErrorKind::Backend, format!("worker task failed: {e}")))?
}

/// Short, per-run id so that runs against a persistent broker never share queues.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut n = nanos ^ (u64::from(std::process::id()) << 40);
    let mut s = String::new();
    for _ in 0..6 {
        s.push(char::from(
            b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize],
        ));
        n /= 36;
    }
    s
}
