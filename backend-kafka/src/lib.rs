//! # ferrymq-kafka
//!
//! The Kafka backend of ferrymq, over librdkafka (`rdkafka` 0.39, its default
//! features: librdkafka 2.12 bundled and built from source).
//!
//! ```no_run
//! use std::time::Duration;
//! use ferrymq_core::{Consumer, Message, Producer};
//! use ferrymq_kafka::KafkaConfig;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> ferrymq_core::Result<()> {
//! let cfg = KafkaConfig::from_url("kafka://127.0.0.1:9092,127.0.0.1:9093/orders?group=invoicers")?;
//! let producer = cfg.producer().await?;
//! let consumer = cfg.consumer().await?; // returns once the member was assigned
//! producer.send(Message::new("hello").key("customer-7")).await?;
//! for d in consumer.receive(100, Duration::from_secs(5)).await? {
//!     d.ack().await?;
//! }
//! consumer.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Topics and groups
//!
//! A queue `Q` is the topic `Q`, its retry tiers `Q.retry-1s`, `Q.retry-5s`, …
//! (`retry_tiers`, default 1s, 5s, 30s, 2m, 10m, 1h) and its dead-letter topic
//! `Q.dlq` (created by the admin; the RetryToDlq middleware publishes to it through
//! `with_queue("Q.dlq")`). Producers and consumers create `Q` and its tiers when
//! missing (`create=true`, `partitions`, `replication`). The group is `group`
//! (default `ferrymq.Q`, one per queue, so a rebalance of one queue never stalls
//! another).
//!
//! A [`KafkaConsumer`] is **two** group members served by one poll thread: one
//! reads `Q` in the group `G`, the other the tiers in `G.retry`. One member for all
//! the topics let the cooperative-sticky assignor balance partition *counts*
//! across topics, so one member could get every tier partition and the other every
//! partition of `Q`.
//!
//! ## Producer
//!
//! `enable.idempotence=true`, `acks=all`, `partitioner=murmur2_random` (a keyed
//! record lands where the Java client puts it; keyless ones spread at random).
//! `send` resolves on the delivery report; the receipt id is `partition/offset`
//! (`TIER-TOPIC/partition/offset` for a delayed message). `send_batch` hands every
//! entry to librdkafka first, then awaits each report: one result per entry. A
//! message is refused with `TooLarge` before anything is produced when its
//! `encoded_len` exceeds `max_message_size`, or when the record on the wire (key,
//! headers, the retry headers a nack may add, record and batch framing) would
//! exceed `max_record_bytes` (the broker's `message.max.bytes`). A report that
//! timed out or failed after the request left (librdkafka's "possibly persisted")
//! is `OutcomeUnknown`; librdkafka's local queue staying full for 5 s is
//! `QueueFull`; a broker quota is `Throttled`. `close` flushes. Delivery reports
//! are routed to their batch by ferrymq's producer context: one registration and
//! one wake-up per `send_batch` (a `send` is a batch of one), not a boxed future per
//! record. [`KafkaProducer::client`] is the librdkafka client, for metadata and
//! statistics; records go through the `Producer` trait.
//!
//! ## Consumer: commits and revokes
//!
//! - A dedicated thread polls both members, so handlers of any duration never make
//!   the member exceed `max.poll.interval.ms` (tested with 6 s and a handler of 8 s).
//!   Records go into a per-partition buffer. Each partition of the queue's topic
//!   gets a librdkafka queue of its own when it is assigned
//!   (`split_partition_queue`, before its fetch starts): the poll thread reads it
//!   only while the partition's buffer holds fewer than `buffer` records (and the
//!   commit metadata has room), and librdkafka stops fetching for it once its queue
//!   holds 4 × `buffer` records or 8 MiB — so backpressure never pauses such a
//!   partition. A pause drops what librdkafka had prefetched for the partition,
//!   fetched again on resume; with it a backlog's drain through the traits ran at
//!   ~0.45× raw rdkafka, without it at ~0.7× (`examples/consume_cost.rs`).
//!   The tiers share their member's queue: there a partition is paused when its buffer holds `buffer` records
//!   (resumed below half), while it is being revoked, and — on a tier — while its
//!   head is not due yet. A resume is followed by a seek to
//!   where the partition stands (librdkafka's broker thread, with every partition
//!   paused, otherwise sleeps up to a second before fetching it), and the queue's
//!   member sets `fetch.queue.backoff.ms=10` (librdkafka's 1 s backoff, taken once
//!   a partition's queue holds `queued.min.messages`, stalled a backlog's drain:
//!   the partition, drained meanwhile, sat out the rest of the second).
//! - Every record polled and not done is *outstanding*. An ack marks its offset
//!   done; a partition's commit position is its smallest outstanding offset (or the
//!   next offset to fetch when none is): an out-of-order ack never commits past an
//!   unprocessed record, and a restart replays from the first undone record. The
//!   poll thread stores moved positions (`store_offsets`) and commits them every
//!   `commit_interval` (`commit_consumer_state`, not librdkafka's auto commit, whose
//!   commit-on-unassign made closing members skip their LeaveGroup).
//!   An ack does not take the consumer's state lock (which the poll thread holds
//!   to push records, and receivers to take them): it appends to a small inbox
//!   that the next state lock applies in one go. While a revoke or a close is
//!   under way, settles take the state lock instead, so the revoke's commit and
//!   the close's count are exact.
//! - **Beyond the watermark**: each commit carries, in its metadata, which records
//!   above the watermark are already done (`fmq1:<span>:<gap>+<len>,…`, run-length
//!   deltas of the not-done ranges, kept under 3800 bytes — the broker allows 4096 —
//!   by describing a shorter span; a partition with more than 300 not-done ranges is
//!   paused until the watermark catches up). A member assigned the partition reads
//!   it and skips those records ([`KafkaConsumer::skipped`] counts them), so a
//!   restart after out-of-order acks replays only the undone records; peek skips
//!   them too. Any other client resumes at the watermark, which is always correct.
//! - **Revoke** (cooperative-sticky, incremental): the partitions stop being handed
//!   out and their buffered records are dropped (still outstanding, so not
//!   committed past); handed-out deliveries get `revoke_grace` to be settled; then,
//!   under the state lock, the partition's epoch is retired (every handle of it now
//!   answers `LeaseExpired` and `is_live()` false) and the position computed, and
//!   it is committed synchronously. After a **lost** assignment nothing is waited
//!   for and nothing is committed (the periodic commit checks too).
//! - **Close** stops handing out at once. With nothing handed out it commits and
//!   leaves before returning. Otherwise it returns at once (so a Worker can release
//!   its prefetched deliveries and finish its handlers), keeps the membership until
//!   they are settled or `close_timeout` passes, then commits and leaves; the settle
//!   that completes it waits for that commit, and [`KafkaConsumer::closed`] waits for
//!   it too. Leaving is unsubscribe, then close. Dropping a consumer closes it the
//!   same way in the background.
//! - **Release** re-queues the record locally: handed out again in this session
//!   after the delay (never committed past meanwhile), attempt unchanged. During a
//!   revoke or close it is left uncommitted for the next owner. A delivery dropped
//!   unsettled is released the same way.
//! - `extend` succeeds while the partition is ours (there is no lease to move).
//!
//! ## Retries and delays: tiered retry topics
//!
//! A nack with delay `d` (no delay: the shortest tier, due at once) produces a copy
//! of the message to the smallest tier `>= d`, with headers `ferrymq-attempt`
//! (attempt + 1), `ferrymq-not-before` (now + `d`, ms since the epoch),
//! `ferrymq-enqueued-at` and `ferrymq-id` (the original's), and the same key; only
//! once the broker confirmed the copy is the original marked done (a crash in
//! between duplicates, never loses). The tier member pauses a tier partition while
//! its head is not due and resumes it when it is; records of a tier are appended in
//! due order except for delays between two tiers, which wait at most the gap
//! between the tiers. A delayed send goes the same way (to the tier, with a
//! not-before time). The internal headers are stripped before a delivery is handed
//! out: id, attempt and enqueue time are in `DeliveryMeta`. A nack delay longer than
//! the largest tier is `Unsupported` and leaves the delivery as it was.
//!
//! Retries do not keep order (a retried record comes after later records of its
//! key); use `Worker::ordered_by_key` for per-key order with concurrency, or the
//! ordered mode.
//!
//! ## Retry modes
//!
//! `retry_mode=tiered` (the default, above) never blocks: a slow retry never holds
//! up other records, at the price of order. `retry_mode=ordered` is the blocking
//! mode a plain Kafka consumer gets with pause + seek, per key: the consumer hands
//! out one record per key at a time (the next record of a key only once the one
//! before is done), and a nack keeps the record in place — not done, so never
//! committed past — and delivers it again after the delay, before any later record
//! of its key (attempt + 1, counted in memory). Records of other keys in the
//! partition keep flowing; the partition stops being read when its buffer
//! (`buffer`) is full of records waiting behind blocked keys. No retry copy is produced, so a crash
//! replays the nacked record from the committed watermark with attempt 1. Delayed
//! *sends* still go through the tiers in both modes (they are out of order by
//! definition). A release behaves as in the tiered mode, and also keeps its key
//! blocked.
//!
//! | | `tiered` (default) | `ordered` |
//! |---|---|---|
//! | `Capabilities::ordering` | `PerKeyPipelined` | `PerKey` |
//! | `nack_delay_blocks` | false | true (its key waits) |
//! | a key's records in flight | several | one |
//! | retry keeps order | no | yes |
//! | attempt after a crash | kept (header) | back to 1 |
//! | conformance: `per_key_order`, `per_key_next_waits_for_head`, `per_key_order_with_concurrency_8_and_retries` | not applicable | apply |
//!
//! ## Exactly once, Kafka to Kafka
//!
//! A consumer's ack and a producer's send are two separate writes, so a handler
//! that produces its next step and then acks duplicates that step when the process
//! dies between the two (at-least-once). [`ExactlyOnce`]
//! (`cfg.exactly_once(output_topic, instance)`) makes them one: the handler returns
//! its outputs instead of sending them, and per batch of inputs the processor
//! produces them with a transactional producer and commits the inputs' offsets in
//! the same transaction (`send_offsets_to_transaction` with the consumer's group
//! metadata, KIP-447); an aborted transaction rewinds its inputs. Readers of the
//! output with `isolation.level=read_committed` (librdkafka's default) see each
//! input's outputs exactly once across crashes (`tests/eos.rs`: kill -9 at random
//! points). Only Kafka writes are covered; other side effects of the handler stay
//! at-least-once. See [`ExactlyOnce`] for fencing (`transactional.id` =
//! `GROUP.INSTANCE`, static membership) and limits.
//!
//! ## Capabilities
//!
//! `Ordering::PerKeyPipelined` (ordered mode: `PerKey`); `max_delay` =
//! `max_nack_delay` = the largest tier; `nack_delay_blocks` false (ordered: true);
//! `release_keeps_attempt` true; `Attempts::NacksOnly` (a header counter: a replay
//! after a crash or rebalance says the same attempt; in memory in ordered mode);
//! depth `Approximate` (group lag: end − committed of `Q` is waiting, less what this
//! consumer holds, in flight; lag of the tiers in `G.retry` is delayed);
//! `visibility_timeout` None; no broker-side dedup; not bounded.
//!
//! ## Admin
//!
//! [`KafkaAdmin`]: create / ensure (the topic, its tiers and its DLQ; `create`
//! refuses another partition count), delete, describe (partitions, groups, tiers,
//! warnings for missing tier topics), peek (a group-less reader from the group's
//! committed offsets; commits nothing), lag per partition, and `reset_offsets` to
//! earliest / latest / a timestamp (refused while the group has members). Purge is
//! `Unsupported`: Kafka deletes by offset, in-flight records included.

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod admin;
mod config;
mod consumer;
mod producer;
mod progress;
mod record;
mod transaction;

