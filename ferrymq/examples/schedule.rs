//! Schedules: a repeatable job every 250 ms, driven by three schedulers at once, one
//! of them killed and replaced mid-way, then all of them down for a second and
//! three new ones catching up.
//!
//! Guarantees shown — the example exits with status 1 if one does not hold:
//!
//! - the schedule exists once however often it is upserted (every scheduler's
//!   start upserts it by its id: "unchanged");
//! - every run from the schedule's start to its last is on the queue, none missed —
//!   also the runs that came due during the downtime (`CatchUp::All`);
//! - no run is on the queue twice, though three schedulers race for each one and
//!   one was killed wherever it was (a claim it left behind is taken over after its
//!   lease and re-sent under the same dedup id);
//! - `remove` stops it: nothing is enqueued after.
//!
//! Where it comes from: each run is claimed in the schedule store (a compare-and-set
//! on the schedule's cursor; on Redis one Lua script) before it is sent with the
//! dedup id `ferrymq-schedule:<id>:<run ms>`, and the cursor moves on once sent.
//! The store is the queue's own where the backend has one (memory: in process;
//! Redis: beside the queue); on SQS and Kafka this example keeps the schedules in
//! process and sends through the broker. On a backend without dedup (Kafka, SQS
//! standard) a run re-sent after a kill could be enqueued twice, so there the
//! example replaces the scheduler cleanly instead of killing it.
//!
//! ```text
//! cargo run -p ferrymq --example schedule
//! FERRYMQ_URL='redis://127.0.0.1:6399/example-schedule' \
//!     cargo run -p ferrymq --features redis --example schedule
//! ```

mod support;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferrymq::schedule::{
    CatchUp, Every, MemoryScheduleStore, ScheduleDef, ScheduleStore, Scheduler, SchedulerSummary,
    Upserted, SCHEDULED_FOR, SCHEDULE_ID,
};
use ferrymq::{Config, Consumer, ErrorKind};
use support::Checks;
use tokio::time::Instant;

const EVERY: Duration = Duration::from_millis(250);
const ID: &str = "heartbeat";

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<ferrymq::Result<SchedulerSummary>>,
}

