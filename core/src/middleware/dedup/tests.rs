use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{Layer, ServiceExt};

use super::*;
use crate::middleware::handler_fn;
use crate::middleware::outcome::{self, Outcome};
use crate::middleware::testing::{loose_delivery, queue};
use crate::worker::Worker;
use crate::{BoxError, Consumer, Delivery, Message, Producer};

const NOW: Duration = Duration::ZERO;

fn counting_handler(
    calls: Arc<AtomicUsize>,
    work: Duration,
    fail_first: usize,
) -> impl tower::Service<Delivery, Response = (), Error = BoxError, Future = impl Send> + Clone {
    handler_fn(move |_d: Delivery| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(work).await;
            if n < fail_first {
                return Err::<(), BoxError>("transient".into());
            }
            Ok(())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn duplicate_is_acked_and_counted_without_calling_the_handler() {
    let (p, c) = queue("dedup-dup").connect().unwrap();
    p.send(Message::new("order-1")).await.unwrap();
    p.send(Message::new("order-1")).await.unwrap(); // same content, no dedup id
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(MemoryDedupStore::default());
    let svc = DedupLayer::from_arc(store.clone()).layer(counting_handler(calls.clone(), NOW, 0));
    let ds = c.receive(2, NOW).await.unwrap();
    let ((r1, o1), (r2, o2)) = (
        outcome::scope(svc.clone().oneshot(ds[0].clone())).await,
        outcome::scope(svc.clone().oneshot(ds[1].clone())).await,
    );
    r1.unwrap();
    r2.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(o1, None, "first: handled; the worker acks it");
    assert!(!ds[0].acker().is_settled());
    assert_eq!(o2, Some(Outcome::Deduplicated));
    assert!(
        ds[1].acker().is_acked(),
        "duplicate acked by the middleware"
    );
}

#[tokio::test(start_paused = true)]
async fn dedup_id_is_the_key_when_present() {
    // Broker-side dedup off, so both copies arrive.
    let (p, c) = queue("dedup-id").dedup_window(NOW).connect().unwrap();
    p.send(Message::new("v1").dedup_id("order-7"))
        .await
        .unwrap();
    p.send(Message::new("v2, different body").dedup_id("order-7"))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc =
        DedupLayer::new(MemoryDedupStore::default()).layer(counting_handler(calls.clone(), NOW, 0));
    for d in c.receive(2, NOW).await.unwrap() {
        svc.clone().oneshot(d).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn failure_releases_the_claim_so_the_retry_is_not_a_duplicate() {
    let (p, c) = queue("dedup-release").connect().unwrap();
    p.send(Message::new("x")).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(MemoryDedupStore::default());
    let svc = DedupLayer::from_arc(store.clone()).layer(counting_handler(calls.clone(), NOW, 1));
    let d = c.receive(1, NOW).await.unwrap().remove(0);
    svc.clone().oneshot(d.clone()).await.unwrap_err();
    assert!(store.is_empty(), "claim released after the failure");
    d.nack(None).await.unwrap();
    let again = c.receive(1, NOW).await.unwrap().remove(0);
    assert_eq!(again.attempt(), 2);
    let (r, o) = outcome::scope(svc.oneshot(again)).await;
    r.unwrap();
    assert_eq!(o, None, "handled, not deduplicated");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Ten copies of one message, four workers sharing a store, a handler slow enough
/// that the copies overlap: exactly one handler call, every copy acked.
#[tokio::test(start_paused = true)]
async fn racing_workers_handle_a_key_exactly_once() {
    let cfg = queue("dedup-race");
    let p = cfg.producer().unwrap();
    for _ in 0..10 {
        p.send(Message::new("same order")).await.unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(MemoryDedupStore::default());
    let mut workers = Vec::new();
    for _ in 0..4 {
        let svc = DedupLayer::from_arc(store.clone())
            .retry_in_progress_after(Duration::from_millis(200))
            .layer(counting_handler(calls.clone(), Duration::from_secs(1), 0));
        let worker = Worker::new(cfg.consumer().unwrap()).concurrency(3);
        workers.push(tokio::spawn(
            worker.run_until(svc, tokio::time::sleep(Duration::from_secs(10))),
        ));
    }
    let mut total = crate::WorkerSummary::default();
    for w in workers {
        let s = w.await.unwrap().unwrap();
        total.succeeded += s.succeeded;
        total.deduplicated += s.deduplicated;
        total.deferred += s.deferred;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "exactly one handler call");
    assert_eq!(total.succeeded, 1);
    assert_eq!(total.deduplicated, 9);
    assert!(
        total.deferred >= 1,
        "the overlapping copies were deferred, not handled"
    );
    assert_eq!(p.depth().await.unwrap().total(), 0, "every copy acked");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_handler_releases_its_claim() {
    let store = Arc::new(MemoryDedupStore::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DedupLayer::from_arc(store.clone()).layer(counting_handler(
        calls.clone(),
        Duration::from_secs(60),
        0,
    ));
    let (d, _) = loose_delivery(Message::new("x"), "1", 1);
    let fut = svc.oneshot(d);
    let _ = tokio::time::timeout(Duration::from_secs(1), fut).await;
    assert_eq!(store.len(), 1, "claimed while running");
    tokio::task::yield_now().await; // the spawned release runs
    assert!(
        store.is_empty(),
        "released when the handler future was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn memory_store_states_ttls_and_bound() {
    let store = MemoryDedupStore::new(Duration::from_secs(60)).max_keys(3);
    let ttl = Duration::from_secs(5);
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Claimed);
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::InProgress);
    // An expired claim can be taken over (crashed consumer).
    tokio::time::advance(ttl).await;
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Claimed);
    store.complete("a").await.unwrap();
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Duplicate);
    store.release("a").await.unwrap();
    assert_eq!(
        store.claim("a", ttl).await.unwrap(),
        Claim::Duplicate,
        "release keeps done keys"
    );
    // Done keys expire after the retention window.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(store.claim("a", ttl).await.unwrap(), Claim::Claimed);
    // Bounded: the key closest to expiry goes first.
    store.complete("b").await.unwrap();
    store.complete("c").await.unwrap();
    store.complete("d").await.unwrap();
    assert_eq!(store.len(), 3);
    assert_eq!(
        store.claim("a", ttl).await.unwrap(),
        Claim::Claimed,
        "a was evicted"
    );
}

#[test]
fn store_is_object_safe() {
    let _: Arc<dyn DedupStore> = Arc::new(MemoryDedupStore::default());
}
