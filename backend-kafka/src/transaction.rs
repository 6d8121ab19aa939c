//! Exactly-once consume-transform-produce: a handler's outputs and its input's
//! offset commit in one Kafka transaction.
//!
//! See [`ExactlyOnce`] for the design, the fencing and the limits.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferrymq_core::time::deadline_in;
use ferrymq_core::{
    reserved, Ack, AckHandle, BoxError, Delivery, DeliveryMeta, Error, ErrorKind, Message, Result,
};
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::admin::{ensure_topics, kafka_error};
use crate::config::KafkaConfig;
use crate::producer::config_error;
use crate::record::{self, with_header, Received};

/// How long an empty poll waits before the loop looks at the shutdown signal.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Longest wait for room in librdkafka's local queue while producing outputs.
const ENQUEUE_WAIT: Duration = Duration::from_secs(5);
/// How long one seek back after an abort may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause after aborts in a row.
const MAX_ABORT_PAUSE: Duration = Duration::from_secs(5);

/// A consume-transform-produce processor whose outputs and offset commits are
/// one Kafka transaction per batch: exactly once, as read by `read_committed`
/// consumers of the output topic. Made by [`KafkaConfig::exactly_once`].
///
/// # Why a processor of its own, not a consumer mode
///
/// A [`KafkaConsumer`](crate::KafkaConsumer) settles each delivery on its own (an
/// ack marks one offset done, commits follow on a timer) and its handlers produce
/// through any producer they like: there is no point at which "these outputs" and
/// "these offsets" are known together, which is what a transaction needs. So the
/// handler here does not produce at all: it *returns* its outputs, and
/// [`ExactlyOnce`] owns the consumer, the transactional producer and the commit:
///
/// 1. poll a batch of input records (up to [`max_batch`](ExactlyOnce::max_batch),
///    waiting at most [`batch_wait`](ExactlyOnce::batch_wait) for it to fill);
/// 2. run the handler on each (up to [`concurrency`](ExactlyOnce::concurrency) at
///    a time; outputs kept in input order);
/// 3. `begin_transaction`, produce every output, `send_offsets_to_transaction`
///    with the batch's next offsets and the consumer's group metadata (KIP-447),
///    `commit_transaction`;
/// 4. if the transaction aborts, seek the batch's partitions back to where the
///    batch began: the inputs are delivered again and their outputs, which were
///    never committed, are produced again in the next transaction.
///
/// A reader with `isolation.level=read_committed` (librdkafka's default, so also
/// a ferrymq [`KafkaConsumer`](crate::KafkaConsumer); Java clients must set it)
/// sees every input's outputs exactly once, whatever crashes in between: either
/// the transaction committed (outputs visible, offsets moved) or it did not
/// (outputs discarded, offsets unchanged, inputs processed again).
///
/// # Fencing
///
/// - **A restarted instance**: the producer's `transactional.id` is
///   `GROUP.INSTANCE` — stable across restarts of one instance, so its
///   `init_transactions` fences the dead process's producer and aborts the
///   transaction it left open at once (a fresh id would leave it open until
///   `transaction.timeout.ms`, and the next owner's offset fetch waits for it).
///   Two live processes must never share an instance name: they fence each other
///   and the loser's `run` ends with `Closed`.
/// - **A zombie member** (one the group expelled, which still thinks it owns a
///   partition): `send_offsets_to_transaction` carries the consumer's group
///   generation, the broker refuses a stale one, and the transaction aborts.
/// - **Static membership**: the instance name is also the consumer's
///   `group.instance.id`, so a restarted instance gets its partitions back at once
///   instead of after the dead member's session timeout. Its price: a clean
///   shutdown does not leave the group either, so the partitions move to the other
///   members only after `session.timeout.ms` (10 s).
///   [`static_membership(false)`](ExactlyOnce::static_membership) turns it off.
///
/// # Limits
///
/// - **Kafka to Kafka only.** Outputs to the output topic (and the dead-letter
///   topic) are in the transaction; anything else the handler does — a database
///   write, an HTTP call, a send through another producer — is at-least-once: it
///   runs again when the input is redelivered. Make such side effects idempotent.
/// - **Handlers may run more than once per input** (after an abort or a crash);
///   only their committed outputs are exactly once.
/// - **Latency**: outputs become visible when the transaction commits (a few
///   round trips to the transaction coordinator per batch, ≈10–50 ms), not when
///   produced. Batch many inputs per transaction for throughput
///   ([`max_batch`](ExactlyOnce::max_batch)); a smaller batch or
///   [`batch_wait`](ExactlyOnce::batch_wait) lowers latency.
/// - A batch's handlers must finish within `max.poll.interval.ms` (5 min by
///   default; `rdkafka.max.poll.interval.ms`): the consumer is polled between
///   batches only.
/// - Outputs cannot be delayed (`Message::delay`): a delayed output fails the
///   handler like an error would.
/// - It is not the [`Worker`](ferrymq_core::worker::Worker): no middleware stack
///   (retries and the dead-letter topic are built in, see below) and no
///   `ordered_by_key` — handlers of one batch run concurrently whatever their key
///   (set [`concurrency(1)`](ExactlyOnce::concurrency) for one at a time); the
///   outputs are produced in input order either way, so a key's outputs keep the
///   order of its inputs.
/// - If the group was read by a [`KafkaConsumer`](crate::KafkaConsumer) before,
///   the records its commit metadata marked done above the watermark are
///   processed again (this processor resumes at the committed watermark).
/// - A handler error is retried in place (`max_attempts`, with a backoff), then the
///   input goes to the dead-letter topic — in the same transaction, so it is
///   dead-lettered exactly once — or, with `dead_letter(None)`, `run` stops with
///   the error and commits nothing of that batch.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use ferrymq_core::{BoxError, Delivery, Message};
/// use ferrymq_kafka::KafkaConfig;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ferrymq_core::Result<()> {
/// let orders = KafkaConfig::from_url("kafka://127.0.0.1:9092/orders?group=pricing")?;
/// // `instance`: stable per process (a pod name), unique among live processes.
/// let summary = orders
///     .exactly_once("priced-orders", "pricing-0")?
///     .max_batch(500)
///     .run_until(
///         |d: Delivery| async move {
///             let priced = format!("{} priced", String::from_utf8_lossy(d.payload()));
///             let out = Message::new(priced);
///             Ok::<_, BoxError>(vec![match d.key() {
///                 Some(k) => out.key(k),
///                 None => out,
///             }])
///         },
///         tokio::time::sleep(Duration::from_secs(60)), // or a shutdown signal
///     )
///     .await?;
/// println!("{} inputs in {} transactions", summary.inputs, summary.transactions);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ExactlyOnce {
    input: KafkaConfig,
    output: String,
    instance: String,
    dead_letter: Option<String>,
    max_batch: usize,
    batch_wait: Duration,
    concurrency: usize,
    max_attempts: u32,
    retry_backoff: Duration,
    transaction_timeout: Duration,
    shutdown_timeout: Duration,
    static_membership: bool,
}

