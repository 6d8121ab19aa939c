//! # ferrymq-bench
//!
//! Runs ferrymq, the raw clients and peer libraries side by side in one process
//! invocation, interleaved round by round (A, B, C, A, B, C, …) so that a slow
//! moment of the machine hits every subject alike, and reports medians, the ratios
//! ferrymq/raw and ferrymq/peer, and the machine and server versions.
//!
//! ```text
//! cargo run --release -p ferrymq-bench -- --json bench-results.json   # full run, ~10 min
//! cargo run --release -p ferrymq-bench -- --smoke                     # < 1 min
//! ```
//!
//! See bench/README.md for what each subject does and the latest results.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cli;
mod drive;
mod env;
mod machine;
mod model;
mod redis_server;
mod report;
mod subjects;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;

use cli::Args;
use env::{ChildSpec, Env};
use model::{human_size, Backend, Role, Sample, Workload};
use redis_server::RedisServer;
use report::Cell;
use subjects::Subject;

fn main() -> ExitCode {
    let args = Args::parse().normalized();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrymq-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        if let Some(spec) = &args.child {
            return child(spec).await;
        }
        if args.list {
            for s in subjects::all() {
                println!(
                    "{:<22} {:<7} {:<8} {}",
                    s.name(),
                    s.backend(),
                    format!("{:?}", s.role()).to_lowercase(),
                    s.describe()
                );
            }
            return Ok(());
        }
        run(args).await
    });
    // Background tasks of peers (omniqueue's, apalis') must not keep us alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrymq-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The consumer side of an RSS measurement, in its own process.
