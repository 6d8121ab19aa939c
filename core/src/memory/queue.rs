//! The state machine of one in-memory queue.
//!
//! Every message lives in exactly one place: `ready` (deliverable now, ordered by
//! priority then send order), `held` (ready, but queued behind an earlier message of
//! the same key), `delayed` (a delayed send, or a nack with a delay), or `leased`
//! (delivered, awaiting ack until its deadline). Time only moves inside [`State::tick`],
//! which every operation calls first, so behaviour is a pure function of the calls and
//! of tokio's clock (paused in tests).

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::depth::Depth;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::time::deadline_after;

use super::MemoryConfig;

pub(crate) struct Queue {
    pub(crate) name: Arc<str>,
    pub(crate) config: MemoryConfig,
    pub(crate) state: std::sync::Mutex<State>,
    /// Woken whenever a message may have become deliverable.
    pub(crate) ready_signal: Notify,
}

impl Queue {
    pub(crate) fn new(config: MemoryConfig) -> Self {
        Queue {
            name: config.queue.as_str().into(),
            config,
            state: std::sync::Mutex::new(State::default()),
            ready_signal: Notify::new(),
        }
    }

    /// Lock the state. A poisoned lock means a panic inside this module's own code,
    /// which holds no invariant across user code, so the state is still consistent.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Ready,
    Held,
    Delayed(Instant),
    Leased(Instant),
}

struct Entry {
    message: Message,
    priority: i32,
    key: Option<Arc<str>>,
    enqueued_at: SystemTime,
    /// Deliveries so far.
    attempt: u32,
    /// Identifies the current lease; a handle from an older lease cannot settle.
    receipt: u64,
    place: Place,
}

#[derive(Default)]
struct Group {
    /// Ready messages of this key waiting for the key to be free, by send order.
    waiting: BTreeSet<u64>,
    /// The one message of this key that is in `ready`, leased, or nack-delayed.
    active: Option<u64>,
}

/// What `take` hands to the consumer for one delivery.
pub(crate) struct Leased {
    pub(crate) seq: u64,
    pub(crate) receipt: u64,
    pub(crate) attempt: u32,
    pub(crate) enqueued_at: SystemTime,
    pub(crate) message: Message,
    pub(crate) deadline: Instant,
}

/// Hashes the queue's own dense sequence numbers: one multiply (Fibonacci hashing,
/// so the high bits the table probes with are well mixed) instead of SipHash, which
/// defends against attacker-chosen keys these are not.
#[derive(Default)]
struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type SeqMap<V> = HashMap<u64, V, BuildHasherDefault<SeqHasher>>;

#[derive(Default)]
pub(crate) struct State {
    next_seq: u64,
    next_receipt: u64,
    entries: SeqMap<Entry>,
    ready: BTreeSet<(Reverse<i32>, u64)>,
    delayed: BTreeSet<(Instant, u64)>,
    leased: BTreeSet<(Instant, u64)>,
    held: usize,
    groups: HashMap<Arc<str>, Group>,
    dedup: HashMap<String, (Instant, u64)>,
    dedup_expiry: VecDeque<(Instant, String)>,
}

pub(crate) enum Enqueued {
    New(u64),
    Duplicate(u64),
}

impl State {
    /// Apply the passage of time: due delayed messages and expired leases become
    /// available, old dedup ids are forgotten. Returns whether anything became ready.
    pub(crate) fn tick(&mut self, now: Instant) -> bool {
        let mut woke = false;
        while let Some(&(at, seq)) = self.leased.first() {
            if at > now {
                break;
            }
            self.leased.pop_first();
            self.release_key(seq);
            self.make_available(seq);
            woke = true;
        }
        while let Some(&(at, seq)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            self.release_key(seq);
            self.make_available(seq);
            woke = true;
        }
        while let Some((at, _)) = self.dedup_expiry.front() {
            if *at > now {
                break;
            }
            if let Some((_, id)) = self.dedup_expiry.pop_front() {
                // Only forget the id if it was not re-registered later.
                if self.dedup.get(&id).is_some_and(|(exp, _)| *exp <= now) {
                    self.dedup.remove(&id);
                }
            }
        }
        woke
    }

