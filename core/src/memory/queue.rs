//! The state machine of one in-memory queue.
//!
//! Every message lives in exactly one place: `ready` (deliverable now, ordered by
//! priority then send order), `held` (ready, but queued behind an earlier message of
//! the same key), `delayed` (a delayed send, or a nack with a delay), or `leased`
//! (delivered, awaiting ack until its deadline). Time only moves inside [`State::tick`],
//! which every operation calls first, so behaviour is a pure function of the calls and
//! of tokio's clock (paused in tests).
//!
//! The hot path (send, receive, ack of messages without key or delay) is built from
//! structures that cost a few dozen instructions per message: entries in a slab (a
//! handle names its slot, no hashing), the ready messages of each priority in a
//! `VecDeque` in send order (a message that becomes ready out of order — nacked, come
//! due, its lease expired — goes to a small heap beside it), and lease deadlines in a
//! `VecDeque` too, as the leases `take` hands out share one visibility timeout and
//! their deadlines only grow (an extend's deadline goes to a heap when it is earlier
//! than the last one). Neither index is updated when a message leaves it early (an
//! ack, a nack, a purge): each record is checked against its entry when it reaches
//! the front and dropped if the entry moved on — the slot, the send order, the
//! lease's receipt and deadline must all still match — and the lease index is
//! compacted when such records outnumber the live ones, so a lease that is never
//! acked cannot make it grow without bound. The rarely used places (held behind a
//! key, delayed) keep ordered sets.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use slab::Slab;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::capabilities::Capabilities;
use crate::delivery::{AckHandle, Delivery};
use crate::depth::Depth;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::time::deadline_after;

use super::MemoryConfig;

pub(crate) struct Queue {
    pub(crate) name: Arc<str>,
    pub(crate) config: MemoryConfig,
    /// What the queue can do (from `config`), shared by its producers, consumers and
    /// deliveries.
    pub(crate) capabilities: Arc<Capabilities>,
    pub(crate) state: std::sync::Mutex<State>,
    /// Woken whenever a message may have become deliverable.
    pub(crate) ready_signal: Notify,
}

