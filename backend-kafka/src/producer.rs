//! The sending side: an idempotent librdkafka producer, `send` resolving on the
//! delivery report.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ferrymq_core::depth::Depth;
use ferrymq_core::{Capabilities, Error, ErrorKind, Message, Producer, Result, SendReceipt};
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use crate::admin::{ensure_topics, lag_depth, LazyLag};
use crate::capabilities;
use crate::config::KafkaConfig;
use crate::record::{self, unix_ms, unix_ms_ceil, with_header, H_ENQUEUED_AT, H_NOT_BEFORE};

/// How long an enqueue waits for room in librdkafka's local queue
/// (`queue.buffering.max.messages` / `.kbytes`) before `QueueFull`.
const ENQUEUE_WAIT: Duration = Duration::from_secs(5);

/// Bits of a delivery opaque holding a record's index in its batch; the bits above
/// name the batch's slot in the [`Registry`].
const INDEX_BITS: u32 = usize::BITS / 2;
/// Most records one registered batch holds; a longer `send_batch` registers one
/// batch per this many records.
const MAX_BATCH: usize = 1 << INDEX_BITS;
/// Most batches in flight at once (slots above this would not fit the opaque).
const MAX_SLOTS: usize = usize::MAX >> INDEX_BITS;

/// One record's delivery report: where it landed, or librdkafka's error.
type Report = std::result::Result<(i32, i64), KafkaError>;

/// The delivery reports of one batch, filled in by librdkafka's poll thread.
struct Batch {
    /// One per record of the batch, by index; `None` until its report came (and for
    /// a record never handed to librdkafka).
    reports: Vec<Option<Report>>,
    /// Reports received so far.
    received: usize,
    /// Records handed to librdkafka; known once the batch is sealed. Reports can
    /// arrive before that, while later records still wait for room in the queue.
    handed: Option<usize>,
    /// Wakes the batch's `send_batch` once every report is in.
    done: oneshot::Sender<Vec<Option<Report>>>,
}

/// The batches in flight, by slot. A slot is freed only once every record handed
/// to librdkafka from it has had its report (librdkafka reports each record once,
/// purges and timeouts included), so no report can reach a later batch that reused
/// the slot.
#[derive(Default)]
struct Registry {
    slots: Vec<Option<Batch>>,
    free: Vec<usize>,
}

type Finished = (oneshot::Sender<Vec<Option<Report>>>, Vec<Option<Report>>);

impl Registry {
    /// A slot for a batch of `len` (at most [`MAX_BATCH`]) records, or `None` when
    /// [`MAX_SLOTS`] batches are in flight.
    fn register(&mut self, len: usize) -> Option<(usize, oneshot::Receiver<Vec<Option<Report>>>)> {
        let (done, rx) = oneshot::channel();
        let batch = Batch {
            reports: unreported(len).collect(),
            received: 0,
            handed: None,
            done,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(batch);
                slot
            }
            None if self.slots.len() < MAX_SLOTS => {
                self.slots.push(Some(batch));
                self.slots.len() - 1
            }
            None => return None,
        };
        Some((slot, rx))
    }

    /// A report for the record `opaque` names; the batch, when it was its last.
    fn report(&mut self, opaque: usize, report: Report) -> Option<Finished> {
        let slot = opaque >> INDEX_BITS;
        let index = opaque & (MAX_BATCH - 1);
        let batch = self.slots.get_mut(slot)?.as_mut()?;
        let entry = batch.reports.get_mut(index)?;
        if entry.is_none() {
            *entry = Some(report);
            batch.received += 1;
        }
        self.finish_if_done(slot)
    }

    /// Every record of `slot` that will be reported has been handed to librdkafka:
    /// `handed` of them.
    fn seal(&mut self, slot: usize, handed: usize) -> Option<Finished> {
        let batch = self.slots.get_mut(slot)?.as_mut()?;
        batch.handed = Some(handed);
        self.finish_if_done(slot)
    }

    fn finish_if_done(&mut self, slot: usize) -> Option<Finished> {
        let entry = self.slots.get_mut(slot)?;
        let complete = entry
            .as_ref()
            .is_some_and(|b| b.handed.is_some_and(|h| b.received >= h));
        if !complete {
            return None;
        }
        let batch = entry.take()?;
        self.free.push(slot);
        Some((batch.done, batch.reports))
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

fn lock(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // The registry is consistent after every method: a panic elsewhere while it was
    // held leaves nothing half-done.
    registry.lock().unwrap_or_else(|e| e.into_inner())
}

fn wake(finished: Option<Finished>) {
    if let Some((done, reports)) = finished {
        // A `send_batch` dropped before its reports came has no receiver: nothing
        // to wake.
        let _ = done.send(reports);
    }
}

/// ferrymq's librdkafka producer context: it routes each delivery report to the
/// batch that produced the record — one registration and one wake-up per
/// `send_batch`, instead of a boxed channel and a wake-up per record.
pub struct DeliveryContext {
    registry: Mutex<Registry>,
}

impl std::fmt::Debug for DeliveryContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryContext").finish_non_exhaustive()
    }
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    /// The batch's slot (high bits) and the record's index in it (low bits).
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let report = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        let finished = lock(&self.registry).report(opaque, report);
        wake(finished);
    }
}

