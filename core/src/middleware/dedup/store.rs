//! The pluggable store behind [`Dedup`](super::Dedup).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

/// Answer of [`DedupStore::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and is now claimed by the caller, for the claim TTL.
    Claimed,
    /// The key was handled already (completed within the store's retention).
    Duplicate,
    /// Someone else holds a live claim on the key.
    InProgress,
}

/// Names one claim, so that only its holder can release it.
///
/// A handler can outlive its claim TTL; another consumer then takes the key over with
/// a claim of its own. When the first handler fails and releases, it must not drop
/// the second one's claim (that would let a third copy run concurrently). Stores that
/// tell claims apart return a fresh token from [`DedupStore::claim_owned`] and release
/// only a claim holding the same token; [`ClaimToken::UNOWNED`] is what stores that
/// do not (the default methods) hand out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimToken(u64);

impl ClaimToken {
    /// The token of a store that does not tell claims apart.
    pub const UNOWNED: ClaimToken = ClaimToken(0);

    /// A token with this value (stores keep it next to the claim).
    pub const fn new(value: u64) -> Self {
        ClaimToken(value)
    }

    /// A random token, never [`UNOWNED`](Self::UNOWNED): for stores shared by several
    /// processes, where a counter would repeat.
    pub fn random() -> Self {
        ClaimToken(rand::random::<u64>().max(1))
    }

    /// The value to store with the claim.
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// Where dedup keys live: in process ([`MemoryDedupStore`](super::MemoryDedupStore)),
/// or shared by every consumer (Redis).
///
/// A key is in one of three states: absent, *claimed* (expires after the claim's
/// TTL, so a crashed consumer does not block the key forever) or *done* (expires
/// after the store's own retention window, which is the dedup window). Object safe,
/// so the middleware holds an `Arc<dyn DedupStore>`.
///
/// Implementations must make [`claim`](DedupStore::claim) atomic: of any number of
/// concurrent claims on an absent key, exactly one gets [`Claim::Claimed`]. For Redis
/// that is `SET key claimed NX PX ttl`, reading the existing value when it fails.
///
/// [`Dedup`](super::Dedup) calls the `*_owned` methods. Their defaults forward to
/// `claim` / `complete` / `release` with [`ClaimToken::UNOWNED`], so a store written
/// before tokens existed keeps working (without the protection tokens give); a store
/// that can should override all three.
#[async_trait]
pub trait DedupStore: Send + Sync + std::fmt::Debug {
    /// Atomically claim `key` for `ttl` if it is absent (or its claim expired).
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim>;

    /// Mark `key` done: later claims get [`Claim::Duplicate`] for the store's
    /// retention window. Called after the handler succeeded, before the ack.
    async fn complete(&self, key: &str) -> Result<()>;

    /// Drop a claim, so the key can be claimed again (the handler failed and the
    /// message will be retried). Must not remove a *done* key.
    async fn release(&self, key: &str) -> Result<()>;

    /// [`claim`](DedupStore::claim), also returning the token of the claim when the
    /// answer is [`Claim::Claimed`] (ignore it otherwise).
    async fn claim_owned(&self, key: &str, ttl: Duration) -> Result<(Claim, ClaimToken)> {
        Ok((self.claim(key, ttl).await?, ClaimToken::UNOWNED))
    }

    /// [`complete`](DedupStore::complete) after the claim `token` was handled. The
    /// key is marked done even if the claim expired and was taken over meanwhile:
    /// the message *was* handled.
    async fn complete_owned(&self, key: &str, token: ClaimToken) -> Result<()> {
        let _ = token;
        self.complete(key).await
    }

    /// [`release`](DedupStore::release) the claim `token` only: a newer claim on the
    /// key (another consumer's, after this one's TTL ran out) or a done key stays.
    async fn release_owned(&self, key: &str, token: ClaimToken) -> Result<()> {
        let _ = token;
        self.release(key).await
    }
}

#[async_trait]
impl<D: DedupStore + ?Sized> DedupStore for std::sync::Arc<D> {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        (**self).claim(key, ttl).await
    }
    async fn complete(&self, key: &str) -> Result<()> {
        (**self).complete(key).await
    }
    async fn release(&self, key: &str) -> Result<()> {
        (**self).release(key).await
    }
    async fn claim_owned(&self, key: &str, ttl: Duration) -> Result<(Claim, ClaimToken)> {
        (**self).claim_owned(key, ttl).await
    }
    async fn complete_owned(&self, key: &str, token: ClaimToken) -> Result<()> {
        (**self).complete_owned(key, token).await
    }
    async fn release_owned(&self, key: &str, token: ClaimToken) -> Result<()> {
        (**self).release_owned(key, token).await
    }
}