impl KafkaConfig {
    /// An [`ExactlyOnce`] processor reading this queue (its topic, in its group)
    /// and producing to `output_topic` transactionally. `instance` names this
    /// process among the group's: stable across its restarts, unique among the
    /// live ones (it makes the `transactional.id` `GROUP.INSTANCE` and the
    /// `group.instance.id`).
    pub fn exactly_once(&self, output_topic: &str, instance: &str) -> Result<ExactlyOnce> {
        self.validate()?;
        self.for_topic(output_topic)?;
        if instance.is_empty()
            || instance.len() > 200
            || !instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(Error::invalid_config(
                "instance",
                "1-200 letters, digits, '.', '_' or '-', stable per process",
            ));
        }
        if output_topic == self.topic {
            return Err(Error::invalid_config(
                "output_topic",
                "must differ from the input topic (a record would feed itself)",
            ));
        }
        Ok(ExactlyOnce {
            input: self.clone(),
            output: output_topic.to_string(),
            instance: instance.to_string(),
            dead_letter: Some(self.dlq_topic()),
            max_batch: 500,
            batch_wait: Duration::from_millis(20),
            concurrency: 16,
            max_attempts: 3,
            retry_backoff: Duration::from_millis(100),
            transaction_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            static_membership: true,
        })
    }
}

/// What a run did; returned by [`ExactlyOnce::run_until`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExactlyOnceSummary {
    /// Transactions committed.
    pub transactions: u64,
    /// Transactions aborted (their inputs were processed again).
    pub aborted: u64,
    /// Inputs whose outputs (or dead-letter copy) were committed.
    pub inputs: u64,
    /// Outputs committed to the output topic.
    pub outputs: u64,
    /// Inputs committed to the dead-letter topic after `max_attempts` failures.
    pub dead_lettered: u64,
    /// Handler calls that failed (errors and panics), retries included.
    pub handler_errors: u64,
}

impl ExactlyOnce {
    /// Most input records per transaction (default 500). Larger: fewer
    /// transactions, more throughput; smaller: outputs visible sooner.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Once a batch has its first record, how long it waits for more before it is
    /// processed (default 20 ms).
    pub fn batch_wait(mut self, wait: Duration) -> Self {
        self.batch_wait = wait;
        self
    }

