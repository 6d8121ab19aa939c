//! A received message, its metadata, and the handle that settles it.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::capabilities::Capabilities;
use crate::error::{Error, ErrorKind, Result};
use crate::id::MessageId;
use crate::message::{Headers, Message};
use crate::position::Position;

/// Settles one delivery on its backend. Backends implement this; users call the
/// methods on [`Delivery`] or [`AckHandle`], which add the once-only bookkeeping and
/// the lease clock.
#[async_trait]
pub trait Ack: Send + Sync + fmt::Debug {
    /// The message was handled: remove it for good.
    async fn ack(&self) -> Result<()>;
    /// The message was not handled: deliver it again, no sooner than `redeliver_after`
    /// (immediately when `None`). This counts as a failed attempt.
    async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()>;
    /// Keep the lease: do not redeliver for another `by`, counted from now.
    async fn extend(&self, by: Duration) -> Result<()>;
    /// Give the message back unhandled — deliver it again no sooner than
    /// `redeliver_after` — without it counting as a failed attempt where the backend
    /// can ([`Capabilities::release_keeps_attempt`](crate::Capabilities::release_keeps_attempt)):
    /// the worker releases what it prefetched but never started (`None`: at once),
    /// and the Dedup middleware what another consumer is handling (after a pause).
    /// The default is a nack.
    async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.nack(redeliver_after).await
    }
    /// Whether the backend still holds this lease for us, as far as it knows without
    /// a round trip (Kafka: the partition is still assigned to this member). The
    /// lease deadline is checked by [`AckHandle`]; the default is `true`.
    fn is_live(&self) -> bool {
        true
    }
    /// Do `op` synchronously if the backend needs no I/O for it (the in-memory queue
    /// settles under a lock): `Some(outcome)`, and the async method is not called.
    /// `None` (the default) means "call the async method".
    ///
    /// Why: `async_trait` boxes every future it returns, so each settle through the
    /// trait costs an allocation, a free and a virtual poll (~200 instructions) even
    /// where nothing is awaited; at a million deliveries a second that is a fifth of
    /// the budget. [`AckHandle`] tries this first.
    fn settle_now(&self, op: Settle) -> Option<Result<()>> {
        let _ = op;
        None
    }
}

/// A settle operation, for [`Ack::settle_now`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settle {
    /// [`Ack::ack`].
    Ack,
    /// [`Ack::nack`] with this redelivery delay.
    Nack(Option<Duration>),
    /// [`Ack::release`] with this redelivery delay.
    Release(Option<Duration>),
    /// [`Ack::extend`] by this much.
    Extend(Duration),
}

const PENDING: u8 = 0;
const SETTLING: u8 = 1;
const ACKED: u8 = 2;
const NACKED: u8 = 3;
const RELEASED: u8 = 4;
/// A settle answered `LeaseExpired`: nobody can settle through this handle any more,
/// and the message was not acked by it.
const LOST: u8 = 5;

/// No lease deadline: the shift field holds this when the deadline was removed.
const NO_SHIFT: i64 = i64::MIN;

/// State, lease clock, the delivery's message and metadata, and backend in one
/// allocation: the backend is the unsized last field.
struct AckShared<A: ?Sized> {
    /// The message and metadata of the [`Delivery`] this handle was made for, put
    /// here by [`Delivery::new`] while the handle was not shared yet (what backends
    /// do), so that a delivery is one allocation, not one for the delivery and one
    /// for its handle. `None` for a handle of its own (or one taken apart by
    /// [`Delivery::into_parts`]).
    inner: Option<DeliveryInner>,
    state: AtomicU8,
    /// The deadline the backend gave at receive time, if it has leases.
    lease: Option<Instant>,
    /// Nanoseconds the deadline moved from `lease` by extends (either way), so the
    /// clock is kept without a lock.
    lease_shift: AtomicI64,
    backend: A,
}

/// Cheap-to-clone, `Send + Sync` handle that settles a delivery exactly once.
///
/// Clones share state: once any clone acks, nacks or releases, every other settle
/// call returns [`ErrorKind::AlreadyAcked`]. That lets a heartbeat task extend the
/// lease while the handler owns the payload. A failed settle (network error) leaves
/// the delivery pending so it can be retried, and so does a settle whose future is
/// dropped before it finished (cancellation-safe).
///
/// The handle also keeps the lease's deadline on the local clock (receive time plus
/// the visibility timeout, moved by each successful [`extend`](AckHandle::extend)),
/// so [`is_live`](AckHandle::is_live) answers without a round trip.
#[derive(Clone)]
pub struct AckHandle {
    shared: Arc<AckShared<dyn Ack>>,
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("backend", &self.shared.backend)
            .field("state", &self.state_name())
            .field("lease_deadline", &self.lease_deadline())
            .finish()
    }
}

