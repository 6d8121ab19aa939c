//! A received message, its metadata, and the handle that settles it.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::message::{Headers, Message};

/// Settles one delivery on its backend. Backends implement this; users call the
/// methods on [`Delivery`] or [`AckHandle`], which add the once-only bookkeeping.
#[async_trait]
pub trait Ack: Send + Sync + fmt::Debug {
    /// The message was handled: remove it for good.
    async fn ack(&self) -> Result<()>;
    /// The message was not handled: deliver it again, no sooner than `redeliver_after`
    /// (immediately when `None`).
    async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()>;
    /// Keep the lease: do not redeliver for another `by`, counted from now.
    async fn extend(&self, by: Duration) -> Result<()>;
}

const PENDING: u8 = 0;
const SETTLING: u8 = 1;
const ACKED: u8 = 2;
const NACKED: u8 = 3;

/// State and backend in one allocation: the backend is the unsized last field.
struct AckShared<A: ?Sized> {
    state: AtomicU8,
    backend: A,
}

/// Cheap-to-clone, `Send + Sync` handle that settles a delivery exactly once.
///
/// Clones share state: once any clone acks or nacks, every other settle call returns
/// [`ErrorKind::AlreadyAcked`]. That lets a heartbeat task extend the lease while the
/// handler owns the payload. A failed settle (network error) leaves the delivery
/// pending so it can be retried.
#[derive(Clone)]
pub struct AckHandle {
    shared: Arc<AckShared<dyn Ack>>,
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("backend", &self.shared.backend)
            .field("state", &self.state_name())
            .finish()
    }
}

impl AckHandle {
    /// Wrap a backend's settle implementation.
    pub fn new(backend: impl Ack + 'static) -> Self {
        AckHandle {
            shared: Arc::new(AckShared {
                state: AtomicU8::new(PENDING),
                backend,
            }),
        }
    }

    fn state_name(&self) -> &'static str {
        match self.shared.state.load(Ordering::Acquire) {
            PENDING => "pending",
            SETTLING => "settling",
            ACKED => "acked",
            _ => "nacked",
        }
    }

    /// Whether the delivery was acked or nacked (successfully) through any clone.
    pub fn is_settled(&self) -> bool {
        matches!(self.shared.state.load(Ordering::Acquire), ACKED | NACKED)
    }

    /// Whether the delivery was acked through any clone.
    pub fn is_acked(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) == ACKED
    }

    fn begin(&self) -> Result<()> {
        self.shared
            .state
            .compare_exchange(PENDING, SETTLING, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(|state| {
                let what = if state == SETTLING {
                    "being settled concurrently"
                } else {
                    "already settled"
                };
                Error::new(ErrorKind::AlreadyAcked, format!("delivery is {what}"))
            })
    }

    fn finish(&self, outcome: &Result<()>, done: u8) {
        let next = match outcome {
            Ok(()) => done,
            // A lease that is gone cannot be settled by anyone through this handle.
            Err(e) if e.kind() == ErrorKind::LeaseExpired => done,
            Err(_) => PENDING,
        };
        self.shared.state.store(next, Ordering::Release);
    }

    /// Remove the message for good. A second settle returns `AlreadyAcked`.
    pub async fn ack(&self) -> Result<()> {
        self.begin()?;
        let outcome = self.shared.backend.ack().await;
        self.finish(&outcome, ACKED);
        outcome
    }

    /// Redeliver no sooner than `redeliver_after` (now when `None`).
    pub async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.begin()?;
        let outcome = self.shared.backend.nack(redeliver_after).await;
        self.finish(&outcome, NACKED);
        outcome
    }

    /// Push the redelivery deadline to `by` from now. Only while not yet settled.
    pub async fn extend(&self, by: Duration) -> Result<()> {
        match self.shared.state.load(Ordering::Acquire) {
            PENDING | SETTLING => self.shared.backend.extend(by).await,
            _ => Err(Error::new(
                ErrorKind::AlreadyAcked,
                "cannot extend a settled delivery",
            )),
        }
    }
}

/// Where and when a delivery came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryMeta {
    /// The backend's id of the message (SQS MessageId, Redis stream entry id, ...).
    pub id: String,
    /// 1 on first delivery, +1 on each redelivery.
    pub attempt: u32,
    /// When the message was first enqueued.
    pub enqueued_at: SystemTime,
    /// The queue (or topic) it was received from.
    pub queue: Arc<str>,
    /// Backend position such as `partition/offset`, where the backend has one.
    pub position: Option<String>,
}

impl DeliveryMeta {
    /// Metadata with the required fields; `position` empty.
    pub fn new(
        id: impl Into<String>,
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
    pub fn with_position(mut self, position: impl Into<String>) -> Self {
        self.position = Some(position.into());
        self
    }
}

/// A received message with its metadata and ack handle.
///
/// Settle it with [`ack`](Delivery::ack) or [`nack`](Delivery::nack). Dropping it
/// without either loses nothing: the backend redelivers it after the visibility
/// timeout. Cloning is cheap and clones share the ack handle.
#[derive(Debug, Clone)]
pub struct Delivery {
    message: Message,
    meta: DeliveryMeta,
    acker: AckHandle,
}

impl Delivery {
    /// Assemble a delivery (used by backends).
    pub fn new(message: Message, meta: DeliveryMeta, acker: AckHandle) -> Self {
        Delivery {
            message,
            meta,
            acker,
        }
    }

    /// The message as sent (delay cleared).
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        self.message.payload()
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        self.message.headers()
    }

    /// The ordering key.
    pub fn key(&self) -> Option<&str> {
        self.message.get_key()
    }

    /// Metadata: id, attempt, enqueue time, queue, position.
    pub fn meta(&self) -> &DeliveryMeta {
        &self.meta
    }

    /// The backend message id.
    pub fn id(&self) -> &str {
        &self.meta.id
    }

    /// 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.meta.attempt
    }

    /// The ack handle, to settle or extend from another task.
    pub fn acker(&self) -> &AckHandle {
        &self.acker
    }

    /// Decode the payload as JSON into `T`; a payload that does not fit is
    /// [`ErrorKind::Decode`].
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        self.message.decode_json()
    }

    /// Acknowledge: the message is removed for good.
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await
    }

    /// Negative-acknowledge: redeliver no sooner than `redeliver_after`.
    pub async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.acker.nack(redeliver_after).await
    }

    /// Extend the lease by `by` from now.
    pub async fn extend(&self, by: Duration) -> Result<()> {
        self.acker.extend(by).await
    }

    /// Split into the message, metadata and handle.
    pub fn into_parts(self) -> (Message, DeliveryMeta, AckHandle) {
        (self.message, self.meta, self.acker)
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
    }

    #[async_trait]
    impl Ack for Arc<Counting> {
        async fn ack(&self) -> Result<()> {
            if self.fail_first.swap(false, Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Connection, "flaky"));
            }
            self.acks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn nack(&self, _: Option<Duration>) -> Result<()> {
            Ok(())
        }
        async fn extend(&self, _: Duration) -> Result<()> {
            Ok(())
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
}
