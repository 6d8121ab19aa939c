use std::time::Duration;

use tower::Layer;

use super::Backpressure;

/// What to do when the queue is past its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Fail the send at once with `QueueFull`.
    Reject,
    /// Wait, re-reading the depth every refresh interval, until there is room; fail
    /// with `QueueFull` after `max_wait` (never, when `None`).
    Wait {
        /// Give up after this long.
        max_wait: Option<Duration>,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    pub(super) max_depth: u64,
    pub(super) refresh: Duration,
    pub(super) overflow: Overflow,
}

/// Layer producing [`Backpressure`] around a producer.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::memory::MemoryConfig;
/// use ferrymq_core::middleware::{BackpressureLayer, Overflow};
/// use tower::Layer;
///
/// let producer = BackpressureLayer::new(10_000)
///     .refresh(Duration::from_millis(500))
///     .overflow(Overflow::Wait { max_wait: Some(Duration::from_secs(5)) })
///     .layer(MemoryConfig::new("bp-doc").producer()?);
/// # let _ = producer;
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BackpressureLayer {
    config: Config,
}

impl BackpressureLayer {
    /// Refuse sends while the queue holds `max_depth` or more messages; depth cached
    /// for one second.
    pub fn new(max_depth: u64) -> Self {
        BackpressureLayer {
            config: Config {
                max_depth,
                refresh: Duration::from_secs(1),
                overflow: Overflow::Reject,
            },
        }
    }

    /// How long a depth reading is trusted.
    pub fn refresh(mut self, refresh: Duration) -> Self {
        self.config.refresh = refresh;
        self
    }

    /// Refuse or wait.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.config.overflow = overflow;
        self
    }
}

impl<P> Layer<P> for BackpressureLayer {
    type Service = Backpressure<P>;
    fn layer(&self, inner: P) -> Backpressure<P> {
        Backpressure::from_config(inner, self.config)
    }
}
