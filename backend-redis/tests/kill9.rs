//! kill -9 of a real `Worker` process, 10 times over 20k messages on Redis (audit #13,
//! "adversarial tests"): nothing is lost, every duplicate run is counted and explained
//! by a kill, and the DLQ holds exactly the poison messages — every extra DLQ copy
//! explained by a kill between the DLQ publish and the source ack.
//!
//! The worker is `examples/chaos_worker.rs` (the default stack: ExtendVisibility,
//! RetryToDlq(3) to a DLQ queue, CatchPanic), run as a child process: this test binary
//! re-executes itself with `CHAOS_CHILD=1`, running only [`chaos_worker_child`]. It
//! logs every step before taking the next (see that file), so the log is the truth of
//! what ran. The 10 kills: 4 SIGKILLs at random moments (the handler sleeps 0–3 ms,
//! so most land mid-handler; the rest between handler and ack, or mid-settle), and 6
//! aborts at chosen points — twice each right before an ack, right after a DLQ publish
//! (before the source ack), and while a nack is on the wire. Then a last worker runs
//! until the queue is empty.
//!
//! Needs `redis-server` on PATH (`scripts/redis.sh start` installs it); starts its own
//! on a free loopback port. `CHAOS_SEED=n` replays a run's choices (printed).

#![allow(clippy::unwrap_used)]

#[path = "../examples/chaos_worker.rs"]
mod chaos_worker;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use chaos_worker::{
    ids_in_streams, is_poison, message, raw, Event, LogTail, Progress, RedisServer, WorkerCommand,
    CHILD_ENV,
};
use ferrymq_core::{Consumer, Producer};
use ferrymq_redis::RedisConfig;
use rand::{Rng, SeedableRng};

const TOTAL: u64 = 20_000;
const CONCURRENCY: usize = 8;
const PREFETCH: usize = 16;
/// Deliveries one worker holds at most: running, waiting for a slot, or settling.
const HELD: usize = CONCURRENCY + PREFETCH;
const LIVES: u64 = 10;
/// Messages sent and not yet done, at most.
const BACKLOG: u64 = 600;

