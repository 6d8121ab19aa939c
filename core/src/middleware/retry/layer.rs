use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tower::Layer;

use super::failures::Failures;
use super::{Backoff, RetryToDlq};
use crate::producer::Producer;

pub(super) struct RetryConfig {
    pub(super) dlq: Arc<dyn Producer>,
    pub(super) max_attempts: u32,
    pub(super) backoff: Backoff,
    pub(super) failures: Failures,
    pub(super) now: fn() -> SystemTime,
    /// The clamp to the broker's own dead-letter threshold was logged.
    pub(super) warned_native_limit: AtomicBool,
}

impl std::fmt::Debug for RetryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryConfig")
            .field("dlq", &self.dlq.queue())
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// Layer producing [`RetryToDlq`]; see the [module docs](super).
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::memory::MemoryConfig;
/// use ferrymq_core::middleware::{Backoff, RetryToDlqLayer};
///
/// let dlq = MemoryConfig::new("retry-doc-dlq").producer()?;
/// let layer = RetryToDlqLayer::new(dlq)
///     .max_attempts(3)
///     .backoff(Backoff::new(Duration::from_millis(500)).max(Duration::from_secs(60)));
/// # let _ = layer;
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Clone)]
pub struct RetryToDlqLayer {
    dlq: Arc<dyn Producer>,
    max_attempts: u32,
    backoff: Backoff,
    memory: usize,
}

impl std::fmt::Debug for RetryToDlqLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryToDlqLayer")
            .field("dlq", &self.dlq.queue())
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl RetryToDlqLayer {
    /// Dead-letter to `dlq`, after 5 attempts, with the default [`Backoff`].
    pub fn new(dlq: impl Producer + 'static) -> Self {
        RetryToDlqLayer::from_arc(Arc::new(dlq))
    }

    /// Dead-letter to a shared producer.
    pub fn from_arc(dlq: Arc<dyn Producer>) -> Self {
        RetryToDlqLayer {
            dlq,
            max_attempts: 5,
            backoff: Backoff::default(),
            memory: 10_000,
        }
    }

    /// Attempts before dead-lettering (at least 1; 1 means never retry).
    ///
    /// On a backend that dead-letters by itself after `n` deliveries
    /// ([`Capabilities::native_dead_letter_after`](crate::Capabilities::native_dead_letter_after)),
    /// a larger value is lowered to `n` (with a warning, once): the middleware must
    /// decide before the broker moves the message without its headers.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Delay before each retry, capped at the backend's
    /// [`max_nack_delay`](crate::Capabilities::max_nack_delay); on a backend that
    /// cannot delay a nack at all, retries are redelivered at once (and the attempts
    /// are still bounded by `max_attempts`, counted in this process if the backend
    /// does not count them).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How many failing messages this process remembers the first failure of
    /// (default 10 000; each is forgotten after 24 h at the latest).
    pub fn failure_memory(mut self, messages: usize) -> Self {
        self.memory = messages;
        self
    }

    fn config(&self) -> RetryConfig {
        RetryConfig {
            dlq: self.dlq.clone(),
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            failures: Failures::new(self.memory, Duration::from_secs(24 * 3600)),
            now: SystemTime::now,
            warned_native_limit: AtomicBool::new(false),
        }
    }

    #[cfg(test)]
    pub(super) fn layer_with_clock<S>(&self, inner: S, now: fn() -> SystemTime) -> RetryToDlq<S> {
        let mut config = self.config();
        config.now = now;
        RetryToDlq::from_parts(inner, Arc::new(config))
    }
}

impl<S> Layer<S> for RetryToDlqLayer {
    type Service = RetryToDlq<S>;

    /// Each call makes a service with its own failure table; clones of that service
    /// share it.
    fn layer(&self, inner: S) -> RetryToDlq<S> {
        RetryToDlq::from_parts(inner, Arc::new(self.config()))
    }
}
