//! In-process dedup store, bounded in time and memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::store::{Claim, ClaimToken, DedupStore};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Claimed(ClaimToken),
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
    /// Done keys by (expiry, seq): to purge them, and to evict the soonest-expiring
    /// one when full.
    done: BTreeMap<(Instant, u64), String>,
    /// Claimed keys by (expiry, seq): to purge them. Never evicted.
    claims: BTreeMap<(Instant, u64), String>,
    next_seq: u64,
}

impl Inner {
    fn index(&mut self, state: State) -> &mut BTreeMap<(Instant, u64), String> {
        match state {
            State::Claimed(_) => &mut self.claims,
            State::Done => &mut self.done,
        }
    }

    fn purge(&mut self, now: Instant) {
        for claims in [true, false] {
            loop {
                let index = if claims {
                    &mut self.claims
                } else {
                    &mut self.done
                };
                let Some(entry) = index.first_entry() else {
                    break;
                };
                if entry.key().0 > now {
                    break;
                }
                let key = entry.remove();
                self.entries.remove(&key);
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn set(&mut self, key: &str, state: State, expires: Instant) {
        let seq = self.next_seq();
        if let Some(old) = self.entries.insert(
            key.to_string(),
            Entry {
                state,
                expires,
                seq,
            },
        ) {
            self.index(old.state).remove(&(old.expires, old.seq));
        }
        self.index(state).insert((expires, seq), key.to_string());
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.remove(key) {
            self.index(old.state).remove(&(old.expires, old.seq));
        }
    }

    /// Forget done keys, soonest-expiring first, until at most `max` keys are left.
    /// Claims are never evicted: forgetting one lets a concurrent duplicate run while
    /// its holder is still working. They are bounded by what is in flight, and go
    /// with their TTL. Nor is `keep`, the key just marked done.
    fn evict_to(&mut self, max: usize, keep: Option<&str>) {
        while self.entries.len() > max {
            let Some(entry) = self.done.first_entry() else {
                break;
            };
            if keep == Some(entry.get().as_str()) {
                break;
            }
            let key = entry.remove();
            self.entries.remove(&key);
        }
    }
}

/// A [`DedupStore`] in this process's memory: dedups within one process only.
///
/// Done keys are kept for the retention window; claims for their TTL. At most
/// `max_keys` done keys are kept (default 100 000): past that, the done key closest
/// to expiry is forgotten first, trading a possible duplicate for bounded memory.
/// In-progress claims are never evicted (they are bounded by the deliveries in
/// flight and expire with their TTL). Each claim has its own [`ClaimToken`], so a
/// handler that outlived its claim cannot release the claim another one took over.
/// Uses tokio's clock, so tests can pause time.
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

    /// Keep at most `max_keys` keys (at least 1), evicting done keys only.
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
        Ok(self.claim_owned(key, ttl).await?.0)
    }

    async fn complete(&self, key: &str) -> Result<()> {
        self.complete_owned(key, ClaimToken::UNOWNED).await
    }

    /// Drops whatever claim `key` has (no token to check); prefer
    /// [`release_owned`](DedupStore::release_owned).
    async fn release(&self, key: &str) -> Result<()> {
        let mut inner = self.lock();
        if inner
            .entries
            .get(key)
            .is_some_and(|e| matches!(e.state, State::Claimed(_)))
        {
            inner.remove(key);
        }
        Ok(())
    }

    async fn claim_owned(&self, key: &str, ttl: Duration) -> Result<(Claim, ClaimToken)> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.purge(now);
        match inner.entries.get(key).map(|e| e.state) {
            Some(State::Done) => Ok((Claim::Duplicate, ClaimToken::UNOWNED)),
            Some(State::Claimed(_)) => Ok((Claim::InProgress, ClaimToken::UNOWNED)),
            None => {
                let token = ClaimToken::new(inner.next_seq());
                inner.set(
                    key,
                    State::Claimed(token),
                    crate::time::deadline_after(now, ttl),
                );
                let max = self.max_keys;
                inner.evict_to(max, None);
                Ok((Claim::Claimed, token))
            }
        }
    }

    async fn complete_owned(&self, key: &str, _token: ClaimToken) -> Result<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.purge(now);
        inner.set(
            key,
            State::Done,
            crate::time::deadline_after(now, self.retention),
        );
        let max = self.max_keys;
        inner.evict_to(max, Some(key));
        Ok(())
    }

    async fn release_owned(&self, key: &str, token: ClaimToken) -> Result<()> {
        let mut inner = self.lock();
        if inner
            .entries
            .get(key)
            .is_some_and(|e| e.state == State::Claimed(token))
        {
            inner.remove(key);
        }
        Ok(())
    }
}
