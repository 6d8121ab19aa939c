//! ferrymq through its public traits: `Box<dyn Producer>` / `Box<dyn Consumer>`,
//! the way an application that took them from configuration would use them.
//!
//! One driver serves every backend; only the connector differs. Producing is
//! `send_batch` of [`BATCH`] messages at a time; consuming is `receive(BATCH, 100 ms)`
//! on a consumer shared by `concurrency` tasks, each handling its batch in order and
//! then settling it with `Delivery::ack_all` (at once where the backend settles
//! without waiting, concurrent acks otherwise, so a backend on a multiplexed
//! connection can pipeline them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::task::JoinSet;

use ferrymq_core::middleware::{
    handler_fn, CatchPanicLayer, ExtendVisibilityLayer, Outcome, RetryToDlqLayer,
};
use ferrymq_core::worker::Worker;
use ferrymq_core::{memory::MemoryConfig, BoxError, Consumer, Delivery, Message, Producer};
use tokio::sync::broadcast;
use tower::util::BoxService;
use tower::ServiceBuilder;

use super::Subject;
use crate::drive::{
    check_batch, handle, latency_us, pace, payload, run_until_done, stamp_of, timed_run,
    wall_nanos, Progress, BATCH, POLL,
};
use crate::env::{finish_drain, proc_status_kib, ChildReport, ChildSpec, Env};
use crate::model::{Backend, Role, Sample};

pub type Pair = (Box<dyn Producer>, Box<dyn Consumer>);

/// Opens a producer and a consumer on `queue` (redis url, queue name).
pub type Connector =
    Arc<dyn Fn(Option<String>, String) -> BoxFuture<'static, Result<Pair>> + Send + Sync>;

pub struct FerryTraits {
    name: &'static str,
    backend: Backend,
    connect: Connector,
    describe: String,
}

impl FerryTraits {
    pub fn new(name: &'static str, backend: Backend, connect: Connector, describe: String) -> Self {
        FerryTraits {
            name,
            backend,
            connect,
            describe,
        }
    }

    /// The in-process backend (capacity raised so a 1M backlog fits).
    pub fn memory() -> Self {
        FerryTraits::new(
            "ferrymq-memory",
            Backend::Memory,
            Arc::new(|_, queue| {
                Box::pin(async move {
                    let (p, c) = MemoryConfig::new(queue).capacity(50_000_000).connect()?;
                    Ok::<Pair, anyhow::Error>((Box::new(p), Box::new(c)))
                })
            }),
            "ferrymq_core::memory through Box<dyn Producer>/Box<dyn Consumer>: send_batch(100); \
             receive(100) shared by N tasks, Delivery::ack_all per batch"
                .into(),
        )
    }

    /// The RSS workload on this subject's backend, drained by the child `subject`
    /// (this one, or the Worker subject over the same backend).
    async fn rss_as(&self, subject: &str, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        let queue = env.queue_name(subject);
        let redis_url = match self.backend {
            Backend::Redis | Backend::Kafka => {
                // The backlog goes to the server from this process; the child only consumes.
                let (producer, _c) = self.pair(env, &queue).await?;
                produce_all(producer.as_ref(), backlog, size).await?;
                self.server_url(env)?
            }
            // An in-process queue lives in its consumer's process: the child fills it.
            // (SQS subjects do not run the RSS workload.)
            Backend::Memory | Backend::Sqs => None,
        };
        let in_process = self.backend == Backend::Memory;
        env.rss_sample(subject, queue, redis_url, backlog, size, in_process)
            .await
    }

    async fn pair(&self, env: &Env, queue: &str) -> Result<Pair> {
        (self.connect)(self.server_url(env)?, queue.to_string()).await
    }

