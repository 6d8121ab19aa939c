use std::time::Duration;

use tower::Layer;

use super::ExtendVisibility;
use crate::capabilities::Capabilities;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Heartbeat {
    pub(super) timeout: Duration,
    pub(super) every: Duration,
}

/// Layer producing [`ExtendVisibility`].
///
/// ```
/// use std::time::Duration;
/// use ferrymq_core::memory::MemoryConfig;
/// use ferrymq_core::middleware::ExtendVisibilityLayer;
/// use ferrymq_core::Consumer;
///
/// let consumer = MemoryConfig::new("extend-doc").consumer()?;
/// // Extends by the queue's visibility timeout every third of it.
/// let layer = ExtendVisibilityLayer::from_capabilities(consumer.capabilities());
/// assert!(layer.is_enabled());
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ExtendVisibilityLayer {
    heartbeat: Option<Heartbeat>,
}

impl ExtendVisibilityLayer {
    /// Extend by `timeout` every third of it.
    pub fn new(timeout: Duration) -> Self {
        ExtendVisibilityLayer {
            heartbeat: (!timeout.is_zero()).then_some(Heartbeat {
                timeout,
                every: timeout / 3,
            }),
        }
    }

    /// From a backend's capabilities: its visibility timeout when it can extend it,
    /// otherwise disabled.
    pub fn from_capabilities(capabilities: &Capabilities) -> Self {
        match capabilities.visibility_timeout {
            Some(timeout) if capabilities.extend_visibility => ExtendVisibilityLayer::new(timeout),
            _ => ExtendVisibilityLayer::disabled(),
        }
    }

    /// A layer that does nothing.
    pub fn disabled() -> Self {
        ExtendVisibilityLayer { heartbeat: None }
    }

    /// Beat every `fraction` of the timeout (clamped to 0.05..=0.9; default 1/3). Lower
    /// is safer against a slow extend call, higher costs fewer calls.
    pub fn fraction(mut self, fraction: f64) -> Self {
        if let Some(h) = &mut self.heartbeat {
            let f = if fraction.is_finite() {
                fraction.clamp(0.05, 0.9)
            } else {
                1.0 / 3.0
            };
            h.every = h.timeout.mul_f64(f);
        }
        self
    }

    /// Whether a heartbeat will run.
    pub fn is_enabled(&self) -> bool {
        self.heartbeat.is_some()
    }
}

impl<S> Layer<S> for ExtendVisibilityLayer {
    type Service = ExtendVisibility<S>;
    fn layer(&self, inner: S) -> ExtendVisibility<S> {
        ExtendVisibility::from_parts(inner, self.heartbeat)
    }
}
