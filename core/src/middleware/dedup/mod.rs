//! Consumer-side deduplication.
//!
//! Brokers deliver at least once, and producers retry sends: the same logical message
//! can arrive twice. [`Dedup`] gives each delivery a key — its
//! [`dedup_id`](crate::Message::dedup_id), else (by default) the backend's message id,
//! which catches redeliveries of one message; content hashing is an opt-in
//! ([`KeyStrategy`]) — and asks a [`DedupStore`] to *claim* the key before the
//! handler runs:
//!
//! - [`Claim::Claimed`]: nobody handled it; run the handler. On success the key is
//!   marked done ([`DedupStore::complete`]); on failure the claim is released
//!   ([`DedupStore::release`]) so that the retry is not mistaken for a duplicate.
//! - [`Claim::Duplicate`]: already handled; ack without calling the handler.
//! - [`Claim::InProgress`]: another consumer is handling the same key right now;
//!   release the delivery for a short pause ([`Delivery::release`](crate::Delivery::release):
//!   the handler did not run, so no attempt is spent where the backend can). When it
//!   comes back the key is either done (acked as a duplicate) or released (handled
//!   here). Two racing workers: exactly one handles it.
//!
//! Each claim carries a [`ClaimToken`]: a handler that outlived its claim TTL cannot
//! release the newer claim of the consumer that took the key over.
//!
//! The store is pluggable: [`MemoryDedupStore`] for one process, a Redis store
//! (`SET NX PX`) in `ferrymq-redis` for many.

mod key;
mod layer;
mod memory_store;
mod service;
mod store;

pub use key::{content_hash, dedup_key, KeyStrategy};
pub use layer::DedupLayer;
pub use memory_store::MemoryDedupStore;
pub use service::Dedup;
pub use store::{Claim, ClaimToken, DedupStore};

#[cfg(test)]
mod tests;
