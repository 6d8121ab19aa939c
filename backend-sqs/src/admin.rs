//! Administration of one SQS queue: create / ensure / delete / describe / purge,
//! native redrive (`StartMessageMoveTask`) with progress. Peeking is refused: SQS
//! has no side-effect-free read.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use ferrymq_core::admin::{Admin, Peeked, ProgressFn, QueueInfo, QueueSpec, RedriveProgress};
use ferrymq_core::{Error, ErrorKind, Result};

use crate::client::{
    self, capabilities, depth_of, find_queue_url, get_attributes, name_of_arn, QueueProfile,
    MAX_BATCH,
};
use crate::config::{whole_seconds, SqsConfig};
use crate::error::{map_sdk, Call};

/// How often redrive progress is polled (`ListMessageMoveTasks`).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The administration of one SQS queue (`Admin`).
///
/// - `create` / `ensure`: `CreateQueue` with `FifoQueue` (from the name), the
///   visibility timeout and retention of the spec (or the config), and a native
///   `RedrivePolicy` (the dead-letter queue is created too, of the same type, and
///   given a `RedriveAllowPolicy` naming only this queue). `create` of a queue that
///   exists with other settings is `InvalidConfig`.
/// - `describe`: approximate depth from `ApproximateNumberOfMessages` /
///   `…NotVisible` / `…Delayed` (a nack with a delay counts as in flight: SQS has no
///   other word for it) plus the dead-letter queue's count, the queue's attributes as
///   settings, and warnings.
/// - `purge`: `Unsupported` — SQS's `PurgeQueue` deletes in-flight messages too,
///   which `Admin::purge` must spare. [`SqsAdmin::purge_all`] is the SQS purge.
/// - `peek`, `peek_dead_letters`: `Unsupported`. An SQS receive always leases the
///   message and increments its `ApproximateReceiveCount`, which counts toward the
///   `maxReceiveCount` of a redrive policy; a "peek" could dead-letter a message.
/// - `redrive_dead_letters`: from the queue's native dead-letter queue back to it.
///   With no limit, on a standard queue, `StartMessageMoveTask` (progress from
///   `ListMessageMoveTasks`); with a limit, on FIFO queues, or where the server
///   refuses move tasks, a copy: receive from the DLQ, send to the queue (group id
///   kept), delete from the DLQ — bounded by the DLQ's count at the start.
#[derive(Debug)]
pub struct SqsAdmin {
    client: Client,
    config: SqsConfig,
}

impl SqsAdmin {
    pub(crate) async fn connect(config: &SqsConfig) -> Result<Self> {
        config.validate()?;
        Ok(SqsAdmin {
            client: client::sdk_client(config).await?,
            config: config.clone(),
        })
    }

    async fn url(&self) -> Result<Option<String>> {
        if let Some(url) = &self.config.queue_url {
            return Ok(Some(url.clone()));
        }
        find_queue_url(&self.client, &self.config, &self.config.queue).await
    }

