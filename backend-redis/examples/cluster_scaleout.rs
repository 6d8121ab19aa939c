//! Scale-out on paper: the Redis backend's end-to-end throughput on one redis-server
//! against a 3-master Redis Cluster, with `K` queues spread over the masters.
//!
//! ```text
//! scripts/redis.sh start 6442
//! scripts/redis-cluster.sh start 7100
//! cargo run --release -p ferrymq-redis --example cluster_scaleout -- \
//!     redis://127.0.0.1:6442 redis://127.0.0.1:7100 [QUEUES=6] [MESSAGES=60000] [ROUNDS=3] [CONCURRENCY=16]
//! ```
//!
//! Each run: `QUEUES` queues, each with its own producer task (`send_batch` of 100,
//! 100-byte payloads) and its own consumer, all at once, until `MESSAGES` in total are
//! consumed; msg/s = MESSAGES / that time. Two consumers per run, in turn:
//! - `worker`: ferrymq's `Worker` at `CONCURRENCY` with the default stack
//!   (ExtendVisibility + RetryToDlq + CatchPanic + Timeout), as the bench's
//!   `ferrymq-redis-worker` subject;
//! - `traits`: `receive(100)` + concurrent `ack()` per batch, 4 tasks per queue, as the
//!   bench's `ferrymq-redis` subject.
//!
//! On the cluster, queue names are picked so each master holds `QUEUES / 3` of them
//! (its `{queue}` hash tag decides the slot). Single and cluster runs are interleaved
//! round by round; medians are printed, with the CPU each redis-server and this
//! process used during the run (from /proc: this only works with the servers on
//! this machine), which says who the bottleneck was.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrymq_core::middleware::{
    handler_fn, CatchPanicLayer, ExtendVisibilityLayer, RetryToDlqLayer,
};
use ferrymq_core::worker::Worker;
use ferrymq_core::{BoxError, Consumer, Delivery, Message, Producer};
use ferrymq_redis::RedisConfig;
use redis::Value;
use tower::util::BoxService;
use tower::ServiceBuilder;

const BATCH: usize = 100;
const SIZE: usize = 100;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Worker,
    Traits,
}

struct Target {
    name: &'static str,
    url: String,
    cluster: bool,
    /// `host:port` of every master (one for the single server).
    nodes: Vec<String>,
}

async fn plain(addr: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `host:port` -> slot ranges, from CLUSTER SLOTS.
async fn masters(seed: &str) -> BTreeMap<String, Vec<(i64, i64)>> {
    let slots: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut plain(seed).await)
        .await
        .unwrap();
    let int = |v: &Value| match v {
        Value::Int(i) => *i,
        other => panic!("CLUSTER SLOTS: {other:?}"),
    };
    let mut out: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for range in slots {
        let Value::Array(parts) = range else { continue };
        let Value::Array(master) = &parts[2] else {
            continue;
        };
        let host = match &master[0] {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            _ => continue,
        };
        out.entry(format!("{host}:{}", int(&master[1])))
            .or_default()
            .push((int(&parts[0]), int(&parts[1])));
    }
    out
}

/// `k` queue names for run `tag`; on a cluster, as many per master as it can be.
async fn queue_names(target: &Target, tag: &str, k: usize) -> Vec<String> {
    if !target.cluster {
        return (0..k).map(|i| format!("scaleout-{tag}-{i}")).collect();
    }
    let seed = &target.nodes[0];
    let map = masters(seed).await;
    let per = k.div_ceil(map.len());
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    let mut names = Vec::new();
    let mut conn = plain(seed).await;
    for i in 0.. {
        if names.len() == k {
            break;
        }
        let name = format!("scaleout-{tag}-{i}");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        let owner = map
            .iter()
            .find(|(_, r)| r.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .map(|(n, _)| n.clone())
            .unwrap();
        let c = count.entry(owner).or_default();
        if *c < per {
            *c += 1;
            names.push(name);
        }
    }
    names
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(f64::NAN)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
    ticks / 100.0
}

async fn server_pid(addr: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut plain(addr).await)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap_or("0")
        .trim()
        .to_string()
}

