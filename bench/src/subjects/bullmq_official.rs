//! Peer: `bullmq-official` on crates.io (imported as `bullmq`), the BullMQ vendor's
//! own Rust port (Taskforce.sh, repository taskforcesh/bullmq), wire-compatible with
//! Node BullMQ: the same Lua scripts and keys.
//!
//! Driven as the Node peer is: `Queue::add_bulk` of 100 jobs at a time (JSON data:
//! the send stamp and a filler string of the payload size), every job added with
//! `remove_on_complete` (the closest to delete-on-ack); a `Worker` at concurrency N
//! whose processor reads the payload, counted on its `Completed` events (emitted
//! after the job was moved to completed).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use bullmq::options::RedisConnectionOptions;
use bullmq::types::RemoveOnFinish;
use bullmq::worker::{CancellationToken, WorkerEvent};
use bullmq::{BulkJob, JobOptions, Queue, QueueOptions, Worker, WorkerOptions};
use serde_json::json;
use tokio::task::JoinSet;

use super::Subject;
use crate::drive::{
    handle, latency_us, pace, run_until_done, timed_run, wall_nanos, Progress, BATCH,
};
use crate::env::{finish_drain, proc_status_kib, ChildReport, ChildSpec, Env};
use crate::model::{Backend, Role, Sample};

pub struct BullMqOfficial;

fn err(e: bullmq::Error) -> anyhow::Error {
    anyhow!("bullmq-official: {e}")
}

fn connection(url: &str) -> RedisConnectionOptions {
    RedisConnectionOptions::default().url(url)
}

fn job_options() -> JobOptions {
    JobOptions::default().remove_on_complete(RemoveOnFinish::Bool(true))
}

/// The job data: the send stamp and a filler of `size` bytes (the payload).
fn data(size: usize, stamp: u64) -> serde_json::Value {
    json!({ "t": stamp, "p": "x".repeat(size.saturating_sub(8).max(1)) })
}

async fn queue(url: &str, name: &str) -> Result<Queue> {
    Queue::with_options(name, QueueOptions::default().connection(connection(url)))
        .await
        .map_err(err)
}

async fn produce_all(q: &Queue, n: u64, size: usize) -> Result<()> {
    let mut sent = 0;
    while sent < n {
        let k = (BATCH as u64).min(n - sent);
        let jobs = (0..k)
            .map(|i| BulkJob::with_options("job", data(size, sent + i), job_options()))
            .collect();
        q.add_bulk(jobs).await.map_err(err)?;
        sent += k;
    }
    Ok(())
}

/// Start a worker and count its completed jobs into `progress` until it is done.
async fn work(
    url: String,
    name: String,
    concurrency: usize,
    progress: Arc<Progress>,
    record_latency: bool,
) -> Result<()> {
    let seen = progress.clone();
    let processor = move |job: bullmq::Job, _token: CancellationToken| {
        let seen = seen.clone();
        async move {
            let d = job.data();
            if record_latency {
                let stamp = d.get("t").and_then(serde_json::Value::as_u64).unwrap_or(0);
                seen.record_latencies(vec![latency_us(stamp)]);
            }
            if let Some(p) = d.get("p").and_then(serde_json::Value::as_str) {
                handle(p.as_bytes());
            }
            Ok(serde_json::Value::Null)
        }
    };
    let opts = WorkerOptions {
        connection: connection(&url),
        concurrency: concurrency.max(1),
        ..WorkerOptions::default()
    };
    let worker = Worker::with_options(&name, processor, opts)
        .await
        .map_err(err)?;
    let counting = async {
        while !progress.should_stop() {
            match worker.next_event().await {
                Some(WorkerEvent::Completed { .. }) => progress.add(1),
                Some(WorkerEvent::Failed { job_id, error }) => {
                    return Err(anyhow!("bullmq-official: job {job_id} failed: {error}"))
                }
                Some(_) => {}
                None => break,
            }
        }
        Ok(())
    };
    let stop = async {
        while !progress.should_stop() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    };
    let outcome = tokio::select! {
        r = counting => r,
        r = stop => r,
    };
    let _ = worker.close(1_000).await;
    outcome
}

#[async_trait]
impl Subject for BullMqOfficial {
    fn name(&self) -> &'static str {
        "bullmq-official"
    }
    fn backend(&self) -> Backend {
        Backend::Redis
    }
    fn role(&self) -> Role {
        Role::Peer
    }
    fn describe(&self) -> String {
        "bullmq-official (the BullMQ vendor's Rust port, crate `bullmq`): Queue::add_bulk(100), \
         jobs with remove_on_complete; Worker at concurrency N, counted on its Completed events"
            .into()
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let q = queue(&url, &env.queue_name(self.name())).await?;
        let start = Instant::now();
        produce_all(&q, n, size).await?;
        Ok(Sample::throughput(n, start.elapsed()))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let name = env.queue_name(self.name());
        let q = queue(&url, &name).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        tasks.spawn(async move { produce_all(&q, n, size).await });
        tasks.spawn(work(url, name, concurrency, progress.clone(), false));
        timed_run(tasks, &progress, start, env.stall, env.cap).await
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let name = env.queue_name(self.name());
        let q = queue(&url, &name).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        tasks.spawn(work(url, name, 1, progress.clone(), true));
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                q.add("job", data(size, wall_nanos()))
                    .options(job_options())
                    .await
                    .map_err(err)?;
            }
            Ok(())
        });
        run_until_done(tasks, &progress, Instant::now(), env.stall).await?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let name = env.queue_name(self.name());
        let q = queue(&url, &name).await?;
        produce_all(&q, backlog, size).await?;
        drop(q);
        env.rss_sample(self.name(), name, Some(url), backlog, size, false)
            .await
    }

    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let url = spec
            .redis_url
            .clone()
            .ok_or_else(|| anyhow!("no redis url"))?;
        let before = proc_status_kib("VmRSS")?;
        let progress = Progress::new(spec.backlog);
        let mut tasks = JoinSet::new();
        tasks.spawn(work(url, spec.queue.clone(), 1, progress.clone(), false));
        let start = Instant::now();
        finish_drain(before, tasks, &progress, start, spec).await
    }
}
