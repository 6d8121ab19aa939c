//! Throughput of an ordered queue (`ordered=true`, per-key order) against a plain
//! one on the same server, with messages spread over 1 000 keys.
//!
//! ```text
//! scripts/redis.sh start 6399
//! cargo run --release -p ferrymq-redis --example ordered_throughput -- redis://127.0.0.1:6399 50000 1000
//! ```
//!
//! Arguments: server URL (no queue), messages, keys, tasks (default 16). For each of
//! plain and ordered, three runs: send the messages in batches of 100 (keys
//! interleaved, `key-0`, `key-1`, … so each batch spans many keys), then process them
//! with the tasks sharing one consumer, each `receive(100)` + acking every delivery
//! concurrently;
//! the rate is the processing rate (messages acked per second). Prints each run and
//! the medians, and the ordered/plain ratio. The ordered runs also check the order:
//! a key's messages must be acked in send order (the run panics otherwise).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrymq_core::{Consumer, Message, Producer};
use ferrymq_redis::RedisConfig;

const BATCH: usize = 100;

async fn run(base: &str, ordered: bool, n: u64, keys: u64, tasks: usize, run: usize) -> f64 {
    let queue = format!("ordered-tput-{}-{}-{run}", std::process::id(), ordered);
    let query = if ordered { "?ordered=true" } else { "" };
    let cfg = RedisConfig::from_url(&format!("{base}/{queue}{query}")).unwrap();
    let (p, c) = cfg.connect().await.unwrap();
    let mut sent = 0;
    while sent < n {
        let batch: Vec<Message> = (sent..(sent + BATCH as u64).min(n))
            .map(|i| Message::new(format!("{}", i / keys)).key(format!("key-{}", i % keys)))
            .collect();
        sent += batch.len() as u64;
        for r in p.send_batch(batch).await.unwrap() {
            r.unwrap();
        }
    }
    let c: Arc<Box<dyn Consumer>> = Arc::new(Box::new(c));
    let done = Arc::new(AtomicU64::new(0));
    let next: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (c, done, next) = (c.clone(), done.clone(), next.clone());
        set.spawn(async move {
            while done.load(Ordering::Relaxed) < n {
                let batch = c.receive(BATCH, Duration::from_millis(100)).await.unwrap();
                if ordered {
                    let mut next = next.lock().unwrap();
                    for d in &batch {
                        let seq: u64 = String::from_utf8_lossy(d.payload()).parse().unwrap();
                        let want = next.entry(d.key().unwrap().to_string()).or_insert(0);
                        assert_eq!(seq, *want, "key {:?} out of order", d.key());
                        *want += 1;
                    }
                }
                futures::future::try_join_all(batch.iter().map(|d| d.ack()))
                    .await
                    .unwrap();
                done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        });
    }
    while set.join_next().await.is_some() {}
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    cfg.delete_queue().await.unwrap();
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "redis://127.0.0.1:6399".into());
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50_000);
    let keys: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let tasks: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(16);
    let (mut plain, mut ordered) = (Vec::new(), Vec::new());
    // ORDERED_THROUGHPUT_ONLY=plain|ordered: run one side only (server-side
    // profiling: `INFO commandstats` of one kind of queue).
    let only = std::env::var("ORDERED_THROUGHPUT_ONLY").unwrap_or_default();
    for i in 0..3 {
        let p = if only == "ordered" {
            f64::NAN
        } else {
            run(&base, false, n, keys, tasks, i).await
        };
        let o = if only == "plain" {
            f64::NAN
        } else {
            run(&base, true, n, keys, tasks, i).await
        };
        println!("run {i}: plain {p:>9.0} msg/s   ordered {o:>9.0} msg/s");
        plain.push(p);
        ordered.push(o);
    }
    let (p, o) = (median(plain), median(ordered));
    println!(
        "median of 3 ({n} messages, {keys} keys, {tasks} tasks x receive({BATCH})): \
         plain {p:.0} msg/s, ordered {o:.0} msg/s, ordered/plain {:.2}",
        o / p
    );
}
