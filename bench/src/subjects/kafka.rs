//! Kafka: the broker the bench uses, raw rdkafka as an expert writes it
//! (`raw-kafka`), and ferrymq-kafka through the traits (`ferrymq-kafka`) and the
//! Worker (`ferrymq-kafka-worker`), on the same broker in the same run.
//!
//! Every subject writes to topics of its own (3 partitions, created before the
//! timer starts) and reads them with a group of its own; the topics are deleted
//! after each run.
//!
//! - `raw-kafka`: a `ThreadedProducer` with ferrymq-kafka's producer settings
//!   (idempotent, `acks=all`: ferrymq's guarantees; the same partitioner, linger,
//!   message timeout and size limit) whose context counts delivery reports — no
//!   future per record — with every send of the run in flight at once, done when
//!   every report is counted (librdkafka batches them; the latency workload awaits a
//!   `FutureProducer::send` per record); a `BaseConsumer` poll loop on a thread of its own that handles
//!   each record, `store_offset`s it, and lets librdkafka commit the stored offsets
//!   every 500 ms (at-least-once, the usual expert loop). One poll loop, whatever
//!   the concurrency: that is how one consumes Kafka fastest.
//! - `ferrymq-kafka`: `KafkaConfig` defaults (but `partitions=3`, `commit_interval`
//!   500 ms like the raw loop) through `Box<dyn Producer>` / `Box<dyn Consumer>`:
//!   `send_batch(100)` with every batch of the run in flight at once (the raw
//!   producer's pipelining, through the trait); `receive(100)` shared by N tasks.
//! - `ferrymq-kafka-worker`: the same, consumed by the Worker with the default
//!   middleware stack (see [`super::ferry::FerryWorker`]).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, FutureProducer, FutureRecord, Producer as _, ProducerContext,
    ThreadedProducer,
};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message as _};
use tokio::task::JoinSet;

use ferrymq_core::{Consumer, Message, Producer};
use futures::stream::{FuturesUnordered, StreamExt as _};

use super::ferry::{consume_loop, run_worker, Pair};
use super::Subject;
use crate::drive::{
    check_batch, handle, latency_us, pace, payload, run_until_done, stamp_of, timed_run,
    wall_nanos, Progress, BATCH,
};
use crate::env::Env;
use crate::model::{Backend, Role, Sample, Workload};

/// Partitions of every bench topic.
pub const PARTITIONS: i32 = 3;

/// The Kafka broker of a run: one the bench started with `scripts/kafka.sh` (and
/// stops), or one given with `--kafka-brokers`.
#[derive(Debug)]
pub struct KafkaBroker {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    port: Option<u16>,
    script: PathBuf,
}

fn script_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka.sh"))
}

impl KafkaBroker {
    pub fn existing(brokers: &str) -> Self {
        KafkaBroker {
            brokers: brokers.to_string(),
            port: None,
            script: script_path(),
        }
    }

    /// Start Apache Kafka on `port` (controller on the next port) in a fresh state
    /// dir of its own; stopped by [`stop`](Self::stop).
    pub fn start(port: u16) -> Result<Self> {
        let script = script_path();
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!(
                "127.0.0.1:{port} is taken: pass --kafka-brokers to use that broker, or \
                 --kafka-port for another port"
            );
        }
        let out = Command::new("bash")
            .arg(&script)
            .args(["start", &port.to_string()])
            .env("FERRYMQ_KAFKA_STATE", state_dir(port))
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "scripts/kafka.sh start {port} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(KafkaBroker {
            brokers: format!("127.0.0.1:{port}"),
            port: Some(port),
            script,
        })
    }

    pub fn stop(&self) {
        if let Some(port) = self.port {
            let _ = Command::new("bash")
                .arg(&self.script)
                .args(["stop", &port.to_string()])
                .env("FERRYMQ_KAFKA_STATE", state_dir(port))
                .output();
            let _ = std::fs::remove_dir_all(state_dir(port));
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    /// Create `topics` (3 partitions each) and wait until they are usable.
    pub async fn create(&self, topics: &[String]) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client().create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
            .collect();
        for r in admin.create_topics(&new, &AdminOptions::new()).await? {
            if let Err((t, e)) = r {
                if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                    bail!("creating {t}: {e}");
                }
            }
        }
        Ok(())
    }

    /// Delete `topics` (best effort: a bench run never fails on its cleanup).
    pub async fn delete(&self, topics: &[String]) {
        if let Ok(admin) = self.client().create::<AdminClient<DefaultClientContext>>() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
        }
    }
}

