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
//! works on Redis Cluster, all keys being in one slot; connect with `cluster=true`,
//! see [`RedisConfig`] — different queues spread over the masters):
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
//! | `ferrymq:{Q}:schedules`, `ferrymq:{Q}:schedule:ID` | set, hash | [`RedisScheduleStore`]: the queue's schedules and their progress (see its docs) |
//! | `ferrymq:{Q}:meta` | hash | the queue's settings, recorded by its first client and checked by every other (`ordered`, `priority_levels`, `group`, `visibility_ms`, `max_deliveries`, `dlq_max_len`, `dlq_retention_ms`, `rate_limit`); an ordered queue's `visibility_ms` is marked `<ms>;ordered`, so consumers of versions without ordered queues are refused |
//! | `ferrymq:{Q}:locks` | hash | ordered queues: message key → `<stream id>:<n>`, the key's head (its oldest unsettled message) and how many entries are held behind it; plus the field `\xff` (no key: not UTF-8) with a 256-byte value, which keeps the hash in hashtable encoding (a small hash would be a listpack, scanned on every lookup) |
//! | `ferrymq:{Q}:held` | zset | ordered queues: entries read while their key's head was unsettled, `<len>:<key><padded stream id>` (lexicographic: per key in stream order); pending, owned by the consumer `~held` |
//! | `ferrymq:{Q}:unblocked` | list | ordered queues: heads due to be handed out (`stream-id\|key`): a key's next after an ack, a nacked head |
//! | `ferrymq:{Q}:parked` | zset | ordered queues: heads nacked with a delay → due time (ms); their key stays blocked |
//! | `ferrymq:{Q}:wake` | stream | ordered queues: one entry, rewritten when an ack or nack queues a head, so consumers waiting in `XREAD BLOCK` wake for it |
//! | `ferrymq:{Q}:limiter` | zset | rate-limited queues: one member per delivery of the current window (score: its time, ms) |
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
//!   The script goes along only when something can be due: a reclaim tick, the
//!   earliest delayed message it saw last time, a read that came back empty (then
//!   it runs at once, before blocking), and otherwise at least every 50 ms (capped
//!   at the tick) — so a delayed message another process sends is promoted at most
//!   that late on a busy consumer, and a busy queue's receives are mostly a bare
//!   `XREADGROUP` (issue 11: the script on every receive was most of the server's
//!   work).
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
//!   level, FIFO. No per-key ordering is promised (`Ordering::None`) — unless the
//!   queue is ordered (below), which has one level.
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
//! - **Per-key order** (`ordered=true`, `Ordering::PerKey`: SQS FIFO group
//!   semantics): a key's messages are delivered in send order, and no later
//!   message of a key is handed out while an earlier one is in flight — also
//!   across nacks, nack delays and expired leases; many keys run in parallel, and
//!   messages without a key are not held at all. The messages stay in the one
//!   stream (a producer's send is the same `XADD`); the receive is then one script
//!   (RECEIVE) that reads with `XREADGROUP` and passes each entry through a gate:
//!   the key's head (`locks`) or a key without one goes out; any other entry is
//!   *held* — left pending with the consumer `~held`, which the reclaim skips, and
//!   listed per key in stream order (`held`). Settles are scripts that move the key
//!   in the same atomic step: an ack hands the key to its next held entry (queued in
//!   `unblocked` for the next receive of any consumer); a nack or release keeps the
//!   head the head, parked with `~held` and queued again — at once, or from `parked`
//!   when its delay is due (the key stays blocked meanwhile, other keys flow:
//!   `nack_delay_blocks` is false); dead-lettering hands the key on. Crash safety: a
//!   consumer killed mid-handler keeps its head's lease until the visibility
//!   timeout; the reclaim then hands the head out again, first, with attempt + 1
//!   (tests/ordered.rs kills a consumer process with SIGKILL). Costs: entries pass
//!   through Lua (the plain receive avoids that), and each ack moves its key; an
//!   entry read while its key is busy costs two `XCLAIM`s more (hold and hand-out:
//!   each seeks its stream entry). Measured with `examples/ordered_throughput.rs`
//!   (1 000 keys, `receive(100)` tasks sharing a consumer, on a loaded 2-core
//!   machine, medians of 3): 0.47× the plain queue's processing rate with 8 tasks
//!   (≤ 800 in flight), 0.41× with 4, and 0.26× with 16 — where more deliveries are
//!   asked for than there are keys, so entries are read while their key is busy
//!   and held. An ordered queue has one priority level (a
//!   key's order is its send order): `ordered=true` in a URL sets
//!   `priority_levels=1`, and more is refused. `ordered` is a setting of the queue:
//!   a producer or consumer that disagrees is refused. Switch it only on an empty
//!   queue (`RedisAdmin::forget_settings` first). A delayed send joins its key's
//!   order when it is due (it enters the stream then). Admin `peek` shows the waiting messages
//!   (queued heads, held entries, then never-delivered ones); `purge` also removes
//!   held entries and queued heads, and hands their keys on.
//! - **Queue-wide rate limit** (`rate_limit=N/PERIOD`, e.g. `100/1s`): at most `N`
//!   deliveries in any window of `PERIOD` across **every** consumer of the queue,
//!   counted on the server in the same RECEIVE script that hands the deliveries
//!   out (a sliding window: one `limiter` member per delivery), so two workers on
//!   two machines share one budget. Every delivery counts, redeliveries too. A
//!   receive over budget waits until the window has room. This is the queue's
//!   limit; tower's `RateLimit` layer (`ServiceBuilder::rate_limit`) stays the
//!   per-worker one — use both for "N per second per queue, M per worker". A
//!   setting of the queue, recorded and checked like `ordered`.
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
mod flow_ack;
mod jobs;
mod keys;
mod ordered;
mod producer;
mod schedule;
mod scripts;
mod settings;

pub use admin::RedisAdmin;
pub use config::{
    RateLimit, RedisConfig, MAX_DLQ_RETENTION, MAX_PRIORITY_LEVELS, MAX_RATE_LIMIT_JOBS,
};
pub use consumer::{DeadLetter, RedisConsumer};
pub use dedup::RedisDedupStore;
pub use driver::RedisDriver;
pub use jobs::{RedisJobStore, DEFAULT_EVENTS_MAX_LEN};
pub use producer::RedisProducer;
pub use schedule::RedisScheduleStore;
