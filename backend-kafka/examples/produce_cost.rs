//! The producer alone, as the bench's produce workload drives it: raw rdkafka (a
//! `ThreadedProducer` whose context counts delivery reports, every record in
//! flight at once — the bench's `raw-kafka`) and ferrymq-kafka through
//! `Box<dyn Producer>` (`send_batch(100)`, every batch in flight at once — the
//! bench's `ferrymq-kafka`), same librdkafka settings, interleaved over rounds.
//! Small enough to profile (`perf record -g`, `perf stat -e instructions`) where
//! the bench binary is not.
//!
//! ```text
//! scripts/kafka.sh start 9320
//! KAFKA_BROKERS=127.0.0.1:9320 cargo run --release -p ferrymq-kafka --example produce_cost
//! ```
//!
//! Env: `KAFKA_BROKERS` (required), `N` (records per run, default 200,000), `SIZE`
//! (100), `ROUNDS` (3), `MODES` (`raw,ferry`; also `future`: raw rdkafka with a
//! result per record, a `FutureProducer` with every `DeliveryFuture` awaited), `RAW` (more `key=value,…` librdkafka
//! properties for the raw producer only), `PARAMS` (more URL parameters for
//! ferrymq's producer).

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_core::{BoxError, Message, Producer};
use ferrymq_kafka::KafkaConfig;
use futures::stream::{FuturesUnordered, StreamExt as _};
use futures::FutureExt as _;
use rdkafka::client::ClientContext;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::producer::{FutureProducer, FutureRecord, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;

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
            eprintln!("produce_cost: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The bench's payload: `size` bytes, the first 8 a stamp.
fn payload(size: usize, stamp: u64) -> Bytes {
    let mut v = vec![b'x'; size.max(8)];
    v[..8].copy_from_slice(&stamp.to_le_bytes());
    Bytes::from(v)
}

#[derive(Default)]
struct Counted {
    reported: AtomicU64,
    expected: AtomicU64,
    failed: AtomicU64,
    all_reported: tokio::sync::Notify,
}

impl ClientContext for Counted {}

impl ProducerContext for Counted {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Ordering::AcqRel);
        }
        let reported = self.reported.fetch_add(1, Ordering::AcqRel) + 1;
        if reported == self.expected.load(Ordering::Acquire) {
            self.all_reported.notify_one();
        }
    }
}

/// ferrymq's producer settings for the raw subjects, plus `RAW`'s.
fn raw_config(brokers: &str) -> Result<ClientConfig, BoxError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "raw")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000")
        .set("message.max.bytes", "1048588")
        .set("linger.ms", "2");
    if let Ok(more) = std::env::var("RAW") {
        for kv in more.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or("RAW: key=value,…")?;
            c.set(k, v);
        }
    }
    Ok(c)
}