/// Returns the handle to pending if a settle future is dropped mid-flight.
struct SettleGuard<'a> {
    state: &'a AtomicU8,
    armed: bool,
}

impl Drop for SettleGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.store(PENDING, Ordering::Release);
        }
    }
}

impl AckHandle {
    /// Wrap a backend's settle implementation, for a delivery without a lease
    /// deadline (or one the backend does not know).
    pub fn new(backend: impl Ack + 'static) -> Self {
        Self::build(backend, None)
    }

    /// Wrap a backend's settle implementation for a delivery leased until `deadline`
    /// (on tokio's clock: the time the receive was sent plus the visibility timeout,
    /// so the local clock errs on the early side).
    pub fn with_lease(backend: impl Ack + 'static, deadline: Instant) -> Self {
        Self::build(backend, Some(deadline))
    }

    fn build(backend: impl Ack + 'static, lease: Option<Instant>) -> Self {
        Self::build_with(None, backend, lease)
    }

    fn build_with(
        inner: Option<DeliveryInner>,
        backend: impl Ack + 'static,
        lease: Option<Instant>,
    ) -> Self {
        AckHandle {
            shared: Arc::new(AckShared {
                inner,
                state: AtomicU8::new(PENDING),
                lease,
                lease_shift: AtomicI64::new(0),
                backend,
            }),
        }
    }

    /// The message of the delivery this handle holds (see [`Delivery::new`]).
    pub(crate) fn message(&self) -> Option<&Message> {
        self.shared.inner.as_ref().map(|inner| &inner.message)
    }

