//! The consumer alone: a backlog produced once (untimed), then drained by fresh
//! groups in turn — raw rdkafka (a `BaseConsumer` loop with `store_offset` and a
//! 500 ms auto commit, as the bench's raw subject), ferrymq-kafka through the
//! traits (`receive(100)` shared by C tasks, `Delivery::ack_all` per batch) and the
//! Worker (the bench's middleware stack) — interleaved over rounds, so the
//! bench's e2e figure can be split into its consumer part. Each figure is
//! records/s from the consumer's join to the last ack; medians are printed.
//!
//! ```text
//! scripts/kafka.sh start 9330
//! KAFKA_BROKERS=127.0.0.1:9330 cargo run --release -p ferrymq-kafka --example consume_cost
//! ```
//!
//! Env: `KAFKA_BROKERS` (required), `N` (records, default 100,000), `SIZE` (100),
//! `RAW` (more `key=value,…` librdkafka properties for the raw consumer only),
//! `ROUNDS` (3), `MODES` (`raw,traits1,traits4,worker1,worker4`), `PARAMS` (more
//! URL parameters for the ferrymq consumers), `TOPIC` (drain this topic, which holds
//! at least `N` records already, instead of producing a backlog and deleting it
//! after: to profile the consumers alone, e.g. `valgrind --tool=callgrind` at two
//! `N`; `KEEP=1` keeps the backlog's topic and prints its name), `EVENTS` (`0`: the
//! Worker modes count successes in the handler instead of from the Worker's events,
//! which subscribing makes it publish).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrymq_core::middleware::{
    handler_fn, CatchPanicLayer, ExtendVisibilityLayer, Outcome, RetryToDlqLayer,
};
use ferrymq_core::worker::Worker;
use ferrymq_core::{BoxError, Consumer, Delivery, Message, Producer};
use ferrymq_kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use tower::util::BoxService;
use tower::ServiceBuilder;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consume_cost: {e}");
            ExitCode::FAILURE
        }
    }
}

fn raw(brokers: &str, topic: &str, group: &str, n: u64) -> Result<f64, BoxError> {
    drain_inline::<false>(brokers, topic, group, n)
}

/// The raw subject's consumer settings (its best), plus `RAW`'s.
fn raw_consumer(brokers: &str, topic: &str, group: &str) -> Result<BaseConsumer, BoxError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // Its best setting, not librdkafka's default of 1 s: once the consumer's queue
        // holds `queued.min.messages` (100,000) the fetcher backs off that long, and
        // the drain of a 1M backlog ran at 0.28M records/s against 1.5–1.6M with 10 ms
        // (at 200k both ~1.0M; consume_cost, issue 10 eighth pass).
        .set("fetch.queue.backoff.ms", "10");
    if let Ok(more) = std::env::var("RAW") {
        for kv in more.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or("RAW: key=value,…")?;
            config.set(k, v);
        }
    }
    let c: BaseConsumer = config.create()?;
    c.subscribe(&[topic])?;
    while c.assignment()?.count() == 0 {
        if let Some(Err(e)) = c.poll(Duration::from_millis(50)) {
            return Err(e.into());
        }
    }
    Ok(c)
}

/// What any consumer that hands a record over owned (as a `Delivery` is) must
/// do with it beyond the raw loop: read its headers (librdkafka parses them,
/// with an allocation, even when there are none) and copy its payload out of
/// librdkafka's buffer (into shared chunks, as ferrymq's poll thread does).
struct Owned {
    partition: i32,
    offset: i64,
    payload: bytes::Bytes,
    headers: usize,
}

fn owned(m: &rdkafka::message::BorrowedMessage<'_>, chunk: &mut bytes::BytesMut) -> Owned {
    use rdkafka::message::{Headers as _, Message as _};
    let p = m.payload().unwrap_or_default();
    if chunk.capacity() - chunk.len() < p.len() {
        *chunk = bytes::BytesMut::with_capacity(16 * 1024);
    }
    chunk.extend_from_slice(p);
    Owned {
        partition: m.partition(),
        offset: m.offset(),
        payload: chunk.split().freeze(),
        headers: m.headers().map_or(0, |h| h.count()),
    }
}

/// The floor of the design on one thread: the raw loop plus [`owned`].
fn floor_inline(brokers: &str, topic: &str, group: &str, n: u64) -> Result<f64, BoxError> {
    drain_inline::<true>(brokers, topic, group, n)
}

