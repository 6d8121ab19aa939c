//! # ferrymq-sqs
//!
//! The SQS backend of ferrymq: standard and FIFO queues over `aws-sdk-sqs`.
//!
//! ```no_run
//! use std::time::Duration;
//! use ferrymq_core::{Consumer, Message, Producer};
//! use ferrymq_sqs::SqsConfig;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let (producer, consumer) = SqsConfig::from_url("sqs://orders.fifo?region=eu-west-1&create=true")?
//!     .connect()
//!     .await?;
//! producer.send(Message::new("hello").key("customer-7")).await?;
//! for delivery in consumer.receive(10, Duration::from_secs(20)).await? {
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Semantics
//!
//! - **URL**: `sqs://NAME?…` or a queue URL
//!   `https://sqs.<region>.amazonaws.com/<account>/<name>`; a name ending in `.fifo`
//!   is a FIFO queue. Region and credentials come from the AWS default chain unless
//!   given (see [`SqsConfig`]); credentials never appear in `Debug`, `Display`, errors
//!   or logs.
//! - **Encoding**: every payload (empty, binary) and any number of headers (in
//!   order) round-trip exactly; a simple message is a plain body with String
//!   attributes, readable by any SQS client. See [`codec`].
//! - **Send**: `key` → `MessageGroupId` on FIFO (a keyless message gets a group of its
//!   own); `dedup_id` → `MessageDeduplicationId` (hashed when SQS would refuse it);
//!   per-message delay up to 15 min on standard queues, `Unsupported` with nothing
//!   sent on FIFO; size checked after encoding (`TooLarge` before sending);
//!   `send_batch` in `SendMessageBatch` calls of ≤ 10 entries and ≤ the batch byte
//!   limit, one result per entry.
//! - **Receive**: long polling, cancel-safe, one head per FIFO group with the rest of
//!   the group's run kept leased in a bounded buffer (so `Ordering::PerKey` holds);
//!   see [`consumer`].
//! - **Settle**: `ack` → `DeleteMessageBatch` (short linger; `ack()` returns once its
//!   batch was applied); `nack(d)` / `release(d)` → `ChangeMessageVisibility(d)`
//!   (SQS counts every receive, so release counts an attempt; a FIFO head with a
//!   buffered run takes its run back with it in one batch, after at least 1 s);
//!   `extend` →
//!   `ChangeMessageVisibility`, capped at 12 h from the receive (`Unsupported`
//!   beyond). A client-side lease clock answers `LeaseExpired` past the deadline
//!   without calling SQS, which would accept the stale receipt handle.
//! - **Attempts** from `ApproximateReceiveCount` ([`Attempts::Approximate`]:
//!   a receive whose answer was lost counts too), `enqueued_at` from `SentTimestamp`,
//!   `position` the FIFO sequence number.
//! - **Admin** ([`SqsAdmin`]): create / ensure (FIFO from the name, visibility,
//!   retention, native `RedrivePolicy` + the DLQ's `RedriveAllowPolicy`), delete,
//!   describe (approximate depth incl. the DLQ's count, attributes, warnings),
//!   `redrive_dead_letters` (`StartMessageMoveTask` with `ListMessageMoveTasks`
//!   progress; a receive-send-delete copy for FIFO or with a limit). `peek` and
//!   `purge` are `Unsupported`: an SQS receive always counts toward
//!   `maxReceiveCount`, and `PurgeQueue` deletes in-flight messages too
//!   ([`SqsAdmin::purge_all`] is that purge).
//! - **Errors**: throttling → `Throttled`; no connection → `Connection`; a send whose
//!   request left without an answer → `OutcomeUnknown`; timeouts of other calls →
//!   `Timeout`. The SDK's standard retries (`max_attempts`) are the only retries.
//!
//! ## Capabilities
//!
//! | | standard | FIFO |
//! |---|---|---|
//! | ordering | `None` | `PerKey` |
//! | max_delay | 15 min | none (`Unsupported`) |
//! | dedup_window | none (Dedup middleware) | 5 min |
//! | visibility_timeout | the config's, else the queue's | same |
//! | max_visibility, max_nack_delay | 12 h | 12 h |
//! | release_keeps_attempt | no | no |
//! | max_message_size | `MaximumMessageSize` − 1 KiB (codec reserve) | same |
//! | max_batch | 10 | 10 |
//! | attempts, depth | approximate | approximate |
//! | native_dead_letter_after | `RedrivePolicy.maxReceiveCount` | same |
//!
//! [`Attempts::Approximate`]: ferrymq_core::Attempts::Approximate

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod ack;
mod admin;
mod client;
pub mod codec;
mod config;
pub mod consumer;
mod error;
mod producer;

pub use admin::SqsAdmin;
pub use config::{SqsConfig, SqsDriver, DEDUP_WINDOW, MAX_DELAY, MAX_VISIBILITY, MAX_WAIT};
pub use consumer::SqsConsumer;
pub use producer::SqsProducer;
