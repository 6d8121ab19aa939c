//! # ferrymq-redis
//!
//! The Redis backend of ferrymq: a job queue on Redis Streams (Redis ≥ 7.0), with
//! delayed messages, priority levels, dedup, visibility timeouts with redelivery,
//! attempt counting, a bounded dead-letter stream and depth counts — every
//! multi-key step one atomic Lua script.
//!
//! ```no_run
//! use std::time::Duration;
//! use ferrymq_core::{Consumer, Message, Producer};
//! use ferrymq_redis::RedisConfig;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let (producer, consumer) =
//!     RedisConfig::from_url("redis://127.0.0.1:6379/orders?group=invoicers&visibility=30s")?
//!         .connect()
//!         .await?;
//! producer.send(Message::new("hello").priority(2)).await?;
//! for delivery in consumer.receive(100, Duration::from_secs(5)).await? {
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! ## Key layout
//!
//! A queue `Q` is a family of keys sharing the hash tag `{Q}` (so every script also
//! works on Redis Cluster, all keys being in one slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `ferrymq:{Q}:ready:N` | stream + consumer group | messages ready or in flight at priority level `N` (`0..priority_levels`, higher first). Pending entries of the group are the in-flight deliveries; acked entries are `XDEL`eted |
//! | `ferrymq:{Q}:delayed` | zset | message id → due time (ms since the epoch): delayed sends and nacks with a delay |
//! | `ferrymq:{Q}:jobs` | hash | message id → the delayed message (MessagePack of level + stream fields) |
//! | `ferrymq:{Q}:leases` | hash | `N/stream-id` → deadline (ms) of a lease extended past the visibility timeout |
//! | `ferrymq:{Q}:dead` | stream | dead-lettered messages, trimmed to `dlq_max_len` (approx.) and `dlq_retention` |
//! | `ferrymq:{Q}:dedup:ID` | string | message id holding dedup id `ID`; expires after `dedup_window` |
//! | `ferrymq:{Q}:revoked` | set | `N/stream-id/deliveries` of leases reclaimed while still held, so their stale handles get `LeaseExpired`; emptied as the entries leave |
//! | `ferrymq:{Q}:handled:K` | string | [`RedisDedupStore`] (Dedup middleware): `claimed:<store>` (claim TTL) or `done` (retention) |
//! | `ferrymq:{Q}:seq` | string | counter for the ids of delayed sends |
//!
//! A stream entry's fields: `p` payload, `h` headers (`<len>:<name><len>:<value>`…,
//! binary-safe, no escaping), `k` key, `d` dedup id, `r` priority, and, once a
//! message was re-enqueued (nack, promotion), `i` its stable id, `t` its first
//! enqueue time (ms) and `a` the deliveries before this entry. Inspect with:
//!
//! ```text
//! redis-cli XINFO GROUPS 'ferrymq:{orders}:ready:0'
//! redis-cli XPENDING 'ferrymq:{orders}:ready:0' ferrymq - + 10      # in flight, with delivery counts
//! redis-cli XRANGE 'ferrymq:{orders}:ready:0' - + COUNT 10
//! redis-cli ZRANGE 'ferrymq:{orders}:delayed' 0 -1 WITHSCORES
//! redis-cli XRANGE 'ferrymq:{orders}:dead' - + COUNT 10
//! ```
//!
//! ## Semantics
//!
//! - **Message id**: `<stream-id>` (level 0), `<stream-id>@N` (level N), or
//!   `d<ms>-<seq>` for a delayed send; it stays the same across redeliveries.
//! - **Visibility**: a delivery not acked within `visibility_timeout` is reclaimed by
//!   the next receive (`XPENDING … IDLE` + `XCLAIM`, which increments the entry's
//!   delivery counter) and delivered again with `attempt + 1`. Reclaiming first
//!   looks, then claims, rather than `XAUTOCLAIM`, so a lease extended past the
//!   visibility timeout is skipped until its deadline. A dropped delivery comes back
//!   the same way.
//! - **Extend** resets the entry's idle clock with `XCLAIM … IDLE … JUSTID` to its
//!   current owner; `JUSTID` does not increment the delivery counter, so the attempt
//!   stays the same.
//! - **Attempt** = deliveries of the current stream entry (the group's counter) +
//!   deliveries before it (`a`), so it survives nack, delay and promotion.
//! - **Stale handles**: ack, nack and extend check that the entry is still pending
//!   with the counter it had when delivered; otherwise `LeaseExpired`.
//! - **Ack** is batched: acks arriving while a batch is on the wire go out together
//!   as one script call (`XACK` + `XDEL` per level); `ack()` returns once its batch
//!   was applied on the server.
//! - **Nack** removes the entry and re-adds the message (stream tail, or the delayed
//!   zset when a delay is given) in one script.
//! - **Priority**: `Priority::Levels(priority_levels)`; priority `p` maps to level
//!   `clamp(p, 0, levels - 1)`; within a level, FIFO. No per-key ordering is
//!   promised (`Ordering::None`).
//! - **Dead letters**: with `max_deliveries > 0`, a message delivered that many times
//!   without an ack (timeouts or nacks) moves to `ferrymq:{Q}:dead` with the
//!   `ferrymq-failure-reason`, `ferrymq-origin-queue`, `ferrymq-attempts` and
//!   `ferrymq-origin-message-id` headers. See [`RedisConsumer::dead_letters`] and
//!   [`RedisConsumer::redrive`].
//! - **Group**: every consumer of a queue must use the same group — acked entries
//!   are deleted, so a queue is one work queue, not a fan-out topic.
//! - **Cancellation**: a `receive` future dropped while its script is on the wire
//!   may leave deliveries leased to nobody; they come back after the visibility
//!   timeout (attempt + 1). A cancelled blocking read drops its connection, so the
//!   server forgets it.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod ack;
mod admin;
mod client;
mod codec;
mod config;
mod consumer;
mod dedup;
mod keys;
mod producer;
mod scripts;

pub use config::{RedisConfig, MAX_PRIORITY_LEVELS};
pub use consumer::{DeadLetter, RedisConsumer};
pub use dedup::RedisDedupStore;
pub use producer::RedisProducer;
