//! Turn handler panics into errors.
//!
//! A panic in a handler must never take down the worker, and it should be treated like
//! any other failure: retried with backoff, then dead-lettered. Placed inside
//! [`RetryToDlq`](super::RetryToDlq), this layer makes that happen. (The worker also
//! catches panics as a last resort, but then only nacks.)

mod future;
mod layer;
mod service;

pub use future::CatchPanicFuture;
pub use layer::CatchPanicLayer;
pub use service::CatchPanic;

#[cfg(test)]
mod tests;
