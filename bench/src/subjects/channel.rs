//! The raw baseline of the memory backend: a tokio unbounded mpsc channel of
//! `Bytes`.
//!
//! A **lower bound, not an equivalent**: a channel has no acks, no visibility
//! timeout, no redelivery, no attempts, no delay, priority, per-key order, dedup or
//! depth — everything ferrymq's memory queue keeps. Consumers share the receiver
//! behind a mutex and take up to [`BATCH`] at a time with `recv_many`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use super::Subject;
use crate::drive::{
    handle, latency_us, pace, payload, run_until_done, stamp_of, timed_run, wall_nanos, Progress,
    BATCH,
};
use crate::env::{finish_drain, proc_status_kib, ChildReport, ChildSpec, Env};
use crate::model::{Backend, Role, Sample};

pub struct Channel;

type Rx = Arc<Mutex<mpsc::UnboundedReceiver<Bytes>>>;

fn send_all(tx: &mpsc::UnboundedSender<Bytes>, n: u64, size: usize) -> Result<()> {
    for i in 0..n {
        tx.send(payload(size, i))
            .map_err(|_| anyhow!("channel closed"))?;
    }
    Ok(())
}

async fn consume(rx: Rx, progress: Arc<Progress>, record_latency: bool) -> Result<()> {
    let mut buf = Vec::with_capacity(BATCH);
    while !progress.should_stop() {
        let got = {
            let mut rx = rx.lock().await;
            tokio::select! {
                got = rx.recv_many(&mut buf, BATCH) => got,
                _ = tokio::time::sleep(crate::drive::POLL) => 0,
            }
        };
        if got == 0 {
            continue;
        }
        let mut lat = Vec::new();
        for p in buf.drain(..) {
            if record_latency {
                lat.push(latency_us(stamp_of(&p).unwrap_or(0)));
            }
            handle(&p);
        }
        if record_latency {
            progress.record_latencies(lat);
        }
        progress.add(got as u64);
    }
    Ok(())
}

#[async_trait]
impl Subject for Channel {
    fn name(&self) -> &'static str {
        "channel"
    }
    fn backend(&self) -> Backend {
        Backend::Memory
    }
    fn role(&self) -> Role {
        Role::Raw
    }
    fn describe(&self) -> String {
        "tokio::sync::mpsc unbounded channel of Bytes, receiver shared by N tasks (recv_many 100). \
         A lower bound: no acks, leases, redelivery or any queue semantics"
            .into()
    }

    async fn produce(&self, _env: &Env, n: u64, size: usize) -> Result<Sample> {
        let (tx, rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        send_all(&tx, n, size)?;
        let elapsed = start.elapsed();
        drop(rx);
        Ok(Sample::throughput(n, elapsed))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx: Rx = Arc::new(Mutex::new(rx));
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        tasks.spawn(async move {
            // Yield between batches like an async producer would between sends.
            let mut sent = 0;
            while sent < n {
                let k = (BATCH as u64).min(n - sent);
                send_all(&tx, k, size)?;
                sent += k;
                tokio::task::yield_now().await;
            }
            Ok(())
        });
        for _ in 0..concurrency {
            tasks.spawn(consume(rx.clone(), progress.clone(), false));
        }
        timed_run(tasks, &progress, start, env.stall, env.cap).await
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let (tx, rx) = mpsc::unbounded_channel();
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        tasks.spawn(consume(Arc::new(Mutex::new(rx)), progress.clone(), true));
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..n {
                pace(start, i, rate).await;
                tx.send(payload(size, wall_nanos()))
                    .map_err(|_| anyhow!("channel closed"))?;
            }
            Ok(())
        });
        run_until_done(tasks, &progress, Instant::now(), env.stall).await?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample> {
        env.rss_sample(self.name(), String::new(), None, backlog, size, true)
            .await
    }

    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let (tx, rx) = mpsc::unbounded_channel();
        send_all(&tx, spec.backlog, spec.size)?;
        drop(tx);
        let before = proc_status_kib("VmRSS")?;
        let progress = Progress::new(spec.backlog);
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        tasks.spawn(consume(Arc::new(Mutex::new(rx)), progress.clone(), false));
        finish_drain(before, tasks, &progress, start, spec).await
    }
}
