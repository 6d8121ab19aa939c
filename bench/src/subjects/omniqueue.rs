//! Peer: omniqueue 0.3 (crates.io, `redis` feature), its Redis Streams backend.
//!
//! omniqueue has no batch send, so producing keeps 16 `send_raw` calls in flight on
//! a bb8 pool of 16 connections. Consuming: each handler task owns a consumer (its
//! `receive_all` takes `&mut self`) and loops `receive_all(100, 100 ms)`, handles the
//! batch, then acks every delivery concurrently (each ack is omniqueue's own
//! `XACK` + `XDEL` pipeline). omniqueue does not create its consumer group, so the
//! bench does (`XGROUP CREATE … MKSTREAM`), as omniqueue's own tests do.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use omniqueue::backends::redis::RedisConnectionManager;
use omniqueue::backends::{RedisBackend, RedisConfig};

type RedisProducer = omniqueue::backends::RedisProducer<RedisConnectionManager>;
type RedisConsumer = omniqueue::backends::RedisConsumer<RedisConnectionManager>;
use tokio::task::JoinSet;

use super::Subject;
use crate::drive::{
    handle, latency_us, pace, payload, run_until_done, stamp_of, timed_run, wall_nanos, Progress,
    BATCH, POLL,
};
use crate::env::{finish_drain, proc_status_kib, ChildReport, ChildSpec, Env};
use crate::model::{Backend, Role, Sample};

pub struct Omniqueue;

const IN_FLIGHT: usize = 16;
const GROUP: &str = "g";

fn config(url: &str, queue: &str, consumer: &str) -> RedisConfig {
    RedisConfig {
        dsn: url.to_string(),
        max_connections: IN_FLIGHT as u16,
        reinsert_on_nack: false,
        queue_key: queue.to_string(),
        delayed_queue_key: format!("{queue}::delayed"),
        delayed_lock_key: format!("{queue}::delayed_lock"),
        consumer_group: GROUP.to_string(),
        consumer_name: consumer.to_string(),
        payload_key: "payload".to_string(),
        ack_deadline_ms: 30_000,
        dlq_config: None,
        sentinel_config: None,
    }
}

fn err(e: omniqueue::QueueError) -> anyhow::Error {
    anyhow!("omniqueue: {e}")
}

async fn create_group(url: &str, queue: &str) -> Result<()> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(queue)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut conn)
        .await?;
    Ok(())
}

async fn producer(url: &str, queue: &str) -> Result<RedisProducer> {
    RedisBackend::builder(config(url, queue, "producer"))
        .build_producer()
        .await
        .map_err(err)
}

async fn consumer(url: &str, queue: &str, name: &str) -> Result<RedisConsumer> {
    RedisBackend::builder(config(url, queue, name))
        .build_consumer()
        .await
        .map_err(err)
}

async fn produce_all(p: &RedisProducer, n: u64, size: usize) -> Result<()> {
    stream::iter(0..n)
        .map(|i| async move { p.send_raw(&payload(size, i)).await.map_err(err) })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
}

async fn consume(
    mut c: RedisConsumer,
    progress: Arc<Progress>,
    record_latency: bool,
) -> Result<()> {
    while !progress.should_stop() {
        let batch = c.receive_all(BATCH, POLL).await.map_err(err)?;
        handle_and_ack(batch, &progress, record_latency, stamp_of).await?;
    }
    Ok(())
}

/// What both omniqueue subjects do with a received batch: read every payload (and its
/// stamp, by `stamp`), then ack all of it concurrently, as omniqueue's docs show.
pub(super) async fn handle_and_ack(
    batch: Vec<omniqueue::Delivery>,
    progress: &Progress,
    record_latency: bool,
    stamp: fn(&[u8]) -> Option<u64>,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut lat = Vec::new();
    for d in &batch {
        let body = d
            .borrow_payload()
            .ok_or_else(|| anyhow!("delivery without payload"))?;
        if record_latency {
            lat.push(latency_us(stamp(body).unwrap_or(0)));
        }
        handle(body);
    }
    let n = batch.len() as u64;
    futures::future::try_join_all(
        batch
            .into_iter()
            .map(|d| async move { d.ack().await.map_err(|(e, _)| err(e)) }),
    )
    .await?;
    if record_latency {
        progress.record_latencies(lat);
    }
    progress.add(n);
    Ok(())
}

#[async_trait]
impl Subject for Omniqueue {
    fn name(&self) -> &'static str {
        "omniqueue"
    }
    fn backend(&self) -> Backend {
        Backend::Redis
    }
    fn role(&self) -> Role {
        Role::Peer
    }
    fn describe(&self) -> String {
        "omniqueue 0.3 Redis Streams backend: send_raw with 16 in flight (no batch API, bb8 pool of 16); \
         per handler task its own consumer, receive_all(100, 100 ms), concurrent acks (XACK+XDEL each)"
            .into()
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let queue = env.queue_name(self.name());
        create_group(&url, &queue).await?;
        let p = producer(&url, &queue).await?;
        let start = Instant::now();
        produce_all(&p, n, size).await?;
        Ok(Sample::throughput(n, start.elapsed()))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let queue = env.queue_name(self.name());
        create_group(&url, &queue).await?;
        let p = producer(&url, &queue).await?;
        let mut consumers = Vec::new();
        for i in 0..concurrency {
            consumers.push(consumer(&url, &queue, &format!("c{i}")).await?);
        }
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        tasks.spawn(async move { produce_all(&p, n, size).await });
        for c in consumers {
            tasks.spawn(consume(c, progress.clone(), false));
        }
        timed_run(tasks, &progress, start, env.stall, env.cap).await
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let url = env.redis()?.url.clone();
        let queue = env.queue_name(self.name());
        create_group(&url, &queue).await?;
        let p = producer(&url, &queue).await?;
        let c = consumer(&url, &queue, "c0").await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        tasks.spawn(consume(c, progress.clone(), true));
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                p.send_raw(&payload(size, wall_nanos()))
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
        let queue = env.queue_name(self.name());
        create_group(&url, &queue).await?;
        let p = producer(&url, &queue).await?;
        produce_all(&p, backlog, size).await?;
        drop(p);
        env.rss_sample(self.name(), queue, Some(url), backlog, size, false)
            .await
    }

    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let url = spec
            .redis_url
            .clone()
            .ok_or_else(|| anyhow!("no redis url"))?;
        let c = consumer(&url, &spec.queue, "c0").await?;
        let before = proc_status_kib("VmRSS")?;
        let progress = Progress::new(spec.backlog);
        let mut tasks = JoinSet::new();
        tasks.spawn(consume(c, progress.clone(), false));
        let start = Instant::now();
        finish_drain(before, tasks, &progress, start, spec).await
    }
}