/// Seals a registered batch when dropped, so a `send_batch` cancelled while it was
/// still handing records to librdkafka frees its slot once those records are
/// reported.
struct Registration<'s> {
    registry: &'s Mutex<Registry>,
    slot: usize,
    handed: usize,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let finished = lock(self.registry).seal(self.slot, self.handed);
        wake(finished);
    }
}

/// One record to hand to librdkafka: the topic, key and payload borrowed only
/// until librdkafka copied them.
pub(crate) struct Outgoing<'p> {
    pub topic: &'p str,
    pub key: Option<&'p str>,
    pub payload: &'p [u8],
    /// `None`: no header list at all, so librdkafka allocates (and later frees)
    /// nothing for headers, which the common header-less send saves per record.
    pub headers: Option<OwnedHeaders>,
}

fn too_many_in_flight() -> Error {
    Error::new(
        ErrorKind::QueueFull,
        format!("more than {MAX_SLOTS} sends are in flight on this producer; nothing was produced"),
    )
}

/// A batch of records on its way to librdkafka, handed over one at a time in
/// index order ([`push`](Self::push) or [`skip`](Self::skip) once per index), so
/// routing a message and handing it over is one pass and nothing of it is kept
/// but what the caller keeps. Dropped half-way (a cancelled send), the records
/// handed so far are still delivered and their slot is freed once reported.
pub(crate) struct Handover<'s> {
    sender: &'s Sender,
    /// Records in the batch.
    len: usize,
    /// The next record's index.
    next: usize,
    /// The registration of the chunk (of [`MAX_BATCH`]) `next` falls in; `None`
    /// when every slot was taken.
    current: Option<Registration<'s>>,
    /// Each chunk's receiver of its reports, in order; `None` where it got no slot.
    chunks: Vec<Option<oneshot::Receiver<Vec<Option<Report>>>>>,
}

