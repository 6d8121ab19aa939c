//! The Redis dedup store for the Dedup middleware, against a real server.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config, connect};
use ferrymq_core::middleware::dedup::{Claim, DedupStore};
use ferrymq_redis::RedisDedupStore;

#[tokio::test]
async fn claim_complete_release_semantics() {
    let (_p, c, cfg) = connect("dedupstore", "").await;
    let a = c.dedup_store(Duration::from_millis(600));
    // A second store (another process, say) on its own connection.
    let b = RedisDedupStore::connect(&cfg, Duration::from_millis(600))
        .await
        .unwrap();
    let ttl = Duration::from_secs(30);

    assert_eq!(a.claim("k1", ttl).await.unwrap(), Claim::Claimed);
    assert_eq!(b.claim("k1", ttl).await.unwrap(), Claim::InProgress);
    // Only the holder's release drops a claim.
    b.release("k1").await.unwrap();
    assert_eq!(b.claim("k1", ttl).await.unwrap(), Claim::InProgress);
    a.release("k1").await.unwrap();
    assert_eq!(b.claim("k1", ttl).await.unwrap(), Claim::Claimed);
    b.complete("k1").await.unwrap();
    assert_eq!(a.claim("k1", ttl).await.unwrap(), Claim::Duplicate);
    // Release never removes a done mark.
    b.release("k1").await.unwrap();
    a.release("k1").await.unwrap();
    assert_eq!(a.claim("k1", ttl).await.unwrap(), Claim::Duplicate);
    // Done marks expire after the retention.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(a.claim("k1", ttl).await.unwrap(), Claim::Claimed);

    // A claim of a crashed consumer expires after its TTL.
    assert_eq!(
        a.claim("k2", Duration::from_millis(200)).await.unwrap(),
        Claim::Claimed
    );
    assert_eq!(b.claim("k2", ttl).await.unwrap(), Claim::InProgress);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.claim("k2", ttl).await.unwrap(), Claim::Claimed);
}

#[tokio::test]
async fn exactly_one_of_many_concurrent_claims_wins() {
    let cfg = config("dedupstore-race", "");
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(
            RedisDedupStore::connect(&cfg, Duration::from_secs(60))
                .await
                .unwrap(),
        );
    }
    for round in 0..20 {
        let key = format!("race-{round}");
        let claims = futures::future::join_all((0..40).map(|i| {
            let s = stores[i % stores.len()].clone();
            let key = key.clone();
            async move { s.claim(&key, Duration::from_secs(30)).await.unwrap() }
        }))
        .await;
        let won = claims.iter().filter(|c| **c == Claim::Claimed).count();
        assert_eq!(won, 1, "round {round}: {claims:?}");
        assert!(claims.iter().all(|c| *c != Claim::Duplicate));
    }
}
