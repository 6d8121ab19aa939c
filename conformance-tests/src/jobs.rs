//! Job cases: `ferrymq_core::jobs` (job states, results, progress, events, flows)
//! over each backend's real producers and consumers.
//!
//! The job store here is the in-process `MemoryJobStore` on every backend: what is
//! checked is that `TrackJobs` reads each backend's settling right — a result
//! recorded only once acked, a retry as a retry, a dead letter as final — and that a
//! flow's parent goes out once, after its children, with their results. (The Redis
//! store itself is tested against Redis in backend-redis/tests/jobs.rs.)

use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::jobs::{
    self, children, json_job_handler, Flow, JobEvent, JobEventKind, JobMessage, JobState, JobStore,
    Keep, MemoryJobStore, TrackJobsLayer,
};
use ferrymq_core::middleware::{Backoff, Outcome, RetryToDlqLayer};
use ferrymq_core::worker::Worker;
use ferrymq_core::{BoxError, Delivery, Message};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;
use tower::ServiceBuilder;

use crate::support::{expect_none, receive_n};
use crate::{ensure, CaseResult, Context, Failure};

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A store no other case shares.
fn store(queue: &str) -> MemoryJobStore {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    MemoryJobStore::new(format!("{queue}#{n}"))
}

fn backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100))
        .max(Duration::from_secs(1))
        .jitter(0.0)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Task {
    n: u64,
    fail_until: u32,
}

fn task(n: u64, fail_until: u32) -> Message {
    Message::json(&Task { n, fail_until })
        .map(|m| m.job_id(format!("job-{n}")))
        .unwrap_or_else(|_| Message::new("unencodable"))
}

/// Events of `store` until `done` holds for them, failing after `within`.
async fn events_until(
    events: &mut jobs::JobEvents,
    within: Duration,
    mut done: impl FnMut(&[JobEvent]) -> bool,
) -> CaseResult<Vec<JobEvent>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while !done(&seen) {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Ok(e))) => seen.push(e),
            Ok(Some(Err(e))) => return Err(Failure::new(format!("job events: {e}"))),
            Ok(None) => return Err(Failure::new("job events ended")),
            Err(_) => {
                return Err(Failure::new(format!(
                    "job events: not done within {within:?}; so far {:?}",
                    seen.iter()
                        .map(|e| format!("{} {}", e.id, e.kind.name()))
                        .collect::<Vec<_>>()
                )))
            }
        }
    }
    Ok(seen)
}

fn kinds<'a>(events: &'a [JobEvent], id: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e.id == id)
        .map(|e| e.kind.name())
        .collect()
}

