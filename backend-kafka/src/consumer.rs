//! The receiving side: one group member, polled by a thread of its own, with
//! per-partition watermark commits and tiered retries.
//!
//! See the crate docs for the design; the invariants kept here:
//!
//! - Every record polled and not yet done is in its partition's `outstanding` set
//!   (buffered, handed out, or re-queued by a release). The commit position of a
//!   partition is the smallest outstanding offset, or the next offset to fetch when
//!   nothing is outstanding: an ack never moves it past an unprocessed record.
//! - A partition's `live` flag is its epoch: a fresh one per assignment, cleared
//!   under the state lock when the partition is revoked. A handle whose flag is
//!   cleared answers `LeaseExpired`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ferrymq_core::depth::Depth;
use ferrymq_core::time::deadline_in;
use ferrymq_core::{
    Ack, AckHandle, Capabilities, Consumer, Delivery, DeliveryMeta, Error, ErrorKind, Position,
    Result, Settle,
};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    base_consumer::PartitionQueue, BaseConsumer, CommitMode, Consumer as _, ConsumerContext,
    Rebalance,
};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::admin::{ensure_topics, kafka_error, lag_depth, LazyLag};
use crate::capabilities;
use crate::config::KafkaConfig;
use crate::producer::{config_error, Outgoing, Sender};
use crate::progress::{self, Progress};
use crate::record::{
    self, unix_ms, unix_ms_ceil, with_header, PayloadArena, Received, H_ATTEMPT, H_ENQUEUED_AT,
    H_ID, H_NOT_BEFORE,
};

/// How long one poll waits when librdkafka has nothing: also the longest a resume
/// (buffer drained, tier head due) or a store waits.
const POLL_WAIT: Duration = Duration::from_millis(20);
/// The broker's longest hold of an empty Fetch (see `connect`): the most a
/// resumed partition waits for its first records. An idle member sends a Fetch
/// this often.
const FETCH_WAIT_MS: &str = "50";
/// How long librdkafka backs off a partition's fetch while its queue is full
/// (see `connect`).
const FETCH_QUEUE_BACKOFF_MS: &str = "10";
/// librdkafka's prefetch per split partition (see [`split_queue`]), in records:
/// this many buffers' worth (20,000 records for the default buffer). A quarter as
/// much ran the drain of a backlog of small records at ~60 % of this rate in one
/// run (consume_cost traits1), waiting on fetches.
const PREFETCH_BUFFERS: usize = 4;
/// ...and in KiB: with large records the bound that counts.
const PREFETCH_KIB: &str = "8192";

/// `queued.min.messages` for a split member (librdkafka's limit: 10,000,000).
fn prefetch_records(buffer: usize) -> usize {
    buffer.saturating_mul(PREFETCH_BUFFERS).clamp(1, 10_000_000)
}

/// Records taken from librdkafka per lock of the shared state.
const POLL_BATCH: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Tp {
    /// 0: the queue's topic; 1..: its retry tiers.
    topic: usize,
    partition: i32,
}

/// The hasher of the maps keyed by [`Tp`]: looked up for every record handed out
/// and every ack, where SipHash (built for untrusted keys; these are ours) cost
/// several percent of the consumer's time.
type TpHash = std::hash::BuildHasherDefault<TpHasher>;

#[derive(Default)]
struct TpHasher(u64);