    /// Handlers of one batch running at once (default 16). Outputs keep input
    /// order whatever the completion order; side effects of different inputs may
    /// overlap.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Handler calls per input before it is dead-lettered (default 3; at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Pause before a failed handler is called again, doubled per attempt (default
    /// 100 ms).
    pub fn retry_backoff(mut self, pause: Duration) -> Self {
        self.retry_backoff = pause;
        self
    }

    /// Where an input goes after `max_attempts` failures, in the same transaction
    /// (default `TOPIC.dlq`, with the RetryToDlq middleware's headers). `None`: a
    /// failing input stops the run instead, with nothing of its batch committed.
    pub fn dead_letter(mut self, topic: Option<&str>) -> Self {
        self.dead_letter = topic.map(str::to_string);
        self
    }

    /// `transaction.timeout.ms` (default 60 s): the broker aborts a transaction
    /// left open longer (a process that died without a successor of the same
    /// instance), and each transaction step waits at most this long.
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// After the shutdown signal, how long the batch in progress gets to finish
    /// and commit (default 10 s); past it the batch is dropped uncommitted (its
    /// inputs come again on the next start).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Use the instance name as `group.instance.id` (default true; see the module
    /// docs, "Fencing").
    pub fn static_membership(mut self, on: bool) -> Self {
        self.static_membership = on;
        self
    }

    /// The producer's `transactional.id`: `GROUP.INSTANCE`.
    pub fn transactional_id(&self) -> String {
        format!("{}.{}", self.input.group(), self.instance)
    }

    fn check(&self) -> Result<()> {
        let ms = self.transaction_timeout.as_millis();
        if !(1_000..=900_000).contains(&ms) {
            return Err(Error::invalid_config(
                "transaction_timeout",
                format!(
                    "{:?} is outside 1s..=15min (the broker's transaction.max.timeout.ms default)",
                    self.transaction_timeout
                ),
            ));
        }
        if self.batch_wait > Duration::from_secs(60) {
            return Err(Error::invalid_config("batch_wait", "at most 60s"));
        }
        if self.retry_backoff > Duration::from_secs(60) {
            return Err(Error::invalid_config("retry_backoff", "at most 60s"));
        }
        if let Some(d) = &self.dead_letter {
            self.input
                .for_topic(d)
                .map_err(|e| Error::invalid_config("dead_letter", e.message().to_string()))?;
        }
        Ok(())
    }

    /// [`run_until`](Self::run_until) without a shutdown signal: until a fatal
    /// error.
    pub async fn run<H, Fut>(self, handler: H) -> Result<ExactlyOnceSummary>
    where
        H: Fn(Delivery) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<Message>, BoxError>>,
    {
        self.run_until(handler, futures::future::pending()).await
    }

    /// Process until `shutdown` completes (then the batch in progress gets
    /// `shutdown_timeout` to commit), or a fatal error (another process took over
    /// this instance's `transactional.id`: `Closed`; a transaction whose outcome
    /// stayed unknown: `OutcomeUnknown`; a handler failing `max_attempts` times
    /// without a dead-letter topic).
    ///
    /// The handler gets each input as a [`Delivery`] (id `partition/offset`,
    /// attempt counted in memory) and returns the messages to produce to the
    /// output topic — none is fine. Do not settle the delivery: the transaction
    /// does (ack, nack and release answer `Unsupported`).
    pub async fn run_until<H, Fut, S>(self, handler: H, shutdown: S) -> Result<ExactlyOnceSummary>
    where
        H: Fn(Delivery) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<Message>, BoxError>>,
        S: Future<Output = ()>,
    {
        self.check()?;
        let out_cfg = self.input.for_topic(&self.output)?;
        if self.input.create {
            ensure_topics(&self.input).await?;
            ensure_topics(&out_cfg).await?;
            if let Some(d) = &self.dead_letter {
                ensure_topics(&self.input.for_topic(d)?).await?;
            }
        }
        let kafka = Arc::new(Clients::connect(&self, &out_cfg).await?);
        let mut summary = ExactlyOnceSummary::default();
        let result = self.serve(&kafka, &handler, shutdown, &mut summary).await;
        // Leave the group (no LeaveGroup under static membership) and drop the
        // producer; both block, so off the runtime.
        let k = kafka.clone();
        drop(kafka);
        let _ = tokio::task::spawn_blocking(move || k.consumer.unsubscribe()).await;
        result.map(|()| summary)
    }

