//! Helpers shared by the middleware and worker tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::memory::MemoryConfig;
use crate::{Ack, AckHandle, Capabilities, Delivery, DeliveryMeta, Message, Result};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh, uniquely named memory queue.
pub(crate) fn queue(prefix: &str) -> MemoryConfig {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    MemoryConfig::new(format!("{prefix}-{n}"))
}

/// Counts settle calls; used where a test needs deliveries outside any queue.
#[derive(Debug, Default)]
pub(crate) struct CountingAck {
    pub(crate) acks: AtomicUsize,
    pub(crate) nacks: AtomicUsize,
    pub(crate) extends: AtomicUsize,
    /// The delay of every nack (and release, which defaults to a nack), in order.
    pub(crate) nack_delays: std::sync::Mutex<Vec<Option<Duration>>>,
}

impl CountingAck {
    pub(crate) fn nack_delays(&self) -> Vec<Option<Duration>> {
        self.nack_delays.lock().unwrap().clone()
    }
}

#[async_trait]
impl Ack for Arc<CountingAck> {
    async fn ack(&self) -> Result<()> {
        self.acks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn nack(&self, after: Option<Duration>) -> Result<()> {
        self.nacks.fetch_add(1, Ordering::SeqCst);
        self.nack_delays.lock().unwrap().push(after);
        Ok(())
    }
    async fn extend(&self, _: Duration) -> Result<()> {
        self.extends.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A delivery of `message` from queue `q` with a counting ack handle.
pub(crate) fn loose_delivery(
    message: Message,
    id: &str,
    attempt: u32,
) -> (Delivery, Arc<CountingAck>) {
    let counts = Arc::new(CountingAck::default());
    let meta = DeliveryMeta::new(id, attempt, SystemTime::now(), "loose".into());
    (
        Delivery::new(message, meta, AckHandle::new(counts.clone())),
        counts,
    )
}

/// [`loose_delivery`] from a backend that says it can do `caps`.
pub(crate) fn loose_delivery_with(
    message: Message,
    id: &str,
    attempt: u32,
    caps: Capabilities,
) -> (Delivery, Arc<CountingAck>) {
    let (d, counts) = loose_delivery(message, id, attempt);
    (d.with_capabilities(Arc::new(caps)), counts)
}