/// Under `TrackJobs` and `RetryToDlq`: a job that succeeds is `completed` with its
/// result and progress; one that fails once is retried then completed; a poison one
/// is dead-lettered after 3 attempts with its error — as records readable by id and
/// as events in order; completed jobs are acked (gone from the queue).
pub async fn jobs_record_states_results_and_events(ctx: &Context) -> CaseResult {
    let (queue, p, c) = ctx.fresh().await?;
    let (_dlq, dlq_p, _dlq_c) = ctx.fresh().await?;
    let store = store(&queue);
    let mut events = store
        .subscribe()
        .await
        .map_err(|e| Failure::new(format!("subscribe: {e}")))?;
    for (n, fail_until) in [(1, 0), (2, 1), (3, 99)] {
        p.send(task(n, fail_until))
            .await
            .map_err(|e| Failure::new(format!("send: {e}")))?;
    }
    let service = ServiceBuilder::new()
        .layer(
            TrackJobsLayer::new(store.clone())
                .keep_completed(Keep::Count(10))
                .keep_failed(Keep::Count(10)),
        )
        .layer(
            RetryToDlqLayer::new(dlq_p)
                .max_attempts(3)
                .backoff(backoff()),
        )
        .service(json_job_handler(|t: Task, d: Delivery| async move {
            jobs::progress(json!({ "n": t.n })).await;
            if d.attempt() <= t.fail_until {
                return Err::<serde_json::Value, BoxError>(format!("job {} failed", t.n).into());
            }
            Ok(json!({ "double": t.n * 2 }))
        }));
    let worker = Worker::new(c).concurrency(3);
    let mut outcomes = worker.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run_until(service, async {
        let _ = stopped.await;
    }));
    let seen = events_until(&mut events, ctx.prompt() * 3, |es| {
        es.iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    JobEventKind::Completed { .. } | JobEventKind::DeadLettered { .. }
                )
            })
            .count()
            == 3
    })
    .await;
    let _ = stop.send(());
    let summary = match tokio::time::timeout(Duration::from_secs(40), task).await {
        Ok(Ok(Ok(s))) => s,
        other => return Err(Failure::new(format!("worker: {other:?}"))),
    };
    let seen = seen?;
    let mut worker_outcomes = Vec::new();
    while let Ok(e) = outcomes.try_recv() {
        worker_outcomes.push(e.outcome);
    }
    ensure!(
        summary.succeeded == 2 && summary.dead_lettered == 1,
        "summary {summary}"
    );
    ensure!(
        worker_outcomes
            .iter()
            .filter(|o| **o == Outcome::Succeeded)
            .count()
            == 2,
        "the worker saw {worker_outcomes:?}"
    );

    ensure!(
        kinds(&seen, "job-1") == ["active", "progress", "completed"],
        "job-1's events: {:?}",
        kinds(&seen, "job-1")
    );
    ensure!(
        kinds(&seen, "job-2")
            == [
                "active",
                "progress",
                "retried",
                "active",
                "progress",
                "completed"
            ],
        "job-2's events: {:?}",
        kinds(&seen, "job-2")
    );
    let three = kinds(&seen, "job-3");
    ensure!(
        three.last() == Some(&"dead_lettered")
            && three.iter().filter(|k| **k == "retried").count() == 2,
        "job-3's events: {three:?}"
    );

    let get = |id: &'static str| {
        let store = store.clone();
        async move {
            store
                .get(id)
                .await
                .map_err(|e| Failure::new(format!("get {id}: {e}")))?
                .ok_or_else(|| Failure::new(format!("{id} is not recorded")))
        }
    };
    let one = get("job-1").await?;
    ensure!(
        one.state == JobState::Completed
            && one.result == Some(json!({ "double": 2 }))
            && one.progress == Some(json!({ "n": 1 })),
        "job-1: {one:?}"
    );
    let two = get("job-2").await?;
    ensure!(
        two.state == JobState::Completed && two.failure.as_deref() == Some("job 2 failed"),
        "job-2: {two:?}"
    );
    let three = get("job-3").await?;
    ensure!(
        three.state == JobState::DeadLettered && three.failure.as_deref() == Some("job 3 failed"),
        "job-3: {three:?}"
    );
    // Completed means acked: nothing comes back.
    let source = ctx.consumer(&queue).await?;
    expect_none(
        &*source,
        ctx.visibility().unwrap_or_default() + ctx.quiet(),
        "completed and dead-lettered jobs must be gone from the queue",
    )
    .await?;
    Ok(())
}

/// A flow: the parent is on its queue only after both children completed, once,
/// carrying both results.
pub async fn flow_parent_runs_after_its_children_once(ctx: &Context) -> CaseResult {
    let (queue, p, c) = ctx.fresh().await?;
    let (_parents, parent_p, parent_c) = ctx.fresh().await?;
    let store = Arc::new(store(&queue));
    let parent_queue = parent_p.queue().to_string();
    Flow::new("parent-1", parent_queue, Message::new("parent"))
        .child(&*p, task(1, 0))
        .child(&*p, task(2, 0))
        .add(&*store)
        .await
        .map_err(|e| Failure::new(format!("add the flow: {e}")))?;
    expect_none(&*parent_c, ctx.quiet(), "no parent before its children ran").await?;
    let service = ServiceBuilder::new()
        .layer(TrackJobsLayer::new(store.clone()).flows(parent_p))
        .service(json_job_handler(|t: Task, _d: Delivery| async move {
            Ok::<_, BoxError>(json!({ "child": t.n }))
        }));
    let worker = Worker::new(c).concurrency(2);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run_until(service, async {
        let _ = stopped.await;
    }));
    let parents = receive_n(&*parent_c, 1, ctx.prompt() * 2).await;
    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(40), task).await {
        Ok(Ok(Ok(_))) => {}
        other => return Err(Failure::new(format!("worker: {other:?}"))),
    }
    let parents = parents?;
    let parent = &parents[0];
    ensure!(
        parent.payload().as_ref() == b"parent",
        "parent payload {:?}",
        parent.payload()
    );
    let kids = children(parent).map_err(|e| Failure::new(format!("children: {e}")))?;
    ensure!(
        kids.results.get("job-1") == Some(&json!({ "child": 1 }))
            && kids.results.get("job-2") == Some(&json!({ "child": 2 })),
        "children's results: {kids:?}"
    );
    parent
        .ack()
        .await
        .map_err(|e| Failure::new(format!("ack the parent: {e}")))?;
    expect_none(&*parent_c, ctx.quiet(), "the parent is sent once").await?;
    Ok(())
}
