//! This process's memory of recent failures: first-failure time and count per message.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

#[derive(Debug)]
struct Record {
    first_at: SystemTime,
    failures: u32,
    seq: u64,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<String, Record>,
    /// Insertion order, for expiry and eviction. Entries whose seq no longer matches
    /// their record are stale leftovers of forgotten keys.
    order: VecDeque<(Instant, u64, String)>,
    next_seq: u64,
}

impl Inner {
    /// Remove the record of `key` if it is the one `seq` was written for.
    fn remove_if(&mut self, key: &str, seq: u64) {
        if self.records.get(key).is_some_and(|r| r.seq == seq) {
            self.records.remove(key);
        }
    }
}

/// What [`Failures::record`] knows after counting one more failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    /// First failure time recorded here (this failure's time if `new`).
    pub(super) first_at: SystemTime,
    /// Failures of this message seen by this process, this one included.
    pub(super) failures: u32,
    /// No earlier failure was recorded here.
    pub(super) new: bool,
}

/// Bounded table: at most `capacity` messages, each forgotten `ttl` after its first
/// failure, on success, or once dead-lettered.
#[derive(Debug)]
pub(super) struct Failures {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl: Duration,
}

impl Failures {
    pub(super) fn new(capacity: usize, ttl: Duration) -> Self {
        Failures {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn record(&self, key: &str, now: SystemTime) -> Seen {
        let instant = Instant::now();
        let mut inner = self.lock();
        self.purge(&mut inner, instant);
        if let Some(r) = inner.records.get_mut(key) {
            r.failures = r.failures.saturating_add(1);
            return Seen {
                first_at: r.first_at,
                failures: r.failures,
                new: false,
            };
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.records.insert(
            key.to_string(),
            Record {
                first_at: now,
                failures: 1,
                seq,
            },
        );
        inner.order.push_back((instant, seq, key.to_string()));
        while inner.records.len() > self.capacity {
            match inner.order.pop_front() {
                Some((_, seq, old)) => inner.remove_if(&old, seq),
                None => break,
            }
        }
        if inner.order.len() > 2 * self.capacity {
            let Inner { records, order, .. } = &mut *inner;
            order.retain(|(_, seq, k)| records.get(k).is_some_and(|r| r.seq == *seq));
        }
        Seen {
            first_at: now,
            failures: 1,
            new: true,
        }
    }

    pub(super) fn forget(&self, key: &str) {
        let mut inner = self.lock();
        inner.records.remove(key);
        // Its `order` entry is skipped when it reaches the front.
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().records.is_empty()
    }

    fn purge(&self, inner: &mut Inner, now: Instant) {
        while let Some((since, _, _)) = inner.order.front() {
            if *since + self.ttl > now {
                break;
            }
            if let Some((_, seq, key)) = inner.order.pop_front() {
                inner.remove_if(&key, seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_expires_and_bounds() {
        let f = Failures::new(2, Duration::from_secs(10));
        let t0 = SystemTime::UNIX_EPOCH;
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            f.record("a", t0),
            Seen {
                first_at: t0,
                failures: 1,
                new: true
            }
        );
        assert_eq!(
            f.record("a", t1),
            Seen {
                first_at: t0,
                failures: 2,
                new: false
            }
        );
        f.record("b", t1);
        f.record("c", t1); // evicts a, the oldest
        assert!(f.record("a", t1).new);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(f.record("c", t1).new, "expired after the ttl");
        f.forget("c");
        f.forget("a");
        assert!(f.is_empty());
    }
}
