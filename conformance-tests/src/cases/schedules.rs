//! Schedules over the backend's producer: each run enqueued once by several
//! schedulers, and a run re-sent after a crashed scheduler's claim is taken over
//! delivered once where the broker deduplicates.
//!
//! The schedules live in an in-process store ([`MemoryScheduleStore`]): what is
//! checked here is what the *backend* contributes — delivery of each run, and its
//! dedup of the re-send. Server stores (Redis) have tests of their own.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use ferrymq_core::schedule::{
    ClaimOutcome, ClaimRequest, Every, MemoryScheduleStore, ScheduleDef, ScheduleEntry,
    ScheduleStore, Scheduler, SCHEDULED_FOR, SCHEDULE_ID,
};
use ferrymq_core::{Consumer, Producer};
use tokio::time::Instant;

use crate::support::{receive, receive_batch, send};
use crate::{ensure, CaseResult, Context};

const EVERY: Duration = Duration::from_millis(300);

/// Receive the schedule's runs until `want` arrived (or a bound passed), then once
/// more for stragglers; every delivery is acked. Run time → deliveries.
async fn runs_on_queue(
    ctx: &Context,
    c: &dyn Consumer,
    id: &str,
    want: usize,
) -> CaseResult<BTreeMap<String, usize>> {
    let mut runs = BTreeMap::new();
    let deadline = Instant::now() + ctx.prompt() * 3 + Duration::from_secs(5);
    let mut settled = false;
    loop {
        let wait = if settled { ctx.quiet() } else { ctx.prompt() };
        let got = receive(c, receive_batch(c), wait).await?;
        for d in &got {
            let h = d.message().headers();
            ensure!(
                h.get(SCHEDULE_ID) == Some(id),
                "a run without its schedule id header: {:?}",
                h
            );
            let at = h.get(SCHEDULED_FOR).unwrap_or_default().to_string();
            *runs.entry(at).or_insert(0) += 1;
            d.ack().await?;
        }
        let total: usize = runs.values().sum();
        if settled && got.is_empty() {
            return Ok(runs);
        }
        if total >= want || Instant::now() > deadline {
            settled = true;
        }
    }
}

/// Every run from the anchor to the cursor, as the header spells it.
fn expected(entry: &ScheduleEntry, every: Duration) -> Vec<String> {
    let step = TimeDelta::from_std(every).unwrap_or_default();
    (1..)
        .map(|k| entry.state.anchor + step * k)
        .take_while(|t| *t <= entry.state.cursor)
        .map(|t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .collect()
}

/// Three schedulers on one schedule (every 300 ms for 2 s), each sending through a
/// producer of its own: every run from the first to the last is delivered exactly
/// once.
pub async fn schedule_runs_once_across_schedulers(ctx: &Context) -> CaseResult {
    let queue = ctx.queue();
    let c = ctx.consumer(&queue).await?;
    let store = MemoryScheduleStore::new();
    let def = ScheduleDef::new("conformance", Every::interval(EVERY)?).payload("run");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..3 {
        let scheduler = Scheduler::new(ctx.producer(&queue).await?, store.clone())
            .poll_interval(Duration::from_millis(50));
        if i == 0 {
            scheduler.upsert(def.clone()).await?;
        }
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            scheduler
                .run_until(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let summary = t
            .await
            .map_err(|e| crate::Failure::new(format!("scheduler task: {e}")))??;
        ensure!(summary.errors == 0, "a scheduler saw errors: {summary:?}");
    }
    let entry = store
        .get("conformance")
        .await?
        .ok_or_else(|| crate::Failure::new("the schedule vanished"))?;
    let want = expected(&entry, EVERY);
    ensure!(want.len() >= 4, "only {} runs in 2 s", want.len());
    let runs = runs_on_queue(ctx, &*c, "conformance", want.len()).await?;
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(twice.is_empty(), "runs delivered more than once: {twice:?}");
    let got: Vec<&String> = runs.keys().collect();
    let want_refs: Vec<&String> = want.iter().collect();
    ensure!(
        got == want_refs,
        "delivered runs {got:?}, expected every run from the anchor to the cursor {want:?}"
    );
    Ok(())
}

/// A scheduler claimed a run, sent it, and died before completing: after its
/// lease another scheduler takes the claim over and sends the same run (same dedup
/// id) again. The broker's dedup delivers it once.
pub async fn schedule_takeover_resend_delivered_once(ctx: &Context) -> CaseResult {
    let queue = ctx.queue();
    let c = ctx.consumer(&queue).await?;
    let p = ctx.producer(&queue).await?;
    let store = MemoryScheduleStore::new();
    let every = Duration::from_millis(200);
    let def = ScheduleDef::new("takeover", Every::interval(every)?).payload("run");
    let (_, entry) = store.upsert(&def, Utc::now()).await?;
    let run = entry.state.anchor + TimeDelta::from_std(every).unwrap_or_default();
    tokio::time::sleep(every + Duration::from_millis(50)).await;
    let lease = Duration::from_millis(300);
    let claimed = store
        .claim(
            "takeover",
            &ClaimRequest {
                revision: entry.state.revision,
                cursor: entry.state.cursor,
                run,
                enqueue: true,
                owner: "crashed".into(),
                lease,
                now: Utc::now(),
            },
        )
        .await?;
    ensure!(
        matches!(claimed, ClaimOutcome::Won(_)),
        "claim: {claimed:?}"
    );
    send(&*p, def.message_for(run)).await?; // ... and the scheduler dies here.
    let live = Scheduler::new(ctx.producer(&queue).await?, store.clone()).lease(lease);
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let report = live.tick().await?;
    ensure!(report.errors.is_empty(), "tick errors: {:?}", report.errors);
    let resent = report
        .enqueued
        .iter()
        .chain(&report.duplicates)
        .any(|r| r.at == run);
    ensure!(resent, "the taken-over run was not sent again: {report:?}");
    let _ = p.close().await;
    let runs = runs_on_queue(ctx, &*c, "takeover", 1 + report.enqueued.len()).await?;
    let at = run.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    ensure!(
        runs.get(&at) == Some(&1),
        "the run sent twice (crashed scheduler, then takeover) was delivered {:?} times",
        runs.get(&at)
    );
    ensure!(
        runs.values().all(|n| *n == 1),
        "some run delivered twice: {runs:?}"
    );
    Ok(())
}
