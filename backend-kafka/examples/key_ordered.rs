//! Key-ordered throughput on Kafka: the Worker with `ordered_by_key` at
//! concurrency 64, handlers of 1 ms, records over 1,000 keys drawn from a Zipf
//! distribution with exponent 1 — the mode Confluent's parallel-consumer publishes
//! (~60k records/s). Prints the rate, the ideal (concurrency ÷ handler time) and
//! the bound the hottest key sets (its records run one after another), and checks
//! per-key order. Both bounds are also given for the handler time measured: a
//! `tokio::time::sleep` of 1 ms lasts longer (tokio's timer ticks in whole
//! milliseconds), and a hottest key runs its records one after another at that
//! measured pace, whatever the consumer does.
//!
//! ```text
//! scripts/kafka.sh start 9300
//! KAFKA_BROKERS=127.0.0.1:9300 cargo run --release -p ferrymq-kafka --example key_ordered
//! ```
//!
//! Env: `KAFKA_BROKERS` (required), `N` (records, default 50,000), `CONCURRENCY`
//! (64), `KEYS` (1,000), `HANDLER_US` (1,000), `PARTITIONS` (12), `PREFETCH` (the
//! Worker's default when unset), `RETRY_MODE` (`tiered`).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrymq_core::middleware::{handler_fn, Outcome};
use ferrymq_core::worker::Worker;
use ferrymq_core::{BoxError, Delivery, Message, Producer};
use ferrymq_kafka::KafkaConfig;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Key indexes drawn from Zipf(s = 1) over `keys` keys (inverse CDF).
fn zipf_keys(n: u64, keys: usize) -> Vec<usize> {
    let weights: Vec<f64> = (1..=keys).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(keys);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    (0..n)
        .map(|_| {
            let u: f64 = rand::random();
            cdf.partition_point(|c| *c < u).min(keys - 1)
        })
        .collect()
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("key_ordered: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let brokers = std::env::var("KAFKA_BROKERS").map_err(|_| "set KAFKA_BROKERS=host:port")?;
    let n = env_or("N", 50_000);
    let concurrency = env_or("CONCURRENCY", 64) as usize;
    let keys = env_or("KEYS", 1_000) as usize;
    let handler = Duration::from_micros(env_or("HANDLER_US", 1_000));
    let partitions = env_or("PARTITIONS", 12);
    let mode = std::env::var("RETRY_MODE").unwrap_or_else(|_| "tiered".into());
    let topic = format!(
        "key-ordered-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let cfg = KafkaConfig::from_url(&format!(
        "kafka://{brokers}/{topic}?partitions={partitions}&retry_mode={mode}&retry_tiers=1s"
    ))?;

    // The backlog first (timed separately), so the run measures consuming.
    let drawn = zipf_keys(n, keys);
    let mut per_key = vec![0u64; keys];
    for k in &drawn {
        per_key[*k] += 1;
    }
    let hottest = per_key.iter().copied().max().unwrap_or(0);
    let producer = cfg.producer().await?;
    let mut seq: HashMap<usize, u64> = HashMap::new();
    let messages: Vec<Message> = drawn
        .iter()
        .map(|k| {
            let s = seq.entry(*k).or_default();
            *s += 1;
            Message::new(s.to_string()).key(format!("key-{k}"))
        })
        .collect();
    let t = Instant::now();
    for chunk in messages.chunks(1000) {
        for r in producer.send_batch(chunk.to_vec()).await? {
            r?;
        }
    }
    let produce_secs = t.elapsed().as_secs_f64();

    let consumer = cfg.consumer().await?;
    let mut worker = Worker::new(consumer)
        .concurrency(concurrency)
        .ordered_by_key(true);
    if let Ok(p) = std::env::var("PREFETCH") {
        worker = worker.prefetch(p.parse()?);
    }
    let mut events = worker.subscribe();
    let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let violations = Arc::new(Mutex::new(0u64));
    let slept_ns = Arc::new(AtomicU64::new(0));
    let (l, v, slept) = (last.clone(), violations.clone(), slept_ns.clone());
    let service = handler_fn(move |d: Delivery| {
        let (last, violations, slept) = (l.clone(), v.clone(), slept.clone());
        async move {
            let began = Instant::now();
            tokio::time::sleep(handler).await;
            let took = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
            slept.fetch_add(took, AtomicOrdering::Relaxed);
            let s: u64 = std::str::from_utf8(d.payload())?.parse()?;
            let key = d.key().unwrap_or_default().to_string();
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            let prev = last.insert(key, s).unwrap_or(0);
            if s != prev + 1 {
                *violations.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
            Ok::<(), BoxError>(())
        }
    });
    let done = Arc::new(tokio::sync::Notify::new());
    let (d2, target) = (done.clone(), n);
    let counter = tokio::spawn(async move {
        let mut ok = 0u64;
        let mut first: Option<Instant> = None;
        while let Ok(e) = events.recv().await {
            first.get_or_insert_with(Instant::now);
            if e.outcome == Outcome::Succeeded {
                ok += 1;
                if ok == target {
                    d2.notify_one();
                    break;
                }
            }
        }
        first
    });
    let start = Instant::now();
    let summary = worker
        .run_until(service, async move { done.notified().await })
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let _ = counter.await;
    let rate = n as f64 / secs;
    let ideal = concurrency as f64 / handler.as_secs_f64();
    let key_bound = n as f64 / (hottest as f64 * handler.as_secs_f64());
    let bound = ideal.min(key_bound);
    // The same bounds at the handler time measured (the mean of every handler's sleep).
    let measured = Duration::from_nanos(slept_ns.load(AtomicOrdering::Relaxed) / n.max(1));
    let measured_secs = measured.as_secs_f64().max(1e-9);
    let measured_bound =
        (concurrency as f64 / measured_secs).min(n as f64 / (hottest as f64 * measured_secs));
    let violations = *violations.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "key_ordered ({mode}): {n} records over {keys} Zipf keys (hottest {hottest}), \
         {partitions} partitions, concurrency {concurrency}, handler {handler:?}: \
         {rate:.0} records/s in {secs:.2} s; ideal {ideal:.0}/s (concurrency / handler), \
         hottest-key bound {key_bound:.0}/s; {:.2} of min(ideal, bound); {:.2} of ideal; \
         handler time measured {measured:?}, min(ideal, bound) at that time \
         {measured_bound:.0}/s, {:.2} of it; \
         produce {:.0}/s; order violations {violations}; {summary}",
        rate / bound,
        rate / ideal,
        rate / measured_bound,
        n as f64 / produce_secs,
    );
    ferrymq_core::admin::Admin::delete(&cfg.admin()?).await?;
    if violations > 0 {
        return Err(format!("{violations} per-key order violations").into());
    }
    Ok(())
}