/// The worker, when this binary is re-executed as one; a no-op test otherwise.
#[test]
fn chaos_worker_child() {
    if std::env::var_os(CHILD_ENV).is_some() {
        std::process::exit(chaos_worker::child_main());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// SIGKILL from here once the worker made progress.
    Random,
    /// `CHAOS_ABORT=<point>:<n>`.
    Abort(&'static str),
}

#[derive(Debug)]
struct Life {
    pid: u32,
    plan: Plan,
    /// What ended it: "SIGKILL", "abort <point>", "SIGKILL (abort did not fire)".
    end: String,
    secs: f64,
}

#[test]
fn kill_9_of_worker_processes_loses_nothing_and_explains_every_duplicate() {
    let t0 = Instant::now();
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let server = RedisServer::start(chaos_worker::free_port().unwrap(), &[]).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let queue = format!("kill9-{}", std::process::id());
    let dlq_queue = format!("{queue}-dlq");
    let url = server.url(&queue, "visibility=2s");
    let dlq_url = server.url(&dlq_queue, "");
    let log = std::env::temp_dir().join(format!("ferrymq-kill9-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    eprintln!(
        "kill9: workers log to {} (kept when the test fails)",
        log.display()
    );

    // Produced as the worker goes, keeping at most BACKLOG messages ahead of it: a
    // nack re-queues at the stream's tail, so with all 20k waiting up front every
    // retry of a poison message (and so every DLQ publish) would wait for the whole
    // backlog, i.e. for the last worker.
    let producer = runtime.block_on(async {
        RedisConfig::from_url(&url)
            .unwrap()
            .producer()
            .await
            .unwrap()
    });
    let mut sent = 0u64;
    let mut feed = |done: u64| {
        while sent < TOTAL && sent.saturating_sub(done) < BACKLOG {
            let batch: Vec<_> = (sent..(sent + 100).min(TOTAL)).map(message).collect();
            let n = batch.len() as u64;
            let results = runtime.block_on(producer.send_batch(batch)).unwrap();
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            sent += n;
        }
    };

    let worker = WorkerCommand::test_binary("chaos_worker_child");
    let env = |abort: String, exit_when_empty: bool| {
        vec![
            ("CHAOS_URL", url.clone()),
            ("CHAOS_DLQ_URL", dlq_url.clone()),
            ("CHAOS_LOG", log.display().to_string()),
            ("CHAOS_CONCURRENCY", CONCURRENCY.to_string()),
            ("CHAOS_PREFETCH", PREFETCH.to_string()),
            ("CHAOS_SLEEP_MAX_US", "3000".to_string()),
            ("CHAOS_ABORT", abort),
            (
                "CHAOS_EXIT_WHEN_EMPTY",
                if exit_when_empty { "1" } else { "0" }.to_string(),
            ),
        ]
    };
    let plans = [
        Plan::Random,
        Plan::Abort("before-ack"),
        Plan::Random,
        Plan::Abort("after-dlq"),
        Plan::Random,
        Plan::Abort("mid-nack"),
        Plan::Random,
        Plan::Abort("before-ack"),
        Plan::Abort("after-dlq"),
        Plan::Abort("mid-nack"),
    ];
    assert_eq!(plans.len() as u64, LIVES);

    let mut tail = LogTail::new(&log);
    let mut progress = Progress::default();
    let mut events: Vec<Event> = Vec::new();
    let mut lives: Vec<Life> = Vec::new();
    // Each life ends (at the latest) once this many more messages are done, so the
    // ten kills spread over the run and all happen before the queue drains.
    let step = TOTAL / (LIVES + 2);
    for (k, plan) in plans.iter().enumerate() {
        let abort = match plan {
            Plan::Random => "none".to_string(),
            Plan::Abort(point @ "before-ack") => format!("{point}:{}", rng.gen_range(100..=1000)),
            Plan::Abort(point @ "after-dlq") => format!("{point}:{}", rng.gen_range(1..=4)),
            Plan::Abort(point) => format!("{point}:{}", rng.gen_range(1..=8)),
        };
        let target = (k as u64 + 1) * step + rng.gen_range(0..step / 4);
        let started = Instant::now();
        let mut child = worker.spawn(&env(abort.clone(), false));
        let pid = child.id();
        let end = loop {
            std::thread::sleep(Duration::from_millis(10));
            let new = tail.poll();
            progress.add(&new);
            events.extend(new);
            feed(progress.done.len() as u64);
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    matches!(plan, Plan::Abort(_)) && status.signal() == Some(6),
                    "worker {pid} ({plan:?}) exited by itself: {status}"
                );
                break format!("abort {abort}");
            }
            let done = progress.done.len() as u64;
            match plan {
                Plan::Random if done >= target => {
                    std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
                    chaos_worker::kill9(&mut child);
                    break "SIGKILL".to_string();
                }
                Plan::Abort(_) if done >= target + step => {
                    chaos_worker::kill9(&mut child);
                    break format!("SIGKILL ({abort} did not fire)");
                }
                _ => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "worker {pid} ({plan:?}) made no progress for 60 s: {done} of {TOTAL} done"
            );
        };
        lives.push(Life {
            pid,
            plan: *plan,
            end,
            secs: started.elapsed().as_secs_f64(),
        });
    }

    // The last worker runs until the queue is empty and exits by itself.
    let last_started = Instant::now();
    let mut last = worker.spawn(&env("none".into(), true));
    let last_pid = last.id();
    let status = loop {
        let new = tail.poll();
        progress.add(&new);
        events.extend(new);
        feed(progress.done.len() as u64);
        if let Some(status) = last.try_wait().unwrap() {
            break status;
        }
        if last_started.elapsed() > Duration::from_secs(90) {
            chaos_worker::kill9(&mut last);
            panic!(
                "the last worker did not drain the queue within 90 s: {} of {TOTAL} done",
                progress.done.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "the last worker exited with {status}");
    events.extend(tail.poll());
    assert_eq!(sent, TOTAL);
    let last_secs = last_started.elapsed().as_secs_f64();

    // What Redis holds now: the source queue must be empty, the DLQ the poison set.
    let (depth, left, dlq_copies) = runtime.block_on(async {
        let consumer = RedisConfig::from_url(&url)
            .unwrap()
            .consumer()
            .await
            .unwrap();
        let depth = consumer.depth().await.unwrap();
        let mut conn = raw(&server.base_url()).await;
        let left = ids_in_streams(&mut conn, &queue).await;
        let dlq = ids_in_streams(&mut conn, &dlq_queue).await;
        (depth, left, dlq)
    });

    let killed: HashSet<u32> = lives.iter().map(|l| l.pid).collect();
    let report = account(&events, &killed, last_pid, &dlq_copies);
    let aborted_at: Vec<&Event> = events.iter().filter(|e| e.kind == 'X').collect();

    let wall = t0.elapsed();
    eprintln!("kill9: seed {seed} (CHAOS_SEED={seed} replays the choices)");
    for (i, l) in lives.iter().enumerate() {
        eprintln!(
            "kill9: life {:>2} pid {} {:?}: {} after {:.1} s",
            i + 1,
            l.pid,
            l.plan,
            l.end,
            l.secs
        );
    }
    for x in &aborted_at {
        eprintln!(
            "kill9: abort {} in pid {} at message {} (poison: {}) attempt {}",
            x.note,
            x.pid,
            x.id,
            is_poison(x.id),
            x.attempt
        );
    }
    eprintln!(
        "kill9: {TOTAL} messages ({} poison, at most {BACKLOG} ahead of the worker); {} kills; \
         {} handler runs ({} ok, {} failed); {} duplicate ok runs ({} explained by a kill, \
         {} by a failed ack); {} runs cut short by a kill (mid-handler), {} handled but \
         not acked at a kill; DLQ {} copies of {} poison messages ({} extra, each \
         explained by a kill between DLQ publish and source ack); last worker drained \
         in {last_secs:.1} s; wall {wall:.1?}",
        report.poison,
        lives.len(),
        report.runs,
        report.ok_runs,
        report.failed_runs,
        report.duplicate_runs,
        report.duplicates_by_kill,
        report.duplicates_by_ack_error,
        report.cut_short,
        report.unacked_at_kill,
        report.dlq_copies,
        report.dlq_ids,
        report.dlq_extra,
    );

    assert!(
        report.problems.is_empty(),
        "{} problems:\n{}",
        report.problems.len(),
        report.problems.join("\n")
    );
    assert_eq!(depth.total(), 0, "the source queue is empty: {depth:?}");
    assert_eq!(depth.dead_lettered, 0, "nothing in Redis's own dead stream");
    assert!(
        left.is_empty(),
        "entries left in the source streams: {left:?}"
    );
    // Every abort point was hit at least once (the plan fires each twice).
    for point in ["before-ack", "after-dlq", "mid-nack"] {
        assert!(
            aborted_at.iter().any(|x| x.note == point),
            "no {point} abort fired: {lives:?}"
        );
    }
    assert!(
        lives.len() as u64 == LIVES && !killed.contains(&last_pid),
        "{lives:?}"
    );
    let _ = std::fs::remove_file(&log);
}

#[derive(Debug, Default)]
struct Report {
    poison: usize,
    runs: usize,
    ok_runs: usize,
    failed_runs: usize,
    duplicate_runs: usize,
    duplicates_by_kill: usize,
    duplicates_by_ack_error: usize,
    cut_short: usize,
    unacked_at_kill: usize,
    dlq_copies: usize,
    dlq_ids: usize,
    dlq_extra: usize,
    problems: Vec<String>,
}

/// Account for every message from the log (`events`, in write order) and the DLQ
/// contents; `killed`: the pids that died by SIGKILL or abort; `last`: the clean one.
fn account(
    events: &[Event],
    killed: &HashSet<u32>,
    last: u32,
    dlq: &std::collections::BTreeMap<u64, usize>,
) -> Report {
    let mut r = Report::default();
    let mut by_id: HashMap<u64, Vec<&Event>> = HashMap::new();
    for e in events {
        if !killed.contains(&e.pid) && e.pid != last {
            r.problems
                .push(format!("an event from an unknown process: {e:?}"));
        }
        if e.id != 0 || !matches!(e.kind, 'W' | 'Q') {
            by_id.entry(e.id).or_default().push(e);
        }
    }
    if !events.iter().any(|e| e.kind == 'Q' && e.pid == last) {
        r.problems
            .push("the last worker did not log a clean shutdown".into());
    }
    // Deliveries each killed process held when it died: started and not finished, or
    // finished and not settled.
    let mut held_at_kill: HashMap<u32, usize> = HashMap::new();

    for id in 0..TOTAL {
        let evs = by_id.remove(&id).unwrap_or_default();
        let poison = is_poison(id);
        r.poison += usize::from(poison);
        let oks: Vec<&&Event> = evs.iter().filter(|e| e.kind == 'K').collect();
        let fails = evs.iter().filter(|e| e.kind == 'F').count();
        r.runs += evs.iter().filter(|e| e.kind == 'S').count();
        r.ok_runs += oks.len();
        r.failed_runs += fails;

        // After an ack returned Ok, the message must never run again.
        let mut acked_by: Option<u32> = None;
        for e in &evs {
            match e.kind {
                'A' => acked_by = Some(e.pid),
                'S' if acked_by.is_some() => r.problems.push(format!(
                    "message {id} ran again (pid {} attempt {}) after its ack returned Ok in pid {}",
                    e.pid,
                    e.attempt,
                    acked_by.unwrap_or_default()
                )),
                _ => {}
            }
        }
        // Held at a kill: per killed pid, runs not finished and finished runs not settled.
        let pids: HashSet<u32> = evs.iter().map(|e| e.pid).collect();
        for pid in pids.iter().filter(|p| killed.contains(p)) {
            let mine = || evs.iter().filter(move |e| e.pid == *pid);
            let started = mine().filter(|e| e.kind == 'S').count();
            let finished = mine().filter(|e| matches!(e.kind, 'K' | 'F')).count();
            // Settles of a run (releases are of deliveries never started).
            let settled = mine()
                .filter(|e| {
                    matches!(e.kind, 'A' | 'N')
                        || (e.kind == 'E'
                            && (e.note.starts_with("ack:") || e.note.starts_with("nack:")))
                })
                .count();
            let cut = started.saturating_sub(finished);
            let unsettled = finished.saturating_sub(settled);
            r.cut_short += cut;
            r.unacked_at_kill += unsettled;
            *held_at_kill.entry(*pid).or_default() += cut + unsettled;
        }

        if poison {
            if !oks.is_empty() {
                r.problems
                    .push(format!("poison message {id} succeeded: {oks:?}"));
            }
            let copies = dlq.get(&id).copied().unwrap_or(0);
            r.dlq_copies += copies;
            let published_ok = evs.iter().filter(|e| e.kind == 'D').count();
            // Publishes from a killed process that never got to ack the source.
            let unacked_publishes = evs
                .iter()
                .enumerate()
                .filter(|(i, e)| {
                    e.kind == 'P'
                        && killed.contains(&e.pid)
                        && !evs[i + 1..].iter().any(|a| a.kind == 'A' && a.pid == e.pid)
                })
                .count();
            if copies == 0 {
                r.problems
                    .push(format!("poison message {id} is not in the DLQ: lost"));
                continue;
            }
            r.dlq_ids += 1;
            r.dlq_extra += copies - 1;
            if copies < published_ok {
                r.problems.push(format!(
                    "poison message {id}: {published_ok} DLQ publishes returned Ok but the DLQ holds {copies}"
                ));
            }
            if copies > 1 + unacked_publishes {
                r.problems.push(format!(
                    "poison message {id}: {copies} DLQ copies, but only {unacked_publishes} publishes \
                     were cut off from their source ack by a kill: {evs:?}"
                ));
            }
            // An abort right after a publish (or right before its ack) makes a second copy.
            for x in evs.iter().filter(|e| e.kind == 'X') {
                if (x.note == "after-dlq" || x.note == "before-ack") && copies < 2 {
                    r.problems.push(format!(
                        "poison message {id}: aborted {} after a DLQ publish, yet only {copies} copy",
                        x.note
                    ));
                }
            }
        } else {
            if fails > 0 {
                r.problems
                    .push(format!("message {id} failed {fails} times (not poison)"));
            }
            if dlq.contains_key(&id) {
                r.problems
                    .push(format!("message {id} (not poison) is in the DLQ"));
            }
            if oks.is_empty() {
                r.problems
                    .push(format!("message {id} never ran to success: lost ({evs:?})"));
                continue;
            }
            r.duplicate_runs += oks.len() - 1;
            // Every successful run but the last must have been cut off from its ack:
            // by a kill of its process, or by an ack that failed.
            for ok in &oks[..oks.len() - 1] {
                let ack_failed = evs
                    .iter()
                    .any(|e| e.kind == 'E' && e.pid == ok.pid && e.note.starts_with("ack:"));
                if killed.contains(&ok.pid) {
                    r.duplicates_by_kill += 1;
                } else if ack_failed {
                    r.duplicates_by_ack_error += 1;
                } else {
                    r.problems.push(format!(
                        "message {id}: duplicate run not explained by a kill or a failed ack: {evs:?}"
                    ));
                }
            }
            for x in evs
                .iter()
                .filter(|e| e.kind == 'X' && e.note == "before-ack")
            {
                if oks.len() < 2 {
                    r.problems.push(format!(
                        "message {id}: aborted before its ack (pid {}), yet it never ran again",
                        x.pid
                    ));
                }
            }
        }
    }
    for (id, evs) in by_id {
        r.problems.push(format!(
            "events for a message never produced ({id}): {evs:?}"
        ));
    }
    for (id, n) in dlq {
        if *id >= TOTAL {
            r.problems
                .push(format!("DLQ holds {n} copies of unknown message {id}"));
        }
    }
    for (pid, held) in held_at_kill {
        if held > HELD {
            r.problems.push(format!(
                "pid {pid} held {held} deliveries at its kill, more than concurrency + prefetch = {HELD}"
            ));
        }
    }
    r
}