    /// What the connector gets: the Redis URL, the Kafka broker list, or nothing.
    fn server_url(&self, env: &Env) -> Result<Option<String>> {
        Ok(match self.backend {
            Backend::Redis => Some(env.redis()?.url.clone()),
            Backend::Kafka => Some(env.kafka()?.brokers.clone()),
            // SQS connectors know their server (subjects::sqs).
            Backend::Memory | Backend::Sqs => None,
        })
    }

    fn cleanup(&self, queue: &str) {
        if self.backend == Backend::Memory {
            ferrymq_core::memory::delete_queue(queue);
        }
    }
}

/// Send `n` messages of `size` in batches of [`BATCH`].
pub async fn produce_all(producer: &dyn Producer, n: u64, size: usize) -> Result<()> {
    let mut sent = 0;
    while sent < n {
        let k = BATCH.min((n - sent) as usize);
        let batch: Vec<Message> = (0..k as u64)
            .map(|i| Message::new(payload(size, sent + i)))
            .collect();
        let results = producer.send_batch(batch).await?;
        check_batch(&results)?;
        sent += k as u64;
    }
    producer.flush().await?;
    Ok(())
}

/// Receive, handle and ack until `progress` is done.
pub async fn consume_loop(
    consumer: Arc<Box<dyn Consumer>>,
    progress: Arc<Progress>,
    record_latency: bool,
) -> Result<()> {
    while !progress.should_stop() {
        let batch = consumer.receive(BATCH, POLL).await?;
        if batch.is_empty() {
            continue;
        }
        let mut lat = Vec::new();
        for d in &batch {
            if record_latency {
                lat.push(latency_us(stamp_of(d.payload()).unwrap_or(0)));
            }
            handle(d.payload());
        }
        Delivery::ack_all(&batch).await?;
        if record_latency {
            progress.record_latencies(lat);
        }
        progress.add(batch.len() as u64);
    }
    Ok(())
}

#[async_trait]
impl Subject for FerryTraits {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backend(&self) -> Backend {
        self.backend
    }
    fn role(&self) -> Role {
        Role::Ferrymq
    }
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let queue = env.queue_name(self.name);
        let (producer, _consumer) = self.pair(env, &queue).await?;
        let start = Instant::now();
        produce_all(producer.as_ref(), n, size).await?;
        let elapsed = start.elapsed();
        self.cleanup(&queue);
        Ok(Sample::throughput(n, elapsed))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let queue = env.queue_name(self.name);
        let (producer, consumer) = self.pair(env, &queue).await?;
        let consumer = Arc::new(consumer);
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        tasks.spawn(async move { produce_all(producer.as_ref(), n, size).await });
        for _ in 0..concurrency {
            tasks.spawn(consume_loop(consumer.clone(), progress.clone(), false));
        }
        let sample = timed_run(tasks, &progress, start, env.stall, env.cap).await;
        self.cleanup(&queue);
        sample
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let queue = env.queue_name(self.name);
        let (producer, consumer) = self.pair(env, &queue).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        tasks.spawn(consume_loop(Arc::new(consumer), progress.clone(), true));
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
        self.cleanup(&queue);
        outcome?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        self.rss_as(self.name, env, backlog, size).await
    }

    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let (producer, consumer) =
            (self.connect)(spec.redis_url.clone(), spec.queue.clone()).await?;
        if self.backend == Backend::Memory {
            produce_all(producer.as_ref(), spec.backlog, spec.size).await?;
        }
        drop(producer);
        child_drain(Arc::new(consumer), spec).await
    }
}

/// Drain `spec.backlog` messages with one handler and report the peak RSS.
pub async fn child_drain(
    consumer: Arc<Box<dyn Consumer>>,
    spec: &ChildSpec,
) -> Result<ChildReport> {
    let before = proc_status_kib("VmRSS")?;
    let progress = Progress::new(spec.backlog);
    let mut tasks = JoinSet::new();
    tasks.spawn(consume_loop(consumer, progress.clone(), false));
    let start = Instant::now();
    finish_drain(before, tasks, &progress, start, spec).await
}

