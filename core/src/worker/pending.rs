//! Deliveries received and not started yet, and which of them may start.
//!
//! Without per-key order every pending delivery may start: a FIFO. With
//! [`ordered_by_key`](super::Worker::ordered_by_key) a delivery may only start once
//! every earlier delivery of its key has finished and been settled. Scanning the
//! pending deliveries for the first whose key is free costs a pass over everything
//! prefetched for the busy keys on every start (issue 11: a Kafka worker with a
//! prefetch of 5,000 and a few hot keys fell from 2,999 to 1,449 records/s), so
//! instead each key has one *owner* — the delivery of the key that is ready, running
//! or being settled — and the later deliveries of the key wait in the key's own
//! queue, in receive order. When the owner is settled the next one of its key
//! becomes ready. Only ready deliveries are ever looked at, so picking the next one
//! is a heap pop, whatever the prefetch.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use crate::delivery::Delivery;

/// Received, not started.
pub(super) struct Pending {
    /// Without per-key order: everything, in receive order.
    fifo: VecDeque<Delivery>,
    /// With per-key order.
    by_key: Option<ByKey>,
}

#[derive(Default)]
struct ByKey {
    /// May start now, earliest received first: deliveries without a key, and the
    /// owner of each key not yet started.
    ready: BinaryHeap<Queued>,
    /// Every key with an owner (ready, running or being settled), with the later
    /// deliveries of that key in receive order.
    keys: HashMap<Box<str>, VecDeque<Queued>>,
    /// How many deliveries wait in `keys`.
    parked: usize,
    /// Receive order.
    next_seq: u64,
}

/// A delivery and its place in receive order.
struct Queued {
    seq: u64,
    delivery: Delivery,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    /// Reversed: `BinaryHeap` is a max-heap, the earliest received comes out first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.seq.cmp(&self.seq)
    }
}

impl Pending {
    pub(super) fn new(ordered_by_key: bool) -> Self {
        Pending {
            fifo: VecDeque::new(),
            by_key: ordered_by_key.then(ByKey::default),
        }
    }

    /// Everything held: ready and waiting for its key.
    pub(super) fn len(&self) -> usize {
        match &self.by_key {
            None => self.fifo.len(),
            Some(k) => k.ready.len() + k.parked,
        }
    }

    /// Whether a delivery may start now.
    pub(super) fn has_startable(&self) -> bool {
        match &self.by_key {
            None => !self.fifo.is_empty(),
            Some(k) => !k.ready.is_empty(),
        }
    }

    /// A received delivery, in receive order.
    pub(super) fn push(&mut self, delivery: Delivery) {
        let Some(by_key) = &mut self.by_key else {
            self.fifo.push_back(delivery);
            return;
        };
        let seq = by_key.next_seq;
        by_key.next_seq += 1;
        let queued = Queued { seq, delivery };
        let Some(key) = queued.delivery.key() else {
            by_key.ready.push(queued);
            return;
        };
        match by_key.keys.get_mut(key) {
            Some(waiting) => {
                waiting.push_back(queued);
                by_key.parked += 1;
            }
            None => {
                by_key.keys.insert(key.into(), VecDeque::new());
                by_key.ready.push(queued);
            }
        }
    }

    /// The next delivery that may start: the earliest received whose key has no
    /// earlier delivery still unfinished. Its key stays taken until
    /// [`key_done`](Pending::key_done).
    pub(super) fn pop(&mut self) -> Option<Delivery> {
        match &mut self.by_key {
            None => self.fifo.pop_front(),
            Some(k) => k.ready.pop().map(|q| q.delivery),
        }
    }

    /// The owner of `delivery`'s key was settled (or given back): the next
    /// delivery of the key, if any, may start.
    pub(super) fn key_done(&mut self, delivery: &Delivery) {
        let Some(by_key) = &mut self.by_key else {
            return;
        };
        let Some(key) = delivery.key() else {
            return;
        };
        let Some(waiting) = by_key.keys.get_mut(key) else {
            return;
        };
        match waiting.pop_front() {
            Some(next) => {
                by_key.parked -= 1;
                by_key.ready.push(next);
            }
            None => {
                by_key.keys.remove(key);
            }
        }
    }

