//! Peer: omniqueue 0.3 (crates.io, `sqs` feature), its SQS backend, on the same
//! LocalStack as `raw-sqs` / `ferrymq-sqs` / `ferrymq-sqs-worker`
//! ([`super::sqs::endpoint`]). Built only with the bench feature
//! `peer-omniqueue-sqs` (off by default): omniqueue's `sqs` feature turns on
//! aws-sdk-sqs's default features, which compile aws-lc-sys and a second
//! rustls 0.21 / hyper 0.14 HTTP stack into the whole bench.
//!
//! Driven at its best, as a user after throughput would:
//!
//! - produce: `send_raw_batch` with chunks of 10 (SQS's batch limit; omniqueue sends
//!   one `SendMessageBatch` per 10 payloads, one after another within a call), with
//!   [`IN_FLIGHT`] calls in flight at once, as many as `raw-sqs` keeps;
//! - consume: N handler tasks share one consumer (its SQS `receive_all` takes
//!   `&self`), each looping `receive_all(10, 1 s)` — batch receive of 10 with long
//!   polling, `WaitTimeSeconds` 1 as `raw-sqs` — then handles the batch and acks every
//!   delivery concurrently. omniqueue has no batch ack: each ack is its own
//!   `DeleteMessage` call.
//!
//! The client is omniqueue's own (`Client::from_conf`) over an `aws_sdk_sqs::Config`
//! the bench passes with `sqs_config`: the same SDK, version and HTTP client
//! (rustls with ring) and static dummy credentials as `raw-sqs`, so the figures
//! differ by omniqueue's API, not by the HTTP stack. omniqueue does not create
//! queues; the bench creates a standard queue per run and deletes it afterwards.
//!
//! Payloads: omniqueue's SQS payload is a `String` (the message body, which SQS
//! requires to be XML text), so the bench's 8-byte stamp travels as 16 hex digits,
//! followed by `x` filler up to the same size.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_sdk_sqs::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use futures::stream::{self, StreamExt, TryStreamExt};
use omniqueue::backends::{SqsBackend, SqsConsumer, SqsProducer};
use omniqueue::QueueProducer;
use tokio::task::JoinSet;

use super::Subject;
use crate::drive::{pace, run_until_done, timed_run, wall_nanos, Progress};
use crate::env::Env;
use crate::model::{Backend, Role, Sample, Workload};

pub struct OmniqueueSqs;

/// `send_raw_batch` calls (of 10) in flight at once: as `raw-sqs`.
const IN_FLIGHT: usize = super::sqs_raw::IN_FLIGHT;
/// SQS's batch limit (omniqueue's `max_messages` on SQS).
const SQS_BATCH: usize = 10;
/// `receive_all`'s deadline, which omniqueue passes as `WaitTimeSeconds`.
const LONG_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The bench's payload as SQS text: the stamp in 16 hex digits, then filler.
fn text_payload(size: usize, stamp: u64) -> String {
    let mut s = format!("{stamp:016x}");
    s.push_str(&"x".repeat(size.saturating_sub(16)));
    s
}

fn text_stamp(body: &[u8]) -> Option<u64> {
    let head = std::str::from_utf8(body.get(..16)?).ok()?;
    u64::from_str_radix(head, 16).ok()
}

fn err(e: omniqueue::QueueError) -> anyhow::Error {
    anyhow!("omniqueue: {e}")
}

/// An SQS client as `raw-sqs` builds it (its config is handed to omniqueue).
async fn client() -> Result<Client> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new("us-east-1"))
        .endpoint_url(super::sqs::endpoint()?)
        .credentials_provider(Credentials::new("test", "test", None, None, "bench"))
        .load()
        .await;
    Ok(Client::new(&sdk))
}

/// A fresh standard queue for one run: the admin client and the queue URL.
async fn create_queue(env: &Env, name: &str) -> Result<(Client, String)> {
    let admin = client().await?;
    let queue = env.queue_name(name);
    let url = admin
        .create_queue()
        .queue_name(&queue)
        .send()
        .await
        .with_context(|| format!("CreateQueue {queue}"))?
        .queue_url
        .ok_or_else(|| anyhow!("CreateQueue {queue}: no queue URL"))?;
    Ok((admin, url))
}

async fn delete_queue(admin: &Client, url: &str) {
    let _ = admin.delete_queue().queue_url(url).send().await;
}

async fn producer(admin: &Client, url: &str) -> Result<SqsProducer> {
    SqsBackend::builder(url)
        .sqs_config(admin.config().clone())
        .build_producer()
        .await
        .map_err(err)
}

