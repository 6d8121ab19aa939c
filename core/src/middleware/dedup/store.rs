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
}
