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
//! | `ferrymq:{Q}:revoked` | set | `N/stream-id` of entries reclaimed while still held (one member per entry, however often), so acks of them check the lease and stale handles get `LeaseExpired`; emptied as the entries leave |
//! | `ferrymq:{Q}:handled:K` | string | [`RedisDedupStore`] (Dedup middleware): `claimed:<store>` (claim TTL) or `done` (retention) |
//! | `ferrymq:{Q}:seq` | string | counter for the ids of delayed sends |
//! | `ferrymq:{Q}:meta` | hash | the queue's settings, recorded by its first client and checked by every other (`priority_levels`, `group`, `visibility_ms`, `max_deliveries`, `dlq_max_len`, `dlq_retention_ms`) |
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
//!   `d<ms>-<seq>` for a delayed send; it stays the same across redeliveries. Once a
//!   message was re-enqueued, `DeliveryMeta::position` names the stream entry that
//!   holds it now (`N/stream-id`).
//! - **Send**: a plain message is one `XADD`; one with a dedup id or a delay goes
//!   through a script (`SET NX PX` claim + `XADD`, or park in the delayed zset).
//!   `send_batch` is one pipeline (one round trip per 1000 messages).
//! - **Receive** is one round trip: the MAINTAIN script (promote due delayed
//!   messages — exactly once, the `ZREM` is in the same atomic step — and, at most
//!   every `tick` = visibility/8 clamped to 10–250 ms, reclaim expired leases),
//!   pipelined with a plain `XREADGROUP` over the level streams, highest first.
//!   Entries are not read inside Lua: copying them through Lua tables costs more
//!   than the read. When several levels answer and more than `max` come back, the
//!   best `max` go out and the rest wait in a per-consumer buffer that the next
//!   receive serves first (reading only the levels above it, so priority holds); a
//!   buffered delivery older than half the visibility timeout is dropped and comes
//!   back by reclaim. With nothing to deliver, receive blocks in
//!   `XREADGROUP … BLOCK` on a pooled connection of its own, at most one tick or
//!   until the next delayed message is due.
//! - **Visibility**: a delivery not acked within `visibility_timeout` is reclaimed by
//!   a receive (`XPENDING … IDLE` + `XCLAIM`, which increments the entry's delivery
//!   counter) and delivered again with `attempt + 1`. Reclaiming looks first, then
//!   claims, rather than `XAUTOCLAIM`, so a lease extended past the visibility
//!   timeout is skipped until its deadline. A dropped delivery comes back the same
//!   way. Depth counts an expired lease as waiting even before it is reclaimed.
//! - **Extend** resets the entry's idle clock with `XCLAIM … IDLE … JUSTID` to its
//!   current owner; `JUSTID` is the form that does not increment the delivery
//!   counter, so the attempt stays the same (tested: the counter stays 1 across
//!   extends, and the extended handle can still settle).
//! - **Attempt** = deliveries of the current stream entry (the group's counter) +
//!   deliveries before it (`a`), so it survives nack, delay and promotion.
//! - **Stale handles**: a reclaim marks the entry in the revoked set; an ack of a
//!   marked entry, a nack and an extend check the entry's delivery counter
//!   against the handle's — a stale handle gets `LeaseExpired`, never settles the
//!   redelivery.
//! - **Bounded state**: the reclaim pass also removes consumers of the group that
//!   hold nothing and were idle for longer than `max(visibility, 5s)` (crashed
//!   processes leave their names behind); a consumer holding entries is never
//!   removed. Revoked markers go with their entries. Dead-lettering that trims older
//!   dead letters logs a warning saying how many went.
//! - **Scripts validate first**: every script checks the types of the keys it
//!   writes and decodes what it reads before its first write (Redis does not roll
//!   back a failing script), so a foreign key is a `Backend` error with nothing
//!   changed, and an undecodable delayed message is moved to the dead stream with a
//!   reason instead of breaking every receive.
//! - **Ack** is batched: acks arriving while earlier batches are on the wire (up to
//!   4 in flight) go out together as one script call — `XACK` + `XDEL` per level,
//!   with no per-entry step in the common case — and `ack()` returns once its batch
//!   was applied on the server. `ack_linger` adds a wait to gather more.
//! - **Nack** removes the entry and re-adds the message (stream tail, or the delayed
//!   zset when a delay is given) in one script.
//! - **Release** (`Ack::release`) is a nack whose new entry carries one delivery
//!   less, so the attempt stays the same (`release_keeps_attempt`), and it never
//!   dead-letters. The worker releases prefetched deliveries it did not start; the
//!   consumer releases its read-ahead buffer on `close` and buffered deliveries too
//!   old to hand out.
//! - **Leases**: every delivery carries its lease deadline (the time the receive
//!   was sent + `visibility_timeout`, so the local clock errs early) and the
//!   consumer's capabilities. Delays, nack delays and extends are limited to a
//!   year (`max_delay`, `max_nack_delay`, `max_visibility`); longer is
//!   `Unsupported` and nothing is sent.
//! - **Admin**: [`RedisAdmin`] (`RedisConfig::admin`) implements
//!   `ferrymq_core::Admin`: ensure/create (the group), describe, purge (waiting,
//!   delayed and expired leases; never live ones), peek (no lease taken), the
//!   dead-letter stream (peek, redrive from a snapshot of its size).
//! - **Priority**: `Priority::Levels(priority_levels)` (default 4; 1 means
//!   `Priority::None`); priority `p` maps to level `clamp(p, 0, levels - 1)`; within a
//!   level, FIFO. No per-key ordering is promised (`Ordering::None`).
//! - **Dead letters**: with `max_deliveries > 0`, a message delivered that many times
//!   without an ack (timeouts or nacks) moves to `ferrymq:{Q}:dead` with the
//!   `ferrymq-failure-reason`, `ferrymq-origin-queue`, `ferrymq-attempts` and
//!   `ferrymq-origin-message-id` headers, bounded by `dlq_max_len` and
//!   `dlq_retention`. See [`RedisConsumer::dead_letters`] and
//!   [`RedisConsumer::redrive`]. (The `RetryToDlq` middleware is the other way:
//!   it publishes to a DLQ producer of your choice.)
//! - **Settings are the queue's**: the first client records the queue's settings
//!   in `ferrymq:{Q}:meta`; a producer whose `priority_levels`, or a consumer whose
//!   `priority_levels`, `group`, `visibility`, `max_deliveries`, `dlq_max_len` or
//!   `dlq_retention` disagree is refused at connect (`InvalidConfig` naming the
//!   setting). So every consumer of a queue uses the same group — acked entries are
//!   deleted, so a queue is one work queue, not a fan-out topic.
//! - **Failures**: an unreachable server is `Connection` (within `connect_timeout`),
//!   refused credentials `Auth`, a key of the wrong type `Backend` (naming the key
//!   at startup), no answer within `command_timeout` `Timeout` — except for a
//!   send, where no answer (or a connection that broke after the request was
//!   written) is `OutcomeUnknown`: the message may be enqueued. Connections
//!   reconnect by themselves; scripts lost by a restarted server are reloaded.
//!   Startup warns (tracing) when `maxmemory-policy` is `allkeys-*`, and refuses a
//!   server older than Redis 7.0 (`Unsupported`, naming the version needed; read
//!   from `INFO server`).
//! - **Cancellation**: a `receive` future dropped while its call is on the wire may
//!   leave deliveries leased to nobody; they come back after the visibility timeout
//!   (attempt + 1). A cancelled blocking read drops its connection, so the server
//!   forgets it. Deliveries left in the buffer when a consumer is dropped come back
//!   the same way.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod ack;
mod admin;
mod client;
mod codec;
mod config;
mod consumer;
mod dedup;
mod driver;
mod jobs;
mod keys;
mod producer;
mod scripts;
mod settings;

pub use admin::RedisAdmin;
pub use config::{RedisConfig, MAX_DLQ_RETENTION, MAX_PRIORITY_LEVELS};
pub use consumer::{DeadLetter, RedisConsumer};
pub use dedup::RedisDedupStore;
pub use driver::RedisDriver;
pub use jobs::{RedisJobStore, DEFAULT_EVENTS_MAX_LEN};
pub use producer::RedisProducer;