fn state_dir(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("ferrymq-bench-kafka-{port}"))
}

/// The Kafka subjects, in run order (raw first).
pub fn subjects() -> Vec<Box<dyn Subject>> {
    vec![
        Box::new(RawKafka),
        Box::new(FerryKafka {
            name: "ferrymq-kafka",
            worker: false,
        }),
        Box::new(FerryKafka {
            name: "ferrymq-kafka-worker",
            worker: true,
        }),
    ]
}

/// The ferrymq-kafka config of a bench topic: defaults, but 3 partitions and a
/// 500 ms commit interval (the raw loop's auto-commit interval).
fn ferry_config(env: &Env, topic: &str) -> Result<ferrymq_kafka::KafkaConfig> {
    let brokers = &env.kafka()?.brokers;
    // For experiments only (the published figures leave it unset): more URL
    // parameters, like `buffer=5000`.
    let extra = std::env::var("FERRYMQ_BENCH_KAFKA_PARAMS")
        .map(|p| format!("&{p}"))
        .unwrap_or_default();
    Ok(ferrymq_kafka::KafkaConfig::from_url(&format!(
        "kafka://{brokers}/{topic}?partitions={PARTITIONS}&commit_interval=500ms{extra}"
    ))?)
}

/// Topics ferrymq-kafka made for `topic`: the topic, its retry tiers, its DLQ.
fn ferry_topics(cfg: &ferrymq_kafka::KafkaConfig) -> Vec<String> {
    let mut v = vec![cfg.topic.clone(), cfg.dlq_topic()];
    v.extend(cfg.tier_topics());
    v
}

/// Send `n` messages through `Producer::send_batch` in batches of [`BATCH`], every
/// batch in flight at once (as the raw producer has every record in flight): the
/// traits pipelined, the way one sends a backlog to Kafka. Each batch is built when
/// its send starts, as the raw loop builds each payload right before its send —
/// building all `n` messages before the first send held them all in memory and made
/// the timed run pay for page faults the raw loop never has.
async fn produce_pipelined(producer: &dyn Producer, n: u64, size: usize) -> Result<()> {
    let mut inflight: FuturesUnordered<_> = (0..n.div_ceil(BATCH as u64))
        .map(|b| async move {
            let first = b * BATCH as u64;
            let batch = (first..n.min(first + BATCH as u64))
                .map(|i| Message::new(payload(size, i)))
                .collect::<Vec<_>>();
            producer.send_batch(batch).await
        })
        .collect();
    while let Some(results) = inflight.next().await {
        check_batch(&results?)?;
    }
    Ok(())
}

/// ferrymq-kafka through `Box<dyn Producer>` / `Box<dyn Consumer>`, or consumed by
/// the Worker with the default middleware stack.
pub struct FerryKafka {
    name: &'static str,
    worker: bool,
}

impl FerryKafka {
    async fn pair(&self, env: &Env) -> Result<(ferrymq_kafka::KafkaConfig, Pair)> {
        let cfg = ferry_config(env, &env.queue_name(self.name))?;
        let p: Box<dyn Producer> = Box::new(cfg.producer().await?);
        let c: Box<dyn Consumer> = Box::new(cfg.consumer().await?);
        Ok((cfg, (p, c)))
    }

