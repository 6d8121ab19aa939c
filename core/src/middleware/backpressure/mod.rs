//! Refuse (or wait) when the target queue is backed up.
//!
//! A producer that outruns its consumers grows the queue without limit. [`Backpressure`]
//! wraps a [`Producer`](crate::Producer) and checks the queue's depth
//! ([`Depth::total`](crate::Depth::total): waiting + in flight + delayed) before each
//! send. Depth calls cost a round trip, so the value is cached and refreshed at an
//! interval; sends made since the last refresh are added to it, so a burst between
//! refreshes cannot overshoot the bound. Past the bound it either refuses with
//! [`ErrorKind::QueueFull`](crate::ErrorKind::QueueFull) or waits for room, per
//! [`Overflow`].

mod layer;
mod producer;

pub use layer::{BackpressureLayer, Overflow};
pub use producer::Backpressure;

#[cfg(test)]
mod tests;
