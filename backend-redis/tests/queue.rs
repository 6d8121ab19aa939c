//! Queue semantics against a real redis-server (FERRYMQ_TEST_REDIS_URL).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use common::{connect, raw, WAIT};
use ferrymq_core::{Consumer, ErrorKind, Message, Priority, Producer};
use redis::AsyncCommands;

#[tokio::test]
async fn send_receive_ack_removes_entries() {
    let (p, c, cfg) = connect("basic", "").await;
    let before = SystemTime::now() - Duration::from_secs(1);
    let receipt = p
        .send(
            Message::new("hello")
                .header("event-type", "greeting")
                .key("k1"),
        )
        .await
        .unwrap();
    assert!(!receipt.id().is_empty() && !receipt.is_duplicate());
    let ds = c.receive(10, WAIT).await.unwrap();
    assert_eq!(ds.len(), 1);
    let d = &ds[0];
    assert_eq!(d.payload().as_ref(), b"hello");
    assert_eq!(d.headers().get("event-type"), Some("greeting"));
    assert_eq!(d.key(), Some("k1"));
    assert_eq!(d.attempt(), 1);
    assert_eq!(d.id(), receipt.id());
    assert_eq!(&*d.meta().queue, cfg.queue.as_str());
    assert!(d.meta().enqueued_at >= before && d.meta().enqueued_at <= SystemTime::now());
    let depth = c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (0, 1));
    d.ack().await.unwrap();
    assert_eq!(d.ack().await.unwrap_err().kind(), ErrorKind::AlreadyAcked);
    let depth = p.depth().await.unwrap();
    assert_eq!(depth.total(), 0);
    // Acked entries are deleted from the stream, not just acknowledged.
    let mut r = raw().await;
    let len: u64 = r
        .xlen(format!("ferrymq:{{{}}}:ready:0", cfg.queue))
        .await
        .unwrap();
    assert_eq!(len, 0);
}

#[tokio::test]
async fn batch_send_receive_ack_in_bulk() {
    let (p, c, _) = connect("batch", "").await;
    let msgs: Vec<Message> = (0..500).map(|i| Message::new(format!("m{i}"))).collect();
    let results = p.send_batch(msgs).await.unwrap();
    assert_eq!(results.len(), 500);
    let ids: HashSet<String> = results.into_iter().map(|r| r.unwrap().into_id()).collect();
    assert_eq!(ids.len(), 500, "ids are unique");
    assert_eq!(p.depth().await.unwrap().waiting, 500);
    let mut seen = HashSet::new();
    while seen.len() < 500 {
        let ds = c.receive(200, WAIT).await.unwrap();
        assert!(!ds.is_empty() && ds.len() <= 200);
        let acks: Vec<_> = ds.iter().map(|d| d.ack()).collect();
        for r in futures::future::join_all(acks).await {
            r.unwrap();
        }
        for d in ds {
            assert!(seen.insert(d.payload().clone()), "no duplicate delivery");
        }
    }
    assert_eq!(c.depth().await.unwrap().total(), 0);
    assert!(c
        .receive(10, Duration::from_millis(50))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn batch_with_bad_entries_fails_them_alone() {
    let (p, c, _) = connect("batchbad", "max_message_size=100").await;
    let results = p
        .send_batch(vec![
            Message::new("ok1"),
            Message::new(vec![0u8; 101]),
            Message::new("ok2").dedup_id("x"),
            Message::new("bad").header("has space", "v"),
            Message::new("ok3").delay(Duration::from_millis(1)),
        ])
        .await
        .unwrap();
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().kind(), ErrorKind::TooLarge);
    assert!(results[2].is_ok());
    assert_eq!(
        results[3].as_ref().unwrap_err().kind(),
        ErrorKind::InvalidMessage
    );
    assert!(results[4].is_ok());
    let mut got = Vec::new();
    while got.len() < 3 {
        for d in c.receive(10, WAIT).await.unwrap() {
            got.push(String::from_utf8(d.payload().to_vec()).unwrap());
            d.ack().await.unwrap();
        }
    }
    got.sort();
    assert_eq!(got, vec!["ok1", "ok2", "ok3"]);
}

#[tokio::test]
async fn unacked_delivery_is_redelivered_with_attempt_plus_one() {
    let (p, c, _) = connect("vis", "visibility=500ms").await;
    let id = p.send(Message::new("x")).await.unwrap().into_id();
    let first = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(first.attempt(), 1);
    let t0 = Instant::now();
    drop(first); // dropped without ack: must come back
    let again = c.receive(1, WAIT).await.unwrap().remove(0);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "redelivered too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "redelivered too late: {waited:?}"
    );
    assert_eq!(again.attempt(), 2);
    assert_eq!(
        again.id(),
        id,
        "the message id is stable across redeliveries"
    );
    drop(again);
    let third = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(third.attempt(), 3);
    third.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().total(), 0);
}