    /// Consume `progress.target()` from `consumer`: the trait loop shared by
    /// `concurrency` tasks, or the Worker.
    #[allow(clippy::too_many_arguments)]
    async fn consumers(
        &self,
        env: &Env,
        cfg: &ferrymq_kafka::KafkaConfig,
        consumer: Box<dyn Consumer>,
        concurrency: usize,
        progress: &Arc<Progress>,
        record_latency: bool,
        tasks: &mut JoinSet<Result<()>>,
    ) -> Result<()> {
        if self.worker {
            let dlq: Box<dyn Producer> =
                Box::new(cfg.for_topic(&cfg.dlq_topic())?.producer().await?);
            tasks.spawn(run_worker(
                consumer,
                dlq,
                concurrency,
                env.worker_prefetch,
                progress.clone(),
                record_latency,
            ));
        } else {
            let consumer = Arc::new(consumer);
            for _ in 0..concurrency {
                tasks.spawn(consume_loop(
                    consumer.clone(),
                    progress.clone(),
                    record_latency,
                ));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Subject for FerryKafka {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backend(&self) -> Backend {
        Backend::Kafka
    }
    fn role(&self) -> Role {
        Role::Ferrymq
    }
    fn describe(&self) -> String {
        let base = "ferrymq-kafka (defaults, partitions=3, commit_interval=500ms) through \
                    Box<dyn Producer>: send_batch(100) with every batch in flight";
        if self.worker {
            format!(
                "{base}; consumed by ferrymq's Worker (concurrency N, default prefetch and poll) \
                 with ExtendVisibility + RetryToDlq(5) + CatchPanic + Timeout(30 s)"
            )
        } else {
            format!(
                "{base}; Box<dyn Consumer> receive(100) shared by N tasks, concurrent \
                 Delivery::ack per batch"
            )
        }
    }

    fn applies(&self, workload: &Workload) -> bool {
        match workload {
            Workload::Rss { .. } => false,
            // The Worker only consumes: produce-only is the traits subject's figure.
            Workload::Produce => !self.worker,
            _ => true,
        }
    }

    /// The producer alone (no consumer fetching meanwhile: the raw subject has
    /// none either), warmed up like the raw one.
    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let cfg = ferry_config(env, &env.queue_name(self.name))?;
        let kp = cfg.producer().await?;
        kp.client()
            .fetch_metadata(Some(&cfg.topic), Duration::from_secs(10))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let producer: Box<dyn Producer> = Box::new(kp);
        let start = Instant::now();
        produce_pipelined(producer.as_ref(), n, size).await?;
        let elapsed = start.elapsed();
        producer.close().await?;
        env.kafka()?.delete(&ferry_topics(&cfg)).await;
        Ok(Sample::throughput(n, elapsed))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let (cfg, (producer, consumer)) = self.pair(env).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        self.consumers(
            env,
            &cfg,
            consumer,
            concurrency,
            &progress,
            false,
            &mut tasks,
        )
        .await?;
        let start = Instant::now();
        tasks.spawn(async move { produce_pipelined(producer.as_ref(), n, size).await });
        let sample = timed_run(tasks, &progress, start, env.stall, env.cap).await;
        env.kafka()?.delete(&ferry_topics(&cfg)).await;
        sample
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let (cfg, (producer, consumer)) = self.pair(env).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        self.consumers(env, &cfg, consumer, 1, &progress, true, &mut tasks)
            .await?;
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                producer
                    .send(Message::new(payload(size, wall_nanos())))
                    .await?;
            }
            Ok(())
        });
        let outcome = run_until_done(tasks, &progress, Instant::now(), env.stall).await;
        env.kafka()?.delete(&ferry_topics(&cfg)).await;
        outcome?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, _env: &Env, _backlog: u64, _size: usize) -> Result<Sample> {
        bail!("{} has no RSS consumer child", self.name)
    }
}

/// Raw rdkafka, the way an expert writes it.
pub struct RawKafka;

type BulkProducer = ThreadedProducer<Counted>;

/// Counts delivery reports and wakes the producing task once all it expects are in.
#[derive(Default)]
struct Counted {
    reported: AtomicU64,
    expected: AtomicU64,
    error: Mutex<Option<String>>,
    all_reported: tokio::sync::Notify,
}

impl Counted {
    fn expect(&self, n: u64) {
        self.reported.store(0, Ordering::Release);
        self.expected.store(n, Ordering::Release);
    }

    fn first_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientContext for Counted {}

impl ProducerContext for Counted {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| e.to_string());
        }
        let reported = self.reported.fetch_add(1, Ordering::AcqRel) + 1;
        if reported == self.expected.load(Ordering::Acquire) {
            // notify_one keeps a permit, so a waiter that registers later still wakes.
            self.all_reported.notify_one();
        }
    }
}

