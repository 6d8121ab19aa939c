use std::time::Duration;

use tower::Layer;

use super::Batching;
use crate::producer::Producer;

#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    pub(super) max_size: Option<usize>,
    pub(super) linger: Duration,
}

/// Layer producing [`Batching`] around a producer.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::memory::MemoryConfig;
/// use ferrymq_core::middleware::BatchingLayer;
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ferrymq_core::Result<()> {
/// let producer = BatchingLayer::new()
///     .linger(Duration::from_millis(10))
///     .max_size(10)
///     .layer(MemoryConfig::new("batching-doc").producer()?);
/// # let _ = producer;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct BatchingLayer {
    config: Config,
}

impl BatchingLayer {
    /// Batches of the backend's native maximum, lingering 5 ms.
    pub fn new() -> Self {
        BatchingLayer {
            config: Config {
                max_size: None,
                linger: Duration::from_millis(5),
            },
        }
    }

    /// At most `n` messages per batch (further capped by the backend's `max_batch`).
    pub fn max_size(mut self, n: usize) -> Self {
        self.config.max_size = Some(n.max(1));
        self
    }

    /// How long the first message of a batch waits for company.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.config.linger = linger;
        self
    }
}

impl Default for BatchingLayer {
    fn default() -> Self {
        BatchingLayer::new()
    }
}

impl<P: Producer + 'static> Layer<P> for BatchingLayer {
    type Service = Batching<P>;

    /// Spawns the batching task: call from inside a Tokio runtime.
    fn layer(&self, inner: P) -> Batching<P> {
        Batching::from_config(inner, self.config)
    }
}