#[tokio::test]
async fn stale_handle_gets_lease_expired() {
    let (p, c, _) = connect("stale", "visibility=300ms").await;
    p.send(Message::new("x")).await.unwrap();
    let first = c.receive(1, WAIT).await.unwrap().remove(0);
    let second = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(second.attempt(), 2);
    // The first lease is gone: none of its settles may touch the redelivery.
    assert_eq!(
        first
            .extend(Duration::from_secs(5))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::LeaseExpired
    );
    assert_eq!(
        first.ack().await.unwrap_err().kind(),
        ErrorKind::LeaseExpired
    );
    assert_eq!(
        first.nack(None).await.unwrap_err().kind(),
        ErrorKind::AlreadyAcked
    );
    assert_eq!(c.depth().await.unwrap().in_flight, 1);
    second.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().total(), 0);
}

#[tokio::test]
async fn extend_keeps_the_lease_without_bumping_the_attempt() {
    let (p, c, cfg) = connect("extend", "visibility=600ms").await;
    p.send(Message::new("x")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    // Heartbeat 4 times, each within the timeout: 1.6 s total > visibility.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        d.extend(Duration::from_millis(600)).await.unwrap();
        assert!(
            c.receive(1, Duration::ZERO).await.unwrap().is_empty(),
            "extended lease was reclaimed"
        );
    }
    // The delivery counter of the entry is still 1: XCLAIM JUSTID did not bump it.
    let mut r = raw().await;
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(format!("ferrymq:{{{}}}:ready:0", cfg.queue))
        .arg(&cfg.group)
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut r)
        .await
        .unwrap();
    let pending: Vec<(String, String, u64, u64)> = redis::from_redis_value(pending).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].3, 1, "delivery count after extends");
    // Stop extending: it comes back as attempt 2.
    drop(d);
    let again = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn extend_past_the_visibility_timeout() {
    let (p, c, _) = connect("extendlong", "visibility=300ms").await;
    p.send(Message::new("x")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    let t0 = Instant::now();
    d.extend(Duration::from_millis(2500)).await.unwrap();
    // Polls through several visibility periods find nothing...
    while t0.elapsed() < Duration::from_millis(1500) {
        assert!(
            c.receive(1, Duration::from_millis(100))
                .await
                .unwrap()
                .is_empty(),
            "redelivered at {:?} despite the 2.5 s extension",
            t0.elapsed()
        );
    }
    // ... and the handle still owns the lease.
    let t1 = Instant::now();
    d.extend(Duration::from_millis(1000)).await.unwrap();
    drop(d);
    let again = c.receive(1, WAIT).await.unwrap().remove(0);
    assert!(
        t1.elapsed() >= Duration::from_millis(950),
        "redelivered {:?} after a 1 s extension",
        t1.elapsed()
    );
    assert_eq!(again.attempt(), 2);
    again.ack().await.unwrap();
}

#[tokio::test]
async fn nack_now_and_later_carry_the_attempt() {
    let (p, c, _) = connect("nack", "").await;
    let id = p
        .send(Message::new("x").header("h", "v").priority(1))
        .await
        .unwrap()
        .into_id();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 1);
    d.nack(None).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 2);
    assert_eq!(d.id(), id);
    assert_eq!(d.headers().get("h"), Some("v"));
    assert_eq!(d.message().get_priority(), Some(1));
    let t0 = Instant::now();
    d.nack(Some(Duration::from_millis(700))).await.unwrap();
    assert_eq!(c.depth().await.unwrap().delayed, 1);
    assert!(c
        .receive(1, Duration::from_millis(400))
        .await
        .unwrap()
        .is_empty());
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(690),
        "nack delay not honoured: {waited:?}"
    );
    assert!(waited < Duration::from_millis(2000), "{waited:?}");
    assert_eq!(d.attempt(), 3);
    assert_eq!(d.id(), id);
    assert_eq!(d.payload().as_ref(), b"x");
    d.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().total(), 0);
}

