//! Helpers shared by the middleware and worker tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::memory::MemoryConfig;
use crate::{Ack, AckHandle, Delivery, DeliveryMeta, Message, Result};

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
}

#[async_trait]
impl Ack for Arc<CountingAck> {
    async fn ack(&self) -> Result<()> {
        self.acks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn nack(&self, _: Option<Duration>) -> Result<()> {
        self.nacks.fetch_add(1, Ordering::SeqCst);
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