async fn start(
    queue: &Config,
    store: &Arc<dyn ScheduleStore>,
    upserts: &mut Vec<Upserted>,
) -> ferrymq::Result<Running> {
    let scheduler = Scheduler::new(queue.producer().await?, store.clone())
        .name("example")
        .poll_interval(Duration::from_millis(50))
        .lease(Duration::from_secs(1));
    // What a service does at every start: upsert its schedules by id.
    upserts.push(
        scheduler
            .upsert(
                ScheduleDef::new(ID, Every::interval(EVERY)?)
                    .catch_up(CatchUp::All { max: 100 })
                    .payload(r#"{"job":"heartbeat"}"#)
                    .header("content-type", "application/json"),
            )
            .await?,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        scheduler
            .run_until(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(Running { stop, task })
}

impl Running {
    async fn stop(self) -> ferrymq::Result<SchedulerSummary> {
        let _ = self.stop.send(());
        self.task.await.map_err(|e| {
            ferrymq::Error::new(ErrorKind::Backend, format!("scheduler task failed: {e}"))
        })?
    }
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("schedule example failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ferrymq::Result<ExitCode> {
    let base = support::base_config("memory://example-schedule")?;
    let queue = support::queue(&base, &format!("sched-{}", support::run_id()))?;
    let consumer = queue.consumer().await?;
    let store: Arc<dyn ScheduleStore> = match queue.schedule_store().await {
        Ok(store) => Arc::from(store),
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            println!("({e}: schedules kept in process, runs sent through the broker)");
            Arc::new(MemoryScheduleStore::named(queue.queue()))
        }
        Err(e) => return Err(e),
    };
    let dedup = queue
        .producer()
        .await?
        .capabilities()
        .dedup_window
        .is_some();
    println!(
        "schedule {ID:?} every {EVERY:?} on {} — three schedulers, {} mid-way, then down for 1 s",
        queue.backend(),
        if dedup {
            "one killed and replaced"
        } else {
            "one replaced (no broker dedup: not killed)"
        }
    );

    let mut upserts = Vec::new();
    let mut running = Vec::new();
    let mut summary = SchedulerSummary::default();
    let add = |total: &mut SchedulerSummary, s: SchedulerSummary| {
        total.enqueued += s.enqueued;
        total.duplicates += s.duplicates;
        total.errors += s.errors;
    };
    for _ in 0..3 {
        running.push(start(&queue, &store, &mut upserts).await?);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let first = running.remove(0);
    if dedup {
        first.kill().await;
    } else {
        add(&mut summary, first.stop().await?);
    }
    running.push(start(&queue, &store, &mut upserts).await?);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for r in running.drain(..) {
        add(&mut summary, r.stop().await?);
    }
    println!("all schedulers down for 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        running.push(start(&queue, &store, &mut upserts).await?);
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for r in running.drain(..) {
        add(&mut summary, r.stop().await?);
    }
    let listed = store.list().await?;
    let entry = store.get(ID).await?;

    // Every run the schedule dealt with, from its anchor to its cursor.
    let expected: Vec<String> = match &entry {
        Some(e) => {
            let step = chrono::TimeDelta::from_std(EVERY).unwrap_or_default();
            (1..)
                .map(|k| e.state.anchor + step * k)
                .take_while(|t| *t <= e.state.cursor)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .collect()
        }
        None => Vec::new(),
    };

    // Read them all back (brokers may deliver a little late).
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + support::patience(Duration::from_secs(1));
    loop {
        let total: usize = seen.values().sum();
        let settled = total >= expected.len() && !expected.is_empty();
        let wait = if settled {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(1)
        };
        let batch = consumer.receive(100, wait).await?;
        if batch.is_empty() && (settled || Instant::now() > deadline) {
            break;
        }
        for d in batch {
            let h = d.message().headers();
            if h.get(SCHEDULE_ID) == Some(ID) {
                let at = h.get(SCHEDULED_FOR).unwrap_or_default().to_string();
                *seen.entry(at).or_insert(0) += 1;
            }
            d.ack().await?;
        }
    }

    // Remove it: nothing more is enqueued.
    let removed = store.remove(ID).await?;
    let last_scheduler = start(&queue, &store, &mut Vec::new()).await?;
    store.remove(ID).await?; // the start above upserted it again
    tokio::time::sleep(Duration::from_millis(700)).await;
    last_scheduler.stop().await?;
    let after_remove = consumer.receive(100, Duration::from_millis(500)).await?;
    for d in &after_remove {
        d.ack().await?;
    }
    consumer.close().await?;
    support::delete_queues(&[&queue]).await;

    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let extra: Vec<&String> = seen.keys().filter(|t| !expected.contains(t)).collect();
    if !extra.is_empty() {
        println!(
            "on the queue but not expected: {extra:?} (expected {expected:?}, state {entry:?})"
        );
    }
    let got: Vec<&String> = seen.keys().collect();
    let missing = expected.iter().filter(|t| !seen.contains_key(*t)).count();
    println!(
        "runs expected {} (anchor to cursor), on the queue {}, missing {missing}, twice or more {}",
        expected.len(),
        got.len(),
        dups.len()
    );
    println!(
        "schedulers (all but the killed one): {} enqueued, {} re-sends dropped by the broker's dedup, {} errors",
        summary.enqueued, summary.duplicates, summary.errors
    );

    let mut checks = Checks::new();
    checks.check(
        upserts.first() == Some(&Upserted::Created)
            && upserts[1..].iter().all(|u| *u == Upserted::Unchanged)
            && listed.len() == 1,
        format!(
            "upserted {} times by id: created once, unchanged after, one schedule listed",
            upserts.len()
        ),
    );
    checks.check(
        expected.len() >= 12,
        format!("the schedule ran ({} runs)", expected.len()),
    );
    checks.check(missing == 0, "no run missed, the downtime's included");
    checks.check(dups.is_empty(), format!("no run enqueued twice ({dups:?})"));
    checks.check(
        got.len() == expected.len(),
        "nothing on the queue but the schedule's runs",
    );
    checks.check(
        removed && after_remove.is_empty(),
        "after remove nothing more was enqueued",
    );
    Ok(checks.exit_code())
}
