//! In-process dedup store, bounded in time and memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::store::{Claim, DedupStore};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Claimed,
    Done,
}

#[derive(Debug)]
struct Entry {
    state: State,
    expires: Instant,
    seq: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// (expiry, seq) -> key, to purge expired keys and to evict the soonest-expiring
    /// one when full.
    by_expiry: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
}

impl Inner {
    fn purge(&mut self, now: Instant) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.entries.remove(&key);
        }
    }

    fn set(&mut self, key: &str, state: State, expires: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(old) = self.entries.insert(
            key.to_string(),
            Entry {
                state,
                expires,
                seq,
            },
        ) {
            self.by_expiry.remove(&(old.expires, old.seq));
        }
        self.by_expiry.insert((expires, seq), key.to_string());
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.by_expiry.remove(&(old.expires, old.seq));
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.entries.len() > max {
            match self.by_expiry.pop_first() {
                Some((_, key)) => {
                    self.entries.remove(&key);
                }
                None => break,
            }
        }
    }
}

/// A [`DedupStore`] in this process's memory: dedups within one process only.
///
/// Done keys are kept for the retention window; claims for their TTL. At most
/// `max_keys` keys are kept (default 100 000): past that, the key closest to expiry is
/// forgotten first, trading a possible duplicate for bounded memory. Uses tokio's
/// clock, so tests can pause time.
#[derive(Debug)]
pub struct MemoryDedupStore {
    inner: Mutex<Inner>,
    retention: Duration,
    max_keys: usize,
}

impl MemoryDedupStore {
    /// A store remembering handled keys for `retention`.
    pub fn new(retention: Duration) -> Self {
        MemoryDedupStore {
            inner: Mutex::new(Inner::default()),
            retention,
            max_keys: 100_000,
        }
    }

    /// Keep at most `max_keys` keys (at least 1).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// Keys currently remembered (claimed or done, not yet expired).
    pub fn len(&self) -> usize {
        let mut inner = self.lock();
        inner.purge(Instant::now());
        inner.entries.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // No user code runs under the lock, so a poisoned lock still holds consistent data.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryDedupStore {
    /// One hour of retention.
    fn default() -> Self {
        MemoryDedupStore::new(Duration::from_secs(3600))
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.purge(now);
        match inner.entries.get(key).map(|e| e.state) {
            Some(State::Done) => Ok(Claim::Duplicate),
            Some(State::Claimed) => Ok(Claim::InProgress),
            None => {
                inner.set(key, State::Claimed, crate::time::deadline_after(now, ttl));
                let max = self.max_keys;
                inner.evict_to(max);
                Ok(Claim::Claimed)
            }
        }
    }

    async fn complete(&self, key: &str) -> Result<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.purge(now);
        inner.set(
            key,
            State::Done,
            crate::time::deadline_after(now, self.retention),
        );
        let max = self.max_keys;
        inner.evict_to(max);
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<()> {
        let mut inner = self.lock();
        if inner
            .entries
            .get(key)
            .is_some_and(|e| e.state == State::Claimed)
        {
            inner.remove(key);
        }
        Ok(())
    }
}