impl RawKafka {
    /// The producer settings of ferrymq-kafka's (idempotent, `acks=all`, the same
    /// partitioner, linger, message timeout and size limit), so raw and ferrymq
    /// differ only in the code driving librdkafka.
    fn producer_config(broker: &KafkaBroker) -> ClientConfig {
        let mut c = broker.client();
        c.set("client.id", "raw")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", "1048588")
            .set("linger.ms", "2");
        c
    }

    /// A producer connected to the broker with the topic's metadata loaded (and
    /// its idempotent producer id, asked for once connected), so the timed run does
    /// not pay for the connection — the ferrymq subjects' producers are as warm, a
    /// consumer having joined after them.
    async fn producer(broker: &KafkaBroker, topic: &str) -> Result<FutureProducer> {
        let p: FutureProducer = Self::producer_config(broker).create()?;
        p.client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(p)
    }

    /// The bulk producer an expert writes: a `ThreadedProducer` whose context
    /// counts delivery reports (no future, no allocation per record), as warm as
    /// [`producer`](Self::producer).
    async fn bulk_producer(broker: &KafkaBroker, topic: &str) -> Result<BulkProducer> {
        let p: BulkProducer =
            Self::producer_config(broker).create_with_context(Counted::default())?;
        p.client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(p)
    }

    /// A member of a fresh group on `topic`, assigned before it returns.
    fn consumer(broker: &KafkaBroker, topic: &str) -> Result<BaseConsumer> {
        let c: BaseConsumer = broker
            .client()
            .set("group.id", format!("{topic}.raw"))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Its best setting, not librdkafka's default of 1 s: once the consumer's queue
            // holds `queued.min.messages` (100,000) the fetcher backs off that long, and
            // the drain of a 1M backlog ran at 0.28M records/s against 1.5–1.6M with 10 ms
            // (at 200k both ~1.0M; consume_cost, issue 10 eighth pass).
            .set("fetch.queue.backoff.ms", "10")
            .create()?;
        c.subscribe(&[topic])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.assignment()?.count() == 0 {
            if Instant::now() > deadline {
                bail!("raw consumer: no assignment within 30 s");
            }
            if let Some(Err(e)) = c.poll(Duration::from_millis(50)) {
                bail!("raw consumer: {e}");
            }
        }
        Ok(c)
    }