impl std::hash::Hasher for TpHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 =
                (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_i32(&mut self, n: i32) {
        self.write_u64(u64::from(n as u32));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

struct Requeued {
    due: Instant,
    record: Received,
    attempt: u32,
}

/// A partition's polled, not-done offsets: ascending (records are polled in
/// offset order), each with a done flag, the done ones dropped from the front.
/// Cheaper than a `BTreeSet` for this shape (appends at the back, acks mostly near
/// the front): no node allocations, one binary search per ack.
#[derive(Default)]
struct Outstanding {
    offsets: VecDeque<(i64, bool)>,
}

impl Outstanding {
    /// Append `offset`, above every offset held.
    fn push(&mut self, offset: i64) {
        debug_assert!(self.offsets.back().map_or(true, |(o, _)| *o < offset));
        self.offsets.push_back((offset, false));
    }

    /// Mark `offset` done (no-op when it is not held).
    fn done(&mut self, offset: i64) {
        // A partition's offsets are mostly contiguous (gaps only from compaction or
        // transaction markers), so `offset - first` is usually its index: tried
        // first, the binary search (1.5% of a Worker's thread) only when it misses.
        let guess = self
            .offsets
            .front()
            .and_then(|(first, _)| usize::try_from(offset.checked_sub(*first)?).ok())
            .filter(|&i| self.offsets.get(i).is_some_and(|(o, _)| *o == offset));
        let found = guess.or_else(|| self.offsets.binary_search_by_key(&offset, |(o, _)| *o).ok());
        if let Some(i) = found {
            self.offsets[i].1 = true;
        }
        while self.offsets.front().is_some_and(|(_, d)| *d) {
            self.offsets.pop_front();
        }
    }

    /// The offsets not done, ascending.
    fn undone(&self) -> impl Iterator<Item = i64> + '_ {
        self.offsets.iter().filter(|(_, d)| !d).map(|(o, _)| *o)
    }
}

struct Part {
    /// This assignment's epoch: cleared when the partition is revoked.
    live: Arc<AtomicBool>,
    /// The partition has a librdkafka queue of its own (see [`split_queue`]): the
    /// poll thread reads it only while `buffered` has room, and never pauses the
    /// partition. Otherwise (the tiers, a split that failed) its
    /// records come through the member's shared queue, and a full buffer pauses it.
    split: bool,
    /// Polled, not handed out, in offset order.
    buffered: VecDeque<Received>,
    /// Released (or dropped) deliveries, to be handed out again in this session.
    requeued: Vec<Requeued>,
    /// Polled and not done.
    outstanding: Outstanding,
    /// Ordered mode, queue topic: per key, its records handed out or re-queued (the
    /// key's next record waits while this is non-zero).
    blocked: HashMap<String, usize>,
    handed_out: usize,
    /// Offset after the last record polled (-1: none yet).
    next_fetch: i64,
    /// Last commit point (position and metadata) handed to the committer.
    stored: Option<(i64, String)>,
    /// What the previous owner finished above the committed watermark (read from
    /// the commit's metadata): records it covers are skipped when polled.
    prev: Option<Progress>,
    /// Records skipped that way in this assignment.
    skipped: u64,
    /// Not-done ranges at the last commit point (the metadata's size).
    ranges: usize,
    paused: bool,
    revoking: bool,
}

impl Part {
    fn new() -> Self {
        Part {
            live: Arc::new(AtomicBool::new(true)),
            split: false,
            buffered: VecDeque::new(),
            requeued: Vec::new(),
            outstanding: Outstanding::default(),
            blocked: HashMap::new(),
            handed_out: 0,
            next_fetch: -1,
            stored: None,
            prev: None,
            skipped: 0,
            ranges: 0,
            paused: false,
            revoking: false,
        }
    }

    /// Take a polled record into the buffer (outstanding from now on), unless the
    /// partition is being revoked, we hold it already, or the previous owner's
    /// commit metadata says it was done.
    fn admit(&mut self, r: Received) -> Admitted {
        if self.revoking || (self.next_fetch >= 0 && r.offset < self.next_fetch) {
            // Revoked meanwhile, or a re-fetch of what we hold already.
            return Admitted::Dropped;
        }
        self.next_fetch = r.offset + 1;
        if let Some(prev) = &self.prev {
            let done = prev.is_done(r.offset);
            if r.offset + 1 >= prev.end {
                self.prev = None;
            }
            if done {
                // Processed before the restart: never handed out again.
                self.skipped += 1;
                return Admitted::SkippedAsDone;
            }
        }
        self.outstanding.push(r.offset);
        self.buffered.push_back(r);
        Admitted::Buffered
    }

    /// A handed-out record is done.
    fn done(&mut self, offset: i64) {
        self.outstanding.done(offset);
        self.handed_out = self.handed_out.saturating_sub(1);
    }

    /// What to commit: the first record not done (where a restart must begin),
    /// and the metadata naming what is done above it. `None` before anything was
    /// polled in this assignment (the committed offset is still right then).
    fn commit_point(&self) -> Option<(i64, String)> {
        if self.next_fetch < 0 {
            return None;
        }
        let mut undone = progress::ranges(self.outstanding.undone());
        let mut end = self.next_fetch;
        if let Some(prev) = &self.prev {
            // Not fetched again yet: the previous owner's not-done ranges still count.
            for (a, b) in &prev.undone {
                let a = (*a).max(self.next_fetch);
                if a <= *b {
                    undone.push((a, *b));
                }
            }
            end = end.max(prev.end);
        }
        let pos = undone.first().map_or(end, |r| r.0);
        Some((pos, progress::encode(pos, end, &undone)))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Admitted {
    Buffered,
    /// Done before, by the partition's previous owner (its commit metadata).
    SkippedAsDone,
    /// Revoked meanwhile, or a re-fetch of a record held already.
    Dropped,
}

#[derive(Default)]
struct State {
    parts: HashMap<Tp, Part, TpHash>,
    order: Vec<Tp>,
    rr: usize,
    handed_out: usize,
    /// Watermarks moved since the last store: `[queue topic, tier topics]`.
    dirty: [bool; 2],
    /// `close` was called: the deadline for handed-out deliveries.
    closing: Option<Instant>,
    /// The poll thread left the group.
    finished: bool,
    /// The first assignment (possibly empty) arrived: `[main member, retry member]`.
    joined: [bool; 2],
    /// Assignments seen, for tests and diagnostics.
    rebalances: u64,
    /// Records skipped because a previous session's commit metadata said done.
    skipped: u64,
    /// Commit points not committed yet, per member: written by `maintain`, taken
    /// by the periodic commit, dropped for revoked partitions.
    pending_commit: [HashMap<Tp, (i64, String), TpHash>; 2],
    /// The inbox's previous buffer, swapped in when it is drained (no allocation
    /// per drain).
    drained: Vec<(Tp, i64)>,
}

/// Acks waiting to be applied to the state: the fast path of a settle (see
/// [`Shared::ack_fast`]).
///
/// Why: every ack took the state lock, which the poll thread holds while it
/// pushes a batch of records and the receivers hold while they take one; at a
/// million acks a second the waits on it were a tenth of a receiving task's
/// thread switches. An ack now holds this lock for one push, and the entries
/// are applied in a batch by the next state lock.
#[derive(Default)]
struct Inbox {
    acks: Vec<(Tp, i64)>,
    /// A revoke is under way: settles take the state lock (so the revoke's
    /// grace wait is woken, and what it commits is exact).
    revoking: bool,
}

pub(crate) struct Shared {
    cfg: Arc<KafkaConfig>,
    /// `retry_mode=ordered`: one record per key in flight, nacks redelivered in place.
    ordered: bool,
    topics: Vec<Arc<str>>,
    queue: Arc<str>,
    caps: Arc<Capabilities>,
    state: Mutex<State>,
    /// Acks not applied to `state` yet. Lock order: `state`, then `inbox`.
    inbox: Mutex<Inbox>,
    /// Settles wake the poll thread (revoke grace, close).
    settled: Condvar,
    /// New records, revokes and close wake receivers.
    notify: Notify,
    sender: Arc<Sender>,
    /// The partition queues of the main member (see [`split_queue`]): read by the
    /// poll thread alone (rebalance callbacks, which add and drop them, run on it
    /// too), so never contended.
    queues: Mutex<HashMap<Tp, PartitionQueue<Ctx>, TpHash>>,
    /// Wakes the poll thread: records on one of its queues, room in a split
    /// partition's buffer. Shared with librdkafka's wake-up callbacks, which must
    /// not own `Shared` (the queues are in it).
    poll_wake: Arc<PollWake>,
    /// Set with `State::closing`, under the inbox's lock: lets a settle skip the
    /// state lock (and the close check) while the consumer is not closing.
    closing: AtomicBool,
    joined_tx: watch::Sender<bool>,
    finished_tx: watch::Sender<bool>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("topic", &self.cfg.topic)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The state, with the inbox's acks applied.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.lock_fencing(|_| {})
    }

    /// [`Shared::lock`], calling `fence` on the inbox under its lock while it is
    /// drained: what `fence` sets holds for every ack not drained here.
    fn lock_fencing(&self, fence: impl FnOnce(&mut Inbox)) -> MutexGuard<'_, State> {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        {
            let mut inbox = lock(&self.inbox);
            fence(&mut inbox);
            if inbox.acks.is_empty() {
                return guard;
            }
            std::mem::swap(&mut inbox.acks, &mut st.drained);
        }
        let mut current: Option<(Tp, &mut Part)> = None;
        for &(tp, offset) in &st.drained {
            // Runs of one partition's acks look it up once.
            if current.as_ref().map_or(true, |(t, _)| *t != tp) {
                current = st.parts.get_mut(&tp).map(|p| (tp, p));
                st.dirty[usize::from(tp.topic > 0)] = true;
            }
            if let Some((_, part)) = current.as_mut() {
                part.done(offset);
            }
        }
        st.handed_out = st.handed_out.saturating_sub(st.drained.len());
        st.drained.clear();
        guard
    }

    /// Mark a handed-out record done through the inbox: `None` when the slow path
    /// must be taken instead (ordered mode, which unblocks keys at once; a revoke
    /// or close under way).
    fn ack_fast(&self, tp: Tp, live: &AtomicBool, offset: i64) -> Option<Result<()>> {
        if self.ordered {
            return None;
        }
        let mut inbox = lock(&self.inbox);
        // A close must count this ack, and the ack wait for the final commit.
        if inbox.revoking || self.closing.load(AtomicOrdering::Acquire) {
            return None;
        }
        // Cleared before a revoke unfences the inbox: stale handles see it here.
        if !live.load(AtomicOrdering::Acquire) {
            return Some(Err(lease_gone()));
        }
        inbox.acks.push((tp, offset));
        Some(Ok(()))
    }

    fn topic_index(&self, name: &str) -> Option<usize> {
        self.topics.iter().position(|t| &**t == name)
    }

    fn tps(&self, tpl: &TopicPartitionList) -> Vec<Tp> {
        tpl.elements()
            .iter()
            .filter_map(|e| {
                self.topic_index(e.topic()).map(|topic| Tp {
                    topic,
                    partition: e.partition(),
                })
            })
            .collect()
    }

    fn commit_list(&self, points: &[(Tp, (i64, String))], metadata: bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::with_capacity(points.len());
        for (tp, (pos, meta)) in points {
            let mut e = tpl.add_partition(&self.topics[tp.topic], tp.partition);
            let _ = e.set_offset(Offset::Offset(*pos));
            if metadata && !meta.is_empty() {
                e.set_metadata(meta);
            }
        }
        tpl
    }

    /// Commit `points` (position + metadata) synchronously, storing them first.
    fn commit_now(&self, consumer: &BaseConsumer<Ctx>, points: &[(Tp, (i64, String))], what: &str) {
        if points.is_empty() {
            return;
        }
        let _ = consumer.store_offsets(&self.commit_list(points, false));
        if let Err(e) = consumer.commit(&self.commit_list(points, true), CommitMode::Sync) {
            tracing::warn!(topic = %self.cfg.topic, error = %e, "commit on {what} failed; acked records may be replayed");
        }
    }

    /// `splitter`: the member whose partitions get queues of their own (see
    /// [`split_queue`]), split here, before librdkafka starts fetching them.
    fn on_assign(
        &self,
        consumer: &BaseConsumer<Ctx>,
        tpl: &TopicPartitionList,
        kind: usize,
        splitter: Option<Arc<BaseConsumer<Ctx>>>,
    ) {
        let tps = self.tps(tpl);
        tracing::debug!(topic = %self.cfg.topic, kind, partitions = ?tps, "assigned");
        // The previous owner's progress above the watermark, from the commit metadata.
        let mut progress: HashMap<Tp, Progress> = HashMap::new();
        if tpl.count() > 0 {
            match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
                Ok(committed) => {
                    for e in committed.elements() {
                        let (Some(topic), Some(pos)) =
                            (self.topic_index(e.topic()), e.offset().to_raw())
                        else {
                            continue;
                        };
                        // rdkafka's metadata() panics on non-UTF-8 bytes (another
                        // client's); such metadata is not ours anyway.
                        let meta = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            e.metadata().to_string()
                        }))
                        .unwrap_or_default();
                        if let Some(p) = progress::decode(pos, &meta) {
                            progress.insert(
                                Tp {
                                    topic,
                                    partition: e.partition(),
                                },
                                p,
                            );
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading committed metadata failed; replaying from the watermark")
                }
            }
        }
        let mut split = Vec::new();
        if let Some(c) = &splitter {
            let mut queues = lock(&self.queues);
            for tp in &tps {
                if let std::collections::hash_map::Entry::Vacant(v) = queues.entry(*tp) {
                    let topic = &self.topics[tp.topic];
                    match split_queue(c, topic, tp.partition, &self.poll_wake) {
                        Some(q) => v.insert(q),
                        None => continue,
                    };
                }
                split.push(*tp);
            }
        }
        let mut st = self.lock();
        for tp in tps {
            if let std::collections::hash_map::Entry::Vacant(v) = st.parts.entry(tp) {
                let mut part = Part::new();
                part.prev = progress.remove(&tp);
                part.split = split.contains(&tp);
                v.insert(part);
                st.order.push(tp);
            }
        }
        st.rebalances += 1;
        st.joined[kind] = true;
        let joined = st.joined[0] && (st.joined[1] || self.topics.len() == 1);
        drop(st);
        if joined {
            self.joined_tx.send_replace(true);
        }
    }

    /// Revoke: stop handing the partitions out, drop their buffered records, give
    /// handed-out deliveries `revoke_grace` to settle, retire the epoch, commit.
    /// After a lost assignment nothing is committed and nobody is waited for.
    fn on_revoke(&self, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        let lost = consumer.assignment_lost();
        let tps = self.tps(tpl);
        tracing::debug!(topic = %self.cfg.topic, lost, partitions = ?tps, "revoked");
        {
            // Settles take the state lock until the revoke is over.
            let mut st = self.lock_fencing(|inbox| inbox.revoking = true);
            for tp in &tps {
                if let Some(part) = st.parts.get_mut(tp) {
                    part.revoking = true;
                    part.buffered.clear();
                    part.requeued.clear();
                }
            }
            st.rebalances += 1;
        }
        self.notify.notify_waiters();
        if !lost {
            let deadline = std::time::Instant::now() + self.cfg.revoke_grace;
            let mut st = self.lock();
            loop {
                let busy = tps
                    .iter()
                    .any(|tp| st.parts.get(tp).is_some_and(|p| p.handed_out > 0));
                let now = std::time::Instant::now();
                if !busy || now >= deadline {
                    break;
                }
                st = self
                    .settled
                    .wait_timeout(st, deadline - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        let mut positions = Vec::new();
        {
            let mut st = self.lock();
            for tp in &tps {
                if let Some(part) = st.parts.remove(tp) {
                    part.live.store(false, AtomicOrdering::Release);
                    st.handed_out = st.handed_out.saturating_sub(part.handed_out);
                    if part.handed_out > 0 {
                        tracing::warn!(
                            topic = %self.topics[tp.topic], partition = tp.partition,
                            unsettled = part.handed_out,
                            "partition revoked with deliveries unsettled after revoke_grace; \
                             they will be redelivered to the partition's next owner"
                        );
                    }
                    if let Some(point) = part.commit_point() {
                        positions.push((*tp, point));
                    }
                }
                st.pending_commit[usize::from(tp.topic > 0)].remove(tp);
            }
            st.order.retain(|tp| !tps.contains(tp));
            // The revoked epochs are cleared: a stale handle's fast ack sees that.
            lock(&self.inbox).revoking = false;
        }
        {
            let mut queues = lock(&self.queues);
            for tp in &tps {
                queues.remove(tp);
            }
        }
        if lost {
            tracing::warn!(topic = %self.cfg.topic, "assignment lost: nothing committed for the lost partitions");
            return;
        }
        self.commit_now(consumer, &positions, "revoke");
    }

    /// The delivery for `record`, handed out now.
    fn delivery(
        self: &Arc<Self>,
        tp: Tp,
        live: &Arc<AtomicBool>,
        record: Received,
        attempt: u32,
    ) -> Delivery {
        let topic = &self.topics[tp.topic];
        let meta = DeliveryMeta::new(
            record.message_id(topic),
            attempt,
            record.enqueued_at,
            self.queue.clone(),
        )
        .with_position(Position::in_log(
            topic.clone(),
            record.partition,
            record.offset,
        ));
        let message = record.message();
        let ack = KafkaAck {
            shared: self.clone(),
            tp,
            live: live.clone(),
            record,
            attempt,
            settled: AtomicBool::new(false),
        };
        Delivery::new(message, meta, AckHandle::new(ack)).with_capabilities(self.caps.clone())
    }

    /// Take up to `max` deliverable records, round robin over partitions; or the
    /// time until the next one is due.
    fn take(self: &Arc<Self>, max: usize) -> Result<(Vec<Delivery>, Option<Duration>)> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if st.closing.is_some() || st.finished {
            return Err(Error::closed("consumer"));
        }
        let mut out: Vec<(Tp, Arc<AtomicBool>, Received, u32)> = Vec::with_capacity(max.min(1024));
        let mut next_due: Option<Duration> = None;
        let mut soonest = |d: Duration| {
            next_due = Some(next_due.map_or(d, |n: Duration| n.min(d)));
        };
        let n = st.order.len();
        if n == 0 || max == 0 {
            return Ok((Vec::new(), None));
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let start = st.rr;
        st.rr = st.rr.wrapping_add(1);
        let mut progress = true;
        let mut refill = false;
        let mut taken = 0usize;
        while taken < max && progress {
            progress = false;
            for i in 0..n {
                if taken >= max {
                    break;
                }
                let tp = st.order[(start + i) % n];
                let Some(part) = st.parts.get_mut(&tp) else {
                    continue;
                };
                if part.revoking {
                    continue;
                }
                // This partition's share of what is left to take in this pass,
                // taken with one lookup of its state (a lookup per record, a
                // cache miss each, was 3 % of a drain).
                let share = (max - taken).div_ceil(n - i);
                let before = part.buffered.len();
                let live = part.live.clone();
                for _ in 0..share {
                    let picked = if let Some(idx) = part.requeued.iter().position(|r| r.due <= now)
                    {
                        let r = part.requeued.swap_remove(idx);
                        Some((r.record, r.attempt))
                    } else {
                        for r in &part.requeued {
                            soonest(r.due.saturating_duration_since(now));
                        }
                        if self.ordered && tp.topic == 0 {
                            // The first record whose key has nothing in flight (keyless
                            // records promise no order).
                            let blocked = &part.blocked;
                            let idx = part.buffered.iter().position(|r| {
                                r.key.as_ref().map_or(true, |k| !blocked.contains_key(k))
                            });
                            let picked = idx.and_then(|i| part.buffered.remove(i));
                            if let Some(r) = &picked {
                                if let Some(k) = &r.key {
                                    *part.blocked.entry(k.clone()).or_default() += 1;
                                }
                            }
                            picked.map(|r| {
                                let a = r.attempt;
                                (r, a)
                            })
                        } else {
                            match part.buffered.front() {
                                Some(front) => match front.not_before {
                                    Some(t) if t > wall => {
                                        soonest(t.duration_since(wall).unwrap_or_default());
                                        None
                                    }
                                    _ => part.buffered.pop_front().map(|r| {
                                        let a = r.attempt;
                                        (r, a)
                                    }),
                                },
                                None => None,
                            }
                        }
                    };
                    let Some((record, attempt)) = picked else {
                        break;
                    };
                    part.handed_out += 1;
                    out.push((tp, live.clone(), record, attempt));
                    taken += 1;
                    progress = true;
                }
                // A split partition's buffer is refilled by the poll thread, which
                // sleeps while every buffer is full: wake it once there is room for
                // a batch, well before this one runs dry.
                let half = self.cfg.buffer / 2;
                refill |= part.split && before > half && part.buffered.len() <= half;
            }
        }
        st.handed_out += taken;
        drop(guard);
        if refill {
            self.poll_wake.wake();
        }
        let deliveries = out
            .into_iter()
            .map(|(tp, live, record, attempt)| self.delivery(tp, &live, record, attempt))
            .collect();
        Ok((deliveries, next_due))
    }

    /// Mark a handed-out record done (acked, or its retry copy confirmed); in
    /// ordered mode its key's next record may go out now.
    fn done(&self, tp: Tp, live: &Arc<AtomicBool>, offset: i64, key: Option<&str>) -> Result<()> {
        self.done_if(tp, live, offset, key, false)
            .unwrap_or_else(|| Err(lease_gone()))
    }

    /// [`Shared::done`], unless `open_only` and the consumer is closing: then
    /// nothing is done and `None` returned (the settle must take the async path,
    /// which waits for the final commit). Checked under the same lock as the
    /// settle, so a close that begins later counts this delivery as settled.
    fn done_if(
        &self,
        tp: Tp,
        live: &Arc<AtomicBool>,
        offset: i64,
        key: Option<&str>,
        open_only: bool,
    ) -> Option<Result<()>> {
        let mut st = self.lock();
        if open_only && st.closing.is_some() {
            return None;
        }
        let Some(part) = st.parts.get_mut(&tp).filter(|p| Arc::ptr_eq(&p.live, live)) else {
            return Some(Err(lease_gone()));
        };
        part.done(offset);
        if let Some(k) = key {
            if let Some(n) = part.blocked.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    part.blocked.remove(k);
                }
            }
        }
        let unblocked = self.ordered && key.is_some();
        let wake = part.revoking || st.closing.is_some();
        st.handed_out = st.handed_out.saturating_sub(1);
        st.dirty[usize::from(tp.topic > 0)] = true;
        drop(st);
        if wake {
            self.settled.notify_all();
        }
        if unblocked {
            self.notify.notify_waiters();
        }
        Some(Ok(()))
    }

    /// Give a handed-out record back: delivered again in this session after
    /// `after` (not done, so never committed past), unless the partition is going
    /// away or the consumer closing — then the next owner or session gets it.
    fn give_back(
        &self,
        tp: Tp,
        live: &Arc<AtomicBool>,
        record: &Received,
        attempt: u32,
        after: Duration,
    ) -> Result<()> {
        let mut st = self.lock();
        let closing = st.closing.is_some();
        let Some(part) = st.parts.get_mut(&tp).filter(|p| Arc::ptr_eq(&p.live, live)) else {
            return Err(lease_gone());
        };
        part.handed_out = part.handed_out.saturating_sub(1);
        let wake = part.revoking || closing;
        if !part.revoking && !closing {
            part.requeued.push(Requeued {
                due: deadline_in(after),
                record: record.clone(),
                attempt,
            });
        }
        st.handed_out = st.handed_out.saturating_sub(1);
        drop(st);
        if wake {
            self.settled.notify_all();
        }
        self.notify.notify_waiters();
        Ok(())
    }

    /// Whether the consumer is closing and nothing is handed out any more.
    fn close_ready(&self) -> bool {
        if !self.closing.load(AtomicOrdering::Acquire) {
            return false;
        }
        let st = self.lock();
        st.closing.is_some() && st.handed_out == 0
    }

    /// Wait until the poll thread has committed and left (bounded).
    async fn wait_finished(&self, limit: Duration) -> Result<()> {
        let mut rx = self.finished_tx.subscribe();
        let waited = tokio::time::timeout(limit, rx.wait_for(|f| *f))
            .await
            .map(|r| r.is_ok());
        match waited {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("the consumer did not commit and leave its group within {limit:?}"),
            )),
        }
    }

    /// Push polled records into their partitions' buffers.
    fn push(&self, records: Vec<Received>) {
        if records.is_empty() {
            return;
        }
        let wall = SystemTime::now();
        let mut guard = self.lock();
        let st = &mut *guard;
        for mut r in records {
            let tp = Tp {
                topic: r.topic_index,
                partition: r.partition,
            };
            self.bound_not_before(&mut r, wall);
            let Some(part) = st.parts.get_mut(&tp) else {
                continue;
            };
            if part.admit(r) == Admitted::SkippedAsDone {
                st.skipped += 1;
                st.dirty[usize::from(tp.topic > 0)] = true;
            }
        }
        drop(guard);
        self.notify.notify_waiters();
    }

    /// A tier record's not-before time, bounded by its tier (see
    /// [`record::bounded_not_before`]).
    fn bound_not_before(&self, r: &mut Received, wall: SystemTime) {
        let tier = r
            .topic_index
            .checked_sub(1)
            .and_then(|i| self.cfg.retry_tiers.get(i).copied());
        r.not_before = record::bounded_not_before(r.not_before, tier, wall);
    }

    /// Pause the shared queue's partitions that are full, revoking, or whose head
    /// is not due yet; resume the others. Store the watermarks that moved.
    fn maintain(&self, consumer: &BaseConsumer<Ctx>, kind: usize, commits: &mut Committer) {
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        let mut restart = TopicPartitionList::new();
        let mut store = Vec::new();
        // Commit points are worked out only when a commit is due: a point costs a
        // walk over the partition's outstanding records (for the metadata), too
        // much to pay every poll. Until then `dirty` stays set.
        let due = commits.due(self.cfg.commit_interval);
        {
            let mut st = self.lock();
            let wall = SystemTime::now();
            let cap = self.cfg.buffer;
            let dirty = due && std::mem::take(&mut st.dirty[kind]);
            for (tp, part) in st.parts.iter_mut() {
                if usize::from(tp.topic > 0) != kind {
                    continue;
                }
                let head_waits = part
                    .buffered
                    .front()
                    .and_then(|r| r.not_before)
                    .is_some_and(|t| t > wall);
                // Resume only below half the cap, so a busy partition is not toggled
                // per record.
                let full = if part.paused {
                    part.buffered.len() > cap / 2
                } else {
                    part.buffered.len() >= cap
                };
                // Too many not-done ranges for the commit metadata: stop fetching
                // until the watermark catches up.
                let gappy = part.ranges > progress::MAX_RANGES;
                // A partition with a queue of its own is never paused: the poll
                // thread stops reading that queue instead (a pause would throw away
                // what librdkafka prefetched, to be fetched again on resume).
                let want = !part.split && (part.revoking || head_waits || full || gappy);
                if want != part.paused {
                    let list = if want { &mut pause } else { &mut resume };
                    list.add_partition(&self.topics[tp.topic], tp.partition);
                    if !want && part.next_fetch >= 0 {
                        let _ = restart
                            .add_partition(&self.topics[tp.topic], tp.partition)
                            .set_offset(Offset::Offset(part.next_fetch));
                    }
                    part.paused = want;
                }
                if dirty {
                    if let Some(point) = part.commit_point() {
                        if part.stored.as_ref() != Some(&point) {
                            part.ranges = point.1.matches('+').count();
                            part.stored = Some(point.clone());
                            store.push((*tp, point));
                        }
                    }
                }
            }
            for (tp, point) in &store {
                st.pending_commit[kind].insert(*tp, point.clone());
            }
        }
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                tracing::debug!(error = %e, "pause failed");
            }
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                tracing::debug!(error = %e, "resume failed");
            }
        }
        if restart.count() > 0 {
            // librdkafka handles a resume on its main thread and neither wakes the
            // broker thread nor clears a fetch backoff: with every partition of the
            // member paused, that thread sleeps on (up to 1 s) before it fetches a
            // resumed partition. A seek to where the partition stands anyway (the
            // offset after the last record polled, where the pause left
            // librdkafka's position) restarts its fetcher, which does both.
            if let Err(e) = consumer.seek_partitions(restart, Duration::ZERO) {
                tracing::debug!(error = %e, "restarting the fetch of resumed partitions failed");
            }
        }
        if !store.is_empty() {
            if let Err(e) = consumer.store_offsets(&self.commit_list(&store, false)) {
                tracing::debug!(error = %e, "storing offsets failed");
            }
        }
        if due {
            let points: Vec<(Tp, (i64, String))> = {
                let mut st = self.lock();
                let taken = std::mem::take(&mut st.pending_commit[kind]);
                taken
                    .into_iter()
                    .filter(|(tp, _)| st.parts.contains_key(tp))
                    .collect()
            };
            // Never after a lost assignment (the broker would fence a stale
            // generation's commit anyway).
            if !points.is_empty() && !consumer.assignment_lost() {
                if let Err(e) = consumer.commit(&self.commit_list(&points, true), CommitMode::Async)
                {
                    tracing::debug!(error = %e, "periodic commit failed");
                }
            }
        }
    }

    /// Close: commit every partition's watermark (unless the assignment was lost)
    /// and retire every epoch.
    fn final_commit(&self, consumer: &BaseConsumer<Ctx>, kind: usize) {
        let lost = consumer.assignment_lost();
        let mut positions = Vec::new();
        {
            let mut st = self.lock();
            let mine: Vec<Tp> = st
                .parts
                .keys()
                .filter(|tp| usize::from(tp.topic > 0) == kind)
                .copied()
                .collect();
            for tp in mine {
                if let Some(part) = st.parts.remove(&tp) {
                    part.live.store(false, AtomicOrdering::Release);
                    st.handed_out = st.handed_out.saturating_sub(part.handed_out);
                    if let Some(point) = part.commit_point() {
                        positions.push((tp, point));
                    }
                }
            }
            st.pending_commit[kind].clear();
            st.order.retain(|tp| usize::from(tp.topic > 0) != kind);
        }
        if kind == 0 {
            lock(&self.queues).clear();
        }
        if lost {
            return;
        }
        self.commit_now(consumer, &positions, "close");
    }
}