    /// The message of the delivery this handle holds: moved out when nothing else
    /// holds the handle, a copy otherwise.
    pub(crate) fn into_message(mut self) -> Option<Message> {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.inner.take().map(|inner| inner.message),
            None => self.message().cloned(),
        }
    }

    fn state_name(&self) -> &'static str {
        match self.shared.state.load(Ordering::Acquire) {
            PENDING => "pending",
            SETTLING => "settling",
            ACKED => "acked",
            NACKED => "nacked",
            RELEASED => "released",
            _ => "lease lost",
        }
    }

    /// Whether nothing is left to do with this delivery through this handle: it was
    /// acked, nacked or released (successfully) through any clone, or a settle found
    /// its lease gone.
    pub fn is_settled(&self) -> bool {
        matches!(
            self.shared.state.load(Ordering::Acquire),
            ACKED | NACKED | RELEASED | LOST
        )
    }

    /// Whether the delivery was acked, successfully, through any clone.
    pub fn is_acked(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == ACKED
    }

    /// When the lease runs out, if the backend has leases: the receive time plus the
    /// visibility timeout, moved by every successful extend.
    pub fn lease_deadline(&self) -> Option<Instant> {
        let lease = self.shared.lease?;
        match self.shared.lease_shift.load(Ordering::Acquire) {
            NO_SHIFT => None,
            shift if shift >= 0 => Some(
                lease
                    .checked_add(Duration::from_nanos(shift.unsigned_abs()))
                    .unwrap_or(lease),
            ),
            shift => Some(
                lease
                    .checked_sub(Duration::from_nanos(shift.unsigned_abs()))
                    .unwrap_or(lease),
            ),
        }
    }

    /// Time left on the lease (zero once past the deadline); `None` when the
    /// delivery has no deadline.
    pub fn lease_remaining(&self) -> Option<Duration> {
        self.lease_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Whether this handle may still settle the delivery: not settled, the lease
    /// deadline not passed, and the backend still holding the lease (a Kafka
    /// partition not revoked).
    pub fn is_live(&self) -> bool {
        matches!(
            self.shared.state.load(Ordering::Acquire),
            PENDING | SETTLING
        ) && self.lease_deadline().map_or(true, |d| Instant::now() < d)
            && self.shared.backend.is_live()
    }

    /// [`is_live`](AckHandle::is_live) judged at `now`, for a caller that read the
    /// clock already (the worker checks every delivery it starts).
    pub fn is_live_at(&self, now: Instant) -> bool {
        matches!(
            self.shared.state.load(Ordering::Acquire),
            PENDING | SETTLING
        ) && self.lease_deadline().map_or(true, |d| now < d)
            && self.shared.backend.is_live()
    }

    fn begin(&self) -> Result<SettleGuard<'_>> {
        self.shared
            .state
            .compare_exchange(PENDING, SETTLING, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| SettleGuard {
                state: &self.shared.state,
                armed: true,
            })
            .map_err(|state| {
                let what = match state {
                    SETTLING => "being settled concurrently",
                    LOST => "no longer leased to this consumer",
                    _ => "already settled",
                };
                Error::new(ErrorKind::AlreadyAcked, format!("delivery is {what}"))
            })
    }

    fn finish(&self, mut guard: SettleGuard<'_>, outcome: &Result<()>, done: u8) {
        guard.armed = false;
        let next = match outcome {
            Ok(()) => done,
            // A lease that is gone cannot be settled by anyone through this handle.
            Err(e) if e.kind() == ErrorKind::LeaseExpired => LOST,
            Err(_) => PENDING,
        };
        self.shared.state.store(next, Ordering::Release);
    }

    /// Remove the message for good. A second settle returns `AlreadyAcked`.
    pub async fn ack(&self) -> Result<()> {
        let guard = self.begin()?;
        let outcome = match self.shared.backend.settle_now(Settle::Ack) {
            Some(outcome) => outcome,
            None => self.shared.backend.ack().await,
        };
        self.finish(guard, &outcome, ACKED);
        outcome
    }

    /// [`ack`](AckHandle::ack) without a future, where the backend can settle
    /// without waiting (an in-process queue, a Kafka offset marked done): its
    /// result, or `None` when the backend has to wait — then nothing happened
    /// and `ack` must be awaited. The worker acks through this first: a boxed
    /// future per delivery was a tenth of its own cost on such backends.
    pub(crate) fn try_ack_now(&self) -> Option<Result<()>> {
        let guard = match self.begin() {
            Ok(guard) => guard,
            Err(e) => return Some(Err(e)),
        };
        // `None`: the guard, dropped unfinished, leaves the handle pending.
        let outcome = self.shared.backend.settle_now(Settle::Ack)?;
        self.finish(guard, &outcome, ACKED);
        Some(outcome)
    }

    /// Redeliver no sooner than `redeliver_after` (now when `None`); counts as a
    /// failed attempt.
    pub async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        let guard = self.begin()?;
        let outcome = match self
            .shared
            .backend
            .settle_now(Settle::Nack(redeliver_after))
        {
            Some(outcome) => outcome,
            None => self.shared.backend.nack(redeliver_after).await,
        };
        self.finish(guard, &outcome, NACKED);
        outcome
    }

    /// Give the message back unhandled, to be delivered again no sooner than
    /// `redeliver_after`, without counting an attempt where the backend can (see
    /// [`Ack::release`]).
    pub async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        let guard = self.begin()?;
        let outcome = match self
            .shared
            .backend
            .settle_now(Settle::Release(redeliver_after))
        {
            Some(outcome) => outcome,
            None => self.shared.backend.release(redeliver_after).await,
        };
        self.finish(guard, &outcome, RELEASED);
        outcome
    }

    /// Push the redelivery deadline to `by` from now. Only while not yet settled.
    pub async fn extend(&self, by: Duration) -> Result<()> {
        match self.shared.state.load(Ordering::Acquire) {
            PENDING | SETTLING => {}
            _ => {
                return Err(Error::new(
                    ErrorKind::AlreadyAcked,
                    "cannot extend a settled delivery",
                ))
            }
        }
        // Measured before the call, so the local deadline errs on the early side.
        let asked_at = Instant::now();
        // A `LeaseExpired` here does not make the handle lost: on some backends (memory,
        // SQS) the old lease can still settle until someone else received the message.
        match self.shared.backend.settle_now(Settle::Extend(by)) {
            Some(outcome) => outcome?,
            None => self.shared.backend.extend(by).await?,
        }
        if let Some(lease) = self.shared.lease {
            let shift = match asked_at.checked_add(by) {
                Some(deadline) if deadline >= lease => {
                    i64::try_from(deadline.duration_since(lease).as_nanos()).unwrap_or(i64::MAX)
                }
                Some(deadline) => i64::try_from(lease.duration_since(deadline).as_nanos())
                    .map_or(NO_SHIFT + 1, |n| -n),
                // Beyond the clock's range: as good as no deadline.
                None => NO_SHIFT,
            };
            self.shared.lease_shift.store(shift, Ordering::Release);
        }
        Ok(())
    }
}

/// Where and when a delivery came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryMeta {
    /// The backend's id of the message (SQS MessageId, Redis stream entry id, ...).
    /// A [`MessageId`]: compares, hashes, prints and serializes as the string.
    pub id: MessageId,
    /// 1 on first delivery, +1 on each redelivery.
    pub attempt: u32,
    /// When the message was first enqueued.
    pub enqueued_at: SystemTime,
    /// The queue (or topic) it was received from.
    pub queue: Arc<str>,
    /// Backend position such as `topic/partition/offset`, where the backend has
    /// one; a [`Position`] reads as a `str`.
    pub position: Option<Position>,
}