    /// Produce `n` records through a `FutureProducer`, every send in flight at once,
    /// then await every future: the raw subject before the bulk producer, kept for
    /// comparison (`FERRYMQ_BENCH_RAW_KAFKA=future`).
    async fn produce_all_futures(
        p: &FutureProducer,
        topic: &str,
        n: u64,
        size: usize,
    ) -> Result<()> {
        let mut pending = Vec::with_capacity(n as usize);
        for i in 0..n {
            let body = payload(size, i);
            let mut record: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic).payload(&body);
            loop {
                match p.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((e, back)) => {
                        if e.rdkafka_error_code()
                            != Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        {
                            bail!("produce: {e}");
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => bail!("delivery: {e}"),
                Err(_) => bail!("delivery report lost"),
            }
        }
        Ok(())
    }

    /// Produce `n` records with every send in flight at once, then wait until every
    /// delivery report has been counted.
    async fn produce_all(p: &BulkProducer, topic: &str, n: u64, size: usize) -> Result<()> {
        let counted = p.context();
        counted.expect(n);
        for i in 0..n {
            let body = payload(size, i);
            let mut record: BaseRecord<'_, (), [u8], ()> = BaseRecord::to(topic).payload(&body);
            loop {
                match p.send(record) {
                    Ok(()) => break,
                    Err((e, back)) => {
                        if e.rdkafka_error_code()
                            != Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        {
                            bail!("produce: {e}");
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        }
        counted.all_reported.notified().await;
        if let Some(e) = counted.first_error() {
            bail!("delivery: {e}");
        }
        Ok(())
    }

    /// The poll loop: handle, store the offset; librdkafka commits what is stored.
    fn poll_loop(c: BaseConsumer, progress: Arc<Progress>, record_latency: bool) -> Result<()> {
        while !progress.should_stop() {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let body = m.payload().unwrap_or_default();
                    if record_latency {
                        progress.record_latencies(vec![latency_us(stamp_of(body).unwrap_or(0))]);
                    }
                    handle(body);
                    c.store_offset_from_message(&m)?;
                    progress.add(1);
                }
                Some(Err(e)) => bail!("poll: {e}"),
                None => {}
            }
        }
        let _ = c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        Ok(())
    }
}

#[async_trait]
impl Subject for RawKafka {
    fn name(&self) -> &'static str {
        "raw-kafka"
    }
    fn backend(&self) -> Backend {
        Backend::Kafka
    }
    fn role(&self) -> Role {
        Role::Raw
    }
    fn describe(&self) -> String {
        "rdkafka ThreadedProducer with ferrymq-kafka's producer settings (idempotent, acks=all, \
         murmur2_random, linger.ms=2) and a context counting delivery reports, every send in \
         flight, done when all are counted (latency: FutureProducer::send per record); one BaseConsumer poll loop on its own thread: handle, \
         store_offset, auto commit of stored offsets every 500 ms"
            .into()
    }

    fn applies(&self, workload: &Workload) -> bool {
        !matches!(workload, Workload::Rss { .. })
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let broker = env.kafka()?;
        let topic = env.queue_name(self.name());
        broker.create(std::slice::from_ref(&topic)).await?;
        if std::env::var("FERRYMQ_BENCH_RAW_KAFKA").as_deref() == Ok("future") {
            let p = Self::producer(broker, &topic).await?;
            let start = Instant::now();
            Self::produce_all_futures(&p, &topic, n, size).await?;
            let elapsed = start.elapsed();
            p.flush(Timeout::After(Duration::from_secs(10)))?;
            drop(p);
            broker.delete(&[topic]).await;
            return Ok(Sample::throughput(n, elapsed));
        }
        let p = Self::bulk_producer(broker, &topic).await?;
        let start = Instant::now();
        Self::produce_all(&p, &topic, n, size).await?;
        let elapsed = start.elapsed();
        p.flush(Timeout::After(Duration::from_secs(10)))?;
        drop(p);
        broker.delete(&[topic]).await;
        Ok(Sample::throughput(n, elapsed))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, _concurrency: usize) -> Result<Sample> {
        let broker = env.kafka()?;
        let topic = env.queue_name(self.name());
        broker.create(std::slice::from_ref(&topic)).await?;
        let p = Self::bulk_producer(broker, &topic).await?;
        let c = Self::consumer(broker, &topic)?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        let t = topic.clone();
        tasks.spawn(async move { Self::produce_all(&p, &t, n, size).await });
        let pr = progress.clone();
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || Self::poll_loop(c, pr, false))
                .await
                .map_err(|e| anyhow!("poll thread: {e}"))?
        });
        let sample = timed_run(tasks, &progress, start, env.stall, env.cap).await;
        broker.delete(&[topic]).await;
        sample
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let broker = env.kafka()?;
        let topic = env.queue_name(self.name());
        broker.create(std::slice::from_ref(&topic)).await?;
        let p = Self::producer(broker, &topic).await?;
        let c = Self::consumer(broker, &topic)?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let pr = progress.clone();
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || Self::poll_loop(c, pr, true))
                .await
                .map_err(|e| anyhow!("poll thread: {e}"))?
        });
        let t = topic.clone();
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                let body = payload(size, wall_nanos());
                let record: FutureRecord<'_, (), [u8]> = FutureRecord::to(&t).payload(&body);
                p.send(record, Timeout::After(Duration::from_secs(10)))
                    .await
                    .map_err(|(e, _)| anyhow!("send: {e}"))?;
            }
            Ok(())
        });
        let outcome = run_until_done(tasks, &progress, Instant::now(), env.stall).await;
        broker.delete(&[topic]).await;
        outcome?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, _env: &Env, _backlog: u64, _size: usize) -> Result<Sample> {
        bail!("raw-kafka has no RSS consumer child")
    }
}