    /// The next instant at which `tick` would change something.
    pub(crate) fn next_event(&self) -> Option<Instant> {
        let lease = self.leased.first().map(|(at, _)| *at);
        let delay = self.delayed.first().map(|(at, _)| *at);
        match (lease, delay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub(crate) fn enqueue(
        &mut self,
        mut message: Message,
        config: &MemoryConfig,
        now: Instant,
    ) -> Result<Enqueued> {
        message.validate(config.max_message_size)?;
        if let Some(id) = message.get_dedup_id() {
            if let Some((_, seq)) = self.dedup.get(id) {
                return Ok(Enqueued::Duplicate(*seq));
            }
        }
        if self.entries.len() >= config.capacity {
            return Err(Error::new(
                ErrorKind::QueueFull,
                format!("queue holds its capacity of {} messages", config.capacity),
            ));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(id) = message.get_dedup_id() {
            let expires = deadline_after(now, config.dedup_window);
            self.dedup.insert(id.to_string(), (expires, seq));
            self.dedup_expiry.push_back((expires, id.to_string()));
        }
        let delay = message.get_delay().filter(|d| !d.is_zero());
        message.clear_delay();
        let entry = Entry {
            priority: message.get_priority().unwrap_or(0),
            key: message.get_key().map(Arc::from),
            message,
            enqueued_at: SystemTime::now(),
            attempt: 0,
            receipt: 0,
            place: Place::Ready,
        };
        self.entries.insert(seq, entry);
        match delay {
            Some(d) => self.place_delayed(seq, deadline_after(now, d)),
            None => self.make_available(seq),
        }
        Ok(Enqueued::New(seq))
    }

    /// Lease up to `max` ready messages until `now + visibility`.
    pub(crate) fn take(&mut self, max: usize, now: Instant, visibility: Duration) -> Vec<Leased> {
        let mut out = Vec::with_capacity(max.min(self.ready.len()));
        let deadline = deadline_after(now, visibility);
        while out.len() < max {
            let Some((_, seq)) = self.ready.pop_first() else {
                break;
            };
            self.next_receipt += 1;
            let receipt = self.next_receipt;
            let Some(entry) = self.entries.get_mut(&seq) else {
                continue;
            };
            entry.attempt += 1;
            entry.receipt = receipt;
            entry.place = Place::Leased(deadline);
            self.leased.insert((deadline, seq));
            out.push(Leased {
                seq,
                receipt,
                attempt: entry.attempt,
                enqueued_at: entry.enqueued_at,
                message: entry.message.clone(),
                deadline,
            });
        }
        out
    }

    /// Check that `receipt` still owns `seq`.
    fn owned(&self, seq: u64, receipt: u64) -> Result<&Entry> {
        match self.entries.get(&seq) {
            Some(e) if e.receipt == receipt => Ok(e),
            _ => Err(Error::new(
                ErrorKind::LeaseExpired,
                "the visibility timeout passed and the message was redelivered or settled through another delivery",
            )),
        }
    }

    /// Remove `seq` for good. Returns whether the next message of its key may have
    /// become ready.
    pub(crate) fn ack(&mut self, seq: u64, receipt: u64) -> Result<bool> {
        self.owned(seq, receipt)?;
        self.detach(seq);
        self.release_key(seq);
        let key = self.entries.remove(&seq).and_then(|e| e.key);
        if let Some(key) = &key {
            self.promote(key);
        }
        Ok(key.is_some())
    }

    pub(crate) fn nack(
        &mut self,
        seq: u64,
        receipt: u64,
        now: Instant,
        after: Option<Duration>,
    ) -> Result<()> {
        self.owned(seq, receipt)?;
        self.detach(seq);
        match after.filter(|d| !d.is_zero()) {
            // The key stays blocked while its head waits out the delay: later
            // messages of the key must not overtake it (SQS FIFO semantics).
            Some(d) => self.place_delayed(seq, deadline_after(now, d)),
            None => {
                self.release_key(seq);
                self.make_available(seq);
            }
        }
        Ok(())
    }

    /// Give `seq` back unhandled, like a nack, except that the delivery it was
    /// leased by does not count as an attempt.
    pub(crate) fn release(
        &mut self,
        seq: u64,
        receipt: u64,
        now: Instant,
        after: Option<Duration>,
    ) -> Result<()> {
        self.nack(seq, receipt, now, after)?;
        if let Some(e) = self.entries.get_mut(&seq) {
            e.attempt = e.attempt.saturating_sub(1);
        }
        Ok(())
    }

    /// Up to `max` of the waiting messages (ready or held behind their key), oldest
    /// first, without touching them.
    pub(crate) fn peek(&self, max: usize) -> Vec<(u64, SystemTime, Message)> {
        let mut waiting: Vec<(u64, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.place, Place::Ready | Place::Held))
            .map(|(seq, e)| (*seq, e))
            .collect();
        waiting.sort_unstable_by_key(|(seq, _)| *seq);
        waiting
            .into_iter()
            .take(max)
            .map(|(seq, e)| (seq, e.enqueued_at, e.message.clone()))
            .collect()
    }

    /// Remove every message that is not leased. Returns how many went.
    pub(crate) fn purge(&mut self) -> u64 {
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !matches!(e.place, Place::Leased(_)))
            .map(|(seq, _)| *seq)
            .collect();
        for &seq in &gone {
            self.detach(seq);
            self.release_key(seq);
            self.entries.remove(&seq);
        }
        // Groups now only know their leased heads.
        let entries = &self.entries;
        self.groups.retain(|_, g| {
            g.waiting.retain(|seq| entries.contains_key(seq));
            g.active = g.active.filter(|seq| entries.contains_key(seq));
            g.active.is_some() || !g.waiting.is_empty()
        });
        self.held = self.groups.values().map(|g| g.waiting.len()).sum();
        gone.len() as u64
    }

    pub(crate) fn extend(
        &mut self,
        seq: u64,
        receipt: u64,
        now: Instant,
        by: Duration,
    ) -> Result<()> {
        let entry = self.owned(seq, receipt)?;
        let Place::Leased(old) = entry.place else {
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                "the visibility timeout already passed; the message is back in the queue",
            ));
        };
        self.leased.remove(&(old, seq));
        let deadline = deadline_after(now, by);
        self.leased.insert((deadline, seq));
        if let Some(e) = self.entries.get_mut(&seq) {
            e.place = Place::Leased(deadline);
        }
        Ok(())
    }

    pub(crate) fn depth(&self) -> Depth {
        Depth {
            waiting: (self.ready.len() + self.held) as u64,
            in_flight: self.leased.len() as u64,
            delayed: self.delayed.len() as u64,
            dead_lettered: 0,
        }
    }

    /// Remove `seq` from whichever index holds it (the entry itself stays).
    fn detach(&mut self, seq: u64) {
        let Some(entry) = self.entries.get(&seq) else {
            return;
        };
        match entry.place {
            Place::Ready => {
                self.ready.remove(&(Reverse(entry.priority), seq));
            }
            Place::Held => {
                if let Some(g) = entry.key.as_ref().and_then(|k| self.groups.get_mut(k)) {
                    if g.waiting.remove(&seq) {
                        self.held -= 1;
                    }
                }
            }
            Place::Delayed(at) => {
                self.delayed.remove(&(at, seq));
            }
            Place::Leased(at) => {
                self.leased.remove(&(at, seq));
            }
        }
    }

    /// If `seq` is the active message of its key, the key is free again.
    fn release_key(&mut self, seq: u64) {
        let Some(key) = self.entries.get(&seq).and_then(|e| e.key.clone()) else {
            return;
        };
        if let Some(g) = self.groups.get_mut(&key) {
            if g.active == Some(seq) {
                g.active = None;
            }
        }
    }

    fn place_delayed(&mut self, seq: u64, at: Instant) {
        if let Some(e) = self.entries.get_mut(&seq) {
            e.place = Place::Delayed(at);
            self.delayed.insert((at, seq));
        }
    }

    /// `seq` may be delivered now, unless an earlier message of its key is in the way.
    fn make_available(&mut self, seq: u64) {
        let Some(entry) = self.entries.get_mut(&seq) else {
            return;
        };
        match entry.key.clone() {
            None => {
                entry.place = Place::Ready;
                self.ready.insert((Reverse(entry.priority), seq));
            }
            Some(key) => {
                entry.place = Place::Held;
                self.groups
                    .entry(key.clone())
                    .or_default()
                    .waiting
                    .insert(seq);
                self.held += 1;
                self.promote(&key);
            }
        }
    }

    /// Make the earliest waiting message of `key` ready if the key is free, or if the
    /// active message is merely ready (not leased) and a waiting one was sent earlier.
    fn promote(&mut self, key: &Arc<str>) {
        let Some(group) = self.groups.get_mut(key) else {
            return;
        };
        let Some(&first) = group.waiting.first() else {
            if group.active.is_none() {
                self.groups.remove(key);
            }
            return;
        };
        if let Some(active) = group.active {
            let active_is_ready = self
                .entries
                .get(&active)
                .is_some_and(|e| e.place == Place::Ready);
            if !(active_is_ready && first < active) {
                return;
            }
            // An earlier message (a delayed send that came due) overtakes the
            // merely-ready active one.
            group.waiting.insert(active);
            if let Some(e) = self.entries.get_mut(&active) {
                e.place = Place::Held;
                self.ready.remove(&(Reverse(e.priority), active));
                self.held += 1;
            }
        }
        group.waiting.remove(&first);
        self.held -= 1;
        group.active = Some(first);
        if let Some(e) = self.entries.get_mut(&first) {
            e.place = Place::Ready;
            self.ready.insert((Reverse(e.priority), first));
        }
    }
}