impl Queue {
    pub(crate) fn new(config: MemoryConfig) -> Self {
        Queue {
            name: config.queue.as_str().into(),
            capabilities: Arc::new(super::capabilities(&config)),
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

/// Where an entry's message is: here until its first delivery, then in the handle of
/// its latest delivery (the `Delivery` lives in its handle's allocation), so a
/// delivery does not copy the message (nor, for a payload made from a `Vec`, allocate
/// the shared header its first clone would need). The handle's `MemoryAck` holds the
/// queue weakly, so the two do not keep each other alive.
enum Body {
    Here(Message),
    Delivered(AckHandle),
}

impl Body {
    fn message(&self) -> Message {
        match self {
            Body::Here(message) => message.clone(),
            Body::Delivered(handle) => handle.message().cloned().unwrap_or_default(),
        }
    }

    /// The message, for a new delivery: moved out of here, or out of the last
    /// delivery's handle if nothing else holds it; copied otherwise.
    fn take(&mut self) -> Message {
        match std::mem::replace(self, Body::Here(Message::default())) {
            Body::Here(message) => message,
            Body::Delivered(handle) => handle.into_message().unwrap_or_default(),
        }
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
    /// Send order, unique in the queue; also the message id.
    seq: u64,
    message: Body,
    priority: i32,
    key: Option<Arc<str>>,
    enqueued_at: SystemTime,
    /// Deliveries so far.
    attempt: u32,
    /// Identifies the current lease (unique in the queue, never 0 once leased); a
    /// handle from an older lease cannot settle.
    receipt: u64,
    place: Place,
}

/// A message's slot in the slab, with its send order (a slot is reused once its
/// message is gone; the send order tells a stale index record from a live one).
type Slot = (u64, usize);

#[derive(Default)]
struct Group {
    /// Ready messages of this key waiting for the key to be free, by send order.
    waiting: BTreeSet<Slot>,
    /// The one message of this key that is in `ready`, leased, or nack-delayed.
    active: Option<Slot>,
}

/// The ready messages of one priority, by send order.
struct Level {
    priority: i32,
    /// Appended in send order: fresh sends, the common case.
    fifo: VecDeque<Slot>,
    /// Those that became ready behind a later one (nacked, come due, lease expired).
    late: BinaryHeap<Reverse<Slot>>,
}

impl Level {
    fn new(priority: i32) -> Self {
        Level {
            priority,
            fifo: VecDeque::new(),
            late: BinaryHeap::new(),
        }
    }

    fn push(&mut self, slot: Slot) {
        if self.fifo.back().map_or(true, |back| back.0 < slot.0) {
            self.fifo.push_back(slot);
        } else {
            self.late.push(Reverse(slot));
        }
    }

    /// The earliest ready message of this priority, dropping stale records.
    fn pop(&mut self, entries: &Slab<Entry>) -> Option<usize> {
        loop {
            let from_fifo = match (self.fifo.front(), self.late.peek()) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(a), Some(Reverse(b))) => a.0 < b.0,
            };
            let popped = if from_fifo {
                self.fifo.pop_front()
            } else {
                self.late.pop().map(|Reverse(s)| s)
            };
            let (seq, slot) = popped?;
            if entries
                .get(slot)
                .is_some_and(|e| e.seq == seq && e.place == Place::Ready)
            {
                return Some(slot);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.fifo.is_empty() && self.late.is_empty()
    }
}

/// A lease deadline record: when, which slot, which lease.
type LeaseRecord = (Instant, usize, u64);

fn lease_valid(entries: &Slab<Entry>, &(at, slot, receipt): &LeaseRecord) -> bool {
    entries
        .get(slot)
        .is_some_and(|e| e.receipt == receipt && e.place == Place::Leased(at))
}

/// What `take` hands to the consumer for one delivery.
pub(crate) struct Leased {
    pub(crate) seq: u64,
    pub(crate) slot: usize,
    pub(crate) receipt: u64,
    pub(crate) attempt: u32,
    pub(crate) enqueued_at: SystemTime,
    pub(crate) message: Message,
    pub(crate) deadline: Instant,
}

#[derive(Default)]
pub(crate) struct State {
    next_seq: u64,
    next_receipt: u64,
    entries: Slab<Entry>,
    /// Ready messages by priority, highest first.
    levels: Vec<Level>,
    /// Entries whose place is `Ready`.
    ready: usize,
    delayed: BTreeSet<(Instant, u64, usize)>,
    /// Lease deadlines in the order `take` handed them out (non-decreasing).
    leases: VecDeque<LeaseRecord>,
    /// Lease deadlines earlier than the last one in `leases` (extends).
    leases_moved: BinaryHeap<Reverse<LeaseRecord>>,
    /// Entries whose place is `Leased`.
    leased: usize,
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
        while let Some(slot) = self.pop_lease_due(now) {
            self.leased -= 1;
            self.release_key(slot);
            self.make_available(slot);
            woke = true;
        }
        while let Some(&(at, _, slot)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            self.release_key(slot);
            self.make_available(slot);
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

    /// Drop the stale records at the front of both lease indexes, then pop the
    /// earliest lease if it is due at `now`.
    fn pop_lease_due(&mut self, now: Instant) -> Option<usize> {
        let entries = &self.entries;
        while let Some(front) = self.leases.front() {
            if lease_valid(entries, front) {
                break;
            }
            self.leases.pop_front();
        }
        while let Some(Reverse(front)) = self.leases_moved.peek() {
            if lease_valid(entries, front) {
                break;
            }
            self.leases_moved.pop();
        }
        let from_fifo = match (self.leases.front(), self.leases_moved.peek()) {
            (None, None) => return None,
            (Some(a), None) => (a.0 <= now).then_some(true)?,
            (None, Some(Reverse(b))) => (b.0 <= now).then_some(false)?,
            (Some(a), Some(Reverse(b))) => {
                let fifo = a.0 <= b.0;
                let at = if fifo { a.0 } else { b.0 };
                (at <= now).then_some(fifo)?
            }
        };
        let record = if from_fifo {
            self.leases.pop_front()
        } else {
            self.leases_moved.pop().map(|Reverse(r)| r)
        };
        record.map(|(_, slot, _)| slot)
    }

    fn push_lease(&mut self, record: LeaseRecord) {
        if self.leases.back().map_or(true, |back| back.0 <= record.0) {
            self.leases.push_back(record);
        } else {
            self.leases_moved.push(Reverse(record));
        }
    }

    /// Drop the records of leases that ended early once they outnumber the live
    /// ones (a lease at the front that is never settled holds back the pruning at
    /// the front): amortized constant per settle, and memory bounded by the leases.
    fn compact_leases(&mut self) {
        let live = self.leased;
        let bound = live.saturating_mul(2).saturating_add(1024);
        let entries = &self.entries;
        if self.leases.len() > bound {
            self.leases.retain(|r| lease_valid(entries, r));
        }
        if self.leases_moved.len() > bound {
            self.leases_moved
                .retain(|Reverse(r)| lease_valid(entries, r));
        }
    }

    /// The next instant at which `tick` would change something (it may be a little
    /// early, for a lease settled since the last `tick`: that costs a wake-up).
    pub(crate) fn next_event(&self) -> Option<Instant> {
        let lease = self.leases.front().map(|r| r.0);
        let moved = self.leases_moved.peek().map(|Reverse(r)| r.0);
        let delay = self.delayed.first().map(|(at, _, _)| *at);
        [lease, moved, delay].into_iter().flatten().min()
    }

    pub(crate) fn enqueue(
        &mut self,
        mut message: Message,
        config: &MemoryConfig,
        now: Instant,
        wall: SystemTime,
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
            seq,
            priority: message.get_priority().unwrap_or(0),
            key: message.get_key().map(Arc::from),
            message: Body::Here(message),
            enqueued_at: wall,
            attempt: 0,
            receipt: 0,
            place: Place::Ready,
        };
        let slot = self.entries.insert(entry);
        match delay {
            Some(d) => self.place_delayed(slot, deadline_after(now, d)),
            None => self.make_available(slot),
        }
        Ok(Enqueued::New(seq))
    }

    /// Lease up to `max` ready messages until `now + visibility`, each made into a
    /// `T` by `make` (a delivery: built here, the batch is one `Vec`, not one of
    /// leases and another of deliveries).
    pub(crate) fn take(
        &mut self,
        max: usize,
        now: Instant,
        visibility: Duration,
        mut make: impl FnMut(Leased) -> Delivery,
    ) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(max.min(self.ready));
        let deadline = deadline_after(now, visibility);
        while out.len() < max {
            let Some(slot) = self.pop_ready() else {
                break;
            };
            self.next_receipt += 1;
            let receipt = self.next_receipt;
            let Some(entry) = self.entries.get_mut(slot) else {
                continue;
            };
            entry.attempt += 1;
            entry.receipt = receipt;
            entry.place = Place::Leased(deadline);
            let delivery = make(Leased {
                seq: entry.seq,
                slot,
                receipt,
                attempt: entry.attempt,
                enqueued_at: entry.enqueued_at,
                message: entry.message.take(),
                deadline,
            });
            entry.message = match delivery.message_handle() {
                Some(handle) => Body::Delivered(handle.clone()),
                None => Body::Here(delivery.message().clone()),
            };
            out.push(delivery);
            self.ready -= 1;
            self.leased += 1;
            self.push_lease((deadline, slot, receipt));
        }
        out
    }

    /// The next ready message, highest priority first, then by send order.
    fn pop_ready(&mut self) -> Option<usize> {
        let entries = &self.entries;
        self.levels.iter_mut().find_map(|level| level.pop(entries))
    }

    fn push_ready(levels: &mut Vec<Level>, priority: i32, slot: Slot) {
        // Highest priority first; almost always a single level.
        if let Some(level) = levels.iter_mut().find(|l| l.priority == priority) {
            level.push(slot);
            return;
        }
        if levels.len() >= 16 {
            levels.retain(|l| !l.is_empty());
        }
        let i = levels
            .iter()
            .position(|l| l.priority < priority)
            .unwrap_or(levels.len());
        let mut level = Level::new(priority);
        level.push(slot);
        levels.insert(i, level);
    }

    /// Check that `receipt` still owns `slot`.
    fn owned(&self, slot: usize, receipt: u64) -> Result<&Entry> {
        match self.entries.get(slot) {
            Some(e) if e.receipt == receipt => Ok(e),
            _ => Err(Error::new(
                ErrorKind::LeaseExpired,
                "the visibility timeout passed and the message was redelivered or settled through another delivery",
            )),
        }
    }

    /// Remove the message in `slot` for good. Returns whether the next message of
    /// its key may have become ready.
    pub(crate) fn ack(&mut self, slot: usize, receipt: u64) -> Result<bool> {
        self.owned(slot, receipt)?;
        self.detach(slot);
        self.release_key(slot);
        let key = self.entries.try_remove(slot).and_then(|e| e.key);
        if let Some(key) = &key {
            self.promote(key);
        }
        self.compact_leases();
        Ok(key.is_some())
    }

    pub(crate) fn nack(
        &mut self,
        slot: usize,
        receipt: u64,
        now: Instant,
        after: Option<Duration>,
    ) -> Result<()> {
        self.owned(slot, receipt)?;
        self.detach(slot);
        match after.filter(|d| !d.is_zero()) {
            // The key stays blocked while its head waits out the delay: later
            // messages of the key must not overtake it (SQS FIFO semantics).
            Some(d) => self.place_delayed(slot, deadline_after(now, d)),
            None => {
                self.release_key(slot);
                self.make_available(slot);
            }
        }
        self.compact_leases();
        Ok(())
    }

    /// Give `slot` back unhandled, like a nack, except that the delivery it was
    /// leased by does not count as an attempt.
    pub(crate) fn release(
        &mut self,
        slot: usize,
        receipt: u64,
        now: Instant,
        after: Option<Duration>,
    ) -> Result<()> {
        self.nack(slot, receipt, now, after)?;
        if let Some(e) = self.entries.get_mut(slot) {
            e.attempt = e.attempt.saturating_sub(1);
        }
        Ok(())
    }

    /// Up to `max` of the waiting messages (ready or held behind their key), oldest
    /// first, without touching them.
    pub(crate) fn peek(&self, max: usize) -> Vec<(u64, SystemTime, Message)> {
        let mut waiting: Vec<&Entry> = self
            .entries
            .iter()
            .map(|(_, e)| e)
            .filter(|e| matches!(e.place, Place::Ready | Place::Held))
            .collect();
        waiting.sort_unstable_by_key(|e| e.seq);
        waiting
            .into_iter()
            .take(max)
            .map(|e| (e.seq, e.enqueued_at, e.message.message()))
            .collect()
    }

    /// Remove every message that is not leased. Returns how many went.
    pub(crate) fn purge(&mut self) -> u64 {
        let gone: Vec<usize> = self
            .entries
            .iter()
            .filter(|(_, e)| !matches!(e.place, Place::Leased(_)))
            .map(|(slot, _)| slot)
            .collect();
        for &slot in &gone {
            self.detach(slot);
            self.release_key(slot);
            self.entries.try_remove(slot);
        }
        // Nothing is ready any more.
        self.levels.clear();
        // Groups now only know their leased heads.
        let entries = &self.entries;
        let live = |&(seq, slot): &Slot| entries.get(slot).is_some_and(|e| e.seq == seq);
        self.groups.retain(|_, g| {
            g.waiting.retain(live);
            g.active = g.active.filter(live);
            g.active.is_some() || !g.waiting.is_empty()
        });
        self.held = self.groups.values().map(|g| g.waiting.len()).sum();
        gone.len() as u64
    }

    pub(crate) fn extend(
        &mut self,
        slot: usize,
        receipt: u64,
        now: Instant,
        by: Duration,
    ) -> Result<()> {
        let entry = self.owned(slot, receipt)?;
        let Place::Leased(_) = entry.place else {
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                "the visibility timeout already passed; the message is back in the queue",
            ));
        };
        let deadline = deadline_after(now, by);
        if let Some(e) = self.entries.get_mut(slot) {
            e.place = Place::Leased(deadline);
        }
        // The old deadline's record is stale now (its deadline no longer matches).
        self.push_lease((deadline, slot, receipt));
        self.compact_leases();
        Ok(())
    }

    /// Records in the lease indexes, live or stale (for tests of their bound).
    #[cfg(test)]
    pub(crate) fn lease_records(&self) -> usize {
        self.leases.len() + self.leases_moved.len()
    }

    pub(crate) fn depth(&self) -> Depth {
        Depth {
            waiting: (self.ready + self.held) as u64,
            in_flight: self.leased as u64,
            delayed: self.delayed.len() as u64,
            dead_lettered: 0,
        }
    }

    /// Take `slot` out of the count of its place and out of the ordered sets (the
    /// entry itself stays; the ready and lease indexes drop its record when it
    /// reaches their front, as the caller moves the entry to another place).
    fn detach(&mut self, slot: usize) {
        let Some(entry) = self.entries.get(slot) else {
            return;
        };
        match entry.place {
            Place::Ready => self.ready -= 1,
            Place::Held => {
                if let Some(g) = entry.key.as_ref().and_then(|k| self.groups.get_mut(k)) {
                    if g.waiting.remove(&(entry.seq, slot)) {
                        self.held -= 1;
                    }
                }
            }
            Place::Delayed(at) => {
                self.delayed.remove(&(at, entry.seq, slot));
            }
            Place::Leased(_) => self.leased -= 1,
        }
        // Whatever the caller does next, the entry must not look like it is still
        // where it was to a stale index record.
        if let Some(e) = self.entries.get_mut(slot) {
            e.place = Place::Held;
        }
    }

    /// If `slot` is the active message of its key, the key is free again.
    fn release_key(&mut self, slot: usize) {
        let Some((seq, key)) = self
            .entries
            .get(slot)
            .and_then(|e| e.key.clone().map(|k| (e.seq, k)))
        else {
            return;
        };
        if let Some(g) = self.groups.get_mut(&key) {
            if g.active == Some((seq, slot)) {
                g.active = None;
            }
        }
    }

    fn place_delayed(&mut self, slot: usize, at: Instant) {
        if let Some(e) = self.entries.get_mut(slot) {
            e.place = Place::Delayed(at);
            self.delayed.insert((at, e.seq, slot));
        }
    }

    /// `slot` may be delivered now, unless an earlier message of its key is in the way.
    fn make_available(&mut self, slot: usize) {
        let Some(entry) = self.entries.get_mut(slot) else {
            return;
        };
        match entry.key.clone() {
            None => {
                entry.place = Place::Ready;
                self.ready += 1;
                Self::push_ready(&mut self.levels, entry.priority, (entry.seq, slot));
            }
            Some(key) => {
                entry.place = Place::Held;
                self.groups
                    .entry(key.clone())
                    .or_default()
                    .waiting
                    .insert((entry.seq, slot));
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
                .get(active.1)
                .is_some_and(|e| e.place == Place::Ready);
            if !(active_is_ready && first.0 < active.0) {
                return;
            }
            // An earlier message (a delayed send that came due) overtakes the
            // merely-ready active one; its ready record goes stale.
            group.waiting.insert(active);
            if let Some(e) = self.entries.get_mut(active.1) {
                e.place = Place::Held;
                self.ready -= 1;
                self.held += 1;
            }
        }
        group.waiting.remove(&first);
        self.held -= 1;
        group.active = Some(first);
        if let Some(e) = self.entries.get_mut(first.1) {
            e.place = Place::Ready;
            self.ready += 1;
            Self::push_ready(&mut self.levels, e.priority, first);
        }
    }
}