    /// Everything held, to give back at shutdown; forgets which keys are taken.
    pub(super) fn drain(&mut self) -> Vec<Delivery> {
        match &mut self.by_key {
            None => self.fifo.drain(..).collect(),
            Some(k) => {
                let mut all: Vec<Queued> = std::mem::take(&mut k.ready).into_vec();
                for (_, waiting) in k.keys.drain() {
                    all.extend(waiting);
                }
                k.parked = 0;
                // Given back in receive order, as the FIFO is.
                all.sort_unstable_by_key(|q| q.seq);
                all.into_iter().map(|q| q.delivery).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::middleware::testing::CountingAck;
    use crate::{AckHandle, DeliveryMeta, Message};

    fn delivery(id: &str, key: Option<&str>) -> Delivery {
        let mut m = Message::new(id.to_string());
        if let Some(key) = key {
            m = m.key(key);
        }
        let meta = DeliveryMeta::new(id, 1, SystemTime::now(), "pending".into());
        Delivery::new(
            m,
            meta,
            AckHandle::new(std::sync::Arc::new(CountingAck::default())),
        )
    }

    fn ids(pending: &mut Pending) -> Vec<String> {
        std::iter::from_fn(|| pending.pop())
            .map(|d| d.id().to_string())
            .collect()
    }

    #[test]
    fn a_key_waits_for_its_owner_and_the_rest_keeps_receive_order() {
        let mut p = Pending::new(true);
        for (id, key) in [
            ("a1", Some("a")),
            ("a2", Some("a")),
            ("b1", Some("b")),
            ("n1", None),
            ("a3", Some("a")),
            ("b2", Some("b")),
        ] {
            p.push(delivery(id, key));
        }
        assert_eq!(p.len(), 6);
        assert_eq!(ids(&mut p), ["a1", "b1", "n1"]);
        assert!(!p.has_startable());
        assert_eq!(p.len(), 3, "a2, a3, b2 wait for their keys");
        p.key_done(&delivery("b1", Some("b")));
        p.key_done(&delivery("a1", Some("a")));
        // Both free now: the earlier received first.
        assert_eq!(ids(&mut p), ["a2", "b2"]);
        p.key_done(&delivery("a2", Some("a")));
        p.push(delivery("c1", Some("c")));
        assert_eq!(ids(&mut p), ["a3", "c1"]);
        p.key_done(&delivery("a3", Some("a")));
        p.key_done(&delivery("b2", Some("b")));
        p.key_done(&delivery("c1", Some("c")));
        assert_eq!(p.len(), 0);
        // Every key was let go: a new delivery of one starts at once.
        p.push(delivery("a4", Some("a")));
        assert_eq!(ids(&mut p), ["a4"]);
    }

    #[test]
    fn drain_gives_back_everything_in_receive_order_and_frees_the_keys() {
        let mut p = Pending::new(true);
        for (id, key) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")] {
            p.push(delivery(id, Some(key)));
        }
        assert_eq!(ids(&mut p), ["a1", "b1"]);
        let drained: Vec<String> = p.drain().iter().map(|d| d.id().to_string()).collect();
        assert_eq!(drained, ["a2", "a3"]);
        assert_eq!(p.len(), 0);
        p.push(delivery("a4", Some("a")));
        assert_eq!(ids(&mut p), ["a4"]);
    }

    #[test]
    fn without_key_order_it_is_a_fifo() {
        let mut p = Pending::new(false);
        for (id, key) in [("a1", Some("a")), ("a2", Some("a")), ("n1", None)] {
            p.push(delivery(id, key));
        }
        assert_eq!(p.len(), 3);
        assert_eq!(ids(&mut p), ["a1", "a2", "n1"]);
    }
}