impl<'s> Handover<'s> {
    /// The opaque of the record at `next` (registering its chunk when it opens
    /// one), or why it cannot be handed over.
    fn advance(&mut self) -> Result<usize> {
        let index = self.next;
        if index >= self.len {
            // A caller bug: a report for it would have no place to go.
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "more records handed over than the batch was opened for",
            ));
        }
        self.next += 1;
        let in_chunk = index % MAX_BATCH;
        if in_chunk == 0 {
            // Dropping the previous chunk's registration seals it.
            self.current = None;
            let registry = &self.sender.producer.context().registry;
            let chunk_len = (self.len - index).min(MAX_BATCH);
            let registered = lock(registry).register(chunk_len);
            self.current = registered.map(|(slot, rx)| {
                self.chunks.push(Some(rx));
                Registration {
                    registry,
                    slot,
                    handed: 0,
                }
            });
            if self.current.is_none() {
                self.chunks.push(None);
            }
        }
        match &self.current {
            Some(r) => Ok((r.slot << INDEX_BITS) | in_chunk),
            None => Err(too_many_in_flight()),
        }
    }

    /// Hand the next record to librdkafka if its local queue has room. Not async,
    /// so the common case builds no future per record (moving one cost ~190
    /// instructions per record); [`Offer::Full`] goes on with
    /// [`when_room`](Self::when_room).
    pub fn offer<'r>(&mut self, record: Outgoing<'r>) -> Offer<'r> {
        let opaque = match self.advance() {
            Ok(opaque) => opaque,
            Err(e) => return Offer::Done(Err(e)),
        };
        let offered = self.sender.try_enqueue(record, opaque);
        if let Offer::Done(Ok(())) = offered {
            self.handed();
        }
        offered
    }

    /// Hand over the record [`offer`](Self::offer) found the queue full for,
    /// waiting for room up to [`ENQUEUE_WAIT`]. An error: it was refused, nothing
    /// was produced.
    pub async fn when_room(&mut self, queued: Queued<'_>) -> Result<()> {
        self.sender.enqueue_when_room(queued).await?;
        self.handed();
        Ok(())
    }

    /// Hand the next record to librdkafka, waiting for room in its local queue up
    /// to [`ENQUEUE_WAIT`]. An error: it was refused, nothing was produced.
    pub async fn push(&mut self, record: Outgoing<'_>) -> Result<()> {
        match self.offer(record) {
            Offer::Done(result) => result,
            Offer::Full(queued) => self.when_room(queued).await,
        }
    }

    fn handed(&mut self) {
        if let Some(r) = &mut self.current {
            r.handed += 1;
        }
    }

    /// Pass over the next index: there is no record for it.
    pub fn skip(&mut self) {
        let _ = self.advance();
    }

    /// Every record handed over: what is left is to wait for the reports.
    pub fn finish(self) -> Pending {
        let Handover {
            len,
            current,
            chunks,
            ..
        } = self;
        drop(current);
        Pending { len, chunks }
    }
}

/// What [`Handover::offer`] did with a record.
pub(crate) enum Offer<'r> {
    /// Handed to librdkafka, or refused (nothing was produced).
    Done(Result<()>),
    /// librdkafka's local queue is full: [`Handover::when_room`] goes on.
    Full(Queued<'r>),
}

/// A record waiting for room in librdkafka's local queue.
pub(crate) struct Queued<'r>(BaseRecord<'r, str, [u8], usize>);

/// Records handed to librdkafka whose delivery reports are still to come. It
/// borrows nothing, so the caller can free the messages (librdkafka holds copies)
/// while the broker round trip runs.
pub(crate) struct Pending {
    len: usize,
    chunks: Vec<Option<oneshot::Receiver<Vec<Option<Report>>>>>,
}

impl Pending {
    /// Wait for the delivery reports: one per index of the batch, `None` where no
    /// record was handed over, or the producer went away before its report came
    /// (then the outcome is unknown).
    pub async fn reports(mut self) -> Vec<Option<Report>> {
        if let [Some(_)] = self.chunks.as_slice() {
            // The common case, one chunk: its reports are the batch's.
            if let Some(Some(rx)) = self.chunks.pop() {
                return rx.await.unwrap_or_else(|_| unreported(self.len).collect());
            }
        }
        let mut out = Vec::with_capacity(self.len);
        for chunk in self.chunks {
            let chunk_len = (self.len - out.len()).min(MAX_BATCH);
            match chunk {
                Some(rx) => match rx.await {
                    Ok(reports) => out.extend(reports),
                    Err(_) => out.extend(unreported(chunk_len)),
                },
                None => out.extend(unreported(chunk_len)),
            }
        }
        out
    }
}

