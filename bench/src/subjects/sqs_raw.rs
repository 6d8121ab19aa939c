//! The raw baseline on SQS: aws-sdk-sqs (the same SDK, version and HTTP client
//! ferrymq-sqs uses: rustls with ring, standard retries) driven the way an expert
//! would on a standard queue:
//!
//! - produce: `SendMessageBatch` of 10 with [`IN_FLIGHT`] batches in flight at once,
//!   a continuous stream (`buffer_unordered`), every entry's result checked;
//! - consume: each of the N handler tasks loops a long-poll `ReceiveMessage` of 10
//!   (`WaitTimeSeconds` 1), handles the batch, then settles it with one
//!   `DeleteMessageBatch` (checked per entry).
//!
//! Payloads are the bench's (binary: an 8-byte stamp, then filler). An SQS body
//! must be XML text, so raw carries them as ferrymq does: the bytes in a Binary
//! message attribute, a one-character body. What it does not do, and ferrymq does:
//! headers, leases and their clock, extend, nack with delay, dead-lettering, FIFO
//! runs, typed errors.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::task::JoinSet;

use super::Subject;
use crate::drive::{
    handle, latency_us, pace, payload, run_until_done, stamp_of, timed_run, wall_nanos, Progress,
};
use crate::env::Env;
use crate::model::{Backend, Role, Sample, Workload};

/// `SendMessageBatch` calls in flight at once.
pub const IN_FLIGHT: usize = 5;
/// SQS's batch limit (send, receive, delete).
const SQS_BATCH: usize = 10;
/// The message attribute carrying the payload.
const ATTR: &str = "p";

pub struct RawSqs;

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

async fn create_queue(client: &Client, name: &str) -> Result<String> {
    let out = client
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .with_context(|| format!("CreateQueue {name}"))?;
    out.queue_url
        .ok_or_else(|| anyhow!("CreateQueue {name}: no queue URL"))
}

async fn delete_queue(client: &Client, url: &str) {
    let _ = client.delete_queue().queue_url(url).send().await;
}

fn entry(i: u64, body: bytes::Bytes) -> Result<SendMessageBatchRequestEntry> {
    Ok(SendMessageBatchRequestEntry::builder()
        .id(i.to_string())
        .message_body("b")
        .message_attributes(
            ATTR,
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new(body))
                .build()?,
        )
        .build()?)
}

async fn send_chunk(
    client: &Client,
    url: &str,
    entries: Vec<SendMessageBatchRequestEntry>,
) -> Result<()> {
    let out = client
        .send_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .context("SendMessageBatch")?;
    if let Some(f) = out.failed.first() {
        bail!("SendMessageBatch entry {} failed: {:?}", f.id, f.message);
    }
    Ok(())
}

/// Send `n` messages of `size` bytes, 10 per call, [`IN_FLIGHT`] calls at once.
async fn produce_all(client: &Client, url: &str, n: u64, size: usize) -> Result<()> {
    let chunks = (0..n).step_by(SQS_BATCH).map(|from| {
        let to = (from + SQS_BATCH as u64).min(n);
        (from..to)
            .map(|i| entry(i - from, payload(size, i)))
            .collect::<Result<Vec<_>>>()
    });
    stream::iter(chunks)
        .map(|entries| async move { send_chunk(client, url, entries?).await })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
}

