//! The receiving side.
//!
//! `receive` sends one pipeline: the MAINTAIN script (promote due delayed messages;
//! reclaim leases past the visibility timeout, at most every `tick`), then a plain
//! `XREADGROUP` over the priority levels' streams, highest first. Reading outside
//! Lua keeps the hot path as cheap as a raw client's (a script would copy every entry
//! through Lua tables, which costs more than the read itself). The price is that one
//! read may return up to `max` entries *per level*: the best `max` (highest level,
//! then stream order) are handed out and the rest wait in a small per-consumer
//! buffer, served first by the next receive, which then reads only the levels above
//! them — so priority order holds across calls. A buffered delivery older than half
//! the visibility timeout is dropped rather than handed out (it comes back by
//! reclaim, attempt + 1).
//!
//! Only when nothing is found does `receive` block in `XREADGROUP … BLOCK` on a
//! pooled connection of its own, for no longer than the caller's wait, the next
//! delayed message's due time, or one tick (so expired leases are still reclaimed
//! while the queue is idle).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ferrymq_core::{
    AckHandle, Capabilities, Consumer, Delivery, DeliveryMeta, Depth, Error, ErrorKind, Message,
    Result,
};
use redis::{Cmd, RedisError, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::ack::{AckBatcher, RedisAck};
use crate::client::{is_nogroup, is_noscript, ms, Shared, MAX_BATCH};
use crate::codec::{decode_fields, stream_id_ms, system_time};
use crate::ordered::{OrderedAck, OrderedBatcher};
use crate::scripts::scripts;
use ferrymq_core::time::deadline_after;

/// Receives from one Redis queue as one consumer of its group. Cheap to clone;
/// clones are the same consumer (same name, same leases).
#[derive(Clone)]
pub struct RedisConsumer {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    name: String,
    batcher: AckBatcher,
    /// Acks of an ordered queue (they hand the key on), when it is one.
    ordered: Option<OrderedBatcher>,
    closed: AtomicBool,
    close_signal: Notify,
    started: Instant,
    /// Milliseconds since `started` of the last reclaim pass (+1; 0 = never).
    last_reclaim: AtomicU64,
    /// Milliseconds since `started` of the last consumer prune (+1; 0 = never).
    last_prune: AtomicU64,
    /// Milliseconds since `started` before which the maintenance script need not
    /// run (nothing can be due yet); 0 = run it on the next receive.
    next_maintain: AtomicU64,
    tick: Duration,
    /// Deliveries read beyond a receive's `max` (several priority levels answered
    /// one read), handed out first by the next receive.
    buffer: Mutex<Vec<Candidate>>,
}

impl Inner {
    fn lock_buffer(&self) -> std::sync::MutexGuard<'_, Vec<Candidate>> {
        // Nothing panics while holding the lock; a poisoned buffer is still valid.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// On a busy consumer the maintenance script runs at least this often (capped at
/// the tick): how late a delayed message enqueued by another process may be
/// promoted while reads keep returning entries.
const MAINTAIN_EVERY: Duration = Duration::from_millis(50);

/// What one [`poll`](RedisConsumer::poll) found.
struct Poll {
    candidates: Vec<Candidate>,
    next_due: Option<Duration>,
    floor: Option<usize>,
    maintained: bool,
}

/// A leased delivery waiting to be handed out.
struct Candidate {
    level: usize,
    ms: u64,
    seq: u64,
    fetched: Instant,
    delivery: Delivery,
}

impl Candidate {
    /// Highest level first, then stream order.
    fn order(&self) -> (std::cmp::Reverse<usize>, u64, u64) {
        (std::cmp::Reverse(self.level), self.ms, self.seq)
    }
}

fn split_id(id: &str) -> (u64, u64) {
    let mut parts = id.splitn(2, '-');
    let ms = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let seq = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (ms, seq)
}

impl std::fmt::Debug for RedisConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConsumer")
            .field("queue", &self.inner.shared.queue)
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// A message in the dead-letter stream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its id in the dead-letter stream.
    pub id: String,
    /// When it was dead-lettered.
    pub dead_lettered_at: SystemTime,
    /// The message, with the `ferrymq-failure-reason`, `ferrymq-origin-queue`,
    /// `ferrymq-attempts` and `ferrymq-origin-message-id` headers.
    pub message: Message,
}

impl RedisConsumer {
    pub(crate) async fn new(shared: Arc<Shared>) -> Result<Self> {
        shared.ensure_group().await?;
        let name =
            shared.config.consumer_name.clone().unwrap_or_else(|| {
                format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
            });
        let tick = (shared.config.visibility_timeout / 8)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        Ok(RedisConsumer {
            inner: Arc::new(Inner {
                batcher: AckBatcher::spawn(shared.clone()),
                ordered: shared
                    .config
                    .ordered
                    .then(|| OrderedBatcher::spawn(shared.clone())),
                shared,
                name,
                closed: AtomicBool::new(false),
                close_signal: Notify::new(),
                started: Instant::now(),
                last_reclaim: AtomicU64::new(0),
                last_prune: AtomicU64::new(0),
                next_maintain: AtomicU64::new(0),
                tick,
                buffer: Mutex::new(Vec::new()),
            }),
        })
    }

    /// This consumer's name in the group.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// Whether a reclaim pass is due; claims it when so.
    fn reclaim_due(&self) -> bool {
        let inner = &self.inner;
        let now = ms(inner.started.elapsed()) + 1;
        let last = inner.last_reclaim.load(AtomicOrdering::Relaxed);
        if last != 0 && now.saturating_sub(last) < ms(inner.tick) {
            return false;
        }
        inner
            .last_reclaim
            .compare_exchange(last, now, AtomicOrdering::Relaxed, AtomicOrdering::Relaxed)
            .is_ok()
    }

    /// Consumers of the group idle for longer than this and holding nothing are
    /// removed from it by the reclaim pass (crashed processes leave their names
    /// behind). A live consumer reads at least every tick, so its idle time stays
    /// far below this; and one that holds nothing loses nothing when removed — its
    /// next read recreates it.
    fn prune_idle(&self) -> Duration {
        self.inner
            .shared
            .config
            .visibility_timeout
            .max(Duration::from_secs(5))
    }

    /// Whether a consumer prune is due (every half prune bound); claims it when so.
    fn prune_due(&self) -> bool {
        let inner = &self.inner;
        let now = ms(inner.started.elapsed()) + 1;
        let last = inner.last_prune.load(AtomicOrdering::Relaxed);
        if last != 0 && now.saturating_sub(last) < ms(self.prune_idle() / 2) {
            return false;
        }
        inner
            .last_prune
            .compare_exchange(last, now, AtomicOrdering::Relaxed, AtomicOrdering::Relaxed)
            .is_ok()
    }

    /// Whether the maintenance script must run on this receive, and whether it
    /// reclaims (claims the reclaim pass when so).
    ///
    /// The script promotes due delayed messages and, every tick, reclaims expired
    /// leases. Running it on every receive made it most of the server's work on a
    /// busy queue (issue 11: ~1 EVALSHA per read), while nothing can be due between
    /// ticks except a delayed message. So it runs: when a reclaim pass is due; when
    /// the earliest delayed message it last saw is due; when the previous read came
    /// back empty (`force`); and otherwise at least every [`MAINTAIN_EVERY`] (capped
    /// at the tick) — the bound on how late a delayed message enqueued meanwhile by
    /// another process is promoted on a busy consumer. An idle consumer blocks at most
    /// one tick and then maintains, as before.
    fn maintain_due(&self, force: bool) -> Option<bool> {
        if self.reclaim_due() {
            return Some(true);
        }
        let now = ms(self.inner.started.elapsed());
        let next = self.inner.next_maintain.load(AtomicOrdering::Relaxed);
        if force || now >= next {
            Some(false)
        } else {
            None
        }
    }

    /// Record when the maintenance needs to run next: after `next_due` (the
    /// earliest delayed message), at most [`MAINTAIN_EVERY`] / one tick from now.
    fn maintained(&self, next_due: Option<Duration>) {
        let every = MAINTAIN_EVERY.min(self.inner.tick);
        let wait = next_due.map_or(every, |d| d.min(every));
        let at = ms(self.inner.started.elapsed()).saturating_add(ms(wait));
        self.inner.next_maintain.store(at, AtomicOrdering::Relaxed);
    }

    /// The maintenance script call (promotion, and reclaim when `reclaim`).
    fn maintain_cmd(&self, max: usize, reclaim: bool) -> Cmd {
        let shared = &self.inner.shared;
        let keys = &shared.keys;
        let config = &shared.config;
        let mut cmd = scripts().maintain.call(5 + keys.ready.len());
        cmd.arg(&keys.delayed)
            .arg(&keys.jobs)
            .arg(&keys.leases)
            .arg(&keys.dead)
            .arg(&keys.revoked);
        for k in &keys.ready {
            cmd.arg(k);
        }
        let prune = if reclaim && self.prune_due() {
            ms(self.prune_idle())
        } else {
            0
        };
        cmd.arg(&config.group)
            .arg(&self.inner.name)
            .arg(max)
            .arg(ms(config.visibility_timeout))
            .arg(if reclaim { "1" } else { "0" })
            .arg(config.promote_batch)
            .arg(config.max_deliveries)
            .arg(config.dlq_max_len)
            .arg(ms(config.dlq_retention))
            .arg(&*shared.queue)
            .arg(prune);
        cmd
    }

    /// `XREADGROUP` of new entries on the given levels (highest first).
    fn read_cmd(&self, max: usize, levels: std::ops::Range<usize>, block: Option<Duration>) -> Cmd {
        let shared = &self.inner.shared;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&shared.config.group)
            .arg(&self.inner.name)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(ms(block).max(1));
        }
        cmd.arg("STREAMS");
        for level in levels.clone().rev() {
            cmd.arg(&shared.keys.ready[level]);
        }
        for _ in levels {
            cmd.arg(">");
        }
        cmd
    }

    /// One round trip: the maintenance script when due (see
    /// [`maintain_due`](Self::maintain_due); always when `force`), then `XREADGROUP`
    /// of new entries on the levels above what is already buffered. Returns the
    /// candidates, how long until the next delayed message is due, the buffered
    /// floor level the read skipped (see [`select`](Self::select)), and whether the
    /// maintenance ran.
    async fn poll(&self, max: usize, force: bool) -> Result<Poll> {
        let shared = &self.inner.shared;
        let levels = shared.keys.ready.len();
        let floor = self.buffered_floor();
        let read_from = floor.map_or(0, |f| f + 1);
        // With every level buffered there is no read: the script is the whole call.
        let maintain = if read_from < levels {
            self.maintain_due(force)
        } else {
            Some(self.reclaim_due())
        };
        let mut pipe = redis::pipe();
        if let Some(reclaim) = maintain {
            pipe.add_command(self.maintain_cmd(max, reclaim));
        }
        if read_from < levels {
            pipe.add_command(self.read_cmd(max, read_from..levels, None));
        }
        // Leases are counted from here: before the request went out, so the local
        // deadline errs on the early side.
        let sent = Instant::now();
        let replies: Vec<Value> = shared
            .with_timeout(
                "receive",
                pipe.ignore_errors().query_async(&mut shared.conn()),
            )
            .await?;
        let mut replies = replies.into_iter();
        let maintained = if maintain.is_some() {
            replies.next()
        } else {
            None
        };
        let read = replies.next();
        let mut out = Vec::new();
        let mut failure = None;
        // The read first: entries it returned are leased to us whatever else failed.
        match read {
            Some(Value::ServerError(e)) => {
                failure = Some(shared.map_err(RedisError::from(e), "XREADGROUP"))
            }
            Some(reply) => self.parse_read(reply, sent, &mut out),
            None => {}
        }
        let mut next_due = None;
        match maintained {
            Some(Value::ServerError(e)) => {
                let e = RedisError::from(e);
                if is_noscript(&e) {
                    // The server lost its scripts (restart): load them, and run the
                    // maintenance again at once.
                    shared.load_scripts().await?;
                    next_due = Some(Duration::ZERO);
                } else if failure.is_none() {
                    failure = Some(shared.map_err(e, "receive"));
                }
            }
            Some(Value::Array(items)) => {
                let mut items = items.into_iter();
                if let Some(Value::Int(ms)) = items.next() {
                    if ms >= 0 {
                        next_due = Some(Duration::from_millis(ms as u64));
                    }
                }
                if let Some(Value::Int(trimmed)) = items.next() {
                    crate::ack::warn_trimmed(shared, trimmed);
                }
                if let Some(Value::Int(pruned)) = items.next() {
                    if pruned > 0 {
                        tracing::debug!(queue = %shared.queue, pruned, "ferrymq-redis: removed idle consumers holding nothing from the group");
                    }
                }
                while let (Some(level), Some(id), Some(count), Some(fields)) =
                    (items.next(), items.next(), items.next(), items.next())
                {
                    let (Value::Int(level), Some(id), Value::Int(count)) =
                        (level, as_string(id), count)
                    else {
                        continue;
                    };
                    let level = (level.max(0) as usize).min(levels - 1);
                    out.push(self.candidate(level, id, count.max(1) as u64, fields, sent));
                }
            }
            _ => {}
        }
        if maintain.is_some() {
            self.maintained(next_due);
        }
        if let Some(err) = failure {
            if is_nogroup(&err) {
                // The group vanished (FLUSHDB, keys deleted): create it again.
                shared.ensure_group().await?;
            } else if out.is_empty() {
                return Err(err);
            } else {
                tracing::warn!(error = %err, "ferrymq-redis: part of a receive failed");
            }
        }
        Ok(Poll {
            candidates: out,
            next_due,
            floor,
            maintained: maintain.is_some(),
        })
    }

    /// Blocking read of new entries on a dedicated connection.
    async fn block_read(&self, max: usize, block: Duration) -> Result<Vec<Candidate>> {
        let shared = &self.inner.shared;
        let conn = match tokio::time::timeout(shared.config.command_timeout, shared.blocking.get())
            .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(deadpool_redis::PoolError::Backend(e))) => {
                return Err(shared.map_err(e, "blocking connection"))
            }
            Ok(Err(e)) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!("no blocking connection to redis: {e}"),
                ))
            }
            Err(_) => return Err(shared.timeout("blocking connection")),
        };
        let mut guard = Discard(Some(conn));
        let cmd = self.read_cmd(max, 0..shared.keys.ready.len(), Some(block));
        let Some(conn) = guard.0.as_mut() else {
            return Ok(Vec::new());
        };
        let sent = Instant::now();
        let reply = tokio::time::timeout(
            block.saturating_add(shared.config.command_timeout),
            cmd.query_async::<Value>(&mut **conn),
        )
        .await;
        let reply = match reply {
            Ok(Ok(v)) => {
                guard.keep();
                v
            }
            Ok(Err(e)) => {
                let err = shared.map_err(e, "XREADGROUP");
                if is_nogroup(&err) {
                    shared.ensure_group().await?;
                    return Ok(Vec::new());
                }
                return Err(err);
            }
            Err(_) => return Err(shared.timeout("XREADGROUP")),
        };
        let mut out = Vec::new();
        self.parse_read(reply, sent, &mut out);
        Ok(out)
    }

    /// Entries of an `XREADGROUP` reply (first deliveries).
    fn parse_read(&self, reply: Value, sent: Instant, out: &mut Vec<Candidate>) {
        let keys = &self.inner.shared.keys;
        let streams = match reply {
            Value::Array(streams) => streams,
            Value::Map(pairs) => pairs
                .into_iter()
                .map(|(k, v)| Value::Array(vec![k, v]))
                .collect(),
            _ => return,
        };
        for stream in streams {
            let Value::Array(mut parts) = stream else {
                continue;
            };
            if parts.len() != 2 {
                continue;
            }
            let entries = parts.pop();
            let level = match parts.pop() {
                Some(Value::BulkString(k)) => keys.level_of(&k),
                _ => None,
            };
            let (Some(level), Some(Value::Array(entries))) = (level, entries) else {
                continue;
            };
            out.reserve(entries.len());
            for entry in entries {
                let Value::Array(mut e) = entry else { continue };
                if e.len() != 2 {
                    continue;
                }
                let fields = e.pop().unwrap_or_default();
                let Some(id) = e.pop().and_then(as_string) else {
                    continue;
                };
                out.push(self.candidate(level, id, 1, fields, sent));
            }
        }
    }

    /// The highest level among buffered deliveries, after dropping the stale ones.
    fn buffered_floor(&self) -> Option<usize> {
        let mut buffer = self.inner.lock_buffer();
        if buffer.is_empty() {
            return None;
        }
        // A delivery that waited half its lease here is not handed out: the lease
        // could run out while it is handled. Dropped, it comes back by reclaim.
        // Given back without counting an attempt (it was never handed out), rather
        // than left to the reclaim, which would count one.
        let stale = self.inner.shared.config.visibility_timeout / 2;
        let (keep, old): (Vec<_>, Vec<_>) =
            buffer.drain(..).partition(|c| c.fetched.elapsed() < stale);
        *buffer = keep;
        let floor = buffer.iter().map(|c| c.level).max();
        drop(buffer);
        self.release_later(old);
        floor
    }

    /// Hand out the best `max` of `fresh` and the buffer (highest level first, then
    /// stream order); keep the rest buffered.
    ///
    /// `floor` is the highest buffered level when the read skipped the levels at and
    /// below it: buffered entries of that level are the oldest of their level, so they
    /// may go out, but nothing below it — unread entries of the floor level outrank
    /// them. Those wait for the next receive, which reads the floor level again.
    fn select(&self, mut fresh: Vec<Candidate>, max: usize, floor: Option<usize>) -> Vec<Delivery> {
        let mut buffer = self.inner.lock_buffer();
        let merged = !buffer.is_empty();
        if merged {
            fresh.append(&mut buffer);
        }
        if merged || fresh.len() > max || fresh.windows(2).any(|w| w[0].order() > w[1].order()) {
            fresh.sort_by_key(Candidate::order);
        }
        let mut take = fresh.len().min(max);
        if let Some(floor) = floor {
            take = take.min(fresh.iter().take_while(|c| c.level >= floor).count());
        }
        let rest: Vec<Candidate> = fresh.drain(take..).collect();
        if self.inner.closed.load(AtomicOrdering::Acquire) {
            // Closed while this receive was on the wire: nobody will ask for the
            // rest, give it back now.
            drop(buffer);
            self.release_later(rest);
        } else {
            buffer.extend(rest);
        }
        fresh.into_iter().map(|c| c.delivery).collect()
    }

    /// Give buffered deliveries back without counting an attempt, bounded by
    /// `command_timeout`. A release that fails leaves the delivery to the reclaim
    /// after the visibility timeout (attempt + 1), as before.
    async fn release_all(shared: &Shared, candidates: Vec<Candidate>) -> usize {
        if candidates.is_empty() {
            return 0;
        }
        let releases =
            futures::future::join_all(candidates.iter().map(|c| c.delivery.release(None)));
        match tokio::time::timeout(shared.config.command_timeout, releases).await {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.is_err()).count();
                if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                    tracing::debug!(error = %e, failed, "ferrymq-redis: releasing read-ahead deliveries failed; they come back after the visibility timeout");
                }
                results.len() - failed
            }
            Err(_) => {
                tracing::debug!("ferrymq-redis: releasing read-ahead deliveries timed out; they come back after the visibility timeout");
                0
            }
        }
    }

    fn release_later(&self, candidates: Vec<Candidate>) {
        if candidates.is_empty() {
            return;
        }
        let shared = self.inner.shared.clone();
        tokio::spawn(async move {
            Self::release_all(&shared, candidates).await;
        });
    }

    /// A delivery read by the request sent at `sent`: its lease runs until `sent`
    /// plus the visibility timeout, also while it waits in the buffer.
    fn candidate(
        &self,
        level: usize,
        stream_id: String,
        deliveries: u64,
        fields: Value,
        sent: Instant,
    ) -> Candidate {
        let (ms, seq) = split_id(&stream_id);
        let deadline = deadline_after(sent, self.inner.shared.config.visibility_timeout);
        Candidate {
            level,
            ms,
            seq,
            fetched: sent,
            delivery: self.delivery(level, stream_id, deliveries, fields, deadline),
        }
    }

    fn delivery(
        &self,
        level: usize,
        stream_id: String,
        deliveries: u64,
        fields: Value,
        deadline: Instant,
    ) -> Delivery {
        let shared = &self.inner.shared;
        let decoded = decode_fields(fields);
        let enqueued_ms = decoded
            .enqueued_ms
            .unwrap_or_else(|| stream_id_ms(&stream_id));
        let attempt = decoded
            .prior
            .saturating_add(u32::try_from(deliveries).unwrap_or(u32::MAX));
        let meta = match decoded.stable_id {
            // Re-enqueued (nack, delay): the id is the first one; the position says
            // which stream entry holds it now (`level/stream-id`).
            Some(id) => {
                DeliveryMeta::new(id, attempt, system_time(enqueued_ms), shared.queue.clone())
                    .with_position(format!("{level}/{stream_id}"))
            }
            // First entry: the id is the stream entry id (+ `@level`), no position.
            None => {
                let suffix = &shared.keys.suffixes[level];
                let mut id = String::with_capacity(stream_id.len() + suffix.len());
                id.push_str(&stream_id);
                id.push_str(suffix);
                DeliveryMeta::new(id, attempt, system_time(enqueued_ms), shared.queue.clone())
            }
        };
        let lease = RedisAck {
            shared: shared.clone(),
            batcher: self.inner.batcher.clone(),
            level,
            stream_id,
            deliveries,
        };
        let acker = match &self.inner.ordered {
            Some(batcher) => AckHandle::with_lease(
                OrderedAck {
                    lease,
                    key: decoded.message.get_key().map(str::to_owned),
                    batcher: batcher.clone(),
                },
                deadline,
            ),
            None => AckHandle::with_lease(lease, deadline),
        };
        Delivery::new(decoded.message, meta, acker).with_capabilities(shared.capabilities.clone())
    }

    /// The receive of ordered and rate-limited queues: the RECEIVE script decides
    /// per entry what goes out (per-key gate, rate limit), so the read happens
    /// inside it. With nothing to hand out it waits — until the deadline, one
    /// tick, or the next due time — in `XREAD BLOCK` on new entries when the
    /// script says new entries are what it waits for (a plain `XREAD` from the
    /// group's last delivered id: it consumes nothing), else asleep (rate limited,
    /// or only due messages to wait for). On an ordered queue the wait also ends
    /// when an ack or nack, of any consumer, queues a key's head for hand-out
    /// (they write to the queue's wake stream, which the wait reads too).
    async fn receive_scripted(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = ferrymq_core::time::deadline_in(wait);
        let mut immediate_repolls = 0;
        loop {
            if self.inner.closed.load(AtomicOrdering::Acquire) {
                return Err(Error::closed("consumer"));
            }
            let (deliveries, next_due, wake) = self.poll_scripted(max).await?;
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut block = (deadline - now).min(self.inner.tick);
            if let Some(due) = next_due {
                if due.is_zero() && immediate_repolls < 3 {
                    immediate_repolls += 1;
                    continue;
                }
                block = block.min(due);
            }
            let block = block.max(Duration::from_millis(1));
            let closed = self.inner.close_signal.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.inner.closed.load(AtomicOrdering::Acquire) {
                return Err(Error::closed("consumer"));
            }
            tokio::select! {
                waited = self.wait_for_entries(block, wake) => waited?,
                _ = &mut closed => return Err(Error::closed("consumer")),
            }
        }
    }

    /// One RECEIVE script call: the deliveries, how long until something is due,
    /// and the last delivered ids to wait on (highest level first) when new
    /// entries are what to wait for.
    async fn poll_scripted(
        &self,
        max: usize,
    ) -> Result<(Vec<Delivery>, Option<Duration>, Option<Vec<String>>)> {
        let shared = &self.inner.shared;
        let keys = &shared.keys;
        let config = &shared.config;
        let lua = &scripts().receive;
        let mut cmd = lua.call(12 + keys.ready.len());
        cmd.arg(&keys.delayed)
            .arg(&keys.jobs)
            .arg(&keys.leases)
            .arg(&keys.dead)
            .arg(&keys.revoked)
            .arg(&keys.locks)
            .arg(&keys.held)
            .arg(&keys.unblocked)
            .arg(&keys.parked)
            .arg(&keys.limiter)
            .arg(&keys.seq)
            .arg(&keys.wake);
        for k in &keys.ready {
            cmd.arg(k);
        }
        let reclaim = self.reclaim_due();
        let prune = if reclaim && self.prune_due() {
            ms(self.prune_idle())
        } else {
            0
        };
        let (limit_jobs, limit_ms) = config.rate_limit.map_or((0, 0), |l| (l.jobs, ms(l.per)));
        // Entries read per call at most: bounds the script's time when most of
        // what it reads is held behind busy keys.
        let budget = (max * 4).clamp(100, 4000);
        cmd.arg(&config.group)
            .arg(&self.inner.name)
            .arg(max)
            .arg(ms(config.visibility_timeout))
            .arg(if reclaim { "1" } else { "0" })
            .arg(config.promote_batch)
            .arg(config.max_deliveries)
            .arg(config.dlq_max_len)
            .arg(ms(config.dlq_retention))
            .arg(&*shared.queue)
            .arg(prune)
            .arg(if config.ordered { "1" } else { "0" })
            .arg(limit_jobs)
            .arg(limit_ms)
            .arg(budget);
        let sent = Instant::now();
        let reply = match shared.eval(lua, &cmd).await {
            Ok(reply) => reply,
            Err(e) if is_nogroup(&e) => {
                // The group vanished (FLUSHDB, keys deleted): create it again.
                shared.ensure_group().await?;
                return Ok((Vec::new(), Some(Duration::ZERO), None));
            }
            Err(e) => return Err(e),
        };
        let Value::Array(items) = reply else {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("unexpected receive reply: {reply:?}"),
            ));
        };
        let levels = keys.ready.len();
        let mut items = items.into_iter();
        let next_due = match items.next() {
            Some(Value::Int(ms)) if ms >= 0 => Some(Duration::from_millis(ms as u64)),
            _ => None,
        };
        if let Some(Value::Int(trimmed)) = items.next() {
            crate::ack::warn_trimmed(shared, trimmed);
        }
        if let Some(Value::Int(pruned)) = items.next() {
            if pruned > 0 {
                tracing::debug!(queue = %shared.queue, pruned, "ferrymq-redis: removed idle consumers holding nothing from the group");
            }
        }
        // One id per level, and the wake stream's on an ordered queue.
        let expected = levels + usize::from(config.ordered);
        let wake = match items.next() {
            Some(Value::Array(ids)) if ids.len() == expected => {
                let ids: Vec<String> = ids.into_iter().filter_map(as_string).collect();
                (ids.len() == expected).then_some(ids)
            }
            _ => None,
        };
        let mut out = Vec::new();
        while let (Some(level), Some(id), Some(count), Some(fields)) =
            (items.next(), items.next(), items.next(), items.next())
        {
            let (Value::Int(level), Some(id), Value::Int(count)) = (level, as_string(id), count)
            else {
                continue;
            };
            let level = (level.max(0) as usize).min(levels - 1);
            out.push(
                self.candidate(level, id, count.max(1) as u64, fields, sent)
                    .delivery,
            );
        }
        Ok((out, next_due, wake))
    }

    /// Wait up to `block` for entries after `ids` (see
    /// [`receive_scripted`](Self::receive_scripted)); without ids, just wait.
    async fn wait_for_entries(&self, block: Duration, ids: Option<Vec<String>>) -> Result<()> {
        let Some(ids) = ids else {
            tokio::time::sleep(block).await;
            return Ok(());
        };
        let shared = &self.inner.shared;
        let conn = match tokio::time::timeout(shared.config.command_timeout, shared.blocking.get())
            .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(deadpool_redis::PoolError::Backend(e))) => {
                return Err(shared.map_err(e, "blocking connection"))
            }
            Ok(Err(e)) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    format!("no blocking connection to redis: {e}"),
                ))
            }
            Err(_) => return Err(shared.timeout("blocking connection")),
        };
        // Streams to wait on, highest level first, then (ordered) the wake stream,
        // which acks and nacks elsewhere write to; an empty id: not waited on.
        let mut streams: Vec<&str> = (0..shared.keys.ready.len())
            .rev()
            .map(|l| shared.keys.ready[l].as_str())
            .collect();
        if shared.config.ordered {
            streams.push(&shared.keys.wake);
        }
        let waited: Vec<(&str, &String)> = streams
            .into_iter()
            .zip(&ids)
            .filter(|(_, id)| !id.is_empty())
            .collect();
        if waited.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(());
        }
        let mut guard = Discard(Some(conn));
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(1).arg("BLOCK").arg(ms(block).max(1));
        cmd.arg("STREAMS");
        for (stream, _) in &waited {
            cmd.arg(*stream);
        }
        for (_, id) in &waited {
            cmd.arg(id.as_str());
        }
        let Some(conn) = guard.0.as_mut() else {
            return Ok(());
        };
        let reply = tokio::time::timeout(
            block.saturating_add(shared.config.command_timeout),
            cmd.query_async::<Value>(&mut **conn),
        )
        .await;
        match reply {
            Ok(Ok(_)) => {
                guard.keep();
                Ok(())
            }
            Ok(Err(e)) => Err(shared.map_err(e, "XREAD")),
            Err(_) => Err(shared.timeout("XREAD")),
        }
    }

    /// Up to `count` of the oldest dead letters, without removing them.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>> {
        let shared = &self.inner.shared;
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&shared.keys.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count.max(1));
        let reply: Value = shared.query(&cmd, "XRANGE").await?;
        let Value::Array(entries) = reply else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(mut e) = entry else { continue };
            if e.len() != 2 {
                continue;
            }
            let fields = e.pop().unwrap_or_default();
            let Some(id) = e.pop().and_then(as_string) else {
                continue;
            };
            out.push(DeadLetter {
                dead_lettered_at: system_time(stream_id_ms(&id)),
                id,
                message: decode_fields(fields).message,
            });
        }
        Ok(out)
    }

    /// Move up to `count` of the oldest dead letters back to the queue (attempts
    /// start again at 1). Returns how many moved.
    pub async fn redrive(&self, count: usize) -> Result<usize> {
        let shared = &self.inner.shared;
        let keys = &shared.keys;
        let mut cmd = scripts().redrive.call(1 + keys.ready.len());
        cmd.arg(&keys.dead);
        for k in &keys.ready {
            cmd.arg(k);
        }
        cmd.arg(count.max(1)).arg("+");
        let moved = shared.eval(&scripts().redrive, &cmd).await?;
        Ok(redis::from_redis_value::<usize>(moved).unwrap_or(0))
    }
}

