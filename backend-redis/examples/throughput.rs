//! Quick side-by-side throughput of ferrymq-redis against raw redis-rs pipelines on
//! the same server (the full comparison lives in the `bench` crate).
//!
//! ```text
//! scripts/redis.sh start 6399
//! cargo run --release -p ferrymq-redis --example throughput -- redis://127.0.0.1:6399 100000 100
//! ```
//!
//! Produce: batches of 100 (`send_batch` vs a pipeline of 100 `XADD`).
//! Process: `receive(100)` + concurrent `ack()` per batch vs `XREADGROUP COUNT 100` +
//! one `XACK` + `XDEL`, with 1 and 16 consumer tasks (ferrymq: one consumer shared by
//! the tasks; raw: one connection and consumer name per task).
//!
//! Environment: `FERRY_ONLY=1` skips the raw runs (for profiling), `TASKS=1|16` runs
//! one row, `FERRY_PARAMS=connections=4&pool_size=16` adds URL parameters.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrymq_core::{Consumer, Message, Producer};
use ferrymq_redis::RedisConfig;
use redis::Value;

const BATCH: usize = 100;

fn payload(size: usize, i: u64) -> bytes::Bytes {
    let mut v = vec![b'x'; size];
    let s = i.to_string();
    let n = s.len().min(size);
    v[..n].copy_from_slice(&s.as_bytes()[..n]);
    v.into()
}

async fn raw_produce(url: &str, key: &str, n: u64, size: usize) -> f64 {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n {
        let mut pipe = redis::pipe();
        for i in 0..BATCH as u64 {
            pipe.cmd("XADD")
                .arg(key)
                .arg("*")
                .arg("p")
                .arg(payload(size, sent + i).as_ref())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
        sent += BATCH as u64;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

async fn raw_consume(url: &str, key: &str, n: u64, tasks: usize) -> f64 {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: Result<(), _> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (url, key, done) = (url.to_string(), key.to_string(), done.clone());
        set.spawn(async move {
            let mut conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            while done.load(Ordering::Relaxed) < n {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg(format!("c{t}"))
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let mut ids = Vec::new();
                if let Value::Array(streams) = reply {
                    for s in streams {
                        if let Value::Array(mut parts) = s {
                            if let Some(Value::Array(entries)) = parts.pop() {
                                for e in entries {
                                    if let Value::Array(mut e) = e {
                                        e.truncate(1);
                                        if let Some(Value::BulkString(id)) = e.pop() {
                                            ids.push(id);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                if ids.is_empty() {
                    continue;
                }
                let mut pipe = redis::pipe();
                let ack = pipe.cmd("XACK").arg(&key).arg("g");
                for id in &ids {
                    ack.arg(id.as_slice());
                }
                ack.ignore();
                let del = pipe.cmd("XDEL").arg(&key);
                for id in &ids {
                    del.arg(id.as_slice());
                }
                del.ignore();
                pipe.query_async::<()>(&mut conn).await.unwrap();
                done.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
        });
    }
    while set.join_next().await.is_some() {}
    n as f64 / t0.elapsed().as_secs_f64()
}

async fn ferry_produce(cfg: &RedisConfig, n: u64, size: usize) -> f64 {
    let p: Box<dyn Producer> = Box::new(cfg.producer().await.unwrap());
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (0..BATCH as u64)
            .map(|i| Message::new(payload(size, sent + i)))
            .collect();
        for r in p.send_batch(batch).await.unwrap() {
            r.unwrap();
        }
        sent += BATCH as u64;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

async fn ferry_consume(cfg: &RedisConfig, n: u64, tasks: usize) -> f64 {
    let c: Arc<Box<dyn Consumer>> = Arc::new(Box::new(cfg.consumer().await.unwrap()));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (c, done) = (c.clone(), done.clone());
        set.spawn(async move {
            while done.load(Ordering::Relaxed) < n {
                let batch = c.receive(BATCH, Duration::from_millis(100)).await.unwrap();
                futures::future::try_join_all(batch.iter().map(|d| d.ack()))
                    .await
                    .unwrap();
                done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        });
    }
    while set.join_next().await.is_some() {}
    n as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6399".into());
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let size: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let runs = 3;
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("produce", vec![], vec![]),
        ("process c=1", vec![], vec![]),
        ("process c=16", vec![], vec![]),
    ];
    for run in 0..runs {
        for (row, tasks) in [(1usize, 1usize), (2, 16)] {
            if std::env::var("TASKS").is_ok_and(|t| t != tasks.to_string()) {
                continue;
            }
            if std::env::var_os("FERRY_ONLY").is_none() {
                let key = format!("raw-bench-{run}-{tasks}");
                let p = raw_produce(&url, &key, n, size).await;
                if tasks == 1 {
                    rows[0].1.push(p);
                }
                rows[row].1.push(raw_consume(&url, &key, n, tasks).await);
            } else {
                rows[0].1.push(1.0);
                rows[row].1.push(1.0);
            }

            let extra = std::env::var("FERRY_PARAMS").unwrap_or_default();
            let cfg =
                RedisConfig::from_url(&format!("{url}/ferry-bench-{run}-{tasks}?{extra}")).unwrap();
            let p = ferry_produce(&cfg, n, size).await;
            if tasks == 1 {
                rows[0].2.push(p);
            }
            rows[row].2.push(ferry_consume(&cfg, n, tasks).await);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!("{n} messages of {size} B, median of {runs} (msg/s)");
    println!("| workload | raw redis-rs | ferrymq-redis | ferrymq/raw |");
    println!("|---|---|---|---|");
    for (name, mut raw, mut ferry) in rows {
        let (r, f) = (median(&mut raw), median(&mut ferry));
        println!("| {name} | {r:.0} | {f:.0} | {:.2} |", f / r);
    }
}