impl DeliveryMeta {
    /// Metadata with the required fields; `position` empty.
    pub fn new(
        id: impl Into<MessageId>,
        attempt: u32,
        enqueued_at: SystemTime,
        queue: Arc<str>,
    ) -> Self {
        DeliveryMeta {
            id: id.into(),
            attempt,
            enqueued_at,
            queue,
            position: None,
        }
    }

    /// Set the backend position.
    pub fn with_position(mut self, position: impl Into<Position>) -> Self {
        self.position = Some(position.into());
        self
    }
}

/// A received message with its metadata and ack handle.
///
/// Settle it with [`ack`](Delivery::ack) or [`nack`](Delivery::nack). Dropping it
/// without either loses nothing: the backend redelivers it after the visibility
/// timeout. Cloning is cheap and clones share the ack handle.
///
/// A `Delivery` is its [`AckHandle`]: the message, metadata and capabilities sit in
/// the handle's allocation (put there by [`Delivery::new`]), so receiving costs one
/// allocation per delivery, and the clones the worker and the middleware make (one
/// to keep, one to hand down) and the moves between queues cost a reference count,
/// not a copy of ~200 bytes with a `String` or two. A clone of the handle (a
/// heartbeat's) keeps the message alive with it.
#[derive(Clone)]
pub struct Delivery {
    acker: AckHandle,
    /// The message and metadata when they could not go into the handle (it was
    /// shared already, or a clone was given other capabilities); `None` when they
    /// are in the handle.
    split: Option<Arc<DeliveryInner>>,
}

/// What no delivery holds (never reached: a `Delivery` always finds its own).
fn empty() -> &'static DeliveryInner {
    static EMPTY: std::sync::OnceLock<DeliveryInner> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| DeliveryInner {
        message: Message::default(),
        meta: DeliveryMeta::new(MessageId::empty(), 0, SystemTime::UNIX_EPOCH, Arc::from("")),
        capabilities: None,
    })
}

#[derive(Clone)]
struct DeliveryInner {
    message: Message,
    meta: DeliveryMeta,
    capabilities: Option<Arc<Capabilities>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.inner().message)
            .field("meta", &self.inner().meta)
            .field("acker", &self.acker)
            .field("capabilities", &self.inner().capabilities)
            .finish()
    }
}

impl Delivery {
    /// Assemble a delivery (used by backends).
    ///
    /// A handle fresh from [`AckHandle::new`] or [`AckHandle::with_lease`], not cloned
    /// yet, takes the message and metadata into its own allocation (see [`Delivery`]).
    pub fn new(message: Message, meta: DeliveryMeta, mut acker: AckHandle) -> Self {
        let inner = DeliveryInner {
            message,
            meta,
            capabilities: None,
        };
        match Arc::get_mut(&mut acker.shared) {
            Some(shared) if shared.inner.is_none() => {
                shared.inner = Some(inner);
                Delivery { acker, split: None }
            }
            _ => Delivery {
                acker,
                split: Some(Arc::new(inner)),
            },
        }
    }

    /// The handle, if the message lives in it (not split off): a backend that keeps
    /// it can read the message back without a copy of its own.
    pub(crate) fn message_handle(&self) -> Option<&AckHandle> {
        self.split.is_none().then_some(&self.acker)
    }

    /// [`Delivery::new`] with a fresh [`AckHandle::with_lease`] and
    /// [`with_capabilities`](Delivery::with_capabilities) in one step, building the
    /// allocation in place (the in-memory queue's receive: no moves of the message
    /// into a handle made just before).
    pub(crate) fn leased(
        message: Message,
        meta: DeliveryMeta,
        capabilities: Arc<Capabilities>,
        backend: impl Ack + 'static,
        deadline: Instant,
    ) -> Self {
        let inner = DeliveryInner {
            message,
            meta,
            capabilities: Some(capabilities),
        };
        Delivery {
            acker: AckHandle::build_with(Some(inner), backend, Some(deadline)),
            split: None,
        }
    }

    fn inner(&self) -> &DeliveryInner {
        match &self.split {
            Some(inner) => inner,
            // `split` is `None` only when the handle holds them (see `new`).
            None => self.acker.shared.inner.as_ref().unwrap_or_else(|| empty()),
        }
    }

    /// Attach what the consumer that received it can do, so middleware can adapt
    /// (cap a nack delay at the backend's longest, decide before a native
    /// dead-letter threshold). Backends set it on every delivery.
    pub fn with_capabilities(mut self, capabilities: Arc<Capabilities>) -> Self {
        // Unshared right after `new`, so this copies nothing.
        if self.split.is_none() {
            if let Some(inner) =
                Arc::get_mut(&mut self.acker.shared).and_then(|shared| shared.inner.as_mut())
            {
                inner.capabilities = Some(capabilities);
                return self;
            }
        }
        match &mut self.split {
            Some(inner) => Arc::make_mut(inner).capabilities = Some(capabilities),
            None => {
                let mut inner = self.inner().clone();
                inner.capabilities = Some(capabilities);
                self.split = Some(Arc::new(inner));
            }
        }
        self
    }

