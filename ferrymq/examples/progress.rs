//! Jobs: states, progress, results and lifecycle events, readable from anywhere.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - a handler's progress reports (25 %, 50 %, 75 %, 100 %) and its typed result
//!   (`json_job_handler` returning an `Invoice`) are readable by job id from a
//!   *separate* job-store handle (on Redis: its own connections, as another process
//!   would have), and each one went out as an event, in order per job: `active`,
//!   the four `progress`, `completed` carrying the result;
//! - a job that keeps failing is `retried` (with its error) and then
//!   `dead_lettered` after 3 attempts; its record says `dead_lettered`, 3 attempts
//!   and the last error;
//! - counts per state (BullMQ's `getJobCounts`): completed 1 (see below),
//!   dead-lettered 1, nothing left waiting or active;
//! - retention: nothing is kept unless asked — the queue keeps completed jobs (the
//!   newest 100), and a message that says `keep_completed(none)` is not kept, yet
//!   its `completed` event still carried its result.
//!
//! ```text
//! cargo run -p ferrymq --example progress
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-orders?visibility=5s' \
//!     cargo run -p ferrymq --features redis --example progress
//! ```
//!
//! On SQS and Kafka, which have no job store of their own, the jobs are recorded in
//! this process's memory store (a Redis store named after the queue is the
//! cross-process choice there).

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use ferrymq::jobs::{
    self, json_job_handler, JobEventKind, JobMessage, JobState, JobStore, Keep, MemoryJobStore,
    TrackJobsLayer,
};
use ferrymq::middleware::{Backoff, RetryToDlqLayer};
use ferrymq::{BoxError, Consumer, Delivery, ErrorKind, Message, Producer, Worker};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use support::Checks;
use tower::ServiceBuilder;

const POISON: u64 = 3;
const UNKEPT: u64 = 2;

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    amount: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Invoice {
    order: u64,
    total: u64,
}

async fn store_for(config: &ferrymq::Config) -> ferrymq::Result<Box<dyn JobStore>> {
    match ferrymq::job_store(config).await {
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            println!(
                "  ({}: recording jobs in this process's memory)",
                e.message()
            );
            Ok(Box::new(MemoryJobStore::named(config.queue())))
        }
        other => other,
    }
}

