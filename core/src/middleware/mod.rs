//! Reliability patterns written once, over the traits, so they behave the same on every
//! backend.
//!
//! # Consumer side: tower layers around a handler
//!
//! A handler is a [`tower::Service`] over a [`Delivery`](crate::Delivery) with
//! `Response = ()` and `Error = BoxError`. Returning `Ok(())` means "handled": the
//! [`Worker`](crate::worker::Worker) acks it. Returning an error means "not handled":
//! the middleware below decide what happens next (retry later, dead-letter), and the
//! worker nacks whatever is still unsettled. Because the middleware are plain tower
//! [`Layer`](tower::Layer)s, tower's own `Timeout`, `ConcurrencyLimit` and `RateLimit`
//! compose with them instead of being rewritten.
//!
//! | layer | what it does |
//! |---|---|
//! | [`ExtendVisibilityLayer`] | heartbeat that keeps the lease while the handler runs |
//! | [`DedupLayer`] | claim a key before handling; ack duplicates without calling the handler |
//! | [`RetryToDlqLayer`] | nack with exponential backoff + jitter; dead-letter on the last attempt or a [`Permanent`] error |
//! | [`CatchPanicLayer`] | a panicking handler becomes an error the layers above can retry |
//!
//! The recommended order, outermost first, is the one above:
//!
//! ```
//! use std::time::Duration;
//! use ferrymq_core::memory::MemoryConfig;
//! use ferrymq_core::middleware::{
//!     handler_fn, CatchPanicLayer, DedupLayer, ExtendVisibilityLayer, MemoryDedupStore,
//!     RetryToDlqLayer,
//! };
//! use ferrymq_core::{BoxError, Consumer, Delivery};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let (_, consumer) = MemoryConfig::new("mw-doc-orders").connect()?;
//! let dlq = MemoryConfig::new("mw-doc-orders-dlq").producer()?;
//!
//! let service = ServiceBuilder::new()
//!     .layer(ExtendVisibilityLayer::from_capabilities(consumer.capabilities()))
//!     .layer(DedupLayer::new(MemoryDedupStore::new(Duration::from_secs(3600))))
//!     .layer(RetryToDlqLayer::new(dlq).max_attempts(5))
//!     .layer(CatchPanicLayer::new())
//!     .timeout(Duration::from_secs(30))
//!     .service(handler_fn(|delivery: Delivery| async move {
//!         println!("got {:?}", delivery.payload());
//!         Ok::<_, BoxError>(())
//!     }));
//! # let _ = service;
//! # Ok(())
//! # }
//! ```
//!
//! Each consumer-side layer reports what it did (retried, dead-lettered,
//! deduplicated...) through [`outcome::record`], which the worker turns into its
//! summary, its metrics and its lifecycle events.
//!
//! # Producer side: wrappers around a `Producer`
//!
//! [`Backpressure`] refuses (or waits) when the target queue's depth passes a bound;
//! [`Batching`] collects sends for a linger time and ships them with
//! [`Producer::send_batch`](crate::Producer::send_batch). Both are `Producer`s
//! themselves, and both have a `Layer` for use with `tower::ServiceBuilder`-style
//! composition.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backpressure;
pub mod batching;
pub mod catch_panic;
pub mod dedup;
mod error;
pub mod extend;
mod handler;
mod json;
pub mod outcome;
pub mod retry;
#[cfg(test)]
pub(crate) mod testing;

pub use backpressure::{Backpressure, BackpressureLayer, Overflow};
pub use batching::{Batching, BatchingLayer};
pub use catch_panic::{CatchPanic, CatchPanicLayer};
pub use dedup::{Claim, Dedup, DedupLayer, DedupStore, MemoryDedupStore};
pub use error::{is_permanent, permanent, HandlerPanicked, Permanent};
pub use extend::{ExtendVisibility, ExtendVisibilityLayer};
pub use handler::{handler_fn, HandlerFn};
pub use json::{json_handler, Json, JsonLayer};
pub use outcome::Outcome;
pub use retry::{Backoff, RetryToDlq, RetryToDlqLayer};

/// The future type of the middleware whose logic is naturally `async` (store calls,
/// DLQ publish): boxed, `Send`, `'static`.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;
