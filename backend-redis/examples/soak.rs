//! The soak (audit #13): churning consumers over many messages, then Redis memory,
//! key count, consumer names in the group and worker RSS, printed and bounded.
//!
//! ```text
//! scripts/soak.sh [--minutes 20] [--messages 1000000] [--port 6419]
//! cargo run --release -p ferrymq-redis --example soak -- --minutes 20 --messages 1000000
//! ```
//!
//! It starts a `redis-server` of its own (port 6419 by default; nothing else may use
//! it), then runs chaos workers (`examples/chaos_worker.rs`, this binary re-executed
//! as `soak worker`) over one queue: one steady worker that lives through the whole
//! run (its RSS is the leak check) and `--churners` (2) that are killed with SIGKILL
//! after a random 1–5 s life each and restarted at once. Messages are produced at an
//! even pace over the first 80% of the run; 1 in 100 is poison and ends in the DLQ.
//! When the time is up the churners stop, the steady worker drains the queue, and
//! once its reclaim pass had time to prune the dead consumers' names the figures
//! are taken and checked against [`Bounds`]: every message handled (poison ones in the
//! DLQ), the queue empty, duplicates within what the kills can explain, and Redis
//! memory, `DBSIZE`, consumer names (sampled through the run and at the end) and the
//! steady worker's RSS under their bounds. Exit status 1 when one does not hold.
//!
//! `tests/soak.rs` runs the same for one minute over 50k messages.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

#[path = "chaos_worker.rs"]
pub mod chaos_worker;

use std::process::Child;
use std::time::{Duration, Instant};

use chaos_worker::{
    consumers, dbsize, ids_in_streams, info_field, is_poison, kill9, message, raw, rss_kib, Event,
    LogTail, RedisServer, WorkerCommand,
};
use ferrymq_core::Producer;
use ferrymq_redis::RedisConfig;
use rand::Rng;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    pub messages: u64,
    pub port: u16,
    /// Workers killed and restarted all the time (besides the steady one).
    pub churners: usize,
    /// A churner lives a random time in this range.
    pub life: (Duration, Duration),
    /// The queue's visibility timeout.
    pub visibility: Duration,
    /// Handler concurrency and prefetch of each worker.
    pub concurrency: usize,
    pub prefetch: usize,
    /// Each handler run sleeps a random 0..=this: long enough that a kill finds
    /// deliveries mid-handler and handled-but-not-acked, short enough to keep up.
    pub handler_sleep_max: Duration,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            duration: Duration::from_secs(20 * 60),
            messages: 1_000_000,
            port: 6419,
            churners: 2,
            life: (Duration::from_secs(1), Duration::from_secs(5)),
            visibility: Duration::from_secs(2),
            concurrency: 8,
            prefetch: 16,
            handler_sleep_max: Duration::from_millis(20),
        }
    }
}

/// Limits the end state must stay within.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Redis `used_memory` once the queue drained (DLQ copies included).
    pub used_memory: u64,
    /// Keys in the server once the queue drained.
    pub keys: u64,
    /// Consumer names in any level's group at any sample during the churn.
    pub consumers_during: usize,
    /// ... and at the end, after the prune window.
    pub consumers_end: usize,
    /// The steady worker's RSS at the end, KiB.
    pub rss_kib: u64,
    /// ... and its growth from the first sample to the end, KiB.
    pub rss_growth_kib: u64,
}

impl Bounds {
    pub fn for_run(o: &SoakOptions) -> Bounds {
        Bounds {
            // Baseline ~1 MiB, plus the DLQ copies (1% of the messages, ~0.5 KiB each
            // with their headers), plus slack for allocator fragmentation.
            used_memory: 16 * 1024 * 1024 + o.messages / 100 * 1024,
            // Both queues' keys (streams, meta, delayed, leases, revoked, seq, …).
            keys: 24,
            consumers_during: 24,
            consumers_end: 2,
            rss_kib: 64 * 1024,
            rss_growth_kib: 16 * 1024,
        }
    }
}

