//! The subjects: everything measured, each in a file of its own.
//!
//! Every subject runs the same workloads with the same batch size ([`BATCH`]),
//! the same payloads and the same handler ([`crate::drive::handle`]), so that the
//! differences are the libraries'.
//!
//! [`BATCH`]: crate::drive::BATCH

use anyhow::{bail, Result};
use async_trait::async_trait;

use crate::env::{ChildReport, ChildSpec, Env};
use crate::model::{Backend, Role, Sample};

pub mod apalis;
pub mod bullmq;
pub mod bullmq_official;
pub mod channel;
pub mod ferry;
pub mod kafka;
pub mod omniqueue;
#[cfg(feature = "peer-omniqueue-sqs")]
pub mod omniqueue_sqs;
pub mod raw_redis;
pub mod sqs;
pub mod sqs_raw;

#[async_trait]
pub trait Subject: Send + Sync {
    /// Stable name (CLI `--subjects`, tables, JSON).
    fn name(&self) -> &'static str;
    fn backend(&self) -> Backend;
    fn role(&self) -> Role;
    /// How it is driven, for the README and the JSON file.
    fn describe(&self) -> String;

    /// Whether `workload` means anything for this subject (a Worker only consumes).
    fn applies(&self, workload: &crate::model::Workload) -> bool {
        let _ = workload;
        true
    }

    /// Send `n` messages of `size` bytes; timed until the last send is confirmed.
    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample>;

    /// Produce `n` while `concurrency` handlers consume and ack; timed from the first
    /// send to the last ack.
    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample>;

    /// Send `n` messages one at a time at `rate`/s; enqueue-to-handler latency.
    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample>;

    /// Peak RSS of a separate consumer process draining `backlog` messages.
    async fn rss(&self, env: &Env, backlog: u64, size: usize) -> Result<Sample>;

    /// The child side of [`rss`](Subject::rss), run in the child process.
    async fn rss_child(&self, spec: &ChildSpec) -> Result<ChildReport> {
        let _ = spec;
        bail!("{} has no RSS consumer child", self.name())
    }
}

/// Every subject this build knows, in run order within a round (raw first, then
/// ferrymq, then peers, per backend).
pub fn all() -> Vec<Box<dyn Subject>> {
    let mut v: Vec<Box<dyn Subject>> = vec![
        Box::new(channel::Channel),
        Box::new(ferry::FerryTraits::memory()),
        Box::new(ferry::FerryWorker::memory()),
        Box::new(raw_redis::RawRedis),
    ];
    v.extend(ferry::redis_subjects());
    v.push(Box::new(omniqueue::Omniqueue));
    v.push(Box::new(bullmq::BullMq));
    v.push(Box::new(bullmq_official::BullMqOfficial));
    v.push(Box::new(apalis::Apalis));
    v.extend(kafka::subjects());
    v.extend(sqs::subjects());
    #[cfg(feature = "peer-omniqueue-sqs")]
    v.push(Box::new(omniqueue_sqs::OmniqueueSqs));
    v
}

/// The subject called `name`.
pub fn by_name(name: &str) -> Result<Box<dyn Subject>> {
    match all().into_iter().find(|s| s.name() == name) {
        Some(s) => Ok(s),
        None => bail!("unknown subject {name:?}"),
    }
}