#[tokio::test]
async fn delayed_send_is_not_delivered_early() {
    let (p, c, _) = connect("delay", "").await;
    let t0 = Instant::now();
    let r = p
        .send(Message::new("later").delay(Duration::from_millis(800)))
        .await
        .unwrap();
    p.send(Message::new("now")).await.unwrap();
    let d = c.receive(10, WAIT).await.unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].payload().as_ref(), b"now");
    d[0].ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().delayed, 1);
    let d = c.receive(10, WAIT).await.unwrap().remove(0);
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(790), "{waited:?}");
    assert!(waited < Duration::from_millis(2500), "{waited:?}");
    assert_eq!(d.payload().as_ref(), b"later");
    assert_eq!(d.id(), r.id());
    assert_eq!(d.attempt(), 1);
    assert!(d.message().get_delay().is_none());
    d.ack().await.unwrap();
}

#[tokio::test]
async fn due_messages_are_promoted_exactly_once_with_many_consumers() {
    let (p, _c, cfg) = connect("promote", "visibility=30s").await;
    let n = 300;
    let msgs: Vec<Message> = (0..n)
        .map(|i| Message::new(format!("{i}")).delay(Duration::from_millis(300)))
        .collect();
    for r in p.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let c = cfg.consumer().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                for d in c.receive(20, Duration::from_millis(200)).await.unwrap() {
                    got.push(d.payload().clone());
                    d.ack().await.unwrap();
                }
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), n, "each message delivered exactly once");
    let distinct: HashSet<_> = all.into_iter().collect();
    assert_eq!(distinct.len(), n);
    assert_eq!(p.depth().await.unwrap().total(), 0);
}

#[tokio::test]
async fn dedup_window_drops_duplicates() {
    let (p, c, _) = connect("dedup", "dedup_window=700ms").await;
    let a = p.send(Message::new("a").dedup_id("order-1")).await.unwrap();
    let b = p.send(Message::new("b").dedup_id("order-1")).await.unwrap();
    assert!(!a.is_duplicate());
    assert!(b.is_duplicate());
    assert_eq!(b.id(), a.id(), "the duplicate names the original");
    let batch = p
        .send_batch(vec![
            Message::new("c").dedup_id("order-2"),
            Message::new("d").dedup_id("order-2"),
        ])
        .await
        .unwrap();
    assert!(!batch[0].as_ref().unwrap().is_duplicate());
    assert!(batch[1].as_ref().unwrap().is_duplicate());
    // A delayed message dedups too.
    let e = p
        .send(
            Message::new("e")
                .dedup_id("order-1")
                .delay(Duration::from_millis(10)),
        )
        .await
        .unwrap();
    assert!(e.is_duplicate());
    assert_eq!(p.depth().await.unwrap().waiting, 2);
    tokio::time::sleep(Duration::from_millis(750)).await;
    let f = p.send(Message::new("f").dedup_id("order-1")).await.unwrap();
    assert!(!f.is_duplicate(), "window passed");
    let mut got = Vec::new();
    while got.len() < 3 {
        for d in c.receive(10, WAIT).await.unwrap() {
            got.push(d.payload().clone());
            d.ack().await.unwrap();
        }
    }
    got.sort();
    assert_eq!(got, vec!["a", "c", "f"]);
}