    async fn serve<H, Fut, S>(
        &self,
        kafka: &Arc<Clients>,
        handler: &H,
        shutdown: S,
        summary: &mut ExactlyOnceSummary,
    ) -> Result<()>
    where
        H: Fn(Delivery) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<Message>, BoxError>>,
        S: Future<Output = ()>,
    {
        let shutdown = shutdown.fuse();
        futures::pin_mut!(shutdown);
        let mut stop_at: Option<tokio::time::Instant> = None;
        let mut aborts_in_a_row = 0u32;
        loop {
            if stop_at.is_some() {
                return Ok(());
            }
            let k = kafka.clone();
            let (max, wait) = (self.max_batch, self.batch_wait);
            let mut poll = tokio::task::spawn_blocking(move || k.poll_batch(max, wait));
            let batch = tokio::select! {
                b = &mut poll => b,
                () = &mut shutdown => {
                    // The poll ends within IDLE_POLL + batch_wait; its records are
                    // dropped uncommitted (delivered again on the next start).
                    let _ = poll.await;
                    return Ok(());
                }
            }
            .map_err(|e| Error::backend("the poll task failed", e))?;
            if batch.is_empty() {
                continue;
            }
            // Handlers, in input order; after the shutdown signal they get
            // shutdown_timeout to finish.
            // The futures collected first (not mapped lazily in the stream): a
            // closure borrowing `self` in the stream makes the run's future not
            // `Send` ("FnOnce is not general enough").
            let calls: Vec<_> = batch.iter().map(|r| self.handle(handler, r)).collect();
            let work = futures::stream::iter(calls)
                .buffered(self.concurrency)
                .collect::<Vec<_>>();
            futures::pin_mut!(work);
            let handled = loop {
                let deadline = stop_at;
                tokio::select! {
                    h = &mut work => break Some(h),
                    () = &mut shutdown, if stop_at.is_none() => {
                        stop_at = Some(deadline_in(self.shutdown_timeout));
                    }
                    () = sleep_until_opt(deadline) => break None,
                }
            };
            let Some(handled) = handled else {
                tracing::warn!(
                    topic = %self.input.topic,
                    inputs = batch.len(),
                    "shutdown_timeout passed with handlers running; their batch is left \
                     uncommitted and will be processed again"
                );
                return Ok(());
            };
            let mut outputs = Vec::new();
            let mut batch_errors = 0u64;
            let mut dead = 0u64;
            for (r, h) in batch.iter().zip(handled) {
                batch_errors += u64::from(h.errors);
                match h.outcome {
                    Ok(msgs) => {
                        for m in msgs {
                            outputs.push(Output::new(&self.output, &m));
                        }
                    }
                    Err(reason) => match &self.dead_letter {
                        Some(topic) => {
                            dead += 1;
                            outputs.push(self.dead_letter_copy(topic, r, &reason));
                        }
                        None => {
                            summary.handler_errors += batch_errors;
                            return Err(Error::new(
                                ErrorKind::Backend,
                                format!(
                                    "the handler failed {} times for {}/{}/{} and no \
                                     dead_letter topic is set; nothing of its batch was \
                                     committed: {reason}",
                                    self.max_attempts, self.input.topic, r.partition, r.offset
                                ),
                            ));
                        }
                    },
                }
            }
            summary.handler_errors += batch_errors;
            let produced = outputs.len() as u64 - dead;
            let offsets = batch_offsets(&batch);
            let k = kafka.clone();
            let topic = self.input.topic.clone();
            let timeout = self.transaction_timeout;
            let outcome = tokio::task::spawn_blocking(move || {
                k.transact(&outputs, &topic, &offsets, timeout)
            })
            .await
            .map_err(|e| Error::backend("the transaction task failed", e))??;
            match outcome {
                Tx::Committed => {
                    aborts_in_a_row = 0;
                    summary.transactions += 1;
                    summary.inputs += batch.len() as u64;
                    summary.outputs += produced;
                    summary.dead_lettered += dead;
                }
                Tx::Aborted(why) => {
                    summary.aborted += 1;
                    tracing::warn!(
                        topic = %self.input.topic, inputs = batch.len(), why = %why,
                        "transaction aborted; its inputs are processed again"
                    );
                    let k = kafka.clone();
                    let topic = self.input.topic.clone();
                    let starts = batch_starts(&batch);
                    tokio::task::spawn_blocking(move || k.rewind(&topic, &starts))
                        .await
                        .map_err(|e| Error::backend("the rewind task failed", e))??;
                    // Aborts in a row (a broker refusing the outputs, say) back off
                    // rather than spin: 100 ms, doubling, at most 5 s.
                    let pause = Duration::from_millis(100)
                        .checked_mul(1 << aborts_in_a_row.min(6))
                        .map_or(MAX_ABORT_PAUSE, |d| d.min(MAX_ABORT_PAUSE));
                    aborts_in_a_row += 1;
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Run the handler on one input, retrying in place.
    async fn handle<H, Fut>(&self, handler: &H, r: &Received) -> Handled
    where
        H: Fn(Delivery) -> Fut,
        Fut: Future<Output = std::result::Result<Vec<Message>, BoxError>>,
    {
        let mut errors = 0u32;
        let mut reason = String::new();
        for attempt in 1..=self.max_attempts {
            let d = self.delivery(r, attempt);
            let result = std::panic::AssertUnwindSafe(handler(d))
                .catch_unwind()
                .await;
            let failure = match result {
                Ok(Ok(msgs)) => match msgs.iter().try_for_each(|m| self.check_output(m)) {
                    Ok(()) => {
                        return Handled {
                            outcome: Ok(msgs),
                            errors,
                        }
                    }
                    Err(e) => e.to_string(),
                },
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the handler panicked".to_string(),
            };
            errors += 1;
            tracing::debug!(
                topic = %self.input.topic, partition = r.partition, offset = r.offset,
                attempt, error = %failure, "handler failed"
            );
            reason = failure;
            if attempt < self.max_attempts {
                let factor = 1u32 << (attempt - 1).min(10);
                let pause = self
                    .retry_backoff
                    .checked_mul(factor)
                    .unwrap_or(self.retry_backoff);
                tokio::time::sleep(pause).await;
            }
        }
        Handled {
            outcome: Err(reason),
            errors,
        }
    }

    fn check_output(&self, m: &Message) -> Result<()> {
        if m.get_delay().is_some_and(|d| !d.is_zero()) {
            return Err(Error::unsupported(
                "an output of an exactly-once handler cannot be delayed (the delay tiers are \
                 outside the transaction)",
            ));
        }
        record::check_size(m, self.input.max_message_size, self.input.max_record_bytes)
    }

    fn delivery(&self, r: &Received, attempt: u32) -> Delivery {
        let meta = DeliveryMeta::new(
            r.id(&self.input.topic),
            attempt,
            r.enqueued_at,
            Arc::from(self.input.topic.as_str()),
        )
        .with_position(r.position(&self.input.topic));
        Delivery::new(r.message(), meta, AckHandle::new(TxSettled))
    }

    /// The input as a dead-letter record: its payload, key and headers, and the
    /// RetryToDlq middleware's reason / origin / attempts headers.
    fn dead_letter_copy(&self, topic: &str, r: &Received, reason: &str) -> Output {
        let mut reason = reason.to_string();
        if reason.len() > 1000 {
            let mut end = 1000;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let headers = record::user_headers(&r.headers);
        let headers = with_header(headers, reserved::FAILURE_REASON, &reason);
        let headers = with_header(headers, reserved::ORIGIN_QUEUE, &self.input.topic);
        let headers = with_header(headers, reserved::ATTEMPTS, &self.max_attempts.to_string());
        let headers = with_header(
            headers,
            reserved::ORIGIN_MESSAGE_ID,
            &r.id(&self.input.topic),
        );
        let headers = with_header(headers, reserved::DEAD_LETTERED_AT, &now);
        Output {
            topic: topic.to_string(),
            key: r.key.clone(),
            payload: r.payload.clone(),
            headers,
        }
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => futures::future::pending().await,
    }
}

struct Handled {
    /// The outputs, or why the last attempt failed.
    outcome: std::result::Result<Vec<Message>, String>,
    errors: u32,
}

/// One record to produce in the transaction.
struct Output {
    topic: String,
    key: Option<String>,
    payload: Bytes,
    headers: OwnedHeaders,
}

impl Output {
    fn new(topic: &str, m: &Message) -> Self {
        Output {
            topic: topic.to_string(),
            key: m.get_key().map(str::to_string),
            payload: m.payload().clone(),
            headers: record::user_headers(m.headers()),
        }
    }
}

/// Per partition, the offset after the batch's last record: what the
/// transaction commits.
fn batch_offsets(batch: &[Received]) -> BTreeMap<i32, i64> {
    let mut m = BTreeMap::new();
    for r in batch {
        let e = m.entry(r.partition).or_insert(r.offset + 1);
        *e = (*e).max(r.offset + 1);
    }
    m
}

/// Per partition, the batch's first offset: where an abort seeks back to.
fn batch_starts(batch: &[Received]) -> BTreeMap<i32, i64> {
    let mut m = BTreeMap::new();
    for r in batch {
        let e = m.entry(r.partition).or_insert(r.offset);
        *e = (*e).min(r.offset);
    }
    m
}

enum Tx {
    Committed,
    Aborted(String),
}

/// The settle handle of an exactly-once input: the transaction settles it.
#[derive(Debug)]
struct TxSettled;

fn settled_by_transaction() -> Error {
    Error::unsupported(
        "an exactly-once input is settled by its batch's transaction: return its outputs \
         (or an error) from the handler instead",
    )
}

#[async_trait::async_trait]
impl Ack for TxSettled {
    async fn ack(&self) -> Result<()> {
        Err(settled_by_transaction())
    }
    async fn nack(&self, _: Option<Duration>) -> Result<()> {
        Err(settled_by_transaction())
    }
    async fn extend(&self, _: Duration) -> Result<()> {
        Err(settled_by_transaction())
    }
    async fn release(&self, _: Option<Duration>) -> Result<()> {
        Err(settled_by_transaction())
    }
}

/// Partitions revoked since the poll loop last looked (rebalance callbacks run
/// inside `poll`).
struct TxCtx {
    topic: String,
    revoked: Mutex<Vec<i32>>,
}

impl ClientContext for TxCtx {}

impl ConsumerContext for TxCtx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut r = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
                for e in tpl.elements() {
                    if e.topic() == self.topic {
                        r.push(e.partition());
                    }
                }
                tracing::debug!(topic = %self.topic, partitions = ?r, "partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::debug!(topic = %self.topic, partitions = ?parts, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// The consumer and the transactional producer of one processor.
struct Clients {
    consumer: BaseConsumer<TxCtx>,
    producer: ThreadedProducer<DefaultProducerContext>,
    transactional_id: String,
}

impl Clients {
    async fn connect(p: &ExactlyOnce, out: &KafkaConfig) -> Result<Self> {
        let input = &p.input;
        let txn_ms = p.transaction_timeout.as_millis().to_string();
        let msg_ms = input
            .send_timeout
            .min(p.transaction_timeout)
            .as_millis()
            .to_string();
        let transactional_id = p.transactional_id();
        let mut c = out.base_client_config();
        c.set("transactional.id", &transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("transaction.timeout.ms", &txn_ms)
            // librdkafka requires message.timeout.ms <= transaction.timeout.ms.
            .set("message.timeout.ms", &msg_ms)
            .set("message.max.bytes", input.max_record_bytes.to_string())
            .set("linger.ms", "2")
            // A transaction begun right after the previous commit is answered
            // CONCURRENT_TRANSACTIONS until the coordinator has written the
            // markers; librdkafka retries after retry.backoff.ms, 100 ms by
            // default, which made every other transaction ~100 ms slower (20k
            // inputs: 11.9 s before, 2.4 s with 10 ms; later retries still back off
            // exponentially to retry.backoff.max.ms).
            .set("retry.backoff.ms", "10");
        input.apply_overrides(&mut c);
        let producer: ThreadedProducer<DefaultProducerContext> = c
            .create()
            .map_err(|e| config_error("transactional producer", e))?;

        let mut c = input.base_client_config();
        c.set("group.id", input.group())
            .set("partition.assignment.strategy", "cooperative-sticky")
            // Offsets are committed only through the transaction.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Inputs may be an upstream stage's transactional outputs; and the
            // committed-offset fetch waits for pending transactional commits
            // (librdkafka asks for stable offsets under read_committed).
            .set("isolation.level", "read_committed")
            .set("heartbeat.interval.ms", "1000")
            .set("session.timeout.ms", "10000")
            .set("enable.partition.eof", "false");
        if p.static_membership {
            c.set("group.instance.id", &p.instance);
        }
        input.apply_overrides(&mut c);
        let consumer: BaseConsumer<TxCtx> = c
            .create_with_context(TxCtx {
                topic: input.topic.clone(),
                revoked: Mutex::new(Vec::new()),
            })
            .map_err(|e| config_error("consumer", e))?;

        // Fences an earlier producer of this transactional.id (a crashed run of
        // this instance) and aborts the transaction it left open.
        let clients = Clients {
            consumer,
            producer,
            transactional_id,
        };
        let timeout = p.transaction_timeout;
        let clients = tokio::task::spawn_blocking(move || {
            clients.init(timeout)?;
            Ok::<_, Error>(clients)
        })
        .await
        .map_err(|e| Error::backend("the init task failed", e))??;
        clients
            .consumer
            .subscribe(&[input.topic.as_str()])
            .map_err(|e| kafka_error("subscribing", e))?;
        Ok(clients)
    }

    fn init(&self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(std::time::Instant::now);
        loop {
            match self.producer.init_transactions(timeout) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e))
                    if e.is_retriable() && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!(
                            "init_transactions for transactional.id {:?} failed: {e}",
                            self.transactional_id
                        ),
                    )
                    .with_source(e))
                }
            }
        }
    }

    /// Up to `max` input records: waits up to [`IDLE_POLL`] for the first, then
    /// `linger` for more. Records of partitions revoked meanwhile are dropped
    /// (not committed: their next owner reads them again).
    fn poll_batch(&self, max: usize, linger: Duration) -> Vec<Received> {
        let start = std::time::Instant::now();
        let mut deadline = start.checked_add(IDLE_POLL).unwrap_or(start);
        let mut batch: Vec<Received> = Vec::new();
        loop {
            let wait = deadline.saturating_duration_since(std::time::Instant::now());
            let polled = self.consumer.poll(wait);
            let revoked: Vec<i32> = std::mem::take(
                &mut *self
                    .consumer
                    .context()
                    .revoked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if !revoked.is_empty() {
                batch.retain(|r| !revoked.contains(&r.partition));
            }
            match polled {
                Some(Ok(m)) if rdkafka::Message::topic(&m) == self.consumer.context().topic => {
                    if batch.is_empty() {
                        let now = std::time::Instant::now();
                        deadline = now.checked_add(linger).unwrap_or(now);
                    }
                    batch.push(Received::parse(&m, 0));
                    if batch.len() >= max {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "consumer poll error"),
                None => {}
            }
            if std::time::Instant::now() >= deadline {
                break;
            }
        }
        batch
    }

    /// One transaction: begin, produce `outputs`, send the offsets with the
    /// group metadata, commit. `Ok(Aborted)` when it was aborted (and can be
    /// retried from the inputs); `Err` when this producer cannot go on.
    fn transact(
        &self,
        outputs: &[Output],
        topic: &str,
        offsets: &BTreeMap<i32, i64>,
        timeout: Duration,
    ) -> Result<Tx> {
        if let Err(e) = self.producer.begin_transaction() {
            return self.after_error("begin_transaction", e, timeout);
        }
        for o in outputs {
            if let Err(e) = self.produce(o) {
                return self.after_error("producing an output", e, timeout);
            }
        }
        let Some(group) = self.consumer.group_metadata() else {
            return self.abort("the consumer has no group metadata".into(), timeout);
        };
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (p, o) in offsets {
            if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*o)) {
                return self.abort(format!("offset list: {e}"), timeout);
            }
        }
        let deadline = std::time::Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(std::time::Instant::now);
        loop {
            match self
                .producer
                .send_offsets_to_transaction(&tpl, &group, timeout)
            {
                Ok(()) => break,
                Err(e) if retriable(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return self.after_error("send_offsets_to_transaction", e, timeout),
            }
        }
        tracing::debug!(
            topic, outputs = outputs.len(), offsets = ?offsets,
            "offsets sent to the transaction; committing it"
        );
        // Wait for the outputs' delivery reports here, in 1 ms steps: rdkafka's
        // commit_transaction flushes first, polling in steps of 100 ms, which made
        // every transaction with outputs in flight last at least 100 ms (the
        // producer's own thread takes the reports, so each such poll runs out).
        while self.producer.in_flight_count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        loop {
            match self.producer.commit_transaction(timeout) {
                Ok(()) => {
                    tracing::debug!(topic, "transaction committed");
                    return Ok(Tx::Committed);
                }
                // The outcome is unknown until a retry answers (librdkafka's rule).
                Err(e) if retriable(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if retriable(&e) => {
                    return Err(Error::new(
                        ErrorKind::OutcomeUnknown,
                        format!(
                            "commit_transaction did not answer within {timeout:?} \
                             (transaction_timeout); a restart of this instance resolves it: {e}"
                        ),
                    )
                    .with_source(e))
                }
                Err(e) => return self.after_error("commit_transaction", e, timeout),
            }
        }
    }

    fn produce(&self, o: &Output) -> std::result::Result<(), KafkaError> {
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&o.topic)
            .payload(o.payload.as_ref())
            .headers(o.headers.clone());
        if let Some(k) = &o.key {
            record = record.key(k.as_str());
        }
        let start = std::time::Instant::now();
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if start.elapsed() < ENQUEUE_WAIT =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// A step failed: abort when the transaction can be aborted, else give up.
    fn after_error(&self, step: &str, e: KafkaError, timeout: Duration) -> Result<Tx> {
        let mut flags = String::new();
        if let KafkaError::Transaction(t) = &e {
            if t.is_fatal() {
                return Err(self.fatal(step, &e));
            }
            flags = format!(" ({:?})", t.code());
        }
        self.abort(format!("{step}: {e}{flags}"), timeout)
    }

    fn fatal(&self, step: &str, e: &KafkaError) -> Error {
        let fenced = matches!(
            e.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        );
        let why = if fenced {
            format!(
                "another process took over transactional.id {:?} (the same instance name \
                 runs twice?)",
                self.transactional_id
            )
        } else {
            format!(
                "the transactional producer {:?} cannot go on",
                self.transactional_id
            )
        };
        Error::new(ErrorKind::Closed, format!("{why}; {step}: {e}"))
    }

    fn abort(&self, why: String, timeout: Duration) -> Result<Tx> {
        let deadline = std::time::Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(std::time::Instant::now);
        loop {
            match self.producer.abort_transaction(timeout) {
                Ok(()) => return Ok(Tx::Aborted(why)),
                Err(e) if retriable(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(self.fatal("abort_transaction", &e)),
            }
        }
    }

    /// After an abort: fetch the batch's partitions again from where it began.
    /// A partition that could not be sought back while still assigned would go
    /// on after the aborted records and commit past them (a loss): `Err` then, so
    /// the run stops and a restart resumes from the committed offsets.
    fn rewind(&self, topic: &str, starts: &BTreeMap<i32, i64>) -> Result<()> {
        let mut pending: Vec<(i32, i64)> = starts.iter().map(|(p, o)| (*p, *o)).collect();
        let mut last_error = String::new();
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut tpl = TopicPartitionList::with_capacity(pending.len());
            for (p, o) in &pending {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
            }
            let failed: Vec<i32> = match self.consumer.seek_partitions(tpl, SEEK_TIMEOUT) {
                Ok(res) => res
                    .elements()
                    .iter()
                    .filter_map(|e| match e.error() {
                        Ok(()) => None,
                        Err(err) => {
                            last_error = err.to_string();
                            Some(e.partition())
                        }
                    })
                    .collect(),
                Err(e) => {
                    last_error = e.to_string();
                    pending.iter().map(|(p, _)| *p).collect()
                }
            };
            // Revoked meanwhile: the next owner starts from the committed offset.
            let assigned: Vec<i32> = self
                .consumer
                .assignment()
                .map(|a| {
                    a.elements()
                        .iter()
                        .filter(|e| e.topic() == topic)
                        .map(|e| e.partition())
                        .collect()
                })
                .unwrap_or_default();
            pending.retain(|(p, _)| failed.contains(p) && assigned.contains(p));
            if pending.is_empty() {
                return Ok(());
            }
        }
        Err(Error::new(
            ErrorKind::Backend,
            format!(
                "after an aborted transaction, partitions {:?} of {topic:?} could not be \
                 sought back to the aborted inputs ({last_error}); stopping, so that a restart \
                 resumes from the committed offsets",
                pending.iter().map(|(p, _)| *p).collect::<Vec<_>>()
            ),
        ))
    }
}

fn retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_checked() {
        let cfg = KafkaConfig::new("127.0.0.1:9092", "in");
        assert!(cfg.exactly_once("out", "worker-1").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(201)] {
            let e = cfg.exactly_once("out", bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig);
            assert!(e.to_string().contains("instance"), "{e}");
        }
        let e = cfg.exactly_once("in", "w").unwrap_err();
        assert!(e.to_string().contains("output_topic"), "{e}");
        assert_eq!(
            cfg.exactly_once("out", "w").unwrap().transactional_id(),
            "ferrymq.in.w"
        );
    }

    #[test]
    fn offsets_commit_after_the_last_record_and_rewind_to_the_first() {
        let rec = |partition, offset| Received {
            topic_index: 0,
            partition,
            offset,
            payload: Bytes::new(),
            key: None,
            headers: ferrymq_core::Headers::new(),
            id_header: None,
            attempt: 1,
            enqueued_at: SystemTime::now(),
            not_before: None,
        };
        let batch = [rec(0, 5), rec(1, 9), rec(0, 6), rec(0, 7), rec(1, 10)];
        assert_eq!(
            batch_offsets(&batch).into_iter().collect::<Vec<_>>(),
            [(0, 8), (1, 11)]
        );
        assert_eq!(
            batch_starts(&batch).into_iter().collect::<Vec<_>>(),
            [(0, 5), (1, 9)]
        );
    }
}