fn as_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// A pooled connection that is dropped — not returned to the pool — unless `keep`
/// is called: a blocking read that was cancelled or timed out may still be pending
/// on the server, and closing its connection is what makes the server forget it.
struct Discard(Option<crate::client::BlockingConn>);

impl Discard {
    fn keep(&mut self) {
        drop(self.0.take());
    }
}

impl Drop for Discard {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(crate::client::BlockingConn::take(conn));
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let max = max.clamp(1, MAX_BATCH);
        if self.inner.shared.config.scripted_receive() {
            return self.receive_scripted(max, wait).await;
        }
        // `wait` comes from the caller: `Duration::MAX` must not panic.
        let deadline = ferrymq_core::time::deadline_in(wait);
        let mut immediate_repolls = 0;
        let mut force_maintain = false;
        loop {
            if self.inner.closed.load(AtomicOrdering::Acquire) {
                return Err(Error::closed("consumer"));
            }
            let Poll {
                candidates,
                next_due,
                floor,
                maintained,
            } = self.poll(max, force_maintain).await?;
            force_maintain = false;
            let deliveries = self.select(candidates, max, floor);
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            if !maintained {
                // Nothing new to read, and the maintenance was skipped: run it now
                // (something may be due) before blocking.
                force_maintain = true;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut block = (deadline - now).min(self.inner.tick);
            if let Some(due) = next_due {
                if due.is_zero() && immediate_repolls < 3 {
                    // More is due right now (a promotion batch was full, or the
                    // scripts had to be reloaded): poll again without blocking.
                    immediate_repolls += 1;
                    continue;
                }
                block = block.min(due);
            }
            let block = block.max(Duration::from_millis(1));
            let closed = self.inner.close_signal.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.inner.closed.load(AtomicOrdering::Acquire) {
                return Err(Error::closed("consumer"));
            }
            tokio::select! {
                got = self.block_read(max, block) => {
                    // The blocking read covers every level: no floor applies.
                    let deliveries = self.select(got?, max, None);
                    if !deliveries.is_empty() {
                        return Ok(deliveries);
                    }
                }
                _ = &mut closed => return Err(Error::closed("consumer")),
            }
        }
    }

    async fn depth(&self) -> Result<Depth> {
        crate::producer::depth(&self.inner.shared).await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, AtomicOrdering::AcqRel) {
            return Ok(());
        }
        self.inner.close_signal.notify_waiters();
        let shared = &self.inner.shared;
        // Deliveries read ahead but never handed out go back now, without an
        // attempt, instead of after the visibility timeout.
        let buffered = std::mem::take(&mut *self.inner.lock_buffer());
        Self::release_all(shared, buffered).await;
        // Forget this consumer in the group when it holds nothing; best effort.
        let mut cmd = scripts().release.call(shared.keys.ready.len());
        for k in &shared.keys.ready {
            cmd.arg(k);
        }
        cmd.arg(&shared.config.group).arg(&self.inner.name);
        if let Err(e) = shared.eval(&scripts().release, &cmd).await {
            tracing::debug!(error = %e, "ferrymq-redis: could not remove consumer from its group");
        }
        Ok(())
    }

    fn queue(&self) -> &str {
        &self.inner.shared.queue
    }

    fn capabilities(&self) -> &Capabilities {
        &self.inner.shared.capabilities
    }
}
