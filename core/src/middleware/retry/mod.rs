//! Retry with backoff, then dead-letter.
//!
//! On a handler error, [`RetryToDlq`]:
//!
//! 1. if the error is [permanent](crate::middleware::is_permanent), or this was the
//!    last attempt (`attempt >= max_attempts`), publishes the message to the DLQ
//!    producer with the reserved headers
//!    ([`FAILURE_REASON`](crate::reserved::FAILURE_REASON),
//!    [`ORIGIN_QUEUE`](crate::reserved::ORIGIN_QUEUE),
//!    [`ATTEMPTS`](crate::reserved::ATTEMPTS),
//!    [`FIRST_FAILURE_AT`](crate::reserved::FIRST_FAILURE_AT),
//!    [`DEAD_LETTERED_AT`](crate::reserved::DEAD_LETTERED_AT),
//!    [`ORIGIN_MESSAGE_ID`](crate::reserved::ORIGIN_MESSAGE_ID)), and only once the
//!    DLQ accepted it, acks the original. If the publish fails nothing is acked: the
//!    delivery is nacked with backoff and the error returned (at-least-once: a crash
//!    between publish and ack can leave a copy in both queues, never in neither);
//! 2. otherwise nacks with [exponential backoff plus jitter](Backoff): the broker
//!    redelivers it later, and the consumer keeps working on other messages
//!    meanwhile — nothing sleeps in the stream.
//!
//! Either way the handler's error is returned (so outer layers such as
//! [`Dedup`](crate::middleware::Dedup) release their claims), and the outcome is
//! [recorded](crate::middleware::outcome) for the worker.
//!
//! # Attempts and the first-failure time
//!
//! The attempt number is the backend's ([`Delivery::attempt`](crate::Delivery::attempt)).
//! A redelivery is the same broker message, so a header cannot be added on nack; the
//! first-failure time is therefore taken, in order of preference, from:
//!
//! 1. a `ferrymq-first-failure-at` header already on the message (a message redriven
//!    from a DLQ, or re-published by a backend that copies headers);
//! 2. this process's own record of the message's first failure, kept in a bounded
//!    in-memory table keyed by queue and dedup id, else by the backend's message id
//!    (exact whenever the same process saw the first failure, the common case; never
//!    by content, so two different messages with identical payloads never share a
//!    record);
//! 3. otherwise, if this failure is attempt 1, now;
//! 4. otherwise (another process saw the first failures) the message's enqueue time, a
//!    lower bound of the true value.
//!
//! The same table counts failures, so the attempt used is
//! `max(backend attempt, failures seen here)`: on a backend whose capabilities say
//! [`Attempts::Untracked`](crate::Attempts::Untracked), a message still reaches the
//! DLQ after `max_attempts` failures in one process.
//!
//! # What the backend can do
//!
//! [`Delivery::capabilities`](crate::Delivery::capabilities) (set by backends; when
//! absent, full support is assumed) shapes the retries:
//!
//! - the backoff is capped at [`max_nack_delay`](crate::Capabilities::max_nack_delay);
//!   a backend that cannot delay a nack gets `nack(None)` — redelivered at once, still
//!   an attempt, still bounded by `max_attempts`;
//! - with [`native_dead_letter_after`](crate::Capabilities::native_dead_letter_after)
//!   `= Some(n)`, `max_attempts` above `n` is lowered to `n` (logged once), so the
//!   middleware dead-letters before the broker moves the message without headers;
//! - a DLQ send whose receipt says `duplicate` is a failed publish: nothing is acked.
//!   The DLQ copy carries no dedup id (it moves to the
//!   [`ORIGIN_DEDUP_ID`](crate::reserved::ORIGIN_DEDUP_ID) header), so a deduplicating
//!   DLQ never drops a message that is dead-lettered a second time after a redrive.

mod backoff;
mod dead_letter;
mod failures;
mod layer;
mod service;

pub use backoff::Backoff;
pub use dead_letter::{dead_letter_message, restore_origin_dedup_id};
pub use layer::RetryToDlqLayer;
pub use service::{RetryFuture, RetryToDlq};

#[cfg(test)]
mod tests;