/// Receive (long poll, 10), handle, delete the batch; until `progress` is done.
async fn consume(
    client: Client,
    url: String,
    progress: Arc<Progress>,
    record_latency: bool,
) -> Result<()> {
    while !progress.should_stop() {
        let out = client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(SQS_BATCH as i32)
            .wait_time_seconds(1)
            .message_attribute_names(ATTR)
            .send()
            .await
            .context("ReceiveMessage")?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        let mut lat = Vec::new();
        let mut deletes = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let body = m
                .message_attributes
                .as_ref()
                .and_then(|a| a.get(ATTR))
                .and_then(|v| v.binary_value.as_ref())
                .map(|b| b.as_ref())
                .unwrap_or_default();
            if record_latency {
                lat.push(latency_us(stamp_of(body).unwrap_or(0)));
            }
            handle(body);
            deletes.push(
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .set_receipt_handle(m.receipt_handle.clone())
                    .build()?,
            );
        }
        let out = client
            .delete_message_batch()
            .queue_url(&url)
            .set_entries(Some(deletes))
            .send()
            .await
            .context("DeleteMessageBatch")?;
        if let Some(f) = out.failed.first() {
            bail!("DeleteMessageBatch entry {} failed: {:?}", f.id, f.message);
        }
        if record_latency {
            progress.record_latencies(lat);
        }
        progress.add(messages.len() as u64);
    }
    Ok(())
}

#[async_trait]
impl Subject for RawSqs {
    fn name(&self) -> &'static str {
        "raw-sqs"
    }
    fn backend(&self) -> Backend {
        Backend::Sqs
    }
    fn role(&self) -> Role {
        Role::Raw
    }
    fn describe(&self) -> String {
        format!(
            "aws-sdk-sqs on a standard queue: SendMessageBatch(10), {IN_FLIGHT} in flight; N \
             tasks each long-polling ReceiveMessage(10, 1 s) then DeleteMessageBatch"
        )
    }
    fn applies(&self, workload: &Workload) -> bool {
        !matches!(workload, Workload::Rss { .. })
    }

    async fn produce(&self, env: &Env, n: u64, size: usize) -> Result<Sample> {
        let client = client().await?;
        let url = create_queue(&client, &env.queue_name(self.name())).await?;
        let start = Instant::now();
        let r = produce_all(&client, &url, n, size).await;
        let elapsed = start.elapsed();
        delete_queue(&client, &url).await;
        r?;
        Ok(Sample::throughput(n, elapsed))
    }

    async fn e2e(&self, env: &Env, n: u64, size: usize, concurrency: usize) -> Result<Sample> {
        let client = client().await?;
        let url = create_queue(&client, &env.queue_name(self.name())).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        {
            let (client, url) = (client.clone(), url.clone());
            tasks.spawn(async move { produce_all(&client, &url, n, size).await });
        }
        for _ in 0..concurrency {
            tasks.spawn(consume(
                client.clone(),
                url.clone(),
                progress.clone(),
                false,
            ));
        }
        let sample = timed_run(tasks, &progress, start, env.stall, env.cap).await;
        delete_queue(&client, &url).await;
        sample
    }

    async fn latency(&self, env: &Env, n: u64, size: usize, rate: u64) -> Result<Sample> {
        let client = client().await?;
        let url = create_queue(&client, &env.queue_name(self.name())).await?;
        let progress = Progress::new(n);
        let mut tasks = JoinSet::new();
        tasks.spawn(consume(client.clone(), url.clone(), progress.clone(), true));
        {
            let (client, url) = (client.clone(), url.clone());
            tasks.spawn(async move {
                let start = tokio::time::Instant::now();
                for i in 0..n {
                    pace(start, i, rate).await;
                    client
                        .send_message()
                        .queue_url(&url)
                        .message_body("b")
                        .message_attributes(
                            ATTR,
                            MessageAttributeValue::builder()
                                .data_type("Binary")
                                .binary_value(Blob::new(payload(size, wall_nanos())))
                                .build()?,
                        )
                        .send()
                        .await
                        .context("SendMessage")?;
                }
                Ok(())
            });
        }
        let r = run_until_done(tasks, &progress, Instant::now(), env.stall).await;
        delete_queue(&client, &url).await;
        r?;
        Ok(Sample::latency(progress.take_latencies(), rate))
    }

    async fn rss(&self, _env: &Env, _backlog: u64, _size: usize) -> Result<Sample> {
        bail!("the RSS workload is not run on SQS")
    }
}