/// What the run saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub messages: u64,
    pub poison: u64,
    pub ok_runs: u64,
    pub duplicate_runs: u64,
    pub failed_runs: u64,
    pub lost: Vec<u64>,
    pub non_poison_in_dlq: Vec<u64>,
    pub dlq_copies: u64,
    pub dlq_extra: u64,
    pub kills: u64,
    pub worker_starts: u64,
    pub left_in_queue: u64,
    pub depth_total: u64,
    pub used_memory_peak: u64,
    pub used_memory_end: u64,
    pub keys_peak: u64,
    pub keys_end: u64,
    pub consumers_peak: usize,
    pub consumers_churn_end: Vec<usize>,
    pub consumers_end: Vec<usize>,
    pub rss_first_kib: u64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
    pub produce_secs: f64,
    pub drain_secs: f64,
    pub wall_secs: f64,
    /// The deliveries a worker holds at most (concurrency + prefetch).
    pub held: u64,
}

impl SoakReport {
    pub fn print(&self) {
        eprintln!(
            "soak: {} messages ({} poison) produced over {:.0} s; {} worker starts, {} kill -9s",
            self.messages, self.poison, self.produce_secs, self.worker_starts, self.kills
        );
        eprintln!(
            "soak: {} ok runs ({} duplicates), {} failed runs (poison), {} lost, \
             DLQ {} copies ({} extra), {} left in the queue (depth {}); drained {:.1} s after the churn",
            self.ok_runs,
            self.duplicate_runs,
            self.failed_runs,
            self.lost.len(),
            self.dlq_copies,
            self.dlq_extra,
            self.left_in_queue,
            self.depth_total,
            self.drain_secs
        );
        eprintln!(
            "soak: redis used_memory end {} KiB (peak sampled {} KiB); DBSIZE end {} (peak {}); \
             consumer names per level: peak {}, at churn end {:?}, at the end {:?}",
            self.used_memory_end / 1024,
            self.used_memory_peak / 1024,
            self.keys_end,
            self.keys_peak,
            self.consumers_peak,
            self.consumers_churn_end,
            self.consumers_end
        );
        eprintln!(
            "soak: steady worker RSS first sample {} KiB, end {} KiB, peak (VmHWM) {} KiB; wall {:.1} s",
            self.rss_first_kib, self.rss_end_kib, self.rss_peak_kib, self.wall_secs
        );
    }

    /// The broken promises (empty: all held).
    pub fn check(&self, b: &Bounds) -> Vec<String> {
        let mut p = Vec::new();
        if !self.lost.is_empty() {
            p.push(format!(
                "{} messages lost: {:?}",
                self.lost.len(),
                &self.lost[..self.lost.len().min(20)]
            ));
        }
        if !self.non_poison_in_dlq.is_empty() {
            p.push(format!(
                "messages in the DLQ that are not poison: {:?}",
                self.non_poison_in_dlq
            ));
        }
        if self.left_in_queue != 0 || self.depth_total != 0 {
            p.push(format!(
                "the queue is not empty: {} entries, depth {}",
                self.left_in_queue, self.depth_total
            ));
        }
        // A kill can cut off at most what its worker held from being acked.
        let explainable = self.kills * self.held;
        if self.duplicate_runs > explainable {
            p.push(format!(
                "{} duplicate runs, more than {} kills × {} held deliveries",
                self.duplicate_runs, self.kills, self.held
            ));
        }
        if self.dlq_extra > explainable {
            p.push(format!(
                "{} extra DLQ copies, more than the kills can explain",
                self.dlq_extra
            ));
        }
        if self.used_memory_end > b.used_memory {
            p.push(format!(
                "redis used_memory {} > bound {}",
                self.used_memory_end, b.used_memory
            ));
        }
        if self.keys_end > b.keys {
            p.push(format!("DBSIZE {} > bound {}", self.keys_end, b.keys));
        }
        if self.consumers_peak > b.consumers_during {
            p.push(format!(
                "{} consumer names in a group during the churn > bound {}",
                self.consumers_peak, b.consumers_during
            ));
        }
        if self.consumers_end.iter().any(|n| *n > b.consumers_end) {
            p.push(format!(
                "consumer names at the end {:?} > bound {}",
                self.consumers_end, b.consumers_end
            ));
        }
        if self.rss_end_kib > b.rss_kib {
            p.push(format!(
                "steady worker RSS {} KiB > bound {} KiB",
                self.rss_end_kib, b.rss_kib
            ));
        }
        if self.rss_end_kib.saturating_sub(self.rss_first_kib) > b.rss_growth_kib {
            p.push(format!(
                "steady worker RSS grew {} → {} KiB, more than {} KiB",
                self.rss_first_kib, self.rss_end_kib, b.rss_growth_kib
            ));
        }
        p
    }
}