/// The ferrymq subjects on Redis: the traits and the Worker, over ferrymq-redis with
/// its default settings (`redis://HOST:PORT/DB/QUEUE`).
pub fn redis_subjects() -> Vec<Box<dyn Subject>> {
    vec![
        Box::new(FerryTraits::redis("ferrymq-redis")),
        Box::new(FerryWorker::new(
            "ferrymq-redis-worker",
            FerryTraits::redis("ferrymq-redis-worker"),
        )),
    ]
}

impl FerryTraits {
    /// ferrymq-redis with its defaults; `url` is the bench's `redis://host:port/db`.
    pub fn redis(name: &'static str) -> Self {
        FerryTraits::new(
            name,
            Backend::Redis,
            Arc::new(|url, queue| {
                Box::pin(async move {
                    let url = url.ok_or_else(|| anyhow!("no Redis server"))?;
                    let (p, c) = ferrymq_redis::RedisConfig::from_url(&format!("{url}/{queue}"))?
                        .connect()
                        .await?;
                    Ok::<Pair, anyhow::Error>((Box::new(p), Box::new(c)))
                })
            }),
            "ferrymq-redis (defaults) through Box<dyn Producer>/Box<dyn Consumer>: send_batch(100); \
             receive(100) shared by N tasks, Delivery::ack_all per batch"
                .into(),
        )
    }
}

/// ferrymq's [`Worker`] at `concurrency` with its other settings at their
/// defaults, running the recommended middleware stack around the bench handler:
/// ExtendVisibility (from the backend's capabilities), RetryToDlq (5 attempts, to a
/// `-dlq` queue of the same backend), CatchPanic and a 30 s tower Timeout. Deliveries
/// count as done on the worker's `Succeeded` event, which it emits after the ack.
pub struct FerryWorker {
    traits: FerryTraits,
    name: &'static str,
}

impl FerryWorker {
    pub fn new(name: &'static str, traits: FerryTraits) -> Self {
        FerryWorker { traits, name }
    }

    pub fn memory() -> Self {
        FerryWorker::new("ferrymq-memory-worker", FerryTraits::memory())
    }
}

/// Run a worker over `consumer` until `progress` is done.
pub async fn run_worker(
    consumer: Box<dyn Consumer>,
    dlq: Box<dyn Producer>,
    concurrency: usize,
    prefetch: Option<usize>,
    progress: Arc<Progress>,
    record_latency: bool,
) -> Result<()> {
    let capabilities = consumer.capabilities().clone();
    let mut worker = Worker::new(consumer).concurrency(concurrency);
    if let Some(n) = prefetch {
        worker = worker.prefetch(n);
    }
    // For experiments only (the published results use the default): each handler in a
    // task of its own, so a Worker can use more than the one core its loop runs on.
    if std::env::var("FERRYMQ_BENCH_WORKER_HANDLER_TASKS").as_deref() == Ok("1") {
        worker = worker.handler_tasks(true);
    }
    let mut events = worker.subscribe();
    let counted = progress.clone();
    let counter = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) if event.outcome == Outcome::Succeeded => counted.add(1),
                // Shutdown after the run (target reached or time cap) releases what
                // was prefetched: expected, not a failure.
                Ok(event) if matches!(event.outcome, Outcome::Released | Outcome::Abandoned) => {}
                Ok(event) => {
                    return Err(anyhow!(
                        "delivery {} ended {:?}: {}",
                        event.meta().id,
                        event.outcome,
                        event.error.as_deref().unwrap_or_default()
                    ))
                }
                // Events are only lost when this task falls behind; they were successes.
                Err(broadcast::error::RecvError::Lagged(n)) => counted.add(n),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    });
    let seen = progress.clone();
    // Boxed: a concrete `Error = BoxError` keeps the spawned future provably `Send`.
    let service: BoxService<Delivery, (), BoxError> = ServiceBuilder::new()
        .boxed()
        .layer(ExtendVisibilityLayer::from_capabilities(&capabilities))
        .layer(RetryToDlqLayer::new(dlq).max_attempts(5))
        .layer(CatchPanicLayer::new())
        .timeout(Duration::from_secs(30))
        .service(handler_fn(move |d: Delivery| {
            let seen = seen.clone();
            async move {
                if record_latency {
                    seen.record_latencies(vec![latency_us(stamp_of(d.payload()).unwrap_or(0))]);
                }
                handle(d.payload());
                Ok::<_, BoxError>(())
            }
        }));
    let stop = progress.clone();
    let summary = worker
        .run_until(service, async move {
            while !stop.should_stop() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await?;
    match counter.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => bail!("event counter task: {e}"),
    }
    if summary.failed > 0 || summary.dead_lettered > 0 {
        bail!("worker summary: {summary}");
    }
    Ok(())
}

