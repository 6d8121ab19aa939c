//! The sending side: an idempotent librdkafka producer, `send` resolving on the
//! delivery report.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ferrymq_core::depth::Depth;
use ferrymq_core::{Capabilities, Error, ErrorKind, Message, Producer, Result, SendReceipt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::admin::{ensure_topics, lag_depth, LazyLag};
use crate::capabilities;
use crate::config::KafkaConfig;
use crate::record::{self, unix_ms, unix_ms_ceil, with_header, H_ENQUEUED_AT, H_NOT_BEFORE};

/// How long an enqueue waits for room in librdkafka's local queue
/// (`queue.buffering.max.messages` / `.kbytes`) before `QueueFull`.
const ENQUEUE_WAIT: Duration = Duration::from_secs(5);

/// A librdkafka producer configured for ferrymq: idempotent, `acks=all`, Java's
/// murmur2 partitioner. Shared by [`KafkaProducer`] and the consumer's retry copies.
pub(crate) struct Sender {
    pub producer: FutureProducer,
    pub cfg: Arc<KafkaConfig>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("topic", &self.cfg.topic)
            .finish()
    }
}

impl Sender {
    pub fn new(cfg: Arc<KafkaConfig>) -> Result<Self> {
        let mut c = cfg.base_client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            // Java-compatible placement of keyed records; keyless ones spread at random.
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                cfg.send_timeout.as_millis().to_string(),
            )
            .set("message.max.bytes", cfg.max_record_bytes.to_string())
            .set("linger.ms", "2");
        cfg.apply_overrides(&mut c);
        let producer: FutureProducer = c.create().map_err(|e| config_error("producer", e))?;
        Ok(Sender { producer, cfg })
    }

    /// Hand one record to librdkafka (waiting for room in its local queue up to
    /// [`ENQUEUE_WAIT`]); the future resolves with the delivery report.
    pub async fn enqueue(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<DeliveryFuture> {
        self.enqueue_with(topic, key, payload, Some(headers)).await
    }

    /// [`enqueue`](Self::enqueue), with no header list at all when `headers` is
    /// `None`: librdkafka then allocates (and later frees) nothing for headers,
    /// which the common header-less send saves per record.
    pub async fn enqueue_with(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<DeliveryFuture> {
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).payload(payload);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        // The deadline is only read once librdkafka's queue is full: the clock is
        // not read per record.
        let mut deadline = None;
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    let now = tokio::time::Instant::now();
                    let until = *deadline.get_or_insert(now + ENQUEUE_WAIT);
                    if now >= until {
                        return Err(enqueue_error(
                            topic,
                            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                        ));
                    }
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(enqueue_error(topic, e)),
            }
        }
    }

    /// Wait for a delivery report: `(partition, offset)`.
    pub async fn delivered(&self, topic: &str, f: DeliveryFuture) -> Result<(i32, i64)> {
        match f.await {
            Ok(result) => delivery_result(topic, result),
            Err(_) => Err(Error::new(
                ErrorKind::OutcomeUnknown,
                format!("the producer of {topic:?} went away before the delivery report"),
            )),
        }
    }

    /// Produce and wait for the broker's acknowledgement.
    pub async fn produce(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(i32, i64)> {
        let f = self.enqueue(topic, key, payload, headers).await?;
        self.delivered(topic, f).await
    }

    /// Topic and headers of `message`: the queue's topic, or for a delayed message
    /// the tier that holds the delay with a not-before time. No header list when
    /// the message has none and is not delayed.
    pub fn route(&self, message: &Message) -> Result<(Cow<'_, str>, usize, Option<OwnedHeaders>)> {
        match message.get_delay().filter(|d| !d.is_zero()) {
            None => {
                let headers = if message.headers().is_empty() {
                    None
                } else {
                    Some(record::user_headers(message.headers()))
                };
                Ok((Cow::Borrowed(self.cfg.topic.as_str()), 0, headers))
            }
            Some(d) => {
                let Some(tier) = self.cfg.tier_for(d) else {
                    return Err(capabilities(&self.cfg)
                        .check_delay(Some(d))
                        .err()
                        .unwrap_or_else(|| Error::unsupported("delay too long")));
                };
                let index = self
                    .cfg
                    .retry_tiers
                    .iter()
                    .position(|t| *t == tier)
                    .map_or(0, |i| i + 1);
                let now = SystemTime::now();
                let due = now.checked_add(d).unwrap_or(now);
                let headers = record::user_headers(message.headers());
                let headers = with_header(headers, H_NOT_BEFORE, &unix_ms_ceil(due).to_string());
                let headers = with_header(headers, H_ENQUEUED_AT, &unix_ms(now).to_string());
                Ok((Cow::Owned(self.cfg.tier_topic(tier)), index, Some(headers)))
            }
        }
    }
}

pub(crate) fn config_error(what: &str, e: KafkaError) -> Error {
    match e {
        KafkaError::ClientConfig(_, desc, key, value) => {
            let shown = if ferrymq_core::config::is_secret_param(&key) {
                "***".to_string()
            } else {
                value
            };
            Error::invalid_config(&format!("rdkafka.{key}"), format!("{shown:?}: {desc}"))
        }
        other => Error::new(
            ErrorKind::InvalidConfig,
            format!("the {what} could not be created: {other}"),
        ),
    }
}

