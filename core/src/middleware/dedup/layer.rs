use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::{Dedup, DedupStore, KeyStrategy};

#[derive(Debug, Clone)]
pub(super) struct DedupConfig {
    pub(super) store: Arc<dyn DedupStore>,
    pub(super) claim_ttl: Duration,
    pub(super) retry_in_progress_after: Duration,
    pub(super) namespace: Option<String>,
    pub(super) key_strategy: KeyStrategy,
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
    /// retried after 1 second; keys are namespaced by the delivery's queue; a
    /// message is known by its dedup id, else by its backend message id
    /// ([`KeyStrategy::MessageId`]).
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
                key_strategy: KeyStrategy::default(),
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
    ///
    /// The delivery is [released](crate::Delivery::release): on a backend where that
    /// keeps the attempt count ([`Capabilities::release_keeps_attempt`](crate::Capabilities::release_keeps_attempt))
    /// the pause stays this short. Where a release spends an attempt, the pause
    /// doubles with each attempt (up to the claim TTL), so that a claim left behind by
    /// a crashed consumer costs a handful of attempts before it expires, not one per
    /// pause.
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

impl DedupLayer {
    /// How a message without a dedup id is recognised; see [`KeyStrategy`].
    pub fn key_strategy(mut self, strategy: KeyStrategy) -> Self {
        Arc::make_mut(&mut self.config).key_strategy = strategy;
        self
    }

    /// `true`: a message without a dedup id is keyed by the SHA-256 of its payload,
    /// ordering key and headers ([`KeyStrategy::ContentHash`]), so a re-send of the
    /// same content is dropped too — and so is **any other message with the same
    /// bytes** (two orders with identical payloads are taken as one). Only for
    /// messages whose content identifies them. `false`: back to the default,
    /// [`KeyStrategy::MessageId`].
    pub fn content_hash(self, enabled: bool) -> Self {
        self.key_strategy(if enabled {
            KeyStrategy::ContentHash
        } else {
            KeyStrategy::MessageId
        })
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;
    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup::from_parts(inner, self.config.clone())
    }
}