fn payload(i: u64) -> bytes::Bytes {
    let mut v = vec![b'x'; SIZE];
    let s = i.to_string();
    v[..s.len()].copy_from_slice(s.as_bytes());
    v.into()
}

struct RunResult {
    rate: f64,
    /// CPU share (1.0 = one core) per redis-server, and of this process.
    server_cpu: Vec<f64>,
    client_cpu: f64,
}

async fn run(target: &Target, mode: Mode, tag: &str, k: usize, n: u64, c: usize) -> RunResult {
    let names = queue_names(target, tag, k).await;
    let per_queue = n / k as u64;
    let total = per_queue * k as u64;
    let mut conns = Vec::new();
    for q in &names {
        // Defaults, as the bench's ferrymq-redis subjects.
        let query = if target.cluster { "?cluster=true" } else { "" };
        let cfg = RedisConfig::from_url(&format!("{}/{q}{query}", target.url)).unwrap();
        let (p, consumer) = cfg.connect().await.unwrap();
        let dlq = RedisConfig::from_url(&format!("{}/{q}-dlq{query}", target.url))
            .unwrap()
            .producer()
            .await
            .unwrap();
        conns.push((cfg, p, consumer, dlq));
    }
    let pids: Vec<String> =
        futures::future::join_all(target.nodes.iter().map(|a| server_pid(a))).await;
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_secs(p)).collect();
    let me0 = cpu_secs("self");
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut workers = Vec::new();
    for (_, producer, consumer, dlq) in &conns {
        let producer = producer.clone();
        set.spawn(async move {
            let mut sent = 0u64;
            while sent < per_queue {
                let m = (BATCH as u64).min(per_queue - sent);
                let batch: Vec<Message> = (0..m).map(|i| Message::new(payload(sent + i))).collect();
                for r in producer.send_batch(batch).await.unwrap() {
                    r.unwrap();
                }
                sent += m;
            }
        });
        let (consumer, done) = (consumer.clone(), done.clone());
        match mode {
            Mode::Traits => {
                for _ in 0..4 {
                    let (consumer, done) = (consumer.clone(), done.clone());
                    set.spawn(async move {
                        while done.load(Ordering::Relaxed) < total {
                            let batch = consumer
                                .receive(BATCH, Duration::from_millis(100))
                                .await
                                .unwrap();
                            let got = batch.len() as u64;
                            futures::future::try_join_all(batch.iter().map(|d| d.ack()))
                                .await
                                .unwrap();
                            done.fetch_add(got, Ordering::Relaxed);
                        }
                    });
                }
            }
            Mode::Worker => {
                let dlq = dlq.clone();
                let caps = consumer.capabilities().clone();
                let worker = Worker::new(consumer).concurrency(c);
                let seen = done.clone();
                let service: BoxService<Delivery, (), BoxError> = ServiceBuilder::new()
                    .boxed()
                    .layer(ExtendVisibilityLayer::from_capabilities(&caps))
                    .layer(RetryToDlqLayer::new(dlq).max_attempts(5))
                    .layer(CatchPanicLayer::new())
                    .timeout(Duration::from_secs(30))
                    .service(handler_fn(move |d: Delivery| {
                        let seen = seen.clone();
                        async move {
                            std::hint::black_box(d.payload().len());
                            seen.fetch_add(1, Ordering::Relaxed);
                            Ok::<_, BoxError>(())
                        }
                    }));
                let stop = done.clone();
                workers.push(tokio::spawn(async move {
                    worker
                        .run_until(service, async move {
                            while stop.load(Ordering::Relaxed) < total {
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                        })
                        .await
                        .unwrap()
                }));
            }
        }
    }
    while done.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let server_cpu = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| (cpu_secs(p) - c0) / elapsed)
        .collect();
    let client_cpu = (cpu_secs("self") - me0) / elapsed;
    while set.join_next().await.is_some() {}
    for w in workers {
        w.await.unwrap();
    }
    for (cfg, ..) in &conns {
        cfg.delete_queue().await.unwrap();
        let mut dlq = cfg.clone();
        dlq.queue.push_str("-dlq");
        dlq.delete_queue().await.unwrap();
    }
    RunResult {
        rate: total as f64 / elapsed,
        server_cpu,
        client_cpu,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let single = args
        .first()
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6442".into());
    let cluster = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:7100".into());
    let (k, n, rounds, c) = (
        arg(2, 6) as usize,
        arg(3, 60_000),
        arg(4, 3),
        arg(5, 16) as usize,
    );
    let seed = cluster
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let targets = [
        Target {
            name: "1 shard (one redis-server)",
            nodes: vec![single
                .trim_start_matches("redis://")
                .trim_end_matches('/')
                .to_string()],
            url: single.trim_end_matches('/').to_string(),
            cluster: false,
        },
        Target {
            name: "3 shards (Redis Cluster, 3 masters)",
            nodes: masters(&seed).await.into_keys().collect(),
            url: cluster.trim_end_matches('/').to_string(),
            cluster: true,
        },
    ];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.trim());
    println!(
        "cluster_scaleout: {k} queues, {n} messages of {SIZE} B per run, {rounds} rounds, worker concurrency {c}, {} cores",
        std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0)
    );
    let mut results: BTreeMap<(Mode, usize), Vec<RunResult>> = BTreeMap::new();
    for round in 0..rounds {
        for mode in [Mode::Worker, Mode::Traits] {
            for (t, target) in targets.iter().enumerate() {
                let tag = format!("{}-{round}-{mode:?}-{t}", std::process::id());
                let r = run(target, mode, &tag, k, n, c).await;
                println!(
                    "  round {round} {mode:?} {:<36} {:>9.0} msg/s  servers cpu {:?}  client cpu {:.2}",
                    target.name,
                    r.rate,
                    r.server_cpu.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>(),
                    r.client_cpu
                );
                results.entry((mode, t)).or_default().push(r);
            }
        }
    }
    println!(
        "\n| consumer | target | e2e msg/s (median) | redis-server CPU (cores, each) | client CPU (cores) | server CPU µs/msg (all shards) | client CPU µs/msg |"
    );
    println!("|---|---|---:|---|---:|---:|---:|");
    for ((mode, t), rs) in &results {
        let rate = median(rs.iter().map(|r| r.rate).collect());
        let nodes = rs[0].server_cpu.len();
        let cpu: Vec<String> = (0..nodes)
            .map(|i| {
                format!(
                    "{:.2}",
                    median(rs.iter().map(|r| r.server_cpu[i]).collect())
                )
            })
            .collect();
        let client = median(rs.iter().map(|r| r.client_cpu).collect());
        // CPU per message: what the run cost, whatever share of the machine it got.
        let per_msg = |f: &dyn Fn(&RunResult) -> f64| {
            median(rs.iter().map(|r| f(r) / r.rate * 1e6).collect())
        };
        let server_us = per_msg(&|r| r.server_cpu.iter().sum::<f64>());
        let client_us = per_msg(&|r| r.client_cpu);
        println!(
            "| {mode:?} | {} | {rate:.0} | {} | {client:.2} | {server_us:.1} | {client_us:.1} |",
            targets[*t].name,
            cpu.join(" / ")
        );
    }
    for mode in [Mode::Worker, Mode::Traits] {
        let one = median(results[&(mode, 0)].iter().map(|r| r.rate).collect());
        let three = median(results[&(mode, 1)].iter().map(|r| r.rate).collect());
        println!("{mode:?}: 3 shards / 1 shard = {:.2}", three / one);
    }
}