/// `n` reports not (yet) received.
fn unreported(n: usize) -> impl Iterator<Item = Option<Report>> {
    std::iter::repeat_with(|| None).take(n)
}

/// A delivery report (or its absence) as the result of a send to `topic`.
fn delivered(topic: &str, report: Option<Report>) -> Result<(i32, i64)> {
    match report {
        Some(Ok(position)) => Ok(position),
        Some(Err(e)) => Err(delivery_error(topic, e)),
        None => Err(Error::new(
            ErrorKind::OutcomeUnknown,
            format!("the producer of {topic:?} went away before the delivery report"),
        )),
    }
}

/// A librdkafka producer configured for ferrymq: idempotent, `acks=all`, Java's
/// murmur2 partitioner. Shared by [`KafkaProducer`] and the consumer's retry copies.
pub(crate) struct Sender {
    producer: ThreadedProducer<DeliveryContext>,
    pub cfg: Arc<KafkaConfig>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("topic", &self.cfg.topic)
            .finish()
    }
}

/// The producer settings ferrymq relies on (the passthrough properties applied
/// last).
pub(crate) fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
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
    c
}

impl Sender {
    pub fn new(cfg: Arc<KafkaConfig>) -> Result<Self> {
        let context = DeliveryContext {
            registry: Mutex::new(Registry::default()),
        };
        let producer = producer_config(&cfg)
            .create_with_context(context)
            .map_err(|e| config_error("producer", e))?;
        Ok(Sender { producer, cfg })
    }

    /// A batch of `len` records to hand over: they travel in few requests, and the
    /// batch costs one registration and one wake-up.
    pub fn handover(&self, len: usize) -> Handover<'_> {
        Handover {
            sender: self,
            len,
            next: 0,
            current: None,
            chunks: Vec::with_capacity(len.div_ceil(MAX_BATCH)),
        }
    }

    /// Hand one record to librdkafka if its local queue has room; the record back
    /// when it is full.
    fn try_enqueue<'r>(&self, r: Outgoing<'r>, opaque: usize) -> Offer<'r> {
        let mut record: BaseRecord<'r, str, [u8], usize> =
            BaseRecord::with_opaque_to(r.topic, opaque).payload(r.payload);
        if let Some(h) = r.headers {
            record = record.headers(h);
        }
        if let Some(k) = r.key {
            record = record.key(k);
        }
        match self.producer.send(record) {
            Ok(()) => Offer::Done(Ok(())),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                Offer::Full(Queued(back))
            }
            Err((e, _)) => Offer::Done(Err(enqueue_error(r.topic, e))),
        }
    }

    /// Hand over a record that found librdkafka's queue full, waiting for room up
    /// to [`ENQUEUE_WAIT`]. Only this path reads the clock.
    async fn enqueue_when_room(&self, Queued(mut record): Queued<'_>) -> Result<()> {
        let until = tokio::time::Instant::now() + ENQUEUE_WAIT;
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if tokio::time::Instant::now() >= until {
                        return Err(enqueue_error(
                            back.topic,
                            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                        ));
                    }
                    record = back;
                }
                Err((e, back)) => return Err(enqueue_error(back.topic, e)),
            }
        }
    }

    /// Produce one record and wait for the broker's acknowledgement.
    pub async fn produce(&self, record: Outgoing<'_>) -> Result<(i32, i64)> {
        let topic = record.topic;
        let mut handover = self.handover(1);
        handover.push(record).await?;
        let report = handover.finish().reports().await.pop().flatten();
        delivered(topic, report)
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

    /// The underlying librdkafka client, for what ferrymq does not wrap (metadata,
    /// watermarks, statistics). Not the producer itself: its delivery reports are
    /// routed to ferrymq's pending sends, so records must go through
    /// [`Producer::send`] / [`Producer::send_batch`].
    pub fn client(&self) -> &Client<DeliveryContext> {
        self.sender.producer.client()
    }
}