    async fn require_url(&self) -> Result<String> {
        self.url().await?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("SQS queue {} does not exist", self.config.queue),
            )
        })
    }

    /// The config with the spec's settings applied.
    fn config_for(&self, spec: &QueueSpec) -> Result<SqsConfig> {
        let mut config = self.config.clone();
        if let Some(fifo) = spec.fifo {
            if fifo != config.is_fifo() {
                return Err(Error::invalid_config(
                    "fifo",
                    "on SQS a FIFO queue's name ends in `.fifo`, and only a FIFO queue's does",
                ));
            }
        }
        if let Some(v) = spec.visibility_timeout {
            config.visibility_timeout = Some(v);
        }
        if let Some(policy) = &spec.dead_letter {
            config.max_receives = Some(policy.max_receives);
            config.dlq = Some(name_of_arn(&policy.queue).to_string());
        }
        config.validate()?;
        Ok(config)
    }

    async fn create_from(&self, spec: &QueueSpec) -> Result<String> {
        let config = self.config_for(spec)?;
        let mut extra = HashMap::new();
        if let Some(retention) = spec.retention {
            extra.insert(
                QueueAttributeName::MessageRetentionPeriod,
                whole_seconds(retention).to_string(),
            );
        }
        client::create_with_config(&self.client, &config, extra).await
    }

    async fn info(&self, url: &str) -> Result<QueueInfo> {
        let attrs = get_attributes(
            &self.client,
            url,
            &self.config.queue,
            &[QueueAttributeName::All],
        )
        .await?;
        let profile = client::profile(&self.client, &self.config, url).await?;
        let mut depth = depth_of(&attrs);
        let mut info_warnings = Vec::new();
        if let Some(dlq_arn) = &profile.dlq_arn {
            match self.dlq_url(dlq_arn).await {
                Ok(Some(dlq_url)) => {
                    let dlq_attrs = get_attributes(
                        &self.client,
                        &dlq_url,
                        name_of_arn(dlq_arn),
                        &[QueueAttributeName::ApproximateNumberOfMessages],
                    )
                    .await?;
                    depth.dead_lettered = depth_of(&dlq_attrs).waiting;
                }
                Ok(None) => info_warnings.push(format!(
                    "the RedrivePolicy names dead-letter queue {dlq_arn}, which does not exist: \
                     SQS drops nothing, but messages past maxReceiveCount stay in the queue"
                )),
                Err(e) => {
                    info_warnings.push(format!("the dead-letter queue could not be read: {e}"))
                }
            }
        }
        let caps = capabilities(&profile);
        let mut info = QueueInfo::new(self.config.queue.clone(), depth, caps).setting("url", url);
        let shown = [
            (QueueAttributeName::QueueArn, "arn"),
            (QueueAttributeName::FifoQueue, "fifo"),
            (
                QueueAttributeName::VisibilityTimeout,
                "visibility_timeout_s",
            ),
            (QueueAttributeName::MessageRetentionPeriod, "retention_s"),
            (
                QueueAttributeName::MaximumMessageSize,
                "maximum_message_size",
            ),
            (QueueAttributeName::DelaySeconds, "delay_s"),
            (
                QueueAttributeName::ReceiveMessageWaitTimeSeconds,
                "receive_wait_s",
            ),
            (QueueAttributeName::RedrivePolicy, "redrive_policy"),
            (
                QueueAttributeName::RedriveAllowPolicy,
                "redrive_allow_policy",
            ),
            (
                QueueAttributeName::ContentBasedDeduplication,
                "content_based_deduplication",
            ),
            (
                QueueAttributeName::DeduplicationScope,
                "deduplication_scope",
            ),
            (
                QueueAttributeName::FifoThroughputLimit,
                "fifo_throughput_limit",
            ),
            (QueueAttributeName::SqsManagedSseEnabled, "sqs_managed_sse"),
            (QueueAttributeName::KmsMasterKeyId, "kms_key"),
        ];
        for (name, label) in shown {
            if let Some(v) = attrs.get(&name) {
                info = info.setting(label, v);
            }
        }
        info = info.warning(
            "depth is approximate (SQS attributes, eventually consistent); a nack with a delay \
             counts as in flight",
        );
        if profile.fifo {
            if attrs
                .get(&QueueAttributeName::ContentBasedDeduplication)
                .is_some_and(|v| v == "true")
            {
                info = info.warning(
                    "content-based deduplication is on, but ferrymq sends a deduplication id \
                     with every message (a unique one when the message has none), so it does \
                     not apply to ferrymq's messages",
                );
            }
        } else {
            info = info.warning(
                "a standard queue does not deduplicate: use the Dedup middleware for dedup ids",
            );
        }
        if let Some(n) = profile.max_receives {
            info = info.warning(format!(
                "SQS moves a message to the dead-letter queue after {n} receives by itself \
                 (Capabilities::native_dead_letter_after): RetryToDlq must decide before that"
            ));
        }
        for w in info_warnings {
            info = info.warning(w);
        }
        Ok(info)
    }

    async fn dlq_url(&self, dlq_arn: &str) -> Result<Option<String>> {
        let account = dlq_arn.split(':').nth(4).map(str::to_string);
        let mut config = self.config.clone();
        config.account = account;
        find_queue_url(&self.client, &config, name_of_arn(dlq_arn)).await
    }

    /// SQS `PurgeQueue`: deletes **every** message of the queue, in-flight ones
    /// included (their acks then fail or do nothing), within up to 60 s; SQS allows
    /// one purge per queue per 60 s (`Throttled` otherwise). Returns the approximate
    /// count of waiting, in-flight and delayed messages before it. Not
    /// [`Admin::purge`], which must spare in-flight messages.
    pub async fn purge_all(&self) -> Result<u64> {
        let url = self.require_url().await?;
        let before = get_attributes(
            &self.client,
            &url,
            &self.config.queue,
            &[
                QueueAttributeName::ApproximateNumberOfMessages,
                QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
                QueueAttributeName::ApproximateNumberOfMessagesDelayed,
            ],
        )
        .await
        .map(|a| depth_of(&a).total())?;
        self.client
            .purge_queue()
            .queue_url(&url)
            .send()
            .await
            .map_err(|e| {
                map_sdk(
                    &format!("PurgeQueue of queue {}", self.config.queue),
                    Call::Other,
                    e,
                )
            })?;
        Ok(before)
    }

    async fn own_profile(&self) -> Result<QueueProfile> {
        let url = self.require_url().await?;
        client::profile(&self.client, &self.config, &url).await
    }

    /// `StartMessageMoveTask` from the DLQ back to its source, polled to the end.
    async fn move_task(
        &self,
        dlq_arn: &str,
        dest_arn: &str,
        progress: ProgressFn<'_>,
    ) -> Result<u64> {
        let start = self
            .client
            .start_message_move_task()
            .source_arn(dlq_arn)
            .destination_arn(dest_arn)
            .send()
            .await
            .map_err(|e| {
                map_sdk(
                    &format!("StartMessageMoveTask from {dlq_arn}"),
                    Call::Other,
                    e,
                )
            })?;
        let handle = start.task_handle.unwrap_or_default();
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            let tasks = self
                .client
                .list_message_move_tasks()
                .source_arn(dlq_arn)
                .max_results(10)
                .send()
                .await
                .map_err(|e| {
                    map_sdk(
                        &format!("ListMessageMoveTasks of {dlq_arn}"),
                        Call::Other,
                        e,
                    )
                })?;
            let task = tasks.results.unwrap_or_default().into_iter().find(|t| {
                t.task_handle.as_deref() == Some(handle.as_str()) || t.task_handle.is_none()
            });
            let Some(task) = task else {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!("the message move task from {dlq_arn} is not listed"),
                ));
            };
            let moved = u64::try_from(task.approximate_number_of_messages_moved).unwrap_or(0);
            let total = task
                .approximate_number_of_messages_to_move
                .and_then(|n| u64::try_from(n).ok());
            let mut p = RedriveProgress::default();
            p.moved = moved;
            p.total = total;
            progress(p);
            match task.status.as_deref() {
                Some("RUNNING") | Some("CANCELLING") | None => continue,
                Some("COMPLETED") => return Ok(moved),
                Some(other) => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        format!(
                            "the message move task from {dlq_arn} ended {other} after {moved} \
                             messages: {}",
                            task.failure_reason.unwrap_or_default()
                        ),
                    ))
                }
            }
        }
    }

    /// The copy path: receive from the DLQ, send to the queue, delete from the DLQ.
    async fn copy_back(
        &self,
        dlq_url: &str,
        dest_url: &str,
        fifo: bool,
        limit: Option<u64>,
        progress: ProgressFn<'_>,
    ) -> Result<u64> {
        let snapshot = get_attributes(
            &self.client,
            dlq_url,
            "dead-letter queue",
            &[QueueAttributeName::ApproximateNumberOfMessages],
        )
        .await
        .map(|a| depth_of(&a).waiting)?;
        let total = limit.map_or(snapshot, |l| l.min(snapshot));
        let mut moved = 0u64;
        let mut p = RedriveProgress::default();
        p.total = Some(total);
        progress(p);
        let mut empty_polls = 0;
        while moved < total && empty_polls < 2 {
            let want = usize::try_from(total - moved)
                .unwrap_or(MAX_BATCH)
                .min(MAX_BATCH);
            let out = self
                .client
                .receive_message()
                .queue_url(dlq_url)
                .max_number_of_messages(i32::try_from(want).unwrap_or(10))
                .wait_time_seconds(1)
                .visibility_timeout(60)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                .send()
                .await
                .map_err(|e| {
                    map_sdk("ReceiveMessage from the dead-letter queue", Call::Other, e)
                })?;
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() {
                empty_polls += 1;
                continue;
            }
            empty_polls = 0;
            let mut entries = Vec::new();
            for (i, m) in messages.iter().enumerate() {
                let group = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                    .cloned();
                let entry =
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(m.body.clone().unwrap_or_default())
                        .set_message_attributes(
                            m.message_attributes
                                .clone()
                                .filter(|a: &HashMap<_, _>| !a.is_empty()),
                        )
                        .set_message_group_id(if fifo { group } else { None })
                        // A fresh id: the original's would be dropped as a duplicate
                        // within 5 minutes of its first send.
                        .set_message_deduplication_id(fifo.then(|| {
                            format!("ferrymq:r:{}", m.message_id.clone().unwrap_or_default())
                        }))
                        .build()
                        .map_err(|e| Error::backend("building a redrive entry", e))?;
                entries.push(entry);
            }
            let sent = self
                .client
                .send_message_batch()
                .queue_url(dest_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| map_sdk("SendMessageBatch (redrive)", Call::Send, e))?;
            let ok: Vec<usize> = sent
                .successful
                .iter()
                .filter_map(|s| s.id.parse().ok())
                .collect();
            for i in ok {
                if let Some(receipt) = messages.get(i).and_then(|m| m.receipt_handle.as_deref()) {
                    self.client
                        .delete_message()
                        .queue_url(dlq_url)
                        .receipt_handle(receipt)
                        .send()
                        .await
                        .map_err(|e| {
                            map_sdk("DeleteMessage from the dead-letter queue", Call::Other, e)
                        })?;
                    moved += 1;
                }
            }
            if let Some(failed) = sent.failed.first() {
                return Err(Error::new(
                    ErrorKind::Backend,
                    format!(
                        "redrive stopped after {moved}: SendMessageBatch refused an entry ({})",
                        failed.code
                    ),
                ));
            }
            let mut p = RedriveProgress::default();
            p.moved = moved;
            p.total = Some(total);
            progress(p);
        }
        Ok(moved)
    }
}