/// A panic while holding one of the consumer's locks leaves consistent data
/// (every step is completed before anything can panic), so a poisoned lock is
/// used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the poll thread sleeps on between rounds that found nothing: set by
/// librdkafka (a queue of the poll thread's turned non-empty) and by receivers
/// (room in a split partition's buffer). A flag, so a wake-up between the round
/// and the sleep is not lost.
#[derive(Default)]
struct PollWake {
    woken: Mutex<bool>,
    cv: Condvar,
}

impl PollWake {
    fn wake(&self) {
        *lock(&self.woken) = true;
        self.cv.notify_one();
    }

    /// Sleep until woken or `limit` passed.
    fn wait(&self, limit: Duration) {
        let mut woken = lock(&self.woken);
        if !*woken {
            woken = self
                .cv
                .wait_timeout(woken, limit)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *woken = false;
    }
}

fn lease_gone() -> Error {
    Error::new(
        ErrorKind::LeaseExpired,
        "the partition was revoked from this consumer (rebalance or close); its next owner \
         delivers the record again",
    )
}

/// The librdkafka context: rebalance callbacks run on the poll thread.
pub(crate) struct Ctx {
    shared: Arc<Shared>,
    /// 0: the member reading the queue's topic; 1: the one reading its tiers.
    kind: usize,
    /// The member itself, when its partitions get queues of their own (see
    /// [`split_queue`]); set once it is created. Weak: the member owns this.
    splitter: OnceLock<Weak<BaseConsumer<Ctx>>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let splitter = self.splitter.get().and_then(Weak::upgrade);
                self.shared.on_assign(consumer, tpl, self.kind, splitter);
            }
            Rebalance::Revoke(tpl) => self.shared.on_revoke(consumer, tpl),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.shared.notify.notify_waiters();
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "offset commit failed");
        }
    }
}

