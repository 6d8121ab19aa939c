use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::{Dedup, DedupStore};

#[derive(Debug, Clone)]
pub(super) struct DedupConfig {
    pub(super) store: Arc<dyn DedupStore>,
    pub(super) claim_ttl: Duration,
    pub(super) retry_in_progress_after: Duration,
    pub(super) namespace: Option<String>,
}

/// Layer producing [`Dedup`].
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::middleware::{DedupLayer, MemoryDedupStore};
///
/// let layer = DedupLayer::new(MemoryDedupStore::new(Duration::from_secs(3600)))
///     .claim_ttl(Duration::from_secs(120))
///     .retry_in_progress_after(Duration::from_secs(2));
/// # let _ = layer;
/// ```
#[derive(Debug, Clone)]
pub struct DedupLayer {
    config: Arc<DedupConfig>,
}

impl DedupLayer {
    /// Dedup through `store`. Claims last 5 minutes; a key in progress elsewhere is
    /// retried after 1 second; keys are namespaced by the delivery's queue.
    pub fn new(store: impl DedupStore + 'static) -> Self {
        DedupLayer::from_arc(Arc::new(store))
    }

    /// Dedup through a shared store.
    pub fn from_arc(store: Arc<dyn DedupStore>) -> Self {
        DedupLayer {
            config: Arc::new(DedupConfig {
                store,
                claim_ttl: Duration::from_secs(300),
                retry_in_progress_after: Duration::from_secs(1),
                namespace: None,
            }),
        }
    }

    /// How long a claim holds before another consumer may take the key over. Must
    /// exceed the longest handler run (including its retries within one delivery):
    /// an expired claim lets a concurrent duplicate through. A consumer that crashed
    /// blocks the key for at most this long.
    pub fn claim_ttl(mut self, ttl: Duration) -> Self {
        Arc::make_mut(&mut self.config).claim_ttl = ttl;
        self
    }

    /// Redelivery delay for a message whose key another consumer is handling.
    pub fn retry_in_progress_after(mut self, delay: Duration) -> Self {
        Arc::make_mut(&mut self.config).retry_in_progress_after = delay;
        self
    }

    /// Use this namespace for keys instead of the delivery's queue name (to dedup
    /// across queues, or to keep two handlers of one queue apart).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config).namespace = Some(namespace.into());
        self
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;
    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup::from_parts(inner, self.config.clone())
    }
}
