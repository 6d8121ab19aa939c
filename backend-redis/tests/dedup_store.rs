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

/// Two workers in competition, each with the Dedup middleware over its own
/// `RedisDedupStore` connection: every message is sent twice (same content, so the
/// same dedup key), and each is handled exactly once across both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_middleware_across_two_workers() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use ferrymq_core::middleware::{handler_fn, DedupLayer};
    use ferrymq_core::worker::Worker;
    use ferrymq_core::{BoxError, Consumer, Delivery, Message, Producer};
    use tower::Layer;

    let (p, c1, cfg) = connect("dedup-mw", "visibility=5s").await;
    let c2 = cfg.consumer().await.unwrap();
    let n = 100;
    let mut msgs = Vec::new();
    for i in 0..n {
        msgs.push(Message::new(format!("job-{i}")));
        msgs.push(Message::new(format!("job-{i}")));
    }
    p.send_batch(msgs).await.unwrap();

    let calls: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for c in [c1.clone(), c2.clone()] {
        let store = c.dedup_store(Duration::from_secs(60));
        let calls = calls.clone();
        let service = DedupLayer::new(store)
            .retry_in_progress_after(Duration::from_millis(100))
            .layer(handler_fn(move |d: Delivery| {
                let calls = calls.clone();
                async move {
                    let body = String::from_utf8(d.payload().to_vec()).unwrap();
                    *calls.lock().unwrap().entry(body).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<(), BoxError>(())
                }
            }));
        let mut stop = stop_rx.clone();
        workers.push(tokio::spawn(
            Worker::new(c)
                .concurrency(8)
                .poll_wait(Duration::from_millis(100))
                .run_until(service, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        ));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = c1.depth().await.unwrap();
        if d.total() == 0 && calls.lock().unwrap().len() == n {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "depth {d:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(true).unwrap();
    let mut deduplicated = 0;
    for w in workers {
        let summary = w.await.unwrap().unwrap();
        deduplicated += summary.deduplicated;
    }
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), n);
    assert!(calls.values().all(|&c| c == 1), "{calls:?}");
    assert_eq!(
        deduplicated, n as u64,
        "every second copy acked as a duplicate"
    );
}

/// #7: two handlers of one worker share one store. A's claim runs out while A is
/// still busy, B claims the key, then A fails and releases: B's live claim must
/// survive (each claim has a token of its own, not one per process).
#[tokio::test]
async fn a_release_never_drops_another_handlers_claim() {
    let (_p, c, _cfg) = connect("dedup-owner", "").await;
    let store = c.dedup_store(Duration::from_secs(60));
    let a = {
        let store = store.clone();
        tokio::spawn(async move {
            assert_eq!(
                store.claim("k", Duration::from_millis(200)).await.unwrap(),
                Claim::Claimed
            );
            tokio::time::sleep(Duration::from_millis(400)).await;
            // A's claim ran out meanwhile; A fails and releases, in its own task.
            store.release("k").await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b_claimed = {
        let store = store.clone();
        tokio::spawn(async move { store.claim("k", Duration::from_secs(30)).await.unwrap() })
            .await
            .unwrap()
    };
    assert_eq!(b_claimed, Claim::Claimed, "A's claim expired");
    a.await.unwrap();
    assert_eq!(
        store.claim("k", Duration::from_secs(30)).await.unwrap(),
        Claim::InProgress,
        "B still holds the key"
    );
}

/// The same task releases what it claimed; a release from elsewhere (the Dedup
/// middleware releases an abandoned claim from a task of its own) drops the claim
/// only when this store holds exactly one live claim on the key.
#[tokio::test]
async fn releases_find_their_claim() {
    let (_p, c, _cfg) = connect("dedup-owner2", "").await;
    let store = c.dedup_store(Duration::from_secs(60));
    let ttl = Duration::from_secs(30);
    // Same task.
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Claimed);
    store.release("a").await.unwrap();
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Claimed);
    // From another task, one claim held: released at once.
    let s = store.clone();
    tokio::spawn(async move { s.release("a").await.unwrap() })
        .await
        .unwrap();
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Claimed);
    // Complete marks it done whoever completes.
    store.complete("a").await.unwrap();
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Duplicate);
    // Two claims of this store on one key (the first expired): a release from an
    // unknown task cannot tell whose it is and drops neither.
    let s = store.clone();
    tokio::spawn(async move { s.claim("b", Duration::from_millis(100)).await.unwrap() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = store.clone();
    let second = tokio::spawn(async move { s.claim("b", ttl).await.unwrap() })
        .await
        .unwrap();
    assert_eq!(second, Claim::Claimed);
    let s = store.clone();
    tokio::spawn(async move { s.release("b").await.unwrap() })
        .await
        .unwrap();
    assert_eq!(store.claim("b", ttl).await.unwrap(), Claim::InProgress);
}

#[tokio::test]
async fn endless_ttls_are_capped_not_refused() {
    let (_p, c, _cfg) = connect("dedup-max", "").await;
    let store = c.dedup_store(Duration::MAX);
    assert_eq!(
        store.claim("k", Duration::MAX).await.unwrap(),
        Claim::Claimed
    );
    store.complete("k").await.unwrap();
    assert_eq!(
        store.claim("k", Duration::MAX).await.unwrap(),
        Claim::Duplicate
    );
}
