use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{Layer, ServiceExt};

use super::*;
use crate::capabilities::Capabilities;
use crate::middleware::testing::{loose_delivery, queue};
use crate::middleware::{handler_fn, CatchPanicLayer};
use crate::worker::Worker;
use crate::{BoxError, Delivery, Message, Producer};

const VISIBILITY: Duration = Duration::from_secs(10);

/// Runs a handler taking 3x the visibility timeout, with two workers on the queue,
/// and returns how many times the handler was called.
async fn long_handler_calls(extend: bool) -> usize {
    let cfg = queue("extend-long").visibility_timeout(VISIBILITY);
    let p = cfg.producer().unwrap();
    p.send(Message::new("slow job")).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = if extend {
        ExtendVisibilityLayer::from_capabilities(p.capabilities())
    } else {
        ExtendVisibilityLayer::disabled()
    };
    let mut workers = Vec::new();
    for _ in 0..2 {
        let calls = calls.clone();
        let svc = layer.layer(handler_fn(move |_d: Delivery| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(VISIBILITY * 3).await;
                Ok::<_, BoxError>(())
            }
        }));
        let w = Worker::new(cfg.consumer().unwrap());
        workers.push(tokio::spawn(
            w.run_until(svc, tokio::time::sleep(VISIBILITY * 5)),
        ));
    }
    for w in workers {
        w.await.unwrap().unwrap();
    }
    if extend {
        assert_eq!(p.depth().await.unwrap().total(), 0);
    }
    calls.load(Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn heartbeat_keeps_a_3x_visibility_handler_from_being_redelivered() {
    assert_eq!(long_handler_calls(true).await, 1);
}

#[tokio::test(start_paused = true)]
async fn without_the_heartbeat_the_same_handler_is_delivered_twice() {
    // The control: proves the test above can fail.
    assert!(long_handler_calls(false).await >= 2);
}

fn counting_layer_run(
    behaviour: &'static str,
) -> impl tower::Service<Delivery, Response = (), Error = BoxError> + Clone {
    let inner = handler_fn(move |_d: Delivery| async move {
        tokio::time::sleep(Duration::from_secs(25)).await;
        match behaviour {
            "panic" => panic!("heartbeat test panic"),
            "error" => Err::<(), BoxError>("failed".into()),
            _ => Ok(()),
        }
    });
    ExtendVisibilityLayer::new(Duration::from_secs(9)).layer(CatchPanicLayer::new().layer(inner))
}

#[tokio::test(start_paused = true)]
async fn heartbeat_beats_every_third_and_stops_on_success_error_and_panic() {
    for behaviour in ["ok", "error", "panic"] {
        let (d, counts) = loose_delivery(Message::new("x"), "1", 1);
        let result = counting_layer_run(behaviour).oneshot(d).await;
        assert_eq!(result.is_ok(), behaviour == "ok");
        // 25 s of work, a beat every 3 s: at 3, 6, ..., 24.
        assert_eq!(counts.extends.load(Ordering::SeqCst), 8, "{behaviour}");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            counts.extends.load(Ordering::SeqCst),
            8,
            "{behaviour}: stopped"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn one_heartbeat_keeps_every_lease_of_a_service_and_its_clones() {
    // 50 handlers at once, staggered starts, through clones of one service (one
    // driver task): each is beaten on its own schedule, every third of 9 s.
    let svc = counting_layer_run("ok");
    let mut runs = Vec::new();
    let mut counts = Vec::new();
    for i in 0..50u64 {
        let (d, c) = loose_delivery(Message::new("x"), &i.to_string(), 1);
        counts.push(c);
        let svc = svc.clone();
        runs.push(async move {
            tokio::time::sleep(Duration::from_millis(37 * i)).await;
            svc.oneshot(d).await
        });
    }
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    for (i, c) in counts.iter().enumerate() {
        // 25 s of work, a beat every 3 s: at 3, 6, ..., 24.
        assert_eq!(c.extends.load(Ordering::SeqCst), 8, "lease {i}");
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    let total: usize = counts
        .iter()
        .map(|c| c.extends.load(Ordering::SeqCst))
        .sum();
    assert_eq!(total, 8 * 50, "every heartbeat stopped with its handler");
}

#[tokio::test(start_paused = true)]
async fn heartbeat_stops_when_the_handler_future_is_dropped() {
    let (d, counts) = loose_delivery(Message::new("x"), "1", 1);
    let fut = counting_layer_run("ok").oneshot(d);
    let _ = tokio::time::timeout(Duration::from_secs(10), fut).await;
    assert_eq!(counts.extends.load(Ordering::SeqCst), 3);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(counts.extends.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn no_op_without_the_capability() {
    let mut caps = Capabilities::minimal("test");
    caps.visibility_timeout = Some(Duration::from_secs(9));
    let layer = ExtendVisibilityLayer::from_capabilities(&caps);
    assert!(!layer.is_enabled(), "extend_visibility is false");
    assert!(!ExtendVisibilityLayer::from_capabilities(&Capabilities::minimal("x")).is_enabled());
    let (d, counts) = loose_delivery(Message::new("x"), "1", 1);
    layer
        .layer(handler_fn(|_d: Delivery| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, BoxError>(())
        }))
        .oneshot(d)
        .await
        .unwrap();
    assert_eq!(counts.extends.load(Ordering::SeqCst), 0);
}

/// An ack whose extend never answers.
#[derive(Debug)]
struct StuckExtend;

#[async_trait::async_trait]
impl crate::Ack for StuckExtend {
    async fn ack(&self) -> crate::Result<()> {
        Ok(())
    }
    async fn nack(&self, _: Option<Duration>) -> crate::Result<()> {
        Ok(())
    }
    async fn extend(&self, _: Duration) -> crate::Result<()> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn an_extend_that_never_answers_does_not_stop_the_other_leases_beats() {
    let svc = counting_layer_run("ok");
    let meta = crate::DeliveryMeta::new("stuck", 1, std::time::SystemTime::now(), "loose".into());
    let stuck = Delivery::new(Message::new("x"), meta, crate::AckHandle::new(StuckExtend));
    let (fine, counts) = loose_delivery(Message::new("y"), "fine", 1);
    let (a, b) = tokio::join!(svc.clone().oneshot(stuck), svc.oneshot(fine));
    a.unwrap();
    b.unwrap();
    // The stuck lease's extends are given up after a period each; the other lease is
    // beaten on schedule all the same: at 3, 6, ..., 24.
    assert_eq!(counts.extends.load(Ordering::SeqCst), 8);
}

#[test]
fn fraction_sets_the_interval() {
    let layer = ExtendVisibilityLayer::new(Duration::from_secs(10)).fraction(0.5);
    assert!(layer.is_enabled());
    let svc = layer.layer(());
    assert!(format!("{svc:?}").contains("every: 5s"), "{svc:?}");
}
