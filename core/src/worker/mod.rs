//! The worker runtime: pull from a [`Consumer`](crate::Consumer), drive a handler
//! service, settle what it leaves unsettled, and shut down without losing anything.
//!
//! ```
//! use std::time::Duration;
//! use ferrymq_core::memory::MemoryConfig;
//! use ferrymq_core::middleware::handler_fn;
//! use ferrymq_core::worker::Worker;
//! use ferrymq_core::{BoxError, Delivery, Message, Producer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let (producer, consumer) = MemoryConfig::new("worker-doc").connect()?;
//! producer.send(Message::new("hello")).await?;
//!
//! let summary = Worker::new(consumer)
//!     .concurrency(4)
//!     .run_until(
//!         handler_fn(|d: Delivery| async move {
//!             println!("{:?}", d.payload());
//!             Ok::<_, BoxError>(())
//!         }),
//!         tokio::time::sleep(Duration::from_millis(100)),
//!     )
//!     .await?;
//! assert_eq!(summary.succeeded, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # What it guarantees
//!
//! - **Bounded memory**: at most `concurrency` handlers run, and the deliveries held
//!   (waiting to start, running, or being acked/nacked after their handler finished)
//!   never exceed `concurrency + prefetch`; nothing is received beyond that. Receives
//!   come in batches, once the prefetched buffer has drained to half.
//! - **Acks off the handler slot**: a handler's slot frees when it returns; the
//!   worker's ack or nack is started in that same poll (an in-process backend answers
//!   at once, and nothing more is scheduled for the delivery) and otherwise runs
//!   alongside the next handlers (so a networked backend can batch them); graceful
//!   shutdown waits for every one of them.
//! - **Settling**: a handler returning `Ok` with its delivery unsettled gets it acked;
//!   an `Err` gets it nacked (after `nack_delay`). Middleware that settle themselves
//!   ([`RetryToDlq`](crate::middleware::RetryToDlq), [`Dedup`](crate::middleware::Dedup))
//!   are left alone.
//! - **Panics** in a handler are caught; they fail that delivery, never the worker.
//! - **No task per delivery**: the worker polls its running handlers itself (a
//!   `FuturesUnordered` bounded by `concurrency`), so a delivery costs no spawn or
//!   join. Handlers that await overlap as before; synchronous CPU work in one handler
//!   delays the others of that worker. For CPU-heavy handlers set
//!   [`Worker::handler_tasks`] (a tokio task each, spread over the runtime's threads)
//!   or move the work to `spawn_blocking`.
//! - **Per-key order** (opt-in): deliveries with the same key run one at a time in
//!   receive order; different keys run in parallel. A delivery whose key is busy waits
//!   in its key's own queue, so picking the next one to start costs the same whatever
//!   the prefetch holds for busy keys.
//! - **Graceful shutdown**: when the shutdown future completes, receiving stops (the
//!   consumer is closed), deliveries received but not started are
//!   [released](crate::Delivery::release) all at once, running handlers get until the
//!   shutdown timeout to finish (then are cancelled and released), registered
//!   producers are flushed, and a [`WorkerSummary`] is returned.
//! - **Bounded shutdown**: all of that happens within the shutdown timeout, plus a
//!   grace of a tenth of it (at most 1 s) for giving back the handlers cancelled at
//!   the deadline. An ack, nack or release the backend has not answered by then is
//!   given up (the message returns after its visibility timeout) and reported:
//!   [`WorkerSummary::release_failed`], and the event's error.
//!
//! # Observability
//!
//! Each delivery runs in a `tracing` span `ferrymq.delivery` (queue, id, attempt,
//! outcome). `metrics`: counters `ferrymq_worker_received_total`,
//! `ferrymq_worker_succeeded_total`, `ferrymq_worker_retried_total`,
//! `ferrymq_worker_dead_lettered_total`, `ferrymq_worker_deduplicated_total`,
//! `ferrymq_worker_failed_total`, `ferrymq_worker_released_total`; histogram
//! `ferrymq_worker_handler_seconds` (by outcome); gauges `ferrymq_worker_in_flight`,
//! `ferrymq_queue_depth` (by state) and `ferrymq_worker_healthy` (1 while receiving
//! works), all labelled with the queue. [`Worker::health`] gives the same as a
//! [`WorkerHealth`] handle for a health endpoint: a worker whose broker is down keeps
//! retrying and resumes by itself, and says `Degraded` meanwhile. And
//! [`Worker::subscribe`] gives a broadcast of [`WorkerEvent`]s, one per finished
//! delivery, like BullMQ's `completed` / `failed` events.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod autoscale;
mod builder;
mod events;
mod health;
mod pending;
mod run;
mod summary;

pub use builder::Worker;
pub use events::WorkerEvent;
pub use health::{HealthReport, HealthState, WorkerHealth};
pub use summary::WorkerSummary;

#[cfg(test)]
mod tests;
