//! Collect sends into native batches.
//!
//! SQS sends ten messages per call, Redis pipelines any number: a producer that sends
//! one message per round trip leaves most of the throughput on the table.
//! [`Batching`] wraps a [`Producer`](crate::Producer): each `send` joins the current
//! batch and waits; the batch goes out with
//! [`send_batch`](crate::Producer::send_batch) when it reaches the maximum size, when
//! its first message has waited the linger time, on [`flush`](crate::Producer::flush),
//! and on [`close`](crate::Producer::close) (or when the `Batching` is dropped). Each
//! caller gets its own message's result back.
//!
//! Memory is bounded: at most one batch is being collected, and callers beyond the
//! command channel's capacity wait in `send`.

mod layer;
mod producer;
mod task;

pub use layer::BatchingLayer;
pub use producer::Batching;

#[cfg(test)]
mod tests;
