use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{Layer, ServiceExt};

use super::*;
use crate::middleware::handler_fn;
use crate::middleware::outcome::{self, Outcome};
use crate::middleware::testing::{loose_delivery, loose_delivery_with, queue};
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
    // Content hashing, on request: the two sends are taken as one message.
    let svc = DedupLayer::from_arc(store.clone())
        .content_hash(true)
        .layer(counting_handler(calls.clone(), NOW, 0));
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
    // Broker-side dedup off, so all ten copies arrive.
    let cfg = queue("dedup-race").dedup_window(NOW);
    let p = cfg.producer().unwrap();
    for _ in 0..10 {
        p.send(Message::new("same order").dedup_id("order-1"))
            .await
            .unwrap();
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
    store.complete("a").await.unwrap();
    // Bounded: the done key closest to expiry goes first.
    tokio::time::advance(Duration::from_secs(1)).await;
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

/// #7: once full, the store evicted the key closest to expiry — an in-progress claim
/// (minutes) long before a done key (an hour) — so a concurrent copy of a message
/// being handled got `Claimed` and ran twice.
#[tokio::test(start_paused = true)]
async fn a_full_store_evicts_done_keys_never_in_progress_claims() {
    let store = MemoryDedupStore::new(Duration::from_secs(3600)).max_keys(2);
    let ttl = Duration::from_secs(300);
    assert_eq!(store.claim("running", ttl).await.unwrap(), Claim::Claimed);
    store.complete("done-1").await.unwrap();
    store.complete("done-2").await.unwrap();
    assert_eq!(
        store.claim("running", ttl).await.unwrap(),
        Claim::InProgress,
        "the in-progress claim must survive the store filling up"
    );
    assert_eq!(
        store.claim("done-2", ttl).await.unwrap(),
        Claim::Duplicate,
        "the newest done key is kept"
    );
    assert_eq!(
        store.claim("done-1", ttl).await.unwrap(),
        Claim::Claimed,
        "the oldest done key made room"
    );
    // More claims than max_keys: none is dropped for another.
    for k in ["c1", "c2", "c3"] {
        assert_eq!(store.claim(k, ttl).await.unwrap(), Claim::Claimed);
    }
    for k in ["running", "done-1", "c1", "c2", "c3"] {
        assert_eq!(store.claim(k, ttl).await.unwrap(), Claim::InProgress, "{k}");
    }
    // A key completed while the store is all claims is still remembered.
    store.complete("c1").await.unwrap();
    assert_eq!(store.claim("c1", ttl).await.unwrap(), Claim::Duplicate);
    // Claims still go with their TTL.
    tokio::time::advance(ttl).await;
    assert_eq!(store.claim("running", ttl).await.unwrap(), Claim::Claimed);
}

/// #7: a release names its claim. A handler that outlived its claim TTL must not drop
/// the claim another consumer took over meanwhile.
#[tokio::test(start_paused = true)]
async fn release_drops_only_the_callers_own_claim() {
    let store = MemoryDedupStore::default();
    let ttl = Duration::from_secs(5);
    let (claim, first) = store.claim_owned("k", ttl).await.unwrap();
    assert_eq!(claim, Claim::Claimed);
    tokio::time::advance(ttl).await;
    let (claim, second) = store.claim_owned("k", ttl).await.unwrap();
    assert_eq!(claim, Claim::Claimed, "the expired claim was taken over");
    assert_ne!(first, second);
    store.release_owned("k", first).await.unwrap();
    assert_eq!(
        store.claim("k", ttl).await.unwrap(),
        Claim::InProgress,
        "the stale holder's release left the new claim alone"
    );
    store.release_owned("k", second).await.unwrap();
    let (claim, third) = store.claim_owned("k", ttl).await.unwrap();
    assert_eq!(
        claim,
        Claim::Claimed,
        "the holder's own release frees the key"
    );
    store.complete_owned("k", third).await.unwrap();
    store.release_owned("k", third).await.unwrap();
    assert_eq!(
        store.claim("k", ttl).await.unwrap(),
        Claim::Duplicate,
        "a release never drops a done key"
    );
}

/// #7 through the middleware: copy A's handler runs past the claim TTL and fails,
/// copy B took the key over and is still running; A's failure must not free the key
/// for a third copy while B runs.
#[tokio::test(start_paused = true)]
async fn a_handler_that_outlived_its_claim_cannot_free_the_next_holders_claim() {
    let store = Arc::new(MemoryDedupStore::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let handler = handler_fn(move |d: Delivery| {
        let calls = c2.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if d.id() == "a" {
                tokio::time::sleep(Duration::from_secs(8)).await;
                return Err::<(), BoxError>("A failed after 8 s".into());
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        }
    });
    let svc = DedupLayer::from_arc(store.clone())
        .claim_ttl(Duration::from_secs(5))
        .layer(handler);
    let copy = |id: &str| loose_delivery(Message::new("order").dedup_id("order-1"), id, 1);
    let (a, _) = copy("a");
    let run_a = tokio::spawn(svc.clone().oneshot(a));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (b, _) = copy("b");
    let run_b = tokio::spawn(outcome::scope(svc.clone().oneshot(b)));
    // t = 9 s: A failed at 8 s; B's claim (taken at 6 s) holds until 11 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(run_a.await.unwrap().is_err());
    let (c, c_acks) = copy("c");
    let (r, o) = outcome::scope(svc.clone().oneshot(c)).await;
    r.unwrap();
    assert_eq!(
        o,
        Some(Outcome::Deferred),
        "B still holds the key: C must wait"
    );
    assert_eq!(c_acks.nacks.load(Ordering::SeqCst), 1, "C given back");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "only A and B ran");
    let (r, o) = run_b.await.unwrap();
    r.unwrap();
    assert_eq!(o, None, "B handled it");
}

/// #4: without a dedup id, two different messages whose bytes happen to be equal are
/// two messages; a redelivery of one of them is the same message.
#[tokio::test(start_paused = true)]
async fn identical_payloads_without_dedup_id_are_both_handled() {
    let (p, c) = queue("dedup-identical").connect().unwrap();
    p.send(Message::new(r#"{"sku":"A1","qty":1}"#))
        .await
        .unwrap();
    p.send(Message::new(r#"{"sku":"A1","qty":1}"#))
        .await
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc =
        DedupLayer::new(MemoryDedupStore::default()).layer(counting_handler(calls.clone(), NOW, 0));
    let ds = c.receive(2, NOW).await.unwrap();
    for d in &ds {
        let (r, o) = outcome::scope(svc.clone().oneshot(d.clone())).await;
        r.unwrap();
        assert_eq!(o, None, "handled, not taken for a duplicate");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "both orders handled");
    // The first one's ack is lost: it comes back, and is not handled again.
    ds[0].nack(None).await.unwrap();
    let again = c.receive(1, NOW).await.unwrap().remove(0);
    assert_eq!(again.id(), ds[0].id());
    let (r, o) = outcome::scope(svc.clone().oneshot(again.clone())).await;
    r.unwrap();
    assert_eq!(o, Some(Outcome::Deduplicated));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(again.acker().is_acked());
}

/// Without a key (strategy `DedupIdOnly`, no dedup id) the store is not asked at all.
#[tokio::test(start_paused = true)]
async fn dedup_id_only_passes_messages_without_an_id_through() {
    let store = Arc::new(MemoryDedupStore::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DedupLayer::from_arc(store.clone())
        .key_strategy(KeyStrategy::DedupIdOnly)
        .layer(counting_handler(calls.clone(), NOW, 0));
    for _ in 0..2 {
        let (d, _) = loose_delivery(Message::new("x"), "1", 1);
        svc.clone().oneshot(d).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(store.is_empty(), "nothing claimed");
}

/// #6: where a release spends an attempt, the in-progress pause doubles with the
/// attempt (up to the claim TTL); where it does not, it stays short.
#[tokio::test(start_paused = true)]
async fn the_in_progress_pause_grows_only_where_a_release_spends_an_attempt() {
    let store = Arc::new(MemoryDedupStore::default());
    store
        .claim("loose/id:k", Duration::from_secs(300))
        .await
        .unwrap();
    let svc = DedupLayer::from_arc(store.clone())
        .claim_ttl(Duration::from_secs(60))
        .retry_in_progress_after(Duration::from_secs(1))
        .layer(counting_handler(Arc::default(), NOW, 0));
    let mut counting = crate::Capabilities::minimal("counting-release");
    counting.max_nack_delay = Some(Duration::from_secs(3600));
    let mut keeping = counting.clone();
    keeping.release_keeps_attempt = true;
    let pause_at = |caps: &crate::Capabilities, attempt: u32| {
        let (d, acks) =
            loose_delivery_with(Message::new("x").dedup_id("k"), "1", attempt, caps.clone());
        let svc = svc.clone();
        async move {
            svc.oneshot(d).await.unwrap();
            acks.nack_delays()
        }
    };
    let secs = |s| vec![Some(Duration::from_secs(s))];
    assert_eq!(pause_at(&keeping, 1).await, secs(1));
    assert_eq!(pause_at(&keeping, 9).await, secs(1));
    assert_eq!(pause_at(&counting, 1).await, secs(1));
    assert_eq!(pause_at(&counting, 4).await, secs(8));
    assert_eq!(
        pause_at(&counting, 9).await,
        secs(60),
        "capped at the claim TTL"
    );
    assert_eq!(pause_at(&counting, u32::MAX).await, secs(60));
    // A backend that cannot delay: back at once.
    let mut no_delay = counting.clone();
    no_delay.max_nack_delay = None;
    assert_eq!(pause_at(&no_delay, 3).await, vec![None]);
}

#[test]
fn store_is_object_safe() {
    let _: Arc<dyn DedupStore> = Arc::new(MemoryDedupStore::default());
}

/// #6: a consumer crashed holding the claim of a message (the claim is in the store,
/// never completed or released). Until the claim TTL passes, every delivery of the
/// message is deferred without running the handler — ~300 of them. None of those may
/// count as an attempt: once the claim expires the message is handled as attempt 1,
/// and a transient failure then is retried, not dead-lettered.
#[tokio::test(start_paused = true)]
async fn deferrals_behind_a_crashed_claim_spend_no_attempts() {
    use crate::middleware::{Backoff, RetryToDlqLayer};
    let cfg = queue("dedup-crashed-holder");
    let (p, c) = cfg.connect().unwrap();
    let (dlq_p, dlq_c) = queue("dedup-crashed-holder-dlq").connect().unwrap();
    let store = Arc::new(MemoryDedupStore::default());
    let claim_ttl = Duration::from_secs(300);
    // The crashed holder's claim, on the key Dedup will use.
    let key = format!("{}/id:order-9", cfg.queue);
    assert_eq!(store.claim(&key, claim_ttl).await.unwrap(), Claim::Claimed);
    p.send(Message::new("order 9").dedup_id("order-9"))
        .await
        .unwrap();

    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let handler = handler_fn(move |d: Delivery| {
        let seen = seen.clone();
        async move {
            let first = {
                let mut seen = seen.lock().unwrap();
                seen.push(d.attempt());
                seen.len() == 1
            };
            if first {
                return Err::<(), BoxError>("transient".into());
            }
            Ok(())
        }
    });
    let svc = tower::ServiceBuilder::new()
        .layer(
            DedupLayer::from_arc(store.clone())
                .claim_ttl(claim_ttl)
                .retry_in_progress_after(Duration::from_secs(1)),
        )
        .layer(
            RetryToDlqLayer::new(dlq_p)
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_secs(1)).jitter(0.0)),
        )
        .service(handler);
    let summary = Worker::new(c)
        .run_until(svc, tokio::time::sleep(Duration::from_secs(330)))
        .await
        .unwrap();
    assert!(
        summary.deferred >= 250,
        "deferred while the claim held: {summary}"
    );
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![1, 2],
        "the handler ran only after the claim expired, as attempt 1, then 2: {summary}"
    );
    assert_eq!(
        (summary.retried, summary.succeeded, summary.dead_lettered),
        (1, 1, 0),
        "{summary}"
    );
    assert!(dlq_c.receive(10, NOW).await.unwrap().is_empty());
    assert_eq!(p.depth().await.unwrap().total(), 0);
}