/// Per-message tallies from the workers' log.
struct Tally {
    ok: Vec<u32>,
    failed: u64,
    starts: u64,
    unknown: Vec<Event>,
}

impl Tally {
    fn add(&mut self, events: Vec<Event>) {
        for e in events {
            match e.kind {
                'K' => match self.ok.get_mut(e.id as usize) {
                    Some(n) => *n += 1,
                    None => self.unknown.push(e),
                },
                'F' => self.failed += 1,
                'W' => self.starts += 1,
                'D' if e.id as usize >= self.ok.len() => self.unknown.push(e),
                _ => {}
            }
        }
    }
}

/// Run the soak with workers started by `worker`.
pub fn run_soak(o: &SoakOptions, worker: &WorkerCommand) -> Result<SoakReport, String> {
    let t0 = Instant::now();
    let server = RedisServer::start(o.port, &[])?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let queue = "soak";
    let dlq_queue = "soak-dlq";
    let vis_ms = o.visibility.as_millis();
    let url = server.url(queue, &format!("visibility={vis_ms}ms"));
    let dlq_url = server.url(dlq_queue, "");
    let log = std::env::temp_dir().join(format!("ferrymq-soak-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    eprintln!(
        "soak: workers log to {} (kept when the run fails)",
        log.display()
    );
    let producer = rt
        .block_on(async { RedisConfig::from_url(&url)?.producer().await })
        .map_err(|e| e.to_string())?;
    let mut conn = rt.block_on(raw(&server.base_url()));

    let env = vec![
        ("CHAOS_URL", url.clone()),
        ("CHAOS_DLQ_URL", dlq_url.clone()),
        ("CHAOS_LOG", log.display().to_string()),
        ("CHAOS_CONCURRENCY", o.concurrency.to_string()),
        ("CHAOS_PREFETCH", o.prefetch.to_string()),
        (
            "CHAOS_SLEEP_MAX_US",
            o.handler_sleep_max.as_micros().to_string(),
        ),
        ("CHAOS_LOG_EVENTS", "min".to_string()),
    ];
    let mut rng = rand::thread_rng();
    let mut life = || {
        let (lo, hi) = o.life;
        lo + hi.saturating_sub(lo).mul_f64(rng.gen::<f64>())
    };

    let mut report = SoakReport {
        messages: o.messages,
        poison: (0..o.messages).filter(|i| is_poison(*i)).count() as u64,
        held: (o.concurrency + o.prefetch) as u64,
        ..SoakReport::default()
    };
    let mut tally = Tally {
        ok: vec![0; o.messages as usize],
        failed: 0,
        starts: 0,
        unknown: Vec::new(),
    };
    let mut tail = LogTail::new(&log);
    let mut steady = worker.spawn(&env);
    let steady_pid = steady.id();
    let mut churners: Vec<(Child, Instant)> = (0..o.churners)
        .map(|_| (worker.spawn(&env), Instant::now() + life()))
        .collect();

    let produce_for = o.duration.mul_f64(0.8);
    let sample_every = (o.duration / 20).clamp(Duration::from_secs(5), Duration::from_secs(60));
    let mut next_sample = Instant::now() + Duration::from_secs(5);
    let mut sent = 0u64;
    let started = Instant::now();
    let mut failure: Option<String> = None;
    while started.elapsed() < o.duration {
        std::thread::sleep(Duration::from_millis(20));
        // Produce at an even pace.
        let due = if started.elapsed() >= produce_for {
            o.messages
        } else {
            (o.messages as f64 * started.elapsed().as_secs_f64() / produce_for.as_secs_f64()) as u64
        };
        while sent < due {
            let n = (due - sent).min(1000);
            let batch = (sent..sent + n).map(message).collect();
            match rt.block_on(producer.send_batch(batch)) {
                Ok(results) if results.iter().all(Result::is_ok) => sent += n,
                other => {
                    failure = Some(format!("a send failed: {other:?}"));
                    break;
                }
            }
        }
        if sent == o.messages && report.produce_secs == 0.0 {
            report.produce_secs = started.elapsed().as_secs_f64();
        }
        // Churn.
        for (child, until) in churners.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                failure = Some(format!("a churning worker exited by itself: {status}"));
            }
            if Instant::now() >= *until {
                kill9(child);
                report.kills += 1;
                *child = worker.spawn(&env);
                *until = Instant::now() + life();
            }
        }
        if let Ok(Some(status)) = steady.try_wait() {
            failure = Some(format!("the steady worker exited by itself: {status}"));
        }
        tally.add(tail.poll());
        if Instant::now() >= next_sample {
            next_sample += sample_every;
            let (mem, keys, names) = rt.block_on(async {
                (
                    info_field(&mut conn, "memory", "used_memory").await,
                    dbsize(&mut conn).await,
                    consumers(&mut conn, queue, "ferrymq").await,
                )
            });
            let rss = rss_kib(steady_pid).map_or(0, |r| r.0);
            if report.rss_first_kib == 0 && started.elapsed() >= Duration::from_secs(10) {
                report.rss_first_kib = rss;
            }
            report.used_memory_peak = report.used_memory_peak.max(mem.unwrap_or(0));
            report.keys_peak = report.keys_peak.max(keys);
            report.consumers_peak = report
                .consumers_peak
                .max(names.iter().copied().max().unwrap_or(0));
            let done = tally.ok.iter().filter(|n| **n > 0).count();
            eprintln!(
                "soak: {:>5.0} s: sent {sent}, handled {done}, kills {}, used_memory {} KiB, \
                 DBSIZE {keys}, consumer names {names:?}, steady RSS {rss} KiB",
                started.elapsed().as_secs_f64(),
                report.kills,
                mem.unwrap_or(0) / 1024
            );
        }
        if failure.is_some() {
            break;
        }
    }
    for (child, _) in churners.iter_mut() {
        kill9(child);
    }
    if let Some(f) = failure {
        kill9(&mut steady);
        return Err(f);
    }
    report.consumers_churn_end = rt.block_on(consumers(&mut conn, queue, "ferrymq"));

    // Drain with the steady worker alone.
    let drain_started = Instant::now();
    let drain_limit = Duration::from_secs(120).max(o.duration / 10);
    let mut depth = u64::MAX;
    loop {
        tally.add(tail.poll());
        let all_ok = (0..o.messages).all(|i| is_poison(i) || tally.ok[i as usize] > 0);
        if all_ok {
            depth = rt
                .block_on(producer.depth())
                .map_or(u64::MAX, |d| d.total());
            if depth == 0 {
                break;
            }
        }
        if drain_started.elapsed() > drain_limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    report.drain_secs = drain_started.elapsed().as_secs_f64();
    report.depth_total = depth;

    // Give the steady worker's reclaim pass time to prune the dead consumers' names
    // (idle longer than max(visibility, 5 s), checked every half of that).
    let prune_bound = o.visibility.max(Duration::from_secs(5));
    let prune_wait = prune_bound * 3 + Duration::from_secs(2);
    let waiting = Instant::now();
    loop {
        let names = rt.block_on(consumers(&mut conn, queue, "ferrymq"));
        if names.iter().all(|n| *n <= 1) || waiting.elapsed() > prune_wait {
            report.consumers_end = names;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    if let Some((rss, hwm)) = rss_kib(steady_pid) {
        report.rss_end_kib = rss;
        report.rss_peak_kib = hwm;
    }
    kill9(&mut steady);
    tally.add(tail.poll());

    let (mem, keys, left, dlq) = rt.block_on(async {
        (
            info_field(&mut conn, "memory", "used_memory").await,
            dbsize(&mut conn).await,
            ids_in_streams(&mut conn, queue).await,
            ids_in_streams(&mut conn, dlq_queue).await,
        )
    });
    report.used_memory_end = mem.unwrap_or(u64::MAX);
    report.used_memory_peak = report.used_memory_peak.max(report.used_memory_end);
    report.keys_end = keys;
    report.keys_peak = report.keys_peak.max(keys);
    report.left_in_queue = left.values().map(|n| *n as u64).sum();
    report.worker_starts = tally.starts;
    report.failed_runs = tally.failed;
    for (i, n) in tally.ok.iter().enumerate() {
        let id = i as u64;
        report.ok_runs += u64::from(*n);
        report.duplicate_runs += u64::from(n.saturating_sub(1));
        let in_dlq = dlq.get(&id).copied().unwrap_or(0) as u64;
        if is_poison(id) {
            if in_dlq == 0 {
                report.lost.push(id);
            }
            report.dlq_copies += in_dlq;
            report.dlq_extra += in_dlq.saturating_sub(1);
        } else {
            if *n == 0 {
                report.lost.push(id);
            }
            if in_dlq > 0 {
                report.non_poison_in_dlq.push(id);
            }
        }
    }
    for id in dlq.keys().filter(|id| **id >= o.messages) {
        report.non_poison_in_dlq.push(*id);
    }
    if !tally.unknown.is_empty() {
        return Err(format!(
            "events for messages never sent: {:?}",
            &tally.unknown[..tally.unknown.len().min(10)]
        ));
    }
    report.wall_secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&log);
    Ok(report)
}

fn usage() -> ! {
    eprintln!(
        "usage: soak [--minutes N] [--messages M] [--port P] [--churners C]\n\
         (defaults: 20 minutes, 1000000 messages, port 6419, 2 churning workers)"
    );
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut o = SoakOptions::default();
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "worker" => std::process::exit(chaos_worker::child_main()),
            "--minutes" => {
                let m: f64 = value().parse().unwrap_or_else(|_| usage());
                if !(m.is_finite() && m > 0.0 && m < 7.0 * 24.0 * 60.0) {
                    usage();
                }
                o.duration = Duration::from_secs_f64(m * 60.0);
            }
            "--messages" => o.messages = value().parse().unwrap_or_else(|_| usage()),
            "--port" => o.port = value().parse().unwrap_or_else(|_| usage()),
            "--churners" => o.churners = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let worker = WorkerCommand {
        program: std::env::current_exe().expect("this binary's path"),
        args: vec!["worker".into()],
        env: Vec::new(),
    };
    eprintln!(
        "soak: {:?} over {} messages, {} churning workers + 1 steady, redis on port {}",
        o.duration, o.messages, o.churners, o.port
    );
    match run_soak(&o, &worker) {
        Err(e) => {
            eprintln!("soak: FAILED: {e}");
            std::process::exit(1);
        }
        Ok(report) => {
            report.print();
            let problems = report.check(&Bounds::for_run(&o));
            for p in &problems {
                eprintln!("soak: BOUND BROKEN: {p}");
            }
            if !problems.is_empty() {
                std::process::exit(1);
            }
            eprintln!("soak: all bounds held");
        }
    }
}