#[async_trait]
impl Admin for SqsAdmin {
    fn backend(&self) -> &'static str {
        "sqs"
    }

    fn queue(&self) -> &str {
        &self.config.queue
    }

    async fn create(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let url = self.create_from(spec).await?;
        self.info(&url).await
    }

    async fn ensure(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let url = match self.url().await? {
            Some(url) => url,
            None => self.create_from(spec).await?,
        };
        self.info(&url).await
    }

    async fn delete(&self) -> Result<bool> {
        let Some(url) = self.url().await? else {
            return Ok(false);
        };
        match self.client.delete_queue().queue_url(&url).send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = map_sdk(
                    &format!("DeleteQueue of queue {}", self.config.queue),
                    Call::Other,
                    e,
                );
                if e.kind() == ErrorKind::NotFound {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn describe(&self) -> Result<QueueInfo> {
        let url = self.require_url().await?;
        self.info(&url).await
    }

    async fn purge(&self) -> Result<u64> {
        Err(Error::unsupported(
            "SQS's PurgeQueue deletes in-flight messages too, so it cannot purge only what \
             is not in flight (the Admin::purge contract); SqsAdmin::purge_all does the SQS \
             purge, in-flight messages included",
        ))
    }

    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        let _ = max;
        Err(Error::unsupported(
            "SQS has no side-effect-free peek: every receive leases the message and counts \
             toward its ApproximateReceiveCount (and a redrive policy's maxReceiveCount), so a \
             peek could dead-letter a message. Receive with a consumer and release instead, \
             knowing each look counts as a receive",
        ))
    }

    async fn peek_dead_letters(&self, max: usize) -> Result<Vec<Peeked>> {
        let _ = max;
        Err(Error::unsupported(
            "SQS has no side-effect-free peek (see peek); open a consumer on the dead-letter \
             queue itself to read it",
        ))
    }

    async fn redrive_dead_letters(
        &self,
        limit: Option<u64>,
        progress: ProgressFn<'_>,
    ) -> Result<u64> {
        let profile = self.own_profile().await?;
        let Some(dlq_arn) = profile.dlq_arn.clone() else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "SQS queue {} has no RedrivePolicy, so no native dead-letter queue to redrive from",
                    self.config.queue
                ),
            ));
        };
        let dest_arn = profile.arn.clone().unwrap_or_default();
        let dlq_url = self.dlq_url(&dlq_arn).await?.ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("the dead-letter queue {dlq_arn} does not exist"),
            )
        })?;
        if limit.is_none() && !profile.fifo {
            match self.move_task(&dlq_arn, &dest_arn, progress).await {
                Ok(n) => return Ok(n),
                Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::InvalidConfig) => {
                    tracing::info!(error = %e, "ferrymq-sqs: no message move task; copying instead");
                }
                Err(e) => return Err(e),
            }
        }
        self.copy_back(&dlq_url, &profile.url, profile.fifo, limit, progress)
            .await
    }
}