#[tokio::test]
async fn higher_priority_levels_first() {
    let (p, c, _) = connect("prio", "priority_levels=3").await;
    assert_eq!(c.capabilities().priority, Priority::Levels(3));
    let mut msgs = Vec::new();
    for i in 0..5 {
        msgs.push(Message::new(format!("low{i}")));
        msgs.push(Message::new(format!("mid{i}")).priority(1));
        msgs.push(Message::new(format!("high{i}")).priority(7)); // clamps to level 2
    }
    p.send_batch(msgs).await.unwrap();
    let mut order = Vec::new();
    while order.len() < 15 {
        for d in c.receive(4, WAIT).await.unwrap() {
            order.push(String::from_utf8(d.payload().to_vec()).unwrap());
            d.ack().await.unwrap();
        }
    }
    let expected: Vec<String> = ["high", "mid", "low"]
        .iter()
        .flat_map(|p| (0..5).map(move |i| format!("{p}{i}")))
        .collect();
    assert_eq!(order, expected, "levels high to low, FIFO within a level");
}

#[tokio::test]
async fn depth_counts_every_state() {
    let (p, c, _) = connect("depth", "max_deliveries=1").await;
    p.send_batch((0..4).map(|i| Message::new(format!("{i}"))).collect())
        .await
        .unwrap();
    p.send(Message::new("d").delay(Duration::from_secs(60)))
        .await
        .unwrap();
    let ds = c.receive(2, WAIT).await.unwrap();
    assert_eq!(ds.len(), 2);
    // max_deliveries=1: a nack dead-letters.
    ds[0].nack(None).await.unwrap();
    let depth = c.depth().await.unwrap();
    assert_eq!(depth.waiting, 2);
    assert_eq!(depth.in_flight, 1);
    assert_eq!(depth.delayed, 1);
    assert_eq!(depth.dead_lettered, 1);
}

#[tokio::test]
async fn max_deliveries_dead_letters_with_reason_and_redrive() {
    let (p, c, cfg) = connect("dlq", "visibility=200ms&max_deliveries=2").await;
    let id = p
        .send(Message::new("poison").header("x", "1"))
        .await
        .unwrap()
        .into_id();
    let d1 = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d1.attempt(), 1);
    drop(d1); // timeout
    let d2 = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d2.attempt(), 2);
    drop(d2); // timeout again: max_deliveries reached
    assert!(c
        .receive(1, Duration::from_millis(800))
        .await
        .unwrap()
        .is_empty());
    let depth = c.depth().await.unwrap();
    assert_eq!((depth.total(), depth.dead_lettered), (0, 1));
    let dead = c.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let m = &dead[0].message;
    assert_eq!(m.payload().as_ref(), b"poison");
    assert_eq!(m.headers().get("x"), Some("1"));
    assert_eq!(m.headers().get("ferrymq-attempts"), Some("2"));
    assert_eq!(
        m.headers().get("ferrymq-origin-queue"),
        Some(cfg.queue.as_str())
    );
    assert_eq!(
        m.headers().get("ferrymq-origin-message-id"),
        Some(id.as_str())
    );
    assert!(m
        .headers()
        .get("ferrymq-failure-reason")
        .unwrap()
        .contains("visibility timeout"));

    // Nacks count too.
    p.send(Message::new("nacked")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    d.nack(None).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 2);
    d.nack(None).await.unwrap();
    assert_eq!(c.depth().await.unwrap().dead_lettered, 2);

    // Redrive puts them back with a fresh attempt count.
    assert_eq!(c.redrive(10).await.unwrap(), 2);
    let mut back = Vec::new();
    while back.len() < 2 {
        for d in c.receive(10, WAIT).await.unwrap() {
            assert_eq!(d.attempt(), 1);
            back.push(d.payload().clone());
            d.ack().await.unwrap();
        }
    }
    back.sort();
    assert_eq!(back, vec!["nacked", "poison"]);
    assert_eq!(c.depth().await.unwrap().dead_lettered, 0);
}

#[tokio::test]
async fn dead_letter_stream_is_bounded() {
    let (p, c, cfg) = connect("dlqbound", "max_deliveries=1&dlq_max_len=5").await;
    p.send_batch((0..300).map(|i| Message::new(format!("{i}"))).collect())
        .await
        .unwrap();
    let mut n = 0;
    while n < 300 {
        for d in c.receive(100, WAIT).await.unwrap() {
            d.nack(None).await.unwrap();
            n += 1;
        }
    }
    let depth = c.depth().await.unwrap();
    assert_eq!(depth.total(), 0);
    // MAXLEN ~ trims whole macro nodes: the bound is approximate but holds.
    assert!(
        depth.dead_lettered <= 200,
        "dead letters not trimmed: {}",
        depth.dead_lettered
    );
    assert!(depth.dead_lettered >= 5);
    let mut r = raw().await;
    let len: u64 = r
        .xlen(format!("ferrymq:{{{}}}:dead", cfg.queue))
        .await
        .unwrap();
    assert_eq!(len, depth.dead_lettered);
}