#[tokio::main]
async fn main() -> ferrymq::Result<ExitCode> {
    let base = support::base_config("memory://example-orders?visibility=1s")?;
    let run = support::run_id();
    let orders_q = support::queue(&base, &format!("progress-{run}"))?;
    let dlq_q = support::queue(&base, &format!("progress-{run}-dlq"))?;
    let (producer, consumer) = orders_q.connect().await?;
    let dlq = dlq_q.producer().await?;
    println!(
        "progress example on {} (queue {})",
        producer.capabilities().backend,
        producer.queue()
    );
    // The worker's store, and an observer's: another handle on the same records.
    let store = store_for(&orders_q).await?;
    let observer = store_for(&orders_q).await?;
    let mut events = observer.subscribe().await?;

    for id in 1..=3 {
        let mut message = Message::json(&Order {
            id,
            amount: id * 10,
        })?
        .job_id(format!("order-{id}"));
        if id == UNKEPT {
            message = message.keep_completed(Keep::None);
        }
        jobs::send(&*producer, &*store, message).await?;
    }
    println!(
        "sent orders 1..=3 (order {POISON} always fails, order {UNKEPT} asks not to be kept)\n"
    );

    let visibility = consumer
        .capabilities()
        .visibility_timeout
        .unwrap_or(Duration::from_secs(1));
    let service = ServiceBuilder::new()
        .layer(
            TrackJobsLayer::new(store)
                .keep_completed(Keep::Count(100))
                .keep_failed(Keep::Age(Duration::from_secs(3600))),
        )
        .layer(
            RetryToDlqLayer::new(dlq)
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_millis(100))),
        )
        .service(json_job_handler(|order: Order, _d: Delivery| async move {
            for pct in [25, 50, 75, 100] {
                tokio::time::sleep(Duration::from_millis(5)).await;
                jobs::progress(json!({ "pct": pct })).await;
            }
            if order.id == POISON {
                return Err::<Invoice, BoxError>(
                    format!("order {} cannot be priced", order.id).into(),
                );
            }
            Ok(Invoice {
                order: order.id,
                total: order.amount + 1,
            })
        }));
    let worker = Worker::new(consumer)
        .concurrency(3)
        .poll_wait(Duration::from_millis(200))
        .depth_interval(None);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(service, async {
        let _ = stopped.await;
    }));

    println!("1. events, as any process subscribed to the queue sees them:");
    let deadline = tokio::time::Instant::now() + support::patience(visibility);
    let mut per_job: HashMap<String, Vec<String>> = HashMap::new();
    let mut results: HashMap<String, Option<serde_json::Value>> = HashMap::new();
    let mut finished = 0;
    while finished < 3 {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await else {
            break;
        };
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                println!("  (event stream: {e})");
                continue;
            }
        };
        let detail = match &event.kind {
            JobEventKind::Progress { value } => value.to_string(),
            JobEventKind::Completed { result } => {
                format!("result {}", result.clone().unwrap_or_default())
            }
            JobEventKind::Retried { reason, .. } | JobEventKind::DeadLettered { reason } => {
                reason.clone()
            }
            _ => String::new(),
        };
        println!(
            "  {:<8} {:<14} attempt {}  {detail}",
            event.id,
            event.kind.name(),
            event.attempt
        );
        if let JobEventKind::Completed { result } = &event.kind {
            results.insert(event.id.clone(), result.clone());
        }
        if matches!(
            event.kind,
            JobEventKind::Completed { .. } | JobEventKind::DeadLettered { .. }
        ) {
            finished += 1;
        }
        per_job
            .entry(event.id.clone())
            .or_default()
            .push(event.kind.name().to_string());
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

    println!("\n2. records, read by job id from the observer's handle:");
    let mut records = HashMap::new();
    for id in 1..=3 {
        let id = format!("order-{id}");
        let record = observer.get(&id).await?;
        match &record {
            Some(r) => println!(
                "  {id}: {}  attempts {}  progress {}  result {}  failure {}",
                r.state,
                r.attempts,
                r.progress.clone().unwrap_or_default(),
                r.result.clone().unwrap_or_default(),
                r.failure.as_deref().unwrap_or("-")
            ),
            None => println!("  {id}: not kept"),
        }
        records.insert(id, record);
    }
    let counts = observer.counts().await?;
    println!(
        "\n3. counts: completed {}  failed {}  dead-lettered {}  waiting {}  active {}",
        counts.completed, counts.failed, counts.dead_lettered, counts.waiting, counts.active
    );

    // SQS counts receives (`ApproximateReceiveCount`), which may run ahead of the
    // deliveries a handler saw; exact counters must match.
    let approximate = producer.capabilities().attempts == ferrymq::Attempts::Approximate;
    let attempts_are = |got: u32, want: u32| got == want || (approximate && got >= want);
    let mut checks = Checks::new();
    println!();
    // The subscription began before the sends, so their `waiting` is in too.
    let good = [
        "waiting",
        "active",
        "progress",
        "progress",
        "progress",
        "progress",
        "completed",
    ];
    for n in [1, UNKEPT] {
        let id = format!("order-{n}");
        let seen: Vec<&str> = per_job
            .get(&id)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        checks.check(
            seen == good,
            format!(
                "{id}'s events in order: waiting, active, 4 × progress, completed (saw {seen:?})"
            ),
        );
        let expected = json!({ "order": n, "total": n * 10 + 1 });
        checks.check(
            results.get(&id) == Some(&Some(expected.clone())),
            format!("{id}'s completed event carries its result {expected}"),
        );
    }
    let one = records.get("order-1").cloned().flatten();
    checks.check(
        one.as_ref().is_some_and(|r| {
            r.state == JobState::Completed
                && r.result == Some(json!({ "order": 1, "total": 11 }))
                && r.progress == Some(json!({ "pct": 100 }))
                && attempts_are(r.attempts, 1)
                && r.finished_at.is_some()
        }),
        "order-1 is readable by id: completed, attempt 1, progress 100 %, its result",
    );
    checks.check(
        records.get("order-2").is_some_and(Option::is_none),
        "order-2 (keep_completed none) is not kept once completed",
    );
    let three = records.get("order-3").cloned().flatten();
    checks.check(
        three.as_ref().is_some_and(|r| {
            r.state == JobState::DeadLettered
                && attempts_are(r.attempts, 3)
                && r.failure.as_deref() == Some("order 3 cannot be priced")
        }),
        "order-3 is dead-lettered after 3 attempts, with its error",
    );
    let poison: Vec<&str> = per_job
        .get("order-3")
        .map(|v| v.iter().map(String::as_str).collect())
        .unwrap_or_default();
    checks.check(
        {
            let retried = poison.iter().filter(|k| **k == "retried").count();
            (retried == 2 || (approximate && (1..=2).contains(&retried)))
                && poison.last() == Some(&"dead_lettered")
        },
        format!("order-3's events: retried twice, then dead_lettered (saw {poison:?})"),
    );
    checks.check(
        (counts.completed, counts.dead_lettered, counts.failed, counts.waiting, counts.active) == (1, 1, 0, 0, 0),
        "counts: completed 1 (order-2 not kept), dead-lettered 1, nothing failed, waiting or active",
    );

    support::delete_queues(&[&orders_q, &dlq_q]).await;
    Ok(checks.exit_code())
}