/// An error from handing a record to librdkafka: nothing left this process.
fn enqueue_error(topic: &str, e: KafkaError) -> Error {
    let code = e.rdkafka_error_code();
    let kind = match code {
        Some(RDKafkaErrorCode::QueueFull) => ErrorKind::QueueFull,
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            ErrorKind::TooLarge
        }
        Some(
            RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownPartition,
        ) => ErrorKind::NotFound,
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::Fenced) => ErrorKind::Closed,
        _ => ErrorKind::Backend,
    };
    let why = match kind {
        ErrorKind::QueueFull => format!(
            "librdkafka's local queue stayed full for {ENQUEUE_WAIT:?} \
             (queue.buffering.max.messages): the broker is not keeping up"
        ),
        _ => format!("producing to {topic:?} failed: {e}"),
    };
    Error::new(kind, format!("{why}; nothing was produced")).with_source(e)
}

/// A delivery report: the record's position, or what we know of its fate.
fn delivery_result(topic: &str, result: OwnedDeliveryResult) -> Result<(i32, i64)> {
    match result {
        Ok(d) => Ok((d.partition, d.offset)),
        Err((e, _)) => Err(delivery_error(topic, e)),
    }
}

fn delivery_error(topic: &str, e: KafkaError) -> Error {
    use RDKafkaErrorCode as C;
    let (kind, why) = match e.rdkafka_error_code() {
        // The broker refused the record itself: it was not written.
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge) => (
            ErrorKind::TooLarge,
            "the broker refused the record as too large",
        ),
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => {
            (ErrorKind::NotFound, "the topic does not exist")
        }
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication,
        ) => (ErrorKind::Auth, "the broker refused the credentials"),
        Some(C::InvalidRecord | C::InvalidMessage | C::PolicyViolation | C::InvalidTimestamp) => {
            (ErrorKind::InvalidMessage, "the broker refused the record")
        }
        Some(C::ThrottlingQuotaExceeded) => (ErrorKind::Throttled, "the broker's quota refused it"),
        Some(C::PurgeQueue) => (
            ErrorKind::Closed,
            "the producer was closed before the record was sent",
        ),
        // Timed out (possibly persisted), purged in flight, or a transport error once
        // the request left: the record may be on the broker.
        _ => (
            ErrorKind::OutcomeUnknown,
            "no delivery report confirmed it; the record may or may not be on the broker \
             (librdkafka: possibly persisted)",
        ),
    };
    Error::new(kind, format!("producing to {topic:?}: {why}")).with_source(e)
}

/// Sends to one topic; `send` resolves after the broker's acknowledgement.
///
/// The receipt id is `partition/offset` (`TIER-TOPIC/partition/offset` for a delayed
/// message, which waits on a retry tier). With idempotence librdkafka may retry a
/// request internally; the report names where the record landed.
#[derive(Debug)]
pub struct KafkaProducer {
    sender: Arc<Sender>,
    lag: LazyLag,
    caps: Capabilities,
    closed: AtomicBool,
}

impl KafkaProducer {
    pub(crate) async fn connect(cfg: KafkaConfig) -> Result<Self> {
        cfg.validate()?;
        let cfg = Arc::new(cfg);
        if cfg.create {
            ensure_topics(&cfg).await?;
        }
        let sender = Arc::new(Sender::new(cfg.clone())?);
        let lag = LazyLag::new(cfg.clone());
        Ok(KafkaProducer {
            caps: capabilities(&cfg),
            sender,
            lag,
            closed: AtomicBool::new(false),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("producer"))
        } else {
            Ok(())
        }
    }

    fn prepare(&self, message: &Message) -> Result<(Cow<'_, str>, usize, Option<OwnedHeaders>)> {
        record::check_size(
            message,
            self.sender.cfg.max_message_size,
            self.sender.cfg.max_record_bytes,
        )?;
        self.caps.check_delay(message.get_delay())?;
        self.sender.route(message)
    }

    async fn enqueue(&self, message: &Message) -> Result<(Cow<'_, str>, usize, DeliveryFuture)> {
        let (topic, index, headers) = self.prepare(message)?;
        let f = self
            .sender
            .enqueue_with(&topic, message.get_key(), message.payload(), headers)
            .await?;
        Ok((topic, index, f))
    }

    async fn finish(
        &self,
        topic: Cow<'_, str>,
        index: usize,
        f: DeliveryFuture,
    ) -> Result<SendReceipt> {
        let (p, o) = self.sender.delivered(&topic, f).await?;
        Ok(SendReceipt::new(record::record_id(index, &topic, p, o)))
    }

    /// The underlying librdkafka producer, for what ferrymq does not wrap.
    pub fn inner(&self) -> &FutureProducer {
        &self.sender.producer
    }
}

#[async_trait]
impl Producer for KafkaProducer {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.check_open()?;
        let (topic, index, f) = self.enqueue(&message).await?;
        self.finish(topic, index, f).await
    }

    /// Every entry is handed to librdkafka first (so they travel in few requests),
    /// then every delivery report is awaited; one result per entry.
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.check_open()?;
        let mut pending = Vec::with_capacity(messages.len());
        for m in &messages {
            pending.push(self.enqueue(m).await);
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Ok((topic, index, f)) => self.finish(topic, index, f).await,
                Err(e) => Err(e),
            });
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<()> {
        let sender = self.sender.clone();
        let timeout = self.sender.cfg.send_timeout;
        tokio::task::spawn_blocking(move || sender.producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| Error::backend("flush task failed", e))?
            .map_err(|e| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("not every record was acknowledged within {timeout:?}"),
                )
                .with_source(e)
            })
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.flush().await
    }

    async fn depth(&self) -> Result<Depth> {
        lag_depth(&self.lag.get()?, 0).await
    }

    fn queue(&self) -> &str {
        &self.sender.cfg.topic
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
}