use ferrymq_core::{Accuracy, Attempts, Capabilities, Ordering};

pub use admin::KafkaAdmin;
pub use config::{KafkaConfig, KafkaDriver, RetryMode, MAX_TOPIC_LEN};
pub use consumer::KafkaConsumer;
pub use producer::KafkaProducer;
pub use transaction::{ExactlyOnce, ExactlyOnceSummary};

/// Header names ferrymq writes on retry copies and delayed records (stripped again
/// before a delivery is handed out; read them from [`ferrymq_core::DeliveryMeta`]).
pub mod headers {
    pub use crate::record::{H_ATTEMPT, H_ENQUEUED_AT, H_ID, H_NOT_BEFORE};
}

/// What a Kafka queue with these settings can do.
pub(crate) fn capabilities(cfg: &KafkaConfig) -> Capabilities {
    let mut c = Capabilities::minimal("kafka");
    match cfg.retry_mode {
        RetryMode::Tiered => {
            c.ordering = Ordering::PerKeyPipelined;
            c.nack_delay_blocks = false;
        }
        RetryMode::Ordered => {
            c.ordering = Ordering::PerKey;
            c.nack_delay_blocks = true;
        }
    }
    c.max_delay = cfg.max_delay();
    c.max_nack_delay = cfg.max_delay();
    c.release_keeps_attempt = true;
    c.max_message_size = cfg.max_message_size;
    c.max_batch = 10_000;
    c.attempts = Attempts::NacksOnly;
    c.depth = Accuracy::Approximate;
    c.visibility_timeout = None;
    c.extend_visibility = false;
    c
}