/// The periodic commit of one member's stored watermarks. Ours rather than
/// librdkafka's auto commit, whose commit of the revoked partitions on unassign
/// kept a closing member from sending its LeaveGroup (it terminated mid-unassign),
/// which stalled the group's next rebalance until the session timed out.
struct Committer {
    last: std::time::Instant,
}

impl Committer {
    fn new() -> Self {
        Committer {
            last: std::time::Instant::now(),
        }
    }

    /// Whether `interval` passed since the last periodic commit (and restart it).
    fn due(&mut self, interval: Duration) -> bool {
        if self.last.elapsed() < interval {
            return false;
        }
        self.last = std::time::Instant::now();
        true
    }
}

/// Poll one member's shared queue (serving its callbacks): up to [`POLL_BATCH`]
/// records. Returns how many there were.
fn poll_into(shared: &Shared, consumer: &BaseConsumer<Ctx>, arena: &mut PayloadArena) -> usize {
    let mut batch = Vec::new();
    while batch.len() < POLL_BATCH {
        match consumer.poll(Duration::ZERO) {
            Some(Ok(m)) => {
                let topic = rdkafka::Message::topic(&m);
                if let Some(i) = shared.topic_index(topic) {
                    batch.push(Received::parse_in(&m, i, arena));
                }
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "consumer poll error");
                break;
            }
            None => break,
        }
    }
    let n = batch.len();
    shared.push(batch);
    n
}