#[async_trait]
impl Subject for FerryWorker {
    fn name(&self) -> &'static str {
        self.name
    }
    fn backend(&self) -> Backend {
        self.traits.backend
    }
    fn role(&self) -> Role {
        Role::Ferrymq
    }
    fn describe(&self) -> String {
        format!(
            "{}; consumed by ferrymq's Worker (concurrency N, default prefetch and poll) with \
             ExtendVisibility + RetryToDlq(5) + CatchPanic + Timeout(30 s)",
            self.traits.describe.split(';').next().unwrap_or_default()
        )
    }

    fn applies(&self, workload: &crate::model::Workload) -> bool {
        // The Worker only consumes; produce-only is the traits subject's figure.
        !matches!(workload, crate::model::Workload::Produce)
    }

    async fn produce(&self, _env: &Env, _n: u64, _size: usize) -> Result<Sample> {
        bail!("the Worker only consumes: produce-only is the traits subject's figure")
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let queue = env.queue_name(self.name);
        let (producer, consumer) = self.traits.pair(env, &queue).await?;
        let (dlq, _) = self.traits.pair(env, &format!("{queue}-dlq")).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        tasks.spawn(async move { produce_all(producer.as_ref(), n, size).await });
        tasks.spawn(run_worker(
            consumer,
            dlq,
            concurrency,
            env.worker_prefetch,
            progress.clone(),
            false,
        ));
        let sample = timed_run(tasks, &progress, start, env.stall, env.cap).await;
        self.traits.cleanup(&queue);
        self.traits.cleanup(&format!("{queue}-dlq"));
        sample
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let queue = env.queue_name(self.name);
        let (producer, consumer) = self.traits.pair(env, &queue).await?;
        let (dlq, _) = self.traits.pair(env, &format!("{queue}-dlq")).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        tasks.spawn(run_worker(
            consumer,
            dlq,
            1,
            env.worker_prefetch,
            progress.clone(),
            true,
        ));
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
        self.traits.cleanup(&queue);
        self.traits.cleanup(&format!("{queue}-dlq"));
        outcome?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        self.traits.rss_as(self.name, env, backlog, size).await
    }

    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let connect = &self.traits.connect;
        let (producer, consumer) = connect(spec.redis_url.clone(), spec.queue.clone()).await?;
        let (dlq, _) = connect(spec.redis_url.clone(), format!("{}-dlq", spec.queue)).await?;
        if self.traits.backend == Backend::Memory {
            produce_all(producer.as_ref(), spec.backlog, spec.size).await?;
        }
        drop(producer);
        let before = proc_status_kib("VmRSS")?;
        let progress = Progress::new(spec.backlog);
        let mut tasks = JoinSet::new();
        tasks.spawn(run_worker(
            consumer,
            dlq,
            1,
            spec.worker_prefetch,
            progress.clone(),
            false,
        ));
        let start = Instant::now();
        finish_drain(before, tasks, &progress, start, spec).await
    }
}
