//! Keep a delivery's lease while its handler runs.
//!
//! A handler that runs longer than the visibility timeout would see its message
//! delivered again, to someone else, mid-processing. [`ExtendVisibility`] keeps a
//! heartbeat beside the handler that extends the lease by the full timeout every
//! fraction of it (a third by default), and stops it as soon as the handler returns —
//! with success, an error, or a panic (the lease is unregistered by a drop guard).
//! One driver task beats every lease of a service and its clones, so a handler that
//! finishes before its first beat costs a slab insert and removal, not a task.
//! Built [from capabilities](ExtendVisibilityLayer::from_capabilities), it is a no-op
//! on backends without visibility extension (Kafka).

mod heartbeat;
mod layer;
mod service;

pub use layer::ExtendVisibilityLayer;
pub use service::{ExtendVisibility, ExtendVisibilityFuture};

#[cfg(test)]
mod tests;
