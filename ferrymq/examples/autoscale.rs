//! Autoscale: a worker whose concurrency follows the backlog, on any backend.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - idle, the worker runs at the lower bound of `autoscale(1..=16)`;
//! - a burst of 300 jobs of 50 ms (15 s of work at concurrency 1) makes it grow to
//!   at least 8, and the burst drains in well under those 15 s;
//! - once the queue is quiet it shrinks back to the lower bound by itself;
//! - every job is handled (at least once; the count of extra runs is printed).
//!
//! ```text
//! cargo run -p ferrymq --example autoscale
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-jobs?visibility=5s' \
//!     cargo run -p ferrymq --features redis --example autoscale
//! ```

mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq::middleware::handler_fn;
use ferrymq::worker::Worker;
use ferrymq::{BoxError, Delivery, Message, Producer};
use support::Checks;
use tokio::time::Instant;

const JOBS: usize = 300;
const WORK: Duration = Duration::from_millis(50);
const MAX: usize = 16;

#[tokio::main]
async fn main() -> ferrymq::Result<ExitCode> {
    let base = support::base_config("memory://example-jobs?visibility=5s")?;
    let queue = support::queue(&base, &format!("autoscale-{}", support::run_id()))?;
    let (producer, consumer) = queue.connect().await?;
    println!(
        "autoscale example on {} (queue {}, autoscale(1..={MAX}), jobs of {WORK:?})\n",
        producer.capabilities().backend,
        producer.queue()
    );
    let mut checks = Checks::new();

    let worker = Worker::new(consumer)
        .autoscale(1..=MAX)
        .autoscale_interval(Duration::from_millis(250))
        .poll_wait(Duration::from_millis(200));
    let health = worker.health();
    let handled = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let seen = handled.clone();
    let handler = handler_fn(move |d: Delivery| {
        let seen = seen.clone();
        async move {
            tokio::time::sleep(WORK).await;
            let id = String::from_utf8_lossy(d.payload()).into_owned();
            *seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id)
                .or_default() += 1;
            Ok::<_, BoxError>(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(handler, async {
        let _ = stopped.await;
    }));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = health.report().concurrency;
    checks.check(
        idle == 1,
        format!("idle: concurrency {idle} (the lower bound)"),
    );

    let batch = producer.capabilities().max_batch.max(1);
    let jobs: Vec<Message> = (0..JOBS)
        .map(|i| Message::new(format!("job-{i}")))
        .collect();
    for chunk in jobs.chunks(batch) {
        for result in producer.send_batch(chunk.to_vec()).await? {
            result?;
        }
    }
    println!("sent {JOBS} jobs");
    let burst = Instant::now();
    let patience = support::patience(Duration::from_secs(5));
    let mut peak = 0;
    let mut timeline = Vec::new();
    let mut last = 0;
    loop {
        let done = handled.lock().unwrap_or_else(|e| e.into_inner()).len();
        let now = health.report().concurrency;
        peak = peak.max(now);
        if now != last {
            timeline.push(format!("{:.1}s:{now}", burst.elapsed().as_secs_f64()));
            last = now;
        }
        if done >= JOBS || burst.elapsed() > patience {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained_in = burst.elapsed();
    println!("concurrency over the burst: {}", timeline.join(" "));
    checks.check(
        peak >= 8,
        format!("grew under the burst: peak concurrency {peak}"),
    );
    checks.check(
        drained_in < WORK * JOBS as u32 / 2,
        format!(
            "the burst drained in {drained_in:.1?} (at concurrency 1 it takes {:?})",
            WORK * JOBS as u32
        ),
    );

    let quiet = Instant::now();
    while health.report().concurrency > 1 && quiet.elapsed() < patience {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = health.report().concurrency;
    checks.check(
        after == 1,
        format!(
            "shrank back to {after} within {:.1?} of quiet",
            quiet.elapsed()
        ),
    );

    let _ = stop.send(());
    let summary = run
        .await
        .map_err(|e| ferrymq::Error::new(ferrymq::ErrorKind::Backend, e.to_string()))??;
    let counts = handled.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let extra: usize = counts.values().map(|n| n - 1).sum();
    checks.check(
        counts.len() == JOBS,
        format!(
            "all {JOBS} jobs handled ({} distinct, {extra} extra runs; worker: {summary})",
            counts.len()
        ),
    );
    support::delete_queues(&[&queue]).await;
    Ok(checks.exit_code())
}