async fn child(spec: &str) -> Result<()> {
    let spec: ChildSpec = serde_json::from_str(spec).context("parsing the child spec")?;
    let subject = subjects::by_name(&spec.subject)?;
    let report = subject.rss_child(&spec).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

struct Plan {
    /// Timed workloads (produce, e2e, latency) run `rounds` times.
    timed: Vec<(Workload, usize)>,
    /// RSS workloads run `rss_rounds` times.
    rss: Vec<(Workload, usize)>,
}

fn plan(args: &Args) -> Plan {
    let mut timed = Vec::new();
    let mut rss = Vec::new();
    for &size in &args.sizes {
        if args.wants_workload("produce") {
            timed.push((Workload::Produce, size));
        }
        if args.wants_workload("e2e") {
            for &concurrency in &args.concurrency {
                timed.push((Workload::EndToEnd { concurrency }, size));
            }
        }
        if args.wants_workload("latency") {
            timed.push((Workload::Latency, size));
        }
    }
    if args.wants_workload("rss") {
        for &size in &args.rss_sizes {
            for &backlog in &args.rss_backlogs {
                rss.push((Workload::Rss { backlog }, size));
            }
        }
    }
    Plan { timed, rss }
}

/// Run one measurement with a hard time limit (runs also fail on their own when
/// they stop making progress).
async fn measure(
    subject: &dyn Subject,
    env: &Env,
    args: &Args,
    workload: Workload,
    size: usize,
) -> Result<Sample> {
    if subject.backend() == Backend::Redis {
        env.redis()?
            .flush()
            .await
            .context("FLUSHDB before the run")?;
    }
    let n = args.messages;
    let limit = env.stall * 4
        + Duration::from_secs(n / 1_000 + args.latency_messages / args.latency_rate.max(1));
    let fut = async {
        match workload {
            Workload::Produce => subject.produce(env, n, size).await,
            Workload::EndToEnd { concurrency } => subject.e2e(env, n, size, concurrency).await,
            Workload::Latency => {
                subject
                    .latency(env, args.latency_messages, size, args.latency_rate)
                    .await
            }
            Workload::Rss { backlog } => subject.rss(env, backlog, size).await,
        }
    };
    let limit = match workload {
        Workload::Rss { backlog } => limit + Duration::from_secs(backlog / 2_000),
        _ => limit,
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("did not finish within {} s", limit.as_secs()),
    }
}

fn summary(sample: &Sample) -> String {
    match sample {
        Sample::Throughput {
            msgs_per_sec,
            secs,
            messages,
            capped,
        } => format!(
            "{msgs_per_sec:>12.0} msg/s ({messages} in {secs:.2} s{})",
            if *capped { ", capped" } else { "" }
        ),
        Sample::Latency { p50_us, p99_us, .. } => format!("p50 {p50_us:.0} µs, p99 {p99_us:.0} µs"),
        Sample::Rss {
            peak_kib,
            before_consume_kib,
            secs,
            consumed,
            capped,
            ..
        } => {
            let drained = format!(
                "drained {consumed} in {secs:.1} s{}",
                if *capped { ", capped" } else { "" }
            );
            match before_consume_kib {
                Some(b) => format!(
                    "peak {:.1} MiB (before consuming {:.1} MiB), {drained}",
                    *peak_kib as f64 / 1024.0,
                    *b as f64 / 1024.0
                ),
                None => format!("peak {:.1} MiB, {drained}", *peak_kib as f64 / 1024.0),
            }
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let subjects: Vec<Box<dyn Subject>> = subjects::all()
        .into_iter()
        .filter(|s| args.wants_backend(&s.backend().to_string()) && args.wants_subject(s.name()))
        .collect();
    if subjects.is_empty() {
        anyhow::bail!("no subject selected (see --list)");
    }
    let needs_redis = subjects.iter().any(|s| s.backend() == Backend::Redis);
    let redis = if needs_redis {
        Some(match &args.redis_url {
            Some(url) => RedisServer::existing(url)?,
            None => RedisServer::start(args.redis_port)?,
        })
    } else {
        None
    };
    let mut env = Env::new(
        redis,
        Duration::from_secs(args.stall_secs),
        Duration::from_secs_f64(args.max_run_secs),
    )?;
    env.worker_prefetch = args.worker_prefetch;
    if subjects.iter().any(|s| s.backend() == Backend::Kafka) {
        env.kafka = Some(match &args.kafka_brokers {
            Some(b) => subjects::kafka::KafkaBroker::existing(b),
            None => subjects::kafka::KafkaBroker::start(args.kafka_port)?,
        });
    }
    if subjects.iter().any(|s| s.name() == "bullmq") {
        match subjects::bullmq::NodeSetup::prepare(&args.bullmq_dir, &args.cache_dir()) {
            Ok(setup) => env.bullmq = Some(setup),
            Err(e) => env.bullmq_error = Some(format!("{e:#}")),
        }
    }
    let result = run_all(&args, &env, &subjects, started).await;
    if let Some(r) = &env.redis {
        r.stop();
    }
    if let Some(k) = &env.kafka {
        k.stop();
    }
    subjects::sqs::stop_server();
    result
}

async fn run_all(
    args: &Args,
    env: &Env,
    subjects: &[Box<dyn Subject>],
    started: Instant,
) -> Result<()> {
    let load_before = machine::load_average();
    let servers = match &env.redis {
        Some(r) => {
            json!({ "redis": r.info().await.unwrap_or_else(|e| json!({"error": e.to_string()})) })
        }
        None => json!({}),
    };
    let plan = plan(args);
    let mut cells: Vec<Cell> = Vec::new();
    let cell_index = |cells: &mut Vec<Cell>, s: &dyn Subject, w: &Workload, size: usize| -> usize {
        let key = w.key();
        if let Some(i) = cells
            .iter()
            .position(|c| c.subject == s.name() && c.workload == key && c.size == size)
        {
            return i;
        }
        cells.push(Cell {
            subject: s.name().into(),
            backend: s.backend(),
            role: s.role(),
            workload: key,
            size,
            samples: Vec::new(),
            failure: None,
            skipped: None,
            median: None,
        });
        cells.len() - 1
    };

    let phases = [(&plan.timed, args.rounds), (&plan.rss, args.rss_rounds)];
    for (items, rounds) in phases {
        for round in 1..=rounds {
            for &(workload, size) in items.iter() {
                for s in subjects {
                    if !s.applies(&workload) {
                        continue;
                    }
                    let i = cell_index(&mut cells, s.as_ref(), &workload, size);
                    if cells[i].failure.is_some() || cells[i].skipped.is_some() {
                        continue;
                    }
                    if let Workload::Rss { backlog } = workload {
                        if s.role() == Role::Peer && backlog > args.peer_rss_max_backlog {
                            cells[i].skipped = Some(format!(
                                "peers run the RSS workload only up to a backlog of {} (--peer-rss-max-backlog): filling and draining 1M jobs through them takes minutes",
                                args.peer_rss_max_backlog
                            ));
                            continue;
                        }
                    }
                    let t = Instant::now();
                    let outcome = measure(s.as_ref(), env, args, workload, size).await;
                    let label = format!(
                        "[{round}/{rounds} {:>5.0}s] {:<10} {:>6} {:<22}",
                        started.elapsed().as_secs_f64(),
                        workload.key(),
                        human_size(size),
                        s.name()
                    );
                    match outcome {
                        Ok(sample) => {
                            eprintln!("{label} {}", summary(&sample));
                            cells[i].samples.push(sample);
                        }
                        Err(e) => {
                            let msg = format!("{e:#}");
                            eprintln!(
                                "{label} FAILED after {:.1} s: {msg}",
                                t.elapsed().as_secs_f64()
                            );
                            cells[i].failure = Some(msg);
                        }
                    }
                }
            }
        }
    }
    for c in &mut cells {
        c.compute_median();
    }
    let ratios = report::ratios(&cells);
    let best = report::best_ratios(&cells);
    println!(
        "{}{}",
        report::tables(&cells, &ratios, args.rounds, args.rss_rounds),
        report::best_table(&best)
    );

    let mut machine = machine::describe();
    machine["loadavg_before"] = json!(load_before);
    machine["loadavg_after"] = json!(machine::load_average());
    let meta = json!({
        "bench": "ferrymq-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "duration_secs": started.elapsed().as_secs_f64(),
        "settings": {
            "messages": args.messages,
            "rounds": args.rounds,
            "rss_rounds": args.rss_rounds,
            "sizes": args.sizes,
            "concurrency": args.concurrency,
            "latency_rate": args.latency_rate,
            "latency_messages": args.latency_messages,
            "rss_backlogs": args.rss_backlogs,
            "rss_sizes": args.rss_sizes,
            "peer_rss_max_backlog": args.peer_rss_max_backlog,
            "stall_secs": args.stall_secs,
            "max_run_secs": args.max_run_secs,
            "worker_prefetch": args.worker_prefetch,
            "smoke": args.smoke,
            "batch": drive::BATCH,
        },
        "machine": machine,
        "servers": servers,
        "versions": {
            "crates": machine::crate_versions(),
            "node": env.bullmq.as_ref().map(|b| b.node_version.clone()),
            "bullmq": env.bullmq.as_ref().map(|b| b.bullmq_version.clone()),
            "bullmq_setup_error": env.bullmq_error,
        },
        "subjects": subjects.iter().map(|s| json!({
            "name": s.name(),
            "backend": s.backend(),
            "role": s.role(),
            "how": s.describe(),
        })).collect::<Vec<_>>(),
    });
    let doc = report::document(meta, &cells, &ratios, &best);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        // The ratio table as a bar chart, next to the JSON.
        let chart = path.with_extension("svg");
        std::fs::write(&chart, report::svg(&ratios))
            .with_context(|| format!("writing {}", chart.display()))?;
        eprintln!("wrote {}", chart.display());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    // Peers may fail as shipped (that is a finding); ferrymq or a raw baseline
    // failing is a bug, and fails the run (the CI smoke test relies on this).
    let broken: Vec<String> = cells
        .iter()
        .filter(|c| c.role != Role::Peer && c.failure.is_some())
        .map(|c| format!("{} {} {}", c.subject, c.workload, human_size(c.size)))
        .collect();
    if !broken.is_empty() {
        anyhow::bail!("ferrymq or raw-baseline runs failed: {}", broken.join(", "));
    }
    Ok(())
}