#[tokio::test]
async fn receive_waits_then_returns_empty_or_on_arrival() {
    let (p, c, _) = connect("wait", "").await;
    let t0 = Instant::now();
    assert!(c
        .receive(5, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    let p2 = p.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        p2.send(Message::new("late")).await.unwrap();
    });
    let t0 = Instant::now();
    let ds = c.receive(5, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ds.len(), 1);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "long poll woke late: {:?}",
        t0.elapsed()
    );
    ds[0].ack().await.unwrap();
}

#[tokio::test]
async fn close_refuses_further_calls_but_settles_outstanding() {
    let (p, c, _) = connect("close", "").await;
    p.send(Message::new("x")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    c.close().await.unwrap();
    assert_eq!(
        c.receive(1, Duration::ZERO).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    d.ack().await.unwrap();
    p.close().await.unwrap();
    assert_eq!(
        p.send(Message::new("y")).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test]
async fn close_wakes_a_blocked_receive() {
    let (_p, c, _) = connect("closewake", "visibility=30s").await;
    let c2 = c.clone();
    let t = tokio::spawn(async move { c2.receive(1, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    c.close().await.unwrap();
    let r = t.await.unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed);
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn capabilities_are_what_is_proven() {
    let (p, c, _) = connect("caps", "visibility=2s").await;
    let caps = p.capabilities();
    assert_eq!(caps, c.capabilities());
    assert_eq!(caps.backend, "redis");
    assert_eq!(caps.ordering, ferrymq_core::Ordering::None);
    assert_eq!(caps.visibility_timeout, Some(Duration::from_secs(2)));
    assert!(caps.extend_visibility && caps.max_nack_delay.is_some());
    assert_eq!(caps.attempts, ferrymq_core::Attempts::Exact);
    assert_eq!(caps.depth, ferrymq_core::Accuracy::Exact);
    assert!(!caps.bounded);
    assert_eq!(caps.priority, Priority::Levels(4));
    assert_eq!(caps.dedup_window, Some(Duration::from_secs(300)));
}

#[tokio::test]
async fn priority_holds_across_buffered_reads() {
    let (p, c, _) = connect("priobuf", "priority_levels=4").await;
    let mut msgs = Vec::new();
    for i in 0..10 {
        msgs.push(Message::new(format!("low{i}")));
        msgs.push(Message::new(format!("mid{i}")).priority(1));
    }
    p.send_batch(msgs).await.unwrap();
    let mut order = Vec::new();
    let take = |ds: Vec<ferrymq_core::Delivery>, order: &mut Vec<String>| {
        for d in ds {
            order.push(String::from_utf8(d.payload().to_vec()).unwrap());
            tokio::spawn(async move { d.ack().await.unwrap() });
        }
    };
    take(c.receive(3, WAIT).await.unwrap(), &mut order);
    // A high-priority message arrives while lower ones sit in the buffer.
    p.send(Message::new("high0").priority(3)).await.unwrap();
    while order.len() < 21 {
        take(c.receive(3, WAIT).await.unwrap(), &mut order);
    }
    let mut expected: Vec<String> =
        vec!["mid0".into(), "mid1".into(), "mid2".into(), "high0".into()];
    expected.extend((3..10).map(|i| format!("mid{i}")));
    expected.extend((0..10).map(|i| format!("low{i}")));
    assert_eq!(order, expected);
}

#[tokio::test]
async fn stale_buffered_deliveries_are_given_back_without_an_attempt() {
    let (p, c, _) = connect("stalebuf", "priority_levels=2&visibility=400ms").await;
    p.send_batch(vec![Message::new("low"), Message::new("high").priority(1)])
        .await
        .unwrap();
    // Both levels answer one read of max 1: "low" is leased but buffered.
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"high");
    d.ack().await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await; // > visibility / 2
                                                          // Too old to hand out safely: released (it was never handed out, so no attempt
                                                          // is spent), then delivered again.
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"low");
    assert_eq!(d.attempt(), 1);
    d.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().total(), 0);
}

#[tokio::test]
async fn batched_acks_sort_out_stale_and_live_leases() {
    let (p, c, cfg) = connect("ackmix", "visibility=300ms&priority_levels=2").await;
    p.send_batch(vec![
        Message::new("a"),
        Message::new("b").priority(1),
        Message::new("c"),
        Message::new("x"),
    ])
    .await
    .unwrap();
    let mut old = Vec::new();
    while old.len() < 4 {
        old.extend(c.receive(10, WAIT).await.unwrap());
    }
    // Their leases run out; the next receive reclaims them (revoking the old ones).
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mut new = Vec::new();
    while new.len() < 4 {
        new.extend(c.receive(10, WAIT).await.unwrap());
    }
    let find = |ds: &[ferrymq_core::Delivery], body: &str| {
        ds.iter()
            .find(|d| d.payload().as_ref() == body.as_bytes())
            .cloned()
            .unwrap()
    };
    let (old_a, old_b, old_c) = (find(&old, "a"), find(&old, "b"), find(&old, "c"));
    let (new_a, new_b, new_c, x) = (
        find(&new, "a"),
        find(&new, "b"),
        find(&new, "c"),
        find(&new, "x"),
    );
    assert_eq!(
        (
            new_a.attempt(),
            new_b.attempt(),
            new_c.attempt(),
            x.attempt()
        ),
        (2, 2, 2, 2)
    );
    // One concurrent batch mixing stale and live leases across levels.
    let results =
        futures::future::join_all([old_a.ack(), new_b.ack(), old_b.ack(), new_a.ack()]).await;
    let kinds: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.kind()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            Some(ErrorKind::LeaseExpired),
            None,
            Some(ErrorKind::LeaseExpired),
            None
        ]
    );
    x.ack().await.unwrap();
    new_c.ack().await.unwrap();
    // Revocation bookkeeping is gone with the entries.
    let mut r = raw().await;
    let n: u64 = r
        .exists(format!("ferrymq:{{{}}}:revoked", cfg.queue))
        .await
        .unwrap();
    assert_eq!(n, 0, "revoked set cleaned up");
    // The stale handle of an entry already acked by its new holder, batched with a
    // live one: with no revoked set, the fast path meets a short XACK and falls back
    // to entry-by-entry.
    p.send(Message::new("y")).await.unwrap();
    let y = c.receive(1, WAIT).await.unwrap().remove(0);
    let results = futures::future::join_all([old_c.ack(), y.ack()]).await;
    assert_eq!(
        results[0].as_ref().unwrap_err().kind(),
        ErrorKind::LeaseExpired
    );
    results[1].as_ref().unwrap();
    assert_eq!(c.depth().await.unwrap().total(), 0);
    let len: u64 = r
        .xlen(format!("ferrymq:{{{}}}:ready:0", cfg.queue))
        .await
        .unwrap();
    assert_eq!(len, 0, "acked entries deleted");
}

#[tokio::test]
async fn delete_queue_removes_every_key() {
    let (p, c, cfg) = connect("delete", "max_deliveries=1").await;
    p.send(Message::new("a").dedup_id("x")).await.unwrap();
    p.send(Message::new("b").delay(Duration::from_secs(60)))
        .await
        .unwrap();
    p.send(Message::new("c")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    d.nack(None).await.unwrap(); // dead-lettered
    let mut r = raw().await;
    let pattern = format!("ferrymq:{{{}}}:*", cfg.queue);
    let before: Vec<String> = r.keys(&pattern).await.unwrap();
    assert!(before.len() >= 5, "{before:?}");
    let n = cfg.delete_queue().await.unwrap();
    assert_eq!(n as usize, before.len());
    let after: Vec<String> = r.keys(&pattern).await.unwrap();
    assert!(after.is_empty(), "{after:?}");
    // The consumer recreates its group and goes on.
    p.send(Message::new("again")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"again");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn depth_counts_an_expired_lease_as_waiting() {
    let (p, c, _) = connect("depthexp", "visibility=300ms").await;
    p.send_batch(vec![Message::new("a"), Message::new("b")])
        .await
        .unwrap();
    let ds = c.receive(2, WAIT).await.unwrap();
    assert_eq!(ds.len(), 2);
    ds[1].extend(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (
            c.depth().await.unwrap().waiting,
            c.depth().await.unwrap().in_flight
        ),
        (0, 2)
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    // No receive ran: "a" is still pending in Redis, but its lease is over; "b" was
    // extended past the visibility timeout.
    let d = p.depth().await.unwrap();
    assert_eq!((d.waiting, d.in_flight), (1, 1));
    drop(ds);
}

/// `INFO commandstats` calls of `cmd` on a server of the test's own.
async fn calls(conn: &mut redis::aio::MultiplexedConnection, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Issue 11: the maintenance script (promotion, reclaim) ran on every receive and
/// type-checked every key, most of the Redis server's work on a busy queue. It now
/// runs when something can be due (a reclaim tick, the earliest delayed message, an
/// empty read, at most every 50 ms otherwise). Counted on a server of our own: each
/// maintenance call does one `ZRANGEBYSCORE`; a busy consumer's reads are `XREADGROUP`.
#[tokio::test]
async fn a_busy_consumer_maintains_only_when_something_can_be_due() {
    let server = common::OwnServer::start(&[]);
    let cfg = ferrymq_redis::RedisConfig::from_url(&server.url("busy")).unwrap();
    let (p, c) = cfg.connect().await.unwrap();
    let n = 400;
    let msgs: Vec<Message> = (0..n).map(|i| Message::new(format!("m{i}"))).collect();
    for r in p.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    let client = redis::Client::open(server.url("")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut got = 0;
    while got < n {
        let ds = c.receive(1, WAIT).await.unwrap();
        got += ds.len();
        for d in ds {
            d.ack().await.unwrap();
        }
    }
    let reads = calls(&mut conn, "xreadgroup").await;
    let maintained = calls(&mut conn, "zrangebyscore").await;
    let types = calls(&mut conn, "type").await;
    assert!(reads >= n as u64, "one read per receive: {reads}");
    assert!(
        maintained * 2 <= reads,
        "the maintenance ran on {maintained} of {reads} receives"
    );
    assert!(
        types * 2 <= reads,
        "{types} TYPE checks for {reads} receives and their acks"
    );
}

/// While reads keep returning entries (the maintenance is skipped between due
/// times), a delayed message another process sends is still promoted within its
/// slack: it goes to the top priority level, so it is delivered on the first
/// receive after its promotion, long before the backlog below it is drained.
#[tokio::test]
async fn a_delayed_message_is_promoted_while_the_consumer_is_busy() {
    let (p, c, cfg) = connect("busydelay", "").await;
    let n = 3000;
    let msgs: Vec<Message> = (0..n).map(|i| Message::new(format!("m{i}"))).collect();
    for r in p.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    // One receive first: the consumer has maintained and knows of no delayed message.
    let first = c.receive(1, WAIT).await.unwrap();
    assert_eq!(first.len(), 1);
    first[0].ack().await.unwrap();
    let (other, _) = cfg.connect().await.unwrap();
    let sent = Instant::now();
    other
        .send(
            Message::new("late")
                .delay(Duration::from_millis(200))
                .priority(3),
        )
        .await
        .unwrap();
    let mut left = n - 1;
    let waited = loop {
        let ds = c.receive(1, WAIT).await.unwrap();
        assert!(
            !ds.is_empty(),
            "backlog drained before the delayed message came"
        );
        let d = &ds[0];
        d.ack().await.unwrap();
        if d.payload().as_ref() == b"late" {
            break sent.elapsed();
        }
        left -= 1;
        // Handling takes a little time, as in a real consumer.
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert!(waited >= Duration::from_millis(190), "early: {waited:?}");
    assert!(
        waited < Duration::from_millis(1500),
        "promoted {waited:?} after send, {left} of the backlog still waiting"
    );
    assert!(left > 0, "delivered only after the backlog");
}