async fn consumer(admin: &Client, url: &str) -> Result<SqsConsumer> {
    SqsBackend::builder(url)
        .sqs_config(admin.config().clone())
        .build_consumer()
        .await
        .map_err(err)
}

/// Send `n` messages of `size` bytes, 10 per `send_raw_batch`, [`IN_FLIGHT`] at once.
async fn produce_all(p: &SqsProducer, n: u64, size: usize) -> Result<()> {
    let chunks = (0..n).step_by(SQS_BATCH).map(|from| {
        let to = (from + SQS_BATCH as u64).min(n);
        // omniqueue takes `AsRef<String>` items, which `String` itself is not.
        (from..to)
            .map(|i| Box::new(text_payload(size, i)))
            .collect::<Vec<_>>()
    });
    stream::iter(chunks)
        .map(|batch| async move { p.send_raw_batch(&batch).await.map_err(err) })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
}

/// Receive (long poll, 10), handle, ack each delivery concurrently; until done.
async fn consume(c: Arc<SqsConsumer>, progress: Arc<Progress>, record_latency: bool) -> Result<()> {
    while !progress.should_stop() {
        let batch = c.receive_all(SQS_BATCH, LONG_POLL).await.map_err(err)?;
        super::omniqueue::handle_and_ack(batch, &progress, record_latency, text_stamp).await?;
    }
    Ok(())
}

#[async_trait]
impl Subject for OmniqueueSqs {
    fn name(&self) -> &'static str {
        "omniqueue-sqs"
    }
    fn backend(&self) -> Backend {
        Backend::Sqs
    }
    fn role(&self) -> Role {
        Role::Peer
    }
    fn describe(&self) -> String {
        format!(
            "omniqueue 0.3 SQS backend (standard queue, raw-sqs's SDK config and HTTP client): \
             send_raw_batch of 10, {IN_FLIGHT} in flight; N tasks sharing one consumer, each \
             receive_all(10, 1 s long poll), then concurrent acks (one DeleteMessage each: no \
             batch ack); text payloads (stamp in hex)"
        )
    }
    fn applies(&self, workload: &Workload) -> bool {
        !matches!(workload, Workload::Rss { .. })
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let (admin, url) = create_queue(env, self.name()).await?;
        let r = async {
            let p = producer(&admin, &url).await?;
            let start = Instant::now();
            produce_all(&p, n, size).await?;
            Ok(Sample::throughput(n, start.elapsed()))
        }
        .await;
        delete_queue(&admin, &url).await;
        r
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let (admin, url) = create_queue(env, self.name()).await?;
        let r = async {
            let p = producer(&admin, &url).await?;
            let c = Arc::new(consumer(&admin, &url).await?);
            let progress = Progress::new(n);
            let mut tasks = JoinSet::new();
            let start = Instant::now();
            tasks.spawn(async move { produce_all(&p, n, size).await });
            for _ in 0..concurrency {
                tasks.spawn(consume(c.clone(), progress.clone(), false));
            }
            timed_run(tasks, &progress, start, env.stall, env.cap).await
        }
        .await;
        delete_queue(&admin, &url).await;
        r
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let (admin, url) = create_queue(env, self.name()).await?;
        let r = async {
            let p = producer(&admin, &url).await?;
            let c = Arc::new(consumer(&admin, &url).await?);
            let progress = Progress::new(n);
            let mut tasks = JoinSet::new();
            tasks.spawn(consume(c, progress.clone(), true));
            tasks.spawn(async move {
                let start = tokio::time::Instant::now();
                for i in 0..n {
                    pace(start, i, rate).await;
                    p.send_raw(&text_payload(size, wall_nanos()))
                        .await
                        .map_err(err)?;
                }
                Ok(())
            });
            run_until_done(tasks, &progress, Instant::now(), env.stall).await?;
            Ok(Sample::latency(progress.take_latencies(), rate))
        }
        .await;
        delete_queue(&admin, &url).await;
        r
    }

    async fn rss(&self, _env: &Env, _backlog: u64, _size: usize) -> Result<Sample> {
        bail!("the RSS workload is not run on SQS")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_payload_keeps_size_and_stamp() {
        let p = text_payload(100, 0x0123_4567_89ab_cdef);
        assert_eq!(p.len(), 100);
        assert_eq!(text_stamp(p.as_bytes()), Some(0x0123_4567_89ab_cdef));
        // A size below the stamp's 16 digits still carries the whole stamp.
        assert_eq!(text_stamp(text_payload(8, 7).as_bytes()), Some(7));
    }
}