/// The raw loop (`store_offset` per record, the auto commit), each record made
/// [`owned`] too when `OWN` (a constant, so the raw loop has no branch for it).
fn drain_inline<const OWN: bool>(
    brokers: &str,
    topic: &str,
    group: &str,
    n: u64,
) -> Result<f64, BoxError> {
    let c = raw_consumer(brokers, topic, group)?;
    let mut chunk = bytes::BytesMut::new();
    let start = Instant::now();
    let mut got = 0u64;
    let mut sum = 0u64;
    while got < n {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            let seen = if OWN {
                let r = owned(&m, &mut chunk);
                r.payload.len() + r.headers
            } else {
                rdkafka::Message::payload(&m).map_or(0, <[u8]>::len)
            };
            sum = sum.wrapping_add(seen as u64);
            c.store_offset_from_message(&m)?;
            got += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    let _ = c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(n as f64 / secs)
}

/// The floor of the design the issue asks for (a background poll thread, so a
/// slow handler never stalls the group; offsets stored only after the record
/// was handled): one thread polls and makes each record [`owned`], hands
/// batches of up to 100 to a handling thread over a bounded channel, and stores
/// the offsets the handler sends back through a locked inbox, drained once per
/// poll round. Nothing else ferrymq does (no `Delivery`, no ack handle, no
/// revoke fencing, no watermark of out-of-order acks): no consumer with this
/// shape can beat it.
fn floor_handoff(brokers: &str, topic: &str, group: &str, n: u64) -> Result<f64, BoxError> {
    let c = raw_consumer(brokers, topic, group)?;
    let inbox: Arc<std::sync::Mutex<Vec<(i32, i64)>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Owned>>(100);
    let handler = {
        let inbox = inbox.clone();
        std::thread::spawn(move || {
            let mut sum = 0u64;
            let mut acks = Vec::with_capacity(100);
            for batch in rx {
                for r in &batch {
                    sum = sum.wrapping_add(r.payload.len() as u64 + r.headers as u64);
                    acks.push((r.partition, r.offset));
                }
                drop(batch);
                inbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .append(&mut acks);
            }
            sum
        })
    };
    let mut chunk = bytes::BytesMut::new();
    let start = Instant::now();
    let (mut polled, mut stored) = (0u64, 0u64);
    // `FLOOR_BATCH`: records per hand-over (100, as the traits subjects receive).
    let per = env_or("FLOOR_BATCH", 100).max(1) as usize;
    let mut batch: Vec<Owned> = Vec::with_capacity(per);
    let mut drained: Vec<(i32, i64)> = Vec::new();
    let mut done: std::collections::HashMap<i32, i64> = Default::default();
    while stored < n {
        // Waiting in librdkafka only with nothing to hand over.
        let wait = if batch.is_empty() {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        };
        let m = if polled < n { c.poll(wait) } else { None };
        let idle = m.is_none();
        if let Some(m) = m {
            batch.push(owned(&m?, &mut chunk));
            polled += 1;
        }
        if batch.len() >= per || (idle && !batch.is_empty()) {
            tx.send(std::mem::replace(&mut batch, Vec::with_capacity(per)))?;
        }
        if idle || polled % per as u64 == 0 {
            std::mem::swap(
                &mut *inbox.lock().unwrap_or_else(|e| e.into_inner()),
                &mut drained,
            );
            for (p, o) in drained.drain(..) {
                let high = done.entry(p).or_insert(o);
                *high = (*high).max(o);
                stored += 1;
            }
            for (&p, &o) in &done {
                c.store_offset(topic, p, o + 1)?;
            }
            done.clear();
            if polled >= n {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(tx);
    std::hint::black_box(handler.join().map_err(|_| "handler thread panicked")?);
    let _ = c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(n as f64 / secs)
}

async fn traits(cfg: &KafkaConfig, n: u64, c: usize) -> Result<f64, BoxError> {
    let consumer: Arc<Box<dyn Consumer>> = Arc::new(Box::new(cfg.consumer().await?));
    // `RECEIVE`: the most one receive takes (100, as the bench's subjects).
    let most = env_or("RECEIVE", 100).max(1) as usize;
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (consumer, count) = (consumer.clone(), count.clone());
        tasks.spawn(async move {
            while count.load(Ordering::Acquire) < n {
                let batch = consumer.receive(most, Duration::from_millis(100)).await?;
                for d in &batch {
                    std::hint::black_box(d.payload().len());
                }
                Delivery::ack_all(&batch).await?;
                count.fetch_add(batch.len() as u64, Ordering::AcqRel);
            }
            Ok::<(), ferrymq_core::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = start.elapsed().as_secs_f64();
    consumer.close().await?;
    Ok(n as f64 / secs)
}

async fn worker(cfg: &KafkaConfig, n: u64, c: usize) -> Result<f64, BoxError> {
    let consumer: Box<dyn Consumer> = Box::new(cfg.consumer().await?);
    let dlq: Box<dyn Producer> = Box::new(cfg.for_topic(&cfg.dlq_topic())?.producer().await?);
    let capabilities = consumer.capabilities().clone();
    let worker = Worker::new(consumer).concurrency(c);
    let done = Arc::new(tokio::sync::Notify::new());
    let start = Instant::now();
    // Timed at the last success, like the traits modes (not the worker's
    // shutdown: its commit and leaving the group come after): counted from the
    // worker's events as the bench does, or with EVENTS=0 in the handler, so
    // the events' own cost can be told apart.
    let by_events = std::env::var("EVENTS").map_or(true, |v| v != "0");
    let handled = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(std::sync::OnceLock::new());
    let counter = if by_events {
        let mut events = worker.subscribe();
        let (d2, finished) = (done.clone(), finished.clone());
        Some(tokio::spawn(async move {
            let mut ok = 0u64;
            loop {
                match events.recv().await {
                    Ok(e) if e.outcome == Outcome::Succeeded => ok += 1,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => ok += k,
                    Err(_) => break,
                }
                if ok >= n {
                    let _ = finished.set(start.elapsed());
                    d2.notify_one();
                    break;
                }
            }
        }))
    } else {
        None
    };
    let (seen, d3, f3) = (handled.clone(), done.clone(), finished.clone());
    let service: BoxService<Delivery, (), BoxError> = ServiceBuilder::new()
        .boxed()
        .layer(ExtendVisibilityLayer::from_capabilities(&capabilities))
        .layer(RetryToDlqLayer::new(dlq).max_attempts(5))
        .layer(CatchPanicLayer::new())
        .timeout(Duration::from_secs(30))
        .service(handler_fn(move |d: Delivery| {
            std::hint::black_box(d.payload().len());
            if !by_events && seen.fetch_add(1, Ordering::AcqRel) + 1 == n {
                let _ = f3.set(start.elapsed());
                d3.notify_one();
            }
            async { Ok::<_, BoxError>(()) }
        }));
    let summary = worker
        .run_until(service, async move { done.notified().await })
        .await?;
    if let Some(counter) = counter {
        counter.await?;
    }
    let secs = finished.get().ok_or("worker: stopped early")?.as_secs_f64();
    if summary.failed > 0 {
        return Err(format!("worker: {summary}").into());
    }
    Ok(n as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run() -> Result<(), BoxError> {
    let brokers = std::env::var("KAFKA_BROKERS").map_err(|_| "set KAFKA_BROKERS=host:port")?;
    let n = env_or("N", 100_000);
    let size = env_or("SIZE", 100) as usize;
    let rounds = env_or("ROUNDS", 3);
    let modes =
        std::env::var("MODES").unwrap_or_else(|_| "raw,traits1,traits4,worker1,worker4".into());
    let params = std::env::var("PARAMS")
        .map(|p| format!("&{p}"))
        .unwrap_or_default();
    let run_id = rand::random::<u32>();
    let given = std::env::var("TOPIC").ok().filter(|t| !t.is_empty());
    let topic = given.clone().unwrap_or_else(|| {
        format!(
            "consume-cost-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )
    });
    let url = |group: &str| {
        format!(
            "kafka://{brokers}/{topic}?partitions=3&commit_interval=500ms&group={group}{params}"
        )
    };
    let base = KafkaConfig::from_url(&url("producer"))?;
    if given.is_none() {
        let producer = base.producer().await?;
        let body = vec![b'x'; size];
        let mut sent = 0u64;
        while sent < n {
            let k = 1000.min(n - sent);
            let batch: Vec<Message> = (0..k).map(|_| Message::new(body.clone())).collect();
            for r in producer.send_batch(batch).await? {
                r?;
            }
            sent += k;
        }
        producer.close().await?;
    }
    let modes: Vec<&str> = modes.split(',').collect();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            // A new group per run too: a kept topic is drained again from the start.
            let group = format!("{topic}-{mode}-{round}-{run_id:08x}");
            let cfg = KafkaConfig::from_url(&url(&group))?;
            let rate = match *mode {
                "raw" => {
                    let (b, t, g) = (brokers.clone(), topic.clone(), group.clone());
                    tokio::task::spawn_blocking(move || {
                        raw(&b, &t, &g, n).map_err(|e| e.to_string())
                    })
                    .await??
                }
                "floor-inline" | "floor-handoff" => {
                    let (b, t, g) = (brokers.clone(), topic.clone(), group.clone());
                    let inline = *mode == "floor-inline";
                    tokio::task::spawn_blocking(move || {
                        if inline {
                            floor_inline(&b, &t, &g, n)
                        } else {
                            floor_handoff(&b, &t, &g, n)
                        }
                        .map_err(|e| e.to_string())
                    })
                    .await??
                }
                "traits1" => traits(&cfg, n, 1).await?,
                "traits4" => traits(&cfg, n, 4).await?,
                "worker1" => worker(&cfg, n, 1).await?,
                "worker4" => worker(&cfg, n, 4).await?,
                other => return Err(format!("unknown mode {other}").into()),
            };
            println!("round {round} {mode}: {rate:.0} records/s");
            results[i].push(rate);
        }
    }
    let raw_median = modes
        .iter()
        .position(|m| *m == "raw")
        .map(|i| median(&mut results[i].clone()));
    for (i, mode) in modes.iter().enumerate() {
        let m = median(&mut results[i]);
        let ratio = raw_median.map_or(String::new(), |r| format!(" ({:.2}x raw)", m / r));
        println!("median {mode}: {m:.0} records/s{ratio}");
    }
    if std::env::var("KEEP").is_ok_and(|v| v == "1") {
        println!("kept topic {topic}");
    } else if given.is_none() {
        ferrymq_core::admin::Admin::delete(&base.admin()?).await?;
    }
    Ok(())
}