/// Read the split partitions' queues: up to [`POLL_BATCH`] records from each
/// whose buffer has room for them (none while it is revoked or its commit
/// metadata full). Returns how many there were.
fn pull_split(shared: &Shared, arena: &mut PayloadArena) -> usize {
    let cap = shared.cfg.buffer;
    let open: Vec<(Tp, usize)> = {
        let st = shared.lock();
        st.parts
            .iter()
            .filter(|(_, p)| p.split && !p.revoking && p.ranges <= progress::MAX_RANGES)
            .map(|(tp, p)| (*tp, cap.saturating_sub(p.buffered.len()).min(POLL_BATCH)))
            .filter(|(_, room)| *room > 0)
            .collect()
    };
    if open.is_empty() {
        return 0;
    }
    let mut batch = Vec::new();
    {
        let queues = lock(&shared.queues);
        for (tp, room) in open {
            let Some(queue) = queues.get(&tp) else {
                continue;
            };
            for _ in 0..room {
                match queue.poll(Duration::ZERO) {
                    Some(Ok(m)) => batch.push(Received::parse_in(&m, tp.topic, arena)),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "partition queue poll error");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
    let n = batch.len();
    shared.push(batch);
    n
}

/// The poll thread: serves both members (the queue's topic in group G, the tiers
/// in group `G.retry`), so neither ever exceeds `max.poll.interval.ms` however
/// slow the handlers are.
fn poll_thread(
    shared: Arc<Shared>,
    main: Arc<BaseConsumer<Ctx>>,
    retry: Option<Arc<BaseConsumer<Ctx>>>,
) {
    let mut commits = [Committer::new(), Committer::new()];
    let mut arena = PayloadArena::default();
    loop {
        let mut got = poll_into(&shared, &main, &mut arena);
        got += pull_split(&shared, &mut arena);
        if let Some(r) = &retry {
            got += poll_into(&shared, r, &mut arena);
            shared.maintain(r, 1, &mut commits[1]);
        }
        shared.maintain(&main, 0, &mut commits[0]);
        let leave = {
            let st = shared.lock();
            match st.closing {
                Some(deadline) => st.handed_out == 0 || Instant::now() >= deadline,
                None => false,
            }
        };
        if leave {
            break;
        }
        if got == 0 {
            // Every queue was empty (or every buffer full): sleep until one of
            // them has records (or a buffer room), bounded, so commits, resumes
            // and the close check still run.
            shared.poll_wake.wait(POLL_WAIT);
        }
    }
    shared.final_commit(&main, 0);
    if let Some(r) = &retry {
        shared.final_commit(r, 1);
    }
    // Leave both groups (unsubscribe, then rd_kafka_consumer_close on drop).
    leave(main);
    if let Some(r) = retry {
        leave(r);
    }
    shared.lock().finished = true;
    shared.finished_tx.send_replace(true);
    shared.notify.notify_waiters();
}

/// Give a newly assigned partition a librdkafka queue of its own (before its
/// fetch starts, so none of its records is on the member's shared queue), waking
/// the poll thread when it turns non-empty.
///
/// Why: with every partition on the shared queue, backpressure meant pausing a
/// full partition, and a pause throws away what librdkafka had prefetched for it
/// (up to a fetch response, thousands of small records), fetched again after the
/// resume — that cost a backlog's drain through the traits ~40 % of its rate
/// (consume_cost traits1 0.41× raw, 0.70× with a buffer that never filled). A
/// queue of its own is simply not read while the partition's buffer is full;
/// librdkafka stops fetching for it at `queued.min.messages`. The split
/// lasts the client's life (librdkafka never forwards the partition to the
/// shared queue again), so every later assignment of it splits as well.
fn split_queue(
    consumer: &Arc<BaseConsumer<Ctx>>,
    topic: &str,
    partition: i32,
    wake: &Arc<PollWake>,
) -> Option<PartitionQueue<Ctx>> {
    let mut queue = consumer.split_partition_queue(topic, partition)?;
    let wake = wake.clone();
    queue.set_nonempty_callback(move || wake.wake());
    Some(queue)
}

/// Leave the group: unsubscribe first (librdkafka revokes, and sends LeaveGroup
/// unless a JoinGroup is in flight), serve the callbacks until nothing is
/// assigned (bounded), then close. A member that closes mid-rebalance may still
/// skip the LeaveGroup; the short `session.timeout.ms` bounds how long the group
/// waits for it.
fn leave(consumer: Arc<BaseConsumer<Ctx>>) {
    consumer.unsubscribe();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(10));
        if consumer.assignment().map_or(true, |a| a.count() == 0) {
            break;
        }
    }
    drop(consumer);
}

/// A `group.instance.id` no other consumer uses (random, 128 bits): static
/// membership for this consumer's lifetime only (see `connect`). `kind`: 0 for the
/// queue's member, 1 for the tiers' (another group, but kept apart anyway).
fn instance_id(kind: usize) -> String {
    format!(
        "ferrymq-{:016x}{:016x}-{kind}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// Settles one delivery: ack marks it done, nack produces a retry copy first.
struct KafkaAck {
    shared: Arc<Shared>,
    tp: Tp,
    live: Arc<AtomicBool>,
    record: Received,
    attempt: u32,
    settled: AtomicBool,
}

impl fmt::Debug for KafkaAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAck")
            .field("partition", &self.record.partition)
            .field("offset", &self.record.offset)
            .field("attempt", &self.attempt)
            .finish()
    }
}

impl KafkaAck {
    fn check_live(&self) -> Result<()> {
        if self.live.load(AtomicOrdering::Acquire) {
            Ok(())
        } else {
            Err(lease_gone())
        }
    }

    /// After a settle: if that was the last delivery a closing consumer waited
    /// for, wait for its final commit, so the settle is on the broker when the
    /// caller (a worker shutting down) moves on.
    async fn after_settle(&self) {
        if self.shared.close_ready() {
            let limit = self.shared.cfg.close_timeout + Duration::from_secs(10);
            let _ = self.shared.wait_finished(limit).await;
        }
    }

    async fn settled_ok(&self, r: Result<()>) -> Result<()> {
        if r.is_ok() {
            self.settled.store(true, AtomicOrdering::Release);
            self.after_settle().await;
        }
        r
    }
}

#[async_trait]
impl Ack for KafkaAck {
    async fn ack(&self) -> Result<()> {
        let r = self.shared.done(
            self.tp,
            &self.live,
            self.record.offset,
            self.record.key.as_deref(),
        );
        self.settled_ok(r).await
    }

    /// Produces a copy to the smallest retry tier holding `redeliver_after` (now:
    /// the shortest tier, due at once) with attempt + 1, a not-before time, and the
    /// original id and enqueue time; only once the broker confirmed the copy is
    /// the original marked done. A crash in between duplicates, never loses.
    async fn nack(&self, redeliver_after: Option<Duration>) -> Result<()> {
        self.check_live()?;
        self.shared.caps.check_nack_delay(redeliver_after)?;
        let delay = redeliver_after.unwrap_or_default();
        let cfg = &self.shared.cfg;
        let attempt = self.attempt.saturating_add(1);
        let tier = if self.shared.ordered && self.tp.topic == 0 {
            // Ordered mode: in place, its key blocked until it is done.
            None
        } else {
            cfg.tier_for(delay)
        };
        let Some(tier) = tier else {
            // Ordered mode, or no tiers configured: redeliver in this session
            // (attempt counted in memory only), never committed past meanwhile.
            let r = self
                .shared
                .give_back(self.tp, &self.live, &self.record, attempt, delay);
            return self.settled_ok(r).await;
        };
        let now = SystemTime::now();
        let due = now.checked_add(delay).unwrap_or(now);
        let r = &self.record;
        let headers = record::user_headers(&r.headers);
        let headers = with_header(headers, H_ID, &r.id(&self.shared.topics[self.tp.topic]));
        let headers = with_header(headers, H_ENQUEUED_AT, &unix_ms(r.enqueued_at).to_string());
        let headers = with_header(headers, H_ATTEMPT, &attempt.to_string());
        let headers = with_header(headers, H_NOT_BEFORE, &unix_ms_ceil(due).to_string());
        let topic = cfg.tier_topic(tier);
        self.shared
            .sender
            .produce(Outgoing {
                topic: &topic,
                key: r.key.as_deref(),
                payload: &r.payload,
                headers: Some(headers),
            })
            .await?;
        let done = self
            .shared
            .done(self.tp, &self.live, r.offset, r.key.as_deref())
            .map_err(|_| {
                Error::new(
                ErrorKind::LeaseExpired,
                "the retry copy was produced, but the partition was revoked before the original \
                 could be marked done: both will be delivered",
            )
            });
        self.settled_ok(done).await
    }

    /// Kafka has no leases: nothing to extend while the partition is ours.
    async fn extend(&self, _by: Duration) -> Result<()> {
        self.check_live()
    }

    /// Re-queued locally and handed out again in this session (not committed past
    /// meanwhile), attempt unchanged. While the partition is being revoked or the
    /// consumer closing, it is left uncommitted for the next owner instead.
    async fn release(&self, redeliver_after: Option<Duration>) -> Result<()> {
        // A local re-queue could hold any delay, but the same limit as a nack keeps
        // the two interchangeable for middleware.
        self.shared.caps.check_nack_delay(redeliver_after)?;
        let r = self.shared.give_back(
            self.tp,
            &self.live,
            &self.record,
            self.attempt,
            redeliver_after.unwrap_or_default(),
        );
        self.settled_ok(r).await
    }

    fn is_live(&self) -> bool {
        self.live.load(AtomicOrdering::Acquire)
    }

    /// An ack (while not closing) and an extend need no I/O: done here, so they
    /// cost no boxed future. A nack may produce a retry copy, a release is rare,
    /// and an ack while closing waits for the final commit: those go async.
    fn settle_now(&self, op: Settle) -> Option<Result<()>> {
        match op {
            Settle::Ack => {
                if let Some(r) = self
                    .shared
                    .ack_fast(self.tp, &self.live, self.record.offset)
                {
                    if r.is_ok() {
                        self.settled.store(true, AtomicOrdering::Release);
                    }
                    return Some(r);
                }
                let r = self.shared.done_if(
                    self.tp,
                    &self.live,
                    self.record.offset,
                    self.record.key.as_deref(),
                    true,
                )?;
                if r.is_ok() {
                    self.settled.store(true, AtomicOrdering::Release);
                }
                Some(r)
            }
            Settle::Extend(_) => Some(self.check_live()),
            _ => None,
        }
    }
}

impl Drop for KafkaAck {
    /// A delivery dropped unsettled comes back in this session (like a release).
    fn drop(&mut self) {
        if !self.settled.load(AtomicOrdering::Acquire) && self.live.load(AtomicOrdering::Acquire) {
            let _ = self.shared.give_back(
                self.tp,
                &self.live,
                &self.record,
                self.attempt,
                Duration::ZERO,
            );
        }
    }
}

/// One member of the queue's consumer group. See the crate docs.
pub struct KafkaConsumer {
    shared: Arc<Shared>,
    lag: LazyLag,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("topic", &self.shared.cfg.topic)
            .field("group", &self.shared.cfg.group())
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    pub(crate) async fn connect(cfg: KafkaConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.create {
            ensure_topics(&cfg).await?;
        }
        let cfg = Arc::new(cfg);
        let topics: Vec<Arc<str>> = std::iter::once(cfg.topic.clone())
            .chain(cfg.tier_topics())
            .map(Arc::from)
            .collect();
        let (joined_tx, mut joined_rx) = watch::channel(false);
        let (finished_tx, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            ordered: cfg.retry_mode == crate::RetryMode::Ordered,
            caps: Arc::new(capabilities(&cfg)),
            queue: topics[0].clone(),
            sender: Arc::new(Sender::new(cfg.clone())?),
            topics,
            state: Mutex::new(State::default()),
            inbox: Mutex::new(Inbox::default()),
            settled: Condvar::new(),
            notify: Notify::new(),
            queues: Mutex::new(HashMap::default()),
            poll_wake: Arc::new(PollWake::default()),
            closing: AtomicBool::new(false),
            joined_tx,
            finished_tx,
            cfg: cfg.clone(),
        });
        let lag = LazyLag::new(cfg.clone());

        let member = |group: String,
                      topics: &[Arc<str>],
                      kind: usize,
                      split: bool|
         -> Result<Arc<BaseConsumer<Ctx>>> {
            let mut c = cfg.base_client_config();
            c.set("group.id", group)
                .set("partition.assignment.strategy", "cooperative-sticky")
                // Committed by the poll thread every commit_interval (see Committer).
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                // A rebalance is noticed on the next heartbeat: 1 s (librdkafka's
                // default is 3 s) so a joining member gets its partitions sooner.
                .set("heartbeat.interval.ms", "1000")
                // A member that died (or closed mid-rebalance without a LeaveGroup,
                // which librdkafka does when a JoinGroup is in flight) holds up every
                // rebalance of the group until its session times out: 10 s rather
                // than the default 45 s.
                .set("session.timeout.ms", "10000")
                // Static membership, under an id of this consumer alone: after a
                // broker outage longer than the session timeout librdkafka drops
                // its member id and joins anew, while the restarted coordinator
                // has reloaded the old member from its log and waits out that
                // member's session (10 s) before the rebalance can finish — no
                // delivery for that long after the broker is back. Rejoining under
                // the same instance id replaces the old member at once. Nothing
                // else changes: `leave` unsubscribes first, and librdkafka sends
                // a static member's LeaveGroup on unsubscribe (only on a bare
                // close does it skip it), so a closing member still hands its
                // partitions on at once; a dead one is dropped after its session.
                .set("group.instance.id", instance_id(kind))
                .set("enable.partition.eof", "false");
            if kind == 0 {
                // A partition resumed (its buffer drained) is fetched only with the
                // broker's next Fetch; while the others are caught up, the one in
                // flight is a long poll held up to this long. librdkafka's 500 ms
                // default stalled a resumed partition that long, cutting a drain of
                // a backlog (consume_cost traits1) from ~190k to ~60k records/s.
                // Not for the tiers' member: its records are due seconds later.
                c.set("fetch.wait.max.ms", FETCH_WAIT_MS);
                // While librdkafka's queue holds `queued.min.messages` (shared by
                // all partitions: any backlog of small records reaches the default
                // 100,000), each partition fetched is backed off this long, and it
                // stays idle that long even once drained: the default 1 s stalled a
                // backlog's drain for a second at a time.
                c.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
            }
            if split {
                // Each split partition's queue is a queue of its own to librdkafka,
                // which prefetches up to these limits into each (not one shared
                // 100,000 records / 64 MiB for the member): ahead of the partition's
                // buffer, enough for a drain not to wait on fetches.
                c.set(
                    "queued.min.messages",
                    prefetch_records(cfg.buffer).to_string(),
                )
                .set("queued.max.messages.kbytes", PREFETCH_KIB);
            }
            cfg.apply_overrides(&mut c);
            let mut consumer: BaseConsumer<Ctx> = c
                .create_with_context(Ctx {
                    shared: shared.clone(),
                    kind,
                    splitter: OnceLock::new(),
                })
                .map_err(|e| config_error("consumer", e))?;
            // Records (of partitions not split) and callbacks on the shared queue
            // wake the poll thread.
            let wake = shared.poll_wake.clone();
            consumer.set_nonempty_callback(move || wake.wake());
            let consumer = Arc::new(consumer);
            if split {
                let _ = consumer.context().splitter.set(Arc::downgrade(&consumer));
            }
            let names: Vec<&str> = topics.iter().map(|t| &**t).collect();
            consumer
                .subscribe(&names)
                .map_err(|e| kafka_error("subscribing", e))?;
            Ok(consumer)
        };
        // Two members: the queue's topic in the group, the tiers in `GROUP.retry`.
        // One member for both would let the sticky assignor balance partition
        // *counts* across all topics — one member could get every tier partition
        // and the other every partition of the queue.
        let main = member(cfg.group(), &shared.topics[..1], 0, true)?;
        let retry = if shared.topics.len() > 1 {
            Some(member(cfg.retry_group(), &shared.topics[1..], 1, false)?)
        } else {
            None
        };
        let thread = std::thread::Builder::new()
            .name(format!("ferrymq-kafka-{}", cfg.topic))
            .spawn({
                let shared = shared.clone();
                move || poll_thread(shared, main, retry)
            })
            .map_err(|e| Error::backend("cannot start the poll thread", e))?;
        let me = KafkaConsumer {
            shared,
            lag,
            thread: Mutex::new(Some(thread)),
        };
        let joined = tokio::time::timeout(cfg.join_timeout, joined_rx.wait_for(|j| *j)).await;
        if joined.is_err() {
            me.begin_close(Duration::ZERO);
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "no partition assignment from group {:?} within join_timeout ({:?}); is the \
                     broker at {} reachable?",
                    cfg.group(),
                    cfg.join_timeout,
                    cfg.brokers.join(",")
                ),
            ));
        }
        Ok(me)
    }

    fn begin_close(&self, timeout: Duration) -> bool {
        let nothing_out = {
            // From here on an ack takes the state lock, and so counts for the close.
            let mut st = self
                .shared
                .lock_fencing(|_| self.shared.closing.store(true, AtomicOrdering::Release));
            if st.closing.is_none() {
                st.closing = Some(deadline_in(timeout));
            }
            st.handed_out == 0
        };
        self.shared.notify.notify_waiters();
        self.shared.settled.notify_all();
        nothing_out
    }

    /// Partitions currently assigned to this member: `(topic, partition)`.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        let st = self.shared.lock();
        let mut v: Vec<(String, i32)> = st
            .parts
            .keys()
            .map(|tp| (self.shared.topics[tp.topic].to_string(), tp.partition))
            .collect();
        v.sort();
        v
    }

    /// Records skipped (never delivered) because the commit metadata of a previous
    /// session said they were done: the replay saved.
    pub fn skipped(&self) -> u64 {
        self.shared.lock().skipped
    }

    /// Rebalance callbacks (assign and revoke) seen so far.
    pub fn rebalances(&self) -> u64 {
        self.shared.lock().rebalances
    }

    /// Wait until the member has committed and left the group (after `close`).
    pub async fn closed(&self) -> Result<()> {
        self.shared
            .wait_finished(self.shared.cfg.close_timeout + Duration::from_secs(30))
            .await
    }
}

