//! Keep a delivery's lease while its handler runs.
//!
//! A handler that runs longer than the visibility timeout would see its message
//! delivered again, to someone else, mid-processing. [`ExtendVisibility`] starts a
//! heartbeat beside the handler that extends the lease by the full timeout every
//! fraction of it (a third by default), and stops it as soon as the handler returns —
//! with success, an error, or a panic (the heartbeat is aborted by a drop guard).
//! Built [from capabilities](ExtendVisibilityLayer::from_capabilities), it is a no-op
//! on backends without visibility extension (Kafka).

mod heartbeat;
mod layer;
mod service;

pub use layer::ExtendVisibilityLayer;
pub use service::ExtendVisibility;

#[cfg(test)]
mod tests;
