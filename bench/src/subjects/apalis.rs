//! Peer: apalis-redis 1.0 with the apalis 1.0 Worker (default features), as its
//! README shows it.
//!
//! Producing is `push_bulk` of [`BATCH`] jobs; consuming is a `WorkerBuilder` with
//! `.concurrency(N)` whose handler counts the job (apalis acks after the handler
//! returns, so the count runs slightly ahead of the acks). Jobs are a serde struct
//! `{t, p}` (apalis encodes JSON).
//!
//! Known as shipped: the worker stops fetching for good once more than ~8,000 jobs
//! wait (see shared/services/README.md). Runs therefore have a stall limit and are
//! reported as failing, with the count reached, when they hit it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use apalis::prelude::*;
use apalis_redis::{Config, RedisStorage};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::Subject;
use crate::drive::{
    handle, latency_us, pace, run_until_done, timed_run, wall_nanos, Progress, BATCH,
};
use crate::env::{finish_drain, proc_status_kib, ChildReport, ChildSpec, Env};
use crate::model::{Backend, Role, Sample};

pub struct Apalis;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    t: u64,
    p: String,
}

fn job(size: usize, t: u64) -> Job {
    Job {
        t,
        p: "x".repeat(size.saturating_sub(8)),
    }
}

#[derive(Clone)]
struct Ctx {
    progress: Arc<Progress>,
    record_latency: bool,
}

async fn handler(job: Job, ctx: Data<Ctx>) -> Result<(), BoxDynError> {
    if ctx.record_latency {
        ctx.progress.record_latencies(vec![latency_us(job.t)]);
    }
    handle(job.p.as_bytes());
    ctx.progress.add(1);
    Ok(())
}

async fn storage(url: &str, queue: &str) -> Result<RedisStorage<Job>> {
    let conn = apalis_redis::connect(url).await?;
    Ok(RedisStorage::new(conn).with_config(Config::default().queue(queue)))
}

async fn produce_all(s: &mut RedisStorage<Job>, n: u64, size: usize) -> Result<()> {
    let mut sent = 0;
    while sent < n {
        let k = (BATCH as u64).min(n - sent);
        let jobs = (0..k).map(|i| job(size, sent + i)).collect();
        s.push_bulk(jobs)
            .await
            .map_err(|e| anyhow!("apalis push_bulk: {e}"))?;
        sent += k;
    }
    Ok(())
}

/// Spawn a worker at `concurrency` that runs until `progress` says stop.
fn spawn_worker(
    tasks: &mut JoinSet<Result<()>>,
    s: RedisStorage<Job>,
    name: String,
    concurrency: usize,
    progress: Arc<Progress>,
    record_latency: bool,
) {
    let ctx = Ctx {
        progress: progress.clone(),
        record_latency,
    };
    tasks.spawn(async move {
        let worker = WorkerBuilder::new(name)
            .backend(s)
            .data(ctx)
            .concurrency(concurrency)
            .build(handler);
        let stop = async move {
            while !progress.should_stop() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<(), WorkerError>(())
        };
        worker
            .run_until(stop)
            .await
            .map_err(|e| anyhow!("apalis worker: {e}"))
    });
}

#[async_trait]
impl Subject for Apalis {
    fn name(&self) -> &'static str {
        "apalis"
    }
    fn backend(&self) -> Backend {
        Backend::Redis
    }
    fn role(&self) -> Role {
        Role::Peer
    }
    fn describe(&self) -> String {
        "apalis 1.0 + apalis-redis 1.0 (defaults): push_bulk(100); WorkerBuilder.concurrency(N), \
         handler counts the job"
            .into()
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let mut s = storage(&url, &env.queue_name(self.name())).await?;
        let start = Instant::now();
        produce_all(&mut s, n, size).await?;
        Ok(Sample::throughput(n, start.elapsed()))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let queue = env.queue_name(self.name());
        let mut producer = storage(&url, &queue).await?;
        let consumer = storage(&url, &queue).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        spawn_worker(
            &mut tasks,
            consumer,
            format!("{queue}-w"),
            concurrency,
            progress.clone(),
            false,
        );
        tasks.spawn(async move { produce_all(&mut producer, n, size).await });
        timed_run(tasks, &progress, start, env.stall, env.cap).await
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let queue = env.queue_name(self.name());
        let mut producer = storage(&url, &queue).await?;
        let consumer = storage(&url, &queue).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        spawn_worker(
            &mut tasks,
            consumer,
            format!("{queue}-w"),
            1,
            progress.clone(),
            true,
        );
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                producer
                    .push(job(size, wall_nanos()))
                    .await
                    .map_err(|e| anyhow!("apalis push: {e}"))?;
            }
            Ok(())
        });
        run_until_done(tasks, &progress, Instant::now(), env.stall).await?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let queue = env.queue_name(self.name());
        let mut producer = storage(&url, &queue).await?;
        produce_all(&mut producer, backlog, size).await?;
        env.rss_sample(self.name(), queue, Some(url), backlog, size, false)
            .await
    }

    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let url = spec
            .redis_url
            .clone()
            .ok_or_else(|| anyhow!("no redis url"))?;
        let consumer = storage(&url, &spec.queue).await?;
        let before = proc_status_kib("VmRSS")?;
        let progress = Progress::new(spec.backlog);
        let mut tasks = JoinSet::new();
        spawn_worker(
            &mut tasks,
            consumer,
            format!("{}-w", spec.queue),
            1,
            progress.clone(),
            false,
        );
        let start = Instant::now();
        finish_drain(before, tasks, &progress, start, spec).await
    }
}