impl Drop for KafkaConsumer {
    /// Dropped without `close`: the poll thread waits for handed-out deliveries up
    /// to `close_timeout`, commits and leaves, in the background.
    fn drop(&mut self) {
        self.begin_close(self.shared.cfg.close_timeout);
        if let Ok(mut t) = self.thread.lock() {
            t.take();
        }
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = deadline_in(wait);
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (got, next_due) = self.shared.take(max)?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = match next_due {
                Some(d) => deadline.min(ferrymq_core::time::deadline_after(now, d)),
                None => deadline,
            };
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Group lag (end offsets − committed) of the topic (`waiting`, less what this
    /// member holds, `in_flight`) and of its tiers (`delayed`). Approximate.
    async fn depth(&self) -> Result<Depth> {
        let held = u64::try_from(self.shared.lock().handed_out).unwrap_or(u64::MAX);
        lag_depth(&self.lag.get()?, held).await
    }

    /// Stop handing out deliveries. With none outstanding, commits and leaves the
    /// group before returning. Otherwise returns at once and keeps the membership
    /// until they are settled (the last settle waits for the commit) or
    /// `close_timeout` passes; [`KafkaConsumer::closed`] waits for that.
    async fn close(&self) -> Result<()> {
        if self.begin_close(self.shared.cfg.close_timeout) {
            self.shared
                .wait_finished(self.shared.cfg.close_timeout + Duration::from_secs(30))
                .await?;
        }
        Ok(())
    }

    fn queue(&self) -> &str {
        &self.shared.cfg.topic
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }
}

#[cfg(test)]
mod tests {
    use super::Outstanding;

    #[test]
    fn outstanding_marks_the_right_offset_also_across_gaps() {
        let mut o = Outstanding::default();
        // Contiguous, then gaps (compaction, transaction markers).
        for off in [10, 11, 12, 13, 20, 21, 25, 40] {
            o.push(off);
        }
        for off in [12, 21, 40, 99, 5] {
            o.done(off);
        }
        assert_eq!(o.undone().collect::<Vec<_>>(), [10, 11, 13, 20, 25]);
        o.done(10);
        o.done(11);
        // The front moved: the watermark stops at the first record not done.
        assert_eq!(o.undone().next(), Some(13));
        for off in [25, 13, 20] {
            o.done(off);
        }
        assert_eq!(o.undone().count(), 0);
        assert!(o.offsets.is_empty());
    }
}