/// A receipt for a record of the queue's topic (`index` 0, its id formatted only if
/// asked for) or of a tier.
fn receipt(index: usize, topic: &str, (p, o): (i32, i64)) -> SendReceipt {
    if index == 0 {
        SendReceipt::at_position(p, o)
    } else {
        SendReceipt::new(record::record_id(index, topic, p, o))
    }
}

#[async_trait]
impl Producer for KafkaProducer {
    async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.check_open()?;
        let (topic, index, headers) = self.prepare(&message)?;
        let position = self
            .sender
            .produce(Outgoing {
                topic: &topic,
                key: message.get_key(),
                payload: message.payload(),
                headers,
            })
            .await?;
        Ok(receipt(index, &topic, position))
    }

    /// Every entry is handed to librdkafka first (so they travel in few requests),
    /// then every delivery report is awaited; one result per entry, in order.
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<SendReceipt>>> {
        self.check_open()?;
        // One pass routes each message and hands it over; what is kept of it is
        // where it went (or why it was refused).
        let mut routes = Vec::with_capacity(messages.len());
        let mut handover = self.sender.handover(messages.len());
        for m in &messages {
            let route = match self.prepare(m) {
                Ok((topic, index, headers)) => {
                    let record = Outgoing {
                        topic: &topic,
                        key: m.get_key(),
                        payload: m.payload(),
                        headers,
                    };
                    // `offer`, not `push`: no future per record.
                    let handed = match handover.offer(record) {
                        Offer::Done(handed) => handed,
                        Offer::Full(queued) => handover.when_room(queued).await,
                    };
                    handed.map(|()| (topic, index))
                }
                Err(e) => {
                    handover.skip();
                    Err(e)
                }
            };
            routes.push(route);
        }
        let pending = handover.finish();
        // librdkafka holds copies of everything handed over: the payloads go back to
        // the allocator now, while they are hot, instead of after the round trip.
        drop(messages);
        let reports = pending.reports().await;
        Ok(routes
            .into_iter()
            .zip(reports)
            .map(|(route, report)| {
                let (topic, index) = route?;
                Ok(receipt(index, &topic, delivered(&topic, report)?))
            })
            .collect())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rdkafka::mocking::MockCluster;

    fn ok(partition: i32, offset: i64) -> Report {
        Ok((partition, offset))
    }

    fn positions(reports: Vec<Option<Report>>) -> Vec<Option<(i32, i64)>> {
        reports
            .into_iter()
            .map(|r| r.and_then(|r| r.ok()))
            .collect()
    }

    #[test]
    fn a_batch_completes_with_its_last_report_whether_it_comes_before_or_after_the_seal() {
        let mut reg = Registry::default();
        // Reports first (librdkafka was faster than the rest of the enqueue), seal last.
        let (a, mut rx_a) = reg.register(3).unwrap();
        assert!(reg.report((a << INDEX_BITS) | 2, ok(0, 12)).is_none());
        assert!(reg.report(a << INDEX_BITS, ok(0, 10)).is_none());
        // Index 1 was never handed to librdkafka (refused locally): sealed with 2.
        let (tx, reports) = reg.seal(a, 2).unwrap();
        tx.send(reports).unwrap();
        assert_eq!(
            positions(rx_a.try_recv().unwrap()),
            [Some((0, 10)), None, Some((0, 12))]
        );
        // Seal first, reports last, out of order.
        let (b, mut rx_b) = reg.register(2).unwrap();
        assert_eq!(b, a, "the freed slot is reused");
        assert!(reg.seal(b, 2).is_none());
        assert!(reg.report((b << INDEX_BITS) | 1, ok(1, 5)).is_none());
        let (tx, reports) = reg.report(b << INDEX_BITS, ok(2, 7)).unwrap();
        tx.send(reports).unwrap();
        assert_eq!(
            positions(rx_b.try_recv().unwrap()),
            [Some((2, 7)), Some((1, 5))]
        );
        assert_eq!(reg.in_flight(), 0);
    }

    #[test]
    fn receipt_ids_are_the_record_ids() {
        for (p, o) in [
            (0, 0),
            (2, 12_345),
            (i32::MAX, i64::MAX),
            (i32::MIN, i64::MIN),
            (-1, -1001),
        ] {
            assert_eq!(
                receipt(0, "t", (p, o)).id(),
                record::record_id(0, "t", p, o)
            );
        }
        assert_eq!(receipt(2, "t.retry-5s", (1, 7)).id(), "t.retry-5s/1/7");
    }

    #[test]
    fn reports_reach_only_their_own_batch() {
        let mut reg = Registry::default();
        let (a, _rx_a) = reg.register(1).unwrap();
        let (b, mut rx_b) = reg.register(2).unwrap();
        assert_ne!(a, b);
        assert!(reg.seal(a, 1).is_none());
        assert!(reg.seal(b, 2).is_none());
        // Unknown slots and indexes past the batch are ignored, not misfiled.
        assert!(reg.report(7 << INDEX_BITS, ok(0, 1)).is_none());
        assert!(reg.report((a << INDEX_BITS) | 5, ok(0, 1)).is_none());
        assert!(reg.report(b << INDEX_BITS, ok(0, 1)).is_none());
        let (tx, reports) = reg.report((b << INDEX_BITS) | 1, ok(0, 2)).unwrap();
        tx.send(reports).unwrap();
        assert_eq!(
            positions(rx_b.try_recv().unwrap()),
            [Some((0, 1)), Some((0, 2))]
        );
        assert_eq!(reg.in_flight(), 1, "a still waits for its report");
        // A batch with nothing handed to librdkafka completes when sealed.
        let (c, _rx_c) = reg.register(3).unwrap();
        assert!(reg.seal(c, 0).is_some());
        assert_eq!(reg.in_flight(), 1);
    }

    fn record(payload: &[u8]) -> Outgoing<'_> {
        Outgoing {
            topic: "full",
            key: None,
            payload,
            headers: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_batch_dropped_while_the_queue_is_full_frees_its_slot_and_others_complete() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("full", 1, 1).unwrap();
        let cfg = KafkaConfig::from_url(&format!(
            "kafka://{}/full?create=false&partitions=1&send_timeout=20s\
             &rdkafka.queue.buffering.max.messages=10",
            mock.bootstrap_servers()
        ))
        .unwrap();
        let sender = Sender::new(Arc::new(cfg)).unwrap();
        let registry = &sender.producer.context().registry;
        sender.produce(record(b"warm")).await.unwrap();
        mock.broker_down(1).unwrap();
        let payloads: Vec<Vec<u8>> = (0..30).map(|i| format!("m{i}").into_bytes()).collect();
        let handing = async {
            let mut handover = sender.handover(payloads.len());
            for p in &payloads {
                handover.push(record(p)).await.unwrap();
            }
            handover.finish().reports().await
        };
        // The first 10 fill librdkafka's queue; the 11th waits for room: cancel it there.
        let cancelled = tokio::time::timeout(Duration::from_millis(300), handing).await;
        assert!(cancelled.is_err(), "the queue never filled");
        assert_eq!(
            lock(registry).in_flight(),
            1,
            "the 10 handed records are pending"
        );
        mock.broker_up(1).unwrap();
        // Another send on the same producer completes meanwhile.
        let p = sender.produce(record(b"after")).await.unwrap();
        assert_eq!(p.0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while lock(registry).in_flight() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cancelled batch's slot was never freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