/// The bench's raw-kafka produce: ferrymq's producer settings, a context counting
/// reports, every record in flight, a 1 ms sleep when librdkafka's queue is full.
async fn raw(brokers: &str, topic: &str, n: u64, size: usize) -> Result<f64, BoxError> {
    let p: ThreadedProducer<Counted> =
        raw_config(brokers)?.create_with_context(Counted::default())?;
    p.client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counted = p.context();
    counted.reported.store(0, Ordering::Release);
    counted.expected.store(n, Ordering::Release);
    let start = Instant::now();
    for i in 0..n {
        let body = payload(size, i);
        let mut record: BaseRecord<'_, (), [u8], ()> = BaseRecord::to(topic).payload(&body);
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((e, back)) => {
                    if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                        return Err(e.into());
                    }
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    counted.all_reported.notified().await;
    let secs = start.elapsed().as_secs_f64();
    if counted.failed.load(Ordering::Acquire) > 0 {
        return Err("raw: failed deliveries".into());
    }
    p.flush(Timeout::After(Duration::from_secs(10)))?;
    Ok(n as f64 / secs)
}

/// raw rdkafka with a result per record, as ferrymq's `send_batch` gives: a
/// `FutureProducer` (`send_result`, every record in flight, a 1 ms sleep when
/// librdkafka's queue is full), each `DeliveryFuture` awaited.
async fn raw_future(brokers: &str, topic: &str, n: u64, size: usize) -> Result<f64, BoxError> {
    let mut c = raw_config(brokers)?;
    c.set("client.id", "raw-future");
    let p: FutureProducer = c.create()?;
    p.client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        let body = payload(size, i);
        let mut record: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic).payload(&body);
        loop {
            match p.send_result(record) {
                Ok(delivery) => {
                    inflight.push(delivery);
                    break;
                }
                Err((e, back)) => {
                    if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                        return Err(e.into());
                    }
                    record = back;
                    // Collect what was reported meanwhile, then wait for room.
                    while let Some(Some(r)) = inflight.next().now_or_never() {
                        r?.map_err(|(e, _)| e)?;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    while let Some(r) = inflight.next().await {
        r?.map_err(|(e, _)| e)?;
    }
    let secs = start.elapsed().as_secs_f64();
    p.flush(Timeout::After(Duration::from_secs(10)))?;
    Ok(n as f64 / secs)
}

/// The floor of a producer that gives a result per record, as `send_batch` does:
/// the raw `ThreadedProducer`, its delivery opaque the record's index, each
/// report stored in its record's slot (an atomic, no lock), one wake-up per
/// batch of 100 once its last report came, and every batch in flight, built
/// when its send starts (as the `ferry` mode's are). Nothing else ferrymq does
/// (no `Message`, no routing, no size checks, no receipts): no producer with
/// per-record results can beat it.
async fn floor(brokers: &str, topic: &str, n: u64, size: usize) -> Result<f64, BoxError> {
    let mut c = raw_config(brokers)?;
    c.set("client.id", "floor");
    let batches = n.div_ceil(100) as usize;
    let ctx = Slots {
        offsets: (0..n)
            .map(|_| std::sync::atomic::AtomicI64::new(-1))
            .collect(),
        left: (0..batches)
            .map(|b| {
                let len = n.min(b as u64 * 100 + 100) - b as u64 * 100;
                std::sync::atomic::AtomicU32::new(len as u32)
            })
            .collect(),
        wake: (0..batches).map(|_| std::sync::Mutex::new(None)).collect(),
    };
    let p: ThreadedProducer<Slots> = c.create_with_context(ctx)?;
    p.client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let p = &p;
    let start = Instant::now();
    let mut inflight: FuturesUnordered<_> = (0..batches)
        .map(|b| async move {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            *p.context().wake[b]
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(tx);
            let first = b as u64 * 100;
            let bodies: Vec<Bytes> = (first..n.min(first + 100))
                .map(|i| payload(size, i))
                .collect();
            for (i, body) in (first..).zip(&bodies) {
                let mut record: BaseRecord<'_, (), [u8], usize> =
                    BaseRecord::with_opaque_to(topic, i as usize).payload(body.as_ref());
                loop {
                    match p.send(record) {
                        Ok(()) => break,
                        Err((e, back)) => {
                            if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                                return Err::<u64, BoxError>(e.into());
                            }
                            record = back;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
            drop(bodies);
            rx.await.map_err(|_| "floor: a batch was never reported")?;
            // The results: one per record, read once.
            let offsets = &p.context().offsets[first as usize..n.min(first + 100) as usize];
            let failed = offsets
                .iter()
                .filter(|o| o.load(Ordering::Acquire) < 0)
                .count();
            Ok(failed as u64)
        })
        .collect();
    while let Some(failed) = inflight.next().await {
        if failed? > 0 {
            return Err("floor: failed deliveries".into());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    p.flush(Timeout::After(Duration::from_secs(10)))?;
    Ok(n as f64 / secs)
}

/// The floor's context: a report slot per record, a count of unreported records
/// and a waker per batch.
struct Slots {
    offsets: Vec<std::sync::atomic::AtomicI64>,
    left: Vec<std::sync::atomic::AtomicU32>,
    wake: Vec<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
}

impl ClientContext for Slots {}

impl ProducerContext for Slots {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        use rdkafka::message::Message as _;
        if let (Ok(m), Some(slot)) = (result, self.offsets.get(index)) {
            slot.store(m.offset(), Ordering::Release);
        }
        let batch = index / 100;
        let last = self
            .left
            .get(batch)
            .is_some_and(|l| l.fetch_sub(1, Ordering::AcqRel) == 1);
        if last {
            let tx = self.wake[batch]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(tx) = tx {
                let _ = tx.send(());
            }
        }
    }
}

/// The bench's ferrymq-kafka produce: `send_batch(100)`, every batch in flight.
async fn ferry(cfg: &KafkaConfig, n: u64, size: usize) -> Result<f64, BoxError> {
    let kp = cfg.producer().await?;
    kp.client()
        .fetch_metadata(Some(&cfg.topic), Duration::from_secs(10))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let producer: Box<dyn Producer> = Box::new(kp);
    let start = Instant::now();
    // Each batch built when its send starts (see the bench's produce_pipelined);
    // EAGER=1 builds every message before the first send, as the bench once did.
    let eager = std::env::var("EAGER").is_ok_and(|v| v == "1");
    let build = |b: u64| {
        let first = b * 100;
        (first..n.min(first + 100))
            .map(|i| Message::new(payload(size, i)))
            .collect::<Vec<_>>()
    };
    let built: Vec<Option<Vec<Message>>> = (0..n.div_ceil(100))
        .map(|b| eager.then(|| build(b)))
        .collect();
    let producer = producer.as_ref();
    let mut inflight: FuturesUnordered<_> = built
        .into_iter()
        .enumerate()
        .map(|(b, batch)| async move {
            let batch = batch.unwrap_or_else(|| build(b as u64));
            producer.send_batch(batch).await
        })
        .collect();
    while let Some(results) = inflight.next().await {
        for r in results? {
            r?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    producer.close().await?;
    Ok(n as f64 / secs)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run() -> Result<(), BoxError> {
    let brokers = std::env::var("KAFKA_BROKERS").map_err(|_| "set KAFKA_BROKERS=host:port")?;
    let n = env_or("N", 200_000);
    let size = env_or("SIZE", 100) as usize;
    let rounds = env_or("ROUNDS", 3);
    let modes = std::env::var("MODES").unwrap_or_else(|_| "raw,ferry".into());
    let params = std::env::var("PARAMS")
        .map(|p| format!("&{p}"))
        .unwrap_or_default();
    let topic = format!(
        "produce-cost-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let cfg = KafkaConfig::from_url(&format!("kafka://{brokers}/{topic}?partitions=3{params}"))?;
    // Creates the topic (and its tiers) once, for both subjects.
    cfg.producer().await?.close().await?;
    let modes: Vec<&str> = modes.split(',').collect();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            let rate = match *mode {
                "raw" => raw(&brokers, &topic, n, size).await?,
                "future" => raw_future(&brokers, &topic, n, size).await?,
                "ferry" => ferry(&cfg, n, size).await?,
                "floor" => floor(&brokers, &topic, n, size).await?,
                other => return Err(format!("unknown mode {other}").into()),
            };
            println!("round {round} {mode}: {rate:.0} msg/s");
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
        println!("median {mode}: {m:.0} msg/s{ratio}");
    }
    ferrymq_core::admin::Admin::delete(&cfg.admin()?).await?;
    Ok(())
}