    /// What the consumer that received it can do, if the backend said.
    pub fn capabilities(&self) -> Option<&Capabilities> {
        self.inner().capabilities.as_deref()
    }

    /// The message as sent (delay cleared).
    pub fn message(&self) -> &Message {
        &self.inner().message
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        self.inner().message.payload()
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        self.inner().message.headers()
    }

    /// The ordering key.
    pub fn key(&self) -> Option<&str> {
        self.inner().message.get_key()
    }

    /// Metadata: id, attempt, enqueue time, queue, position.
    pub fn meta(&self) -> &DeliveryMeta {
        &self.inner().meta
    }

    /// The backend message id.
    pub fn id(&self) -> &str {
        &self.inner().meta.id
    }

    /// 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.inner().meta.attempt
    }

    /// The ack handle, to settle or extend from another task.
    pub fn acker(&self) -> &AckHandle {
        &self.acker
    }

    /// Decode the payload as JSON into `T`; a payload that does not fit is
    /// [`ErrorKind::Decode`].
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        self.inner().message.decode_json()
    }

    /// Acknowledge: the message is removed for good.
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await
    }

    /// Acknowledge every delivery of a batch: those the backend settles without
    /// waiting (a Kafka offset marked done, the in-process queue) at once, the rest
    /// concurrently. Every delivery is tried; the error of the first that failed,
    /// in batch order, is returned.
    ///
    /// Why not `try_join_all(batch.iter().map(|d| d.ack()))`: that allocates a
    /// task per delivery, and stops at the first error while later deliveries
    /// may be acked or not. On Kafka the task cost twice the ack itself.
    ///
    /// ```
    /// use std::time::Duration;
    /// use ferrymq_core::{memory::MemoryConfig, Consumer, Delivery, Message, Producer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> ferrymq_core::Result<()> {
    /// let (producer, consumer) = MemoryConfig::new("doc-ack-all").connect()?;
    /// producer
    ///     .send_batch((0..10).map(|i| Message::new(format!("m{i}"))).collect())
    ///     .await?;
    /// let batch = consumer.receive(10, Duration::from_secs(1)).await?;
    /// Delivery::ack_all(&batch).await?;
    /// assert!(batch.iter().all(|d| !d.acker().is_live()));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn ack_all(batch: &[Delivery]) -> Result<()> {
        let mut failed: Option<(usize, Error)> = None;
        let mut keep_first = |i: usize, e: Error| {
            if failed.as_ref().map_or(true, |(at, _)| i < *at) {
                failed = Some((i, e));
            }
        };
        let mut waiting = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            match d.acker.try_ack_now() {
                Some(Ok(())) => {}
                Some(Err(e)) => keep_first(i, e),
                None => waiting.push((i, d)),
            }
        }
        if !waiting.is_empty() {
            let results = futures::future::join_all(waiting.iter().map(|(_, d)| d.ack())).await;
            for (&(i, _), r) in waiting.iter().zip(results) {
                if let Err(e) = r {
                    keep_first(i, e);
                }
            }
        }
        failed.map_or(Ok(()), |(_, e)| Err(e))
    }

    /// Negative-acknowledge: redeliver no sooner than `redeliver_after`.
    pub async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.acker.nack(redeliver_after).await
    }

    /// Extend the lease by `by` from now.
    pub async fn extend(&self, by: Duration) -> Result<()> {
        self.acker.extend(by).await
    }

    /// Give the message back unhandled, to be delivered again no sooner than
    /// `redeliver_after`, without counting a failed attempt where the backend can
    /// ([`Capabilities::release_keeps_attempt`](crate::Capabilities::release_keeps_attempt)).
    pub async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.acker.release(redeliver_after).await
    }

    /// When the lease runs out (`None` when the backend has no leases).
    pub fn lease_deadline(&self) -> Option<Instant> {
        self.acker.lease_deadline()
    }

    /// Time left on the lease; `None` when the backend has no leases.
    pub fn lease_remaining(&self) -> Option<Duration> {
        self.acker.lease_remaining()
    }

    /// Whether this delivery may still be settled by this consumer: not settled, the
    /// lease not run out, the partition not revoked. The worker never starts a
    /// delivery that is not live.
    pub fn is_live(&self) -> bool {
        self.acker.is_live()
    }

    /// Split into the message, metadata and handle (copying the message and metadata
    /// only if a clone of this delivery or of its handle is still alive).
    pub fn into_parts(self) -> (Message, DeliveryMeta, AckHandle) {
        let Delivery { mut acker, split } = self;
        let inner = match split {
            Some(inner) => Arc::try_unwrap(inner).unwrap_or_else(|shared| (*shared).clone()),
            None => match Arc::get_mut(&mut acker.shared).and_then(|s| s.inner.take()) {
                Some(inner) => inner,
                None => acker
                    .shared
                    .inner
                    .clone()
                    .unwrap_or_else(|| empty().clone()),
            },
        };
        (inner.message, inner.meta, acker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug, Default)]
    struct Counting {
        acks: AtomicUsize,
        fail_first: std::sync::atomic::AtomicBool,
        expired: std::sync::atomic::AtomicBool,
        /// The next settle waits this long before answering (to cancel it mid-flight).
        stall: std::sync::Mutex<Option<Duration>>,
        nacks: AtomicUsize,
        releases: AtomicUsize,
    }

    #[async_trait]
    impl Ack for Arc<Counting> {
        async fn ack(&self) -> Result<()> {
            let stall = self.stall.lock().unwrap().take();
            if let Some(stall) = stall {
                tokio::time::sleep(stall).await;
            }
            if self.expired.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::LeaseExpired, "gone"));
            }
            if self.fail_first.swap(false, Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Connection, "flaky"));
            }
            self.acks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn nack(&self, _: Option<Duration>) -> Result<()> {
            self.stall_if_asked().await;
            self.nacks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn extend(&self, _: Duration) -> Result<()> {
            Ok(())
        }
        async fn release(&self, _: Option<Duration>) -> Result<()> {
            self.stall_if_asked().await;
            self.releases.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl Counting {
        async fn stall_if_asked(&self) {
            let stall = self.stall.lock().unwrap().take();
            if let Some(stall) = stall {
                tokio::time::sleep(stall).await;
            }
        }
    }

    #[tokio::test]
    async fn settles_once_across_clones() {
        let backend = Arc::new(Counting::default());
        let h = AckHandle::new(backend.clone());
        let h2 = h.clone();
        h.ack().await.unwrap();
        assert!(h2.is_acked());
        assert_eq!(h2.ack().await.unwrap_err().kind(), ErrorKind::AlreadyAcked);
        assert_eq!(
            h2.nack(None).await.unwrap_err().kind(),
            ErrorKind::AlreadyAcked
        );
        assert_eq!(
            h2.extend(Duration::from_secs(1)).await.unwrap_err().kind(),
            ErrorKind::AlreadyAcked
        );
        assert_eq!(backend.acks.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn failed_settle_can_be_retried() {
        let backend = Arc::new(Counting::default());
        backend.fail_first.store(true, Ordering::SeqCst);
        let h = AckHandle::new(backend.clone());
        assert_eq!(h.ack().await.unwrap_err().kind(), ErrorKind::Connection);
        assert!(!h.is_settled());
        h.ack().await.unwrap();
        assert_eq!(backend.acks.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_settle_returns_the_handle_to_pending() {
        let backend = Arc::new(Counting::default());
        *backend.stall.lock().unwrap() = Some(Duration::from_secs(10));
        let h = AckHandle::new(backend.clone());
        // Cancelled mid-flight: the backend never answered.
        let cut = tokio::time::timeout(Duration::from_millis(10), h.ack()).await;
        assert!(cut.is_err(), "the ack should still have been waiting");
        assert!(
            !h.is_settled(),
            "a cancelled ack must not leave it settling"
        );
        h.ack().await.unwrap();
        assert!(h.is_acked());
        assert_eq!(backend.acks.load(Ordering::SeqCst), 1);
    }

    /// #10: the same for a nack and a release cut short: the handle goes back to
    /// pending (not "being settled concurrently" for ever), and settles once after.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_nack_or_release_returns_the_handle_to_pending() {
        for release in [false, true] {
            let backend = Arc::new(Counting::default());
            *backend.stall.lock().unwrap() = Some(Duration::from_secs(10));
            let h =
                AckHandle::with_lease(backend.clone(), Instant::now() + Duration::from_secs(60));
            let settle = |h: &AckHandle| {
                let h = h.clone();
                async move {
                    if release {
                        h.release(Some(Duration::from_secs(1))).await
                    } else {
                        h.nack(Some(Duration::from_secs(1))).await
                    }
                }
            };
            let cut = tokio::time::timeout(Duration::from_millis(10), settle(&h)).await;
            assert!(
                cut.is_err(),
                "release {release}: should still have been waiting"
            );
            assert!(!h.is_settled(), "release {release}: not left settling");
            assert!(h.is_live(), "release {release}: still ours to settle");
            settle(&h).await.unwrap();
            assert!(h.is_settled() && !h.is_acked());
            assert_eq!(h.ack().await.unwrap_err().kind(), ErrorKind::AlreadyAcked);
            let (nacks, releases) = (
                backend.nacks.load(Ordering::SeqCst),
                backend.releases.load(Ordering::SeqCst),
            );
            assert_eq!(
                (nacks, releases),
                if release { (0, 1) } else { (1, 0) },
                "one completed settle"
            );
        }
    }

    #[tokio::test]
    async fn an_ack_that_found_the_lease_gone_is_not_acked() {
        let backend = Arc::new(Counting::default());
        backend.expired.store(true, Ordering::SeqCst);
        let h = AckHandle::new(backend.clone());
        assert_eq!(h.ack().await.unwrap_err().kind(), ErrorKind::LeaseExpired);
        assert!(!h.is_acked(), "a failed ack must not read as acked");
        assert!(
            h.is_settled(),
            "nothing more can be done through this handle"
        );
        assert!(!h.is_live());
        assert_eq!(h.ack().await.unwrap_err().kind(), ErrorKind::AlreadyAcked);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_clock_follows_extends() {
        let backend = Arc::new(Counting::default());
        let start = Instant::now();
        let h = AckHandle::with_lease(backend.clone(), start + Duration::from_secs(2));
        assert!(h.is_live());
        assert_eq!(h.lease_remaining(), Some(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_secs(1)).await;
        h.extend(Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.lease_deadline(), Some(start + Duration::from_secs(6)));
        // Shortening works too, and a huge extend does not panic.
        h.extend(Duration::from_millis(100)).await.unwrap();
        assert_eq!(h.lease_remaining(), Some(Duration::from_millis(100)));
        h.extend(Duration::MAX).await.unwrap();
        assert!(h.is_live());
        h.extend(Duration::from_millis(1)).await.unwrap();
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!h.is_live(), "past its deadline a lease is not live");
        assert_eq!(h.lease_remaining(), Some(Duration::ZERO));
        let no_lease = AckHandle::new(backend);
        assert_eq!(no_lease.lease_deadline(), None);
        assert!(no_lease.is_live());
    }

    /// A delivery is shared behind an `Arc`: clones see the same message and handle,
    /// and neither `into_parts` nor `with_capabilities` on one changes another.
    #[tokio::test]
    async fn clones_share_the_delivery_and_stay_independent_values() {
        let backend = Arc::new(Counting::default());
        let meta = DeliveryMeta::new("7", 1, SystemTime::UNIX_EPOCH, "q".into());
        let d = Delivery::new(Message::new("x"), meta, AckHandle::new(backend.clone()));
        let kept = d.clone();
        let with_caps = d
            .clone()
            .with_capabilities(Arc::new(Capabilities::minimal("test")));
        assert!(
            kept.capabilities().is_none(),
            "the clone kept its own value"
        );
        assert_eq!(with_caps.capabilities().map(|c| c.backend), Some("test"));
        let (message, meta, handle) = d.into_parts();
        assert_eq!(message.payload(), kept.payload());
        assert_eq!(meta.id, kept.id());
        handle.ack().await.unwrap();
        assert!(kept.acker().is_acked() && with_caps.acker().is_acked());
        assert_eq!(backend.acks.load(Ordering::SeqCst), 1);
    }

    /// A backend that settles synchronously is not asked through its async methods,
    /// and its outcome drives the handle's state like an async one (a lost lease
    /// leaves the handle lost, a failure leaves it pending).
    #[tokio::test]
    async fn a_synchronous_settle_skips_the_async_path() {
        #[derive(Debug, Default)]
        struct SyncOnly {
            seen: std::sync::Mutex<Vec<Settle>>,
            answer: std::sync::Mutex<Option<ErrorKind>>,
        }
        #[async_trait]
        impl Ack for Arc<SyncOnly> {
            async fn ack(&self) -> Result<()> {
                Err(Error::new(ErrorKind::Backend, "async ack called"))
            }
            async fn nack(&self, _: Option<Duration>) -> Result<()> {
                Err(Error::new(ErrorKind::Backend, "async nack called"))
            }
            async fn extend(&self, _: Duration) -> Result<()> {
                Err(Error::new(ErrorKind::Backend, "async extend called"))
            }
            fn settle_now(&self, op: Settle) -> Option<Result<()>> {
                self.seen.lock().unwrap().push(op);
                Some(match *self.answer.lock().unwrap() {
                    Some(kind) => Err(Error::new(kind, "told to fail")),
                    None => Ok(()),
                })
            }
        }
        let backend = Arc::new(SyncOnly::default());
        let h = AckHandle::with_lease(backend.clone(), Instant::now() + Duration::from_secs(9));
        h.extend(Duration::from_secs(1)).await.unwrap();
        *backend.answer.lock().unwrap() = Some(ErrorKind::Connection);
        assert_eq!(
            h.nack(None).await.unwrap_err().kind(),
            ErrorKind::Connection
        );
        assert!(!h.is_settled(), "a failed settle leaves it pending");
        *backend.answer.lock().unwrap() = None;
        h.release(Some(Duration::from_secs(2))).await.unwrap();
        assert!(h.is_settled() && !h.is_acked());
        assert_eq!(h.ack().await.unwrap_err().kind(), ErrorKind::AlreadyAcked);
        assert_eq!(
            *backend.seen.lock().unwrap(),
            [
                Settle::Extend(Duration::from_secs(1)),
                Settle::Nack(None),
                Settle::Release(Some(Duration::from_secs(2)))
            ]
        );
        let lost = AckHandle::new(backend.clone());
        *backend.answer.lock().unwrap() = Some(ErrorKind::LeaseExpired);
        assert_eq!(
            lost.ack().await.unwrap_err().kind(),
            ErrorKind::LeaseExpired
        );
        assert!(lost.is_settled() && !lost.is_acked() && !lost.is_live());
    }

    /// A fresh handle takes the delivery into its own allocation; one shared before
    /// `Delivery::new` (or still holding another delivery) keeps them apart, and
    /// either way the delivery, its clones and the handle's clones settle once.
    #[tokio::test]
    async fn a_delivery_lives_in_its_handle_unless_the_handle_was_shared() {
        let backend = Arc::new(Counting::default());
        let meta = || DeliveryMeta::new("9", 2, SystemTime::UNIX_EPOCH, "q".into());
        let joined = Delivery::new(Message::new("a"), meta(), AckHandle::new(backend.clone()))
            .with_capabilities(Arc::new(Capabilities::minimal("test")));
        assert!(joined.split.is_none(), "one allocation");
        assert_eq!(
            (joined.payload().as_ref(), joined.id(), joined.attempt()),
            (&b"a"[..], "9", 2)
        );
        assert_eq!(joined.capabilities().map(|c| c.backend), Some("test"));

        let early = AckHandle::new(backend.clone());
        let split = Delivery::new(Message::new("b"), meta(), early.clone());
        assert!(split.split.is_some());
        assert_eq!(split.payload().as_ref(), b"b");
        early.ack().await.unwrap();
        assert!(split.acker().is_acked(), "the same handle");
        assert_eq!(
            split.ack().await.unwrap_err().kind(),
            ErrorKind::AlreadyAcked
        );

        // Taken apart and put together again (what the retry tests do): the handle
        // gives its message back when nothing else holds it, and takes the new one.
        let (message, mut meta2, handle) = joined.into_parts();
        assert_eq!(message.payload().as_ref(), b"a");
        assert!(handle.shared.inner.is_none(), "moved out, not copied");
        meta2.attempt = 5;
        let again = Delivery::new(Message::new("c"), meta2, handle);
        assert!(again.split.is_none());
        assert_eq!((again.payload().as_ref(), again.attempt()), (&b"c"[..], 5));
        // A handle still holding a delivery (a clone kept it) does not take another.
        let kept = again.acker().clone();
        let (_, meta3, handle) = again.into_parts();
        assert!(kept.shared.inner.is_some());
        let other = Delivery::new(Message::new("d"), meta3, handle);
        assert!(other.split.is_some());
        assert_eq!(other.payload().as_ref(), b"d");
        other.ack().await.unwrap();
        assert!(kept.is_acked());
        assert_eq!(backend.acks.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn release_defaults_to_nack_and_settles_once() {
        /// A backend with no release of its own.
        #[derive(Debug)]
        struct NackOnly(Arc<Counting>);
        #[async_trait]
        impl Ack for NackOnly {
            async fn ack(&self) -> Result<()> {
                self.0.ack().await
            }
            async fn nack(&self, after: Option<Duration>) -> Result<()> {
                self.0.nack(after).await
            }
            async fn extend(&self, by: Duration) -> Result<()> {
                self.0.extend(by).await
            }
        }
        let backend = Arc::new(Counting::default());
        let h = AckHandle::new(NackOnly(backend.clone()));
        h.release(None).await.unwrap();
        assert!(h.is_settled() && !h.is_acked());
        assert_eq!(
            backend.nacks.load(Ordering::SeqCst),
            1,
            "released by a nack"
        );
        assert_eq!(
            h.nack(None).await.unwrap_err().kind(),
            ErrorKind::AlreadyAcked
        );
    }
}
