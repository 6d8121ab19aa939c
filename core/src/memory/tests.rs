//! Deterministic tests of the in-memory queue on tokio's paused clock.

use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::ErrorKind;

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn config() -> MemoryConfig {
    let n = NEXT.fetch_add(1, AtomicOrdering::Relaxed);
    MemoryConfig::new(format!("memory-unit-{n}")).visibility_timeout(Duration::from_secs(10))
}

const NOW: Duration = Duration::ZERO;

async fn one(c: &MemoryConsumer) -> Option<Delivery> {
    c.receive(1, NOW).await.expect("receive").pop()
}

fn payload(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

#[tokio::test(start_paused = true)]
async fn visibility_timeout_redelivers_unacked_and_dropped() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("a")).await.unwrap();
    let d = one(&c).await.unwrap();
    assert_eq!(d.attempt(), 1);
    drop(d);
    assert!(
        one(&c).await.is_none(),
        "leased message must stay invisible"
    );
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(one(&c).await.is_none());
    tokio::time::advance(Duration::from_secs(1)).await;
    let d = one(&c).await.expect("redelivered after the timeout");
    assert_eq!(d.attempt(), 2);
    d.ack().await.unwrap();
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(one(&c).await.is_none(), "acked message is gone");
}

#[tokio::test(start_paused = true)]
async fn nack_delay_and_extend() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("a")).await.unwrap();
    let d = one(&c).await.unwrap();
    d.nack(Some(Duration::from_secs(3))).await.unwrap();
    tokio::time::advance(Duration::from_millis(2999)).await;
    assert!(one(&c).await.is_none(), "not before the nack delay");
    tokio::time::advance(Duration::from_millis(1)).await;
    let d = one(&c).await.unwrap();
    assert_eq!(d.attempt(), 2);

    tokio::time::advance(Duration::from_secs(8)).await;
    d.extend(Duration::from_secs(10)).await.unwrap();
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(one(&c).await.is_none(), "extend pushed the deadline");
    tokio::time::advance(Duration::from_secs(1)).await;
    let again = one(&c).await.expect("back after the extended deadline");
    assert_eq!(again.attempt(), 3);
    // The old lease cannot settle or extend the message any more.
    assert_eq!(d.ack().await.unwrap_err().kind(), ErrorKind::LeaseExpired);
    again.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn extend_after_expiry_is_lease_expired_but_ack_before_redelivery_works() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("a")).await.unwrap();
    let d = one(&c).await.unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(
        d.extend(Duration::from_secs(5)).await.unwrap_err().kind(),
        ErrorKind::LeaseExpired
    );
    // Like SQS: the old receipt still deletes while nobody received the message again.
    d.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap(), Depth::default());
}

#[tokio::test(start_paused = true)]
async fn delay_and_priority() {
    let (p, c) = config().connect().unwrap();
    p.send(
        Message::new("late")
            .delay(Duration::from_secs(5))
            .priority(100),
    )
    .await
    .unwrap();
    p.send(Message::new("low").priority(-1)).await.unwrap();
    p.send(Message::new("plain")).await.unwrap();
    p.send(Message::new("high").priority(10)).await.unwrap();
    p.send(Message::new("plain2")).await.unwrap();
    let got: Vec<_> = c
        .receive(10, NOW)
        .await
        .unwrap()
        .iter()
        .map(payload)
        .collect();
    assert_eq!(got, ["high", "plain", "plain2", "low"]);
    assert_eq!(c.depth().await.unwrap().delayed, 1);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(payload(&one(&c).await.unwrap()), "late");
}

#[tokio::test(start_paused = true)]
async fn receive_waits_for_delayed_message_then_returns() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("x").delay(Duration::from_secs(2)))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let got = c.receive(10, Duration::from_secs(20)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn receive_wakes_on_send_from_another_task() {
    let (p, c) = config().connect().unwrap();
    let start = tokio::time::Instant::now();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.send(Message::new("x")).await.unwrap();
    });
    let got = c.receive(10, Duration::from_secs(20)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    sender.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn per_key_order_blocks_key_while_in_flight() {
    let (p, c) = config().connect().unwrap();
    for (k, v) in [
        ("a", "a1"),
        ("a", "a2"),
        ("b", "b1"),
        ("a", "a3"),
        ("b", "b2"),
    ] {
        p.send(Message::new(v).key(k)).await.unwrap();
    }
    let first: Vec<_> = c.receive(10, NOW).await.unwrap();
    let names: Vec<_> = first.iter().map(payload).collect();
    assert_eq!(names, ["a1", "b1"], "one message per key in flight");
    // Nack a1 with a delay: the key stays blocked, a2 must not overtake it.
    first[0].nack(Some(Duration::from_secs(2))).await.unwrap();
    first[1].ack().await.unwrap();
    let b2 = c.receive(10, NOW).await.unwrap();
    assert_eq!(b2.iter().map(payload).collect::<Vec<_>>(), ["b2"]);
    b2[0].ack().await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    let d = one(&c).await.unwrap();
    assert_eq!((payload(&d), d.attempt()), ("a1".into(), 2));
    // A lease expiry also keeps the key's order.
    drop(d);
    tokio::time::advance(Duration::from_secs(10)).await;
    let d = one(&c).await.unwrap();
    assert_eq!((payload(&d), d.attempt()), ("a1".into(), 3));
    d.ack().await.unwrap();
    let rest: Vec<_> = c.receive(10, NOW).await.unwrap();
    assert_eq!(rest.iter().map(payload).collect::<Vec<_>>(), ["a2"]);
    rest[0].ack().await.unwrap();
    assert_eq!(payload(&one(&c).await.unwrap()), "a3");
}

#[tokio::test(start_paused = true)]
async fn per_key_order_under_random_acks_and_nacks() {
    let (p, c) = config().connect().unwrap();
    let keys = 8;
    let per_key = 50;
    for i in 0..per_key {
        let batch = (0..keys)
            .map(|k| Message::new(format!("{i}")).key(format!("k{k}")))
            .collect();
        p.send_batch(batch).await.unwrap();
    }
    let mut next: HashMap<String, u32> = HashMap::new();
    let mut round = 0u32;
    loop {
        let ds = c.receive(5, NOW).await.unwrap();
        if ds.is_empty() {
            if c.depth().await.unwrap().total() == 0 {
                break;
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            continue;
        }
        for d in ds {
            round += 1;
            let key = d.key().unwrap().to_string();
            let seq: u32 = payload(&d).parse().unwrap();
            let expected = next.entry(key).or_default();
            assert_eq!(seq, *expected, "key order broken");
            match round % 5 {
                0 => d.nack(None).await.unwrap(),
                1 => d.nack(Some(Duration::from_millis(500))).await.unwrap(),
                _ => {
                    d.ack().await.unwrap();
                    *expected += 1;
                }
            }
        }
    }
    assert!(next.values().all(|n| *n == per_key));
}

#[tokio::test(start_paused = true)]
async fn dedup_window() {
    let cfg = config().dedup_window(Duration::from_secs(60));
    let (p, c) = cfg.connect().unwrap();
    let first = p.send(Message::new("1").dedup_id("x")).await.unwrap();
    let second = p.send(Message::new("2").dedup_id("x")).await.unwrap();
    assert!(!first.is_duplicate() && second.is_duplicate());
    assert_eq!(first.id(), second.id());
    let d = one(&c).await.unwrap();
    d.ack().await.unwrap();
    // Still deduplicated after delete, inside the window (like SQS FIFO).
    assert!(p
        .send(Message::new("3").dedup_id("x"))
        .await
        .unwrap()
        .is_duplicate());
    tokio::time::advance(Duration::from_secs(60)).await;
    assert!(!p
        .send(Message::new("4").dedup_id("x"))
        .await
        .unwrap()
        .is_duplicate());
    assert_eq!(payload(&one(&c).await.unwrap()), "4");
}

#[tokio::test(start_paused = true)]
async fn too_large_and_queue_full_enqueue_nothing() {
    let cfg = config().capacity(2).max_message_size(8);
    let (p, c) = cfg.connect().unwrap();
    let err = p.send(Message::new(vec![0u8; 9])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    p.send(Message::new("1")).await.unwrap();
    p.send(Message::new("2")).await.unwrap();
    assert_eq!(
        p.send(Message::new("3")).await.unwrap_err().kind(),
        ErrorKind::QueueFull
    );
    let results = p
        .send_batch(vec![Message::new("4"), Message::new("5")])
        .await
        .unwrap();
    assert!(results.iter().all(|r| r.is_err()));
    assert_eq!(c.depth().await.unwrap().waiting, 2);
    one(&c).await.unwrap().ack().await.unwrap();
    p.send(Message::new("6")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn depth_counts_each_place() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("a")).await.unwrap();
    p.send(Message::new("b")).await.unwrap();
    p.send(Message::new("c").delay(Duration::from_secs(5)))
        .await
        .unwrap();
    p.send(Message::new("k1").key("k")).await.unwrap();
    p.send(Message::new("k2").key("k")).await.unwrap();
    assert_eq!(
        c.depth().await.unwrap(),
        Depth {
            waiting: 4,
            in_flight: 0,
            delayed: 1,
            dead_lettered: 0
        }
    );
    let _leased = c.receive(2, NOW).await.unwrap();
    assert_eq!(
        c.depth().await.unwrap(),
        Depth {
            waiting: 2,
            in_flight: 2,
            delayed: 1,
            dead_lettered: 0
        }
    );
}

#[tokio::test(start_paused = true)]
async fn close_refuses_further_use_and_settling_still_works() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("a")).await.unwrap();
    let d = one(&c).await.unwrap();
    p.close().await.unwrap();
    c.close().await.unwrap();
    assert_eq!(
        p.send(Message::new("b")).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(
        c.receive(1, NOW).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    d.ack().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn close_wakes_a_waiting_receive() {
    let (_p, c) = config().connect().unwrap();
    let c2 = c.clone();
    let waiting = tokio::spawn(async move { c2.receive(1, Duration::from_secs(3600)).await });
    tokio::task::yield_now().await;
    c.close().await.unwrap();
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn named_queues_are_shared_and_settings_must_agree() {
    let cfg = config();
    let p = cfg.producer().unwrap();
    let c = cfg.consumer().unwrap();
    p.send(Message::new("shared")).await.unwrap();
    assert_eq!(payload(&one(&c).await.unwrap()), "shared");
    let err = cfg.clone().capacity(5).consumer().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
}

#[test]
fn url_config() {
    let cfg = MemoryConfig::from_url("memory://orders?visibility=2s&capacity=10&dedup_window=1m")
        .unwrap();
    assert_eq!(cfg.queue, "orders");
    assert_eq!(cfg.visibility_timeout, Duration::from_secs(2));
    assert_eq!(cfg.capacity, 10);
    assert_eq!(cfg.dedup_window, Duration::from_secs(60));
    for (url, param) in [
        ("memory://", "queue"),
        ("memory://q?visibility=soon", "visibility"),
        ("memory://q?capacity=-1", "capacity"),
        ("memory://q?bogus=1", "bogus"),
        ("memory://q/extra", "queue"),
        ("redis://q", "scheme"),
        ("not a url", "url"),
    ] {
        let err = MemoryConfig::from_url(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
        assert!(
            err.to_string().contains(&format!("`{param}`")),
            "{url}: {err}"
        );
    }
}

/// #6: a release (what the Dedup middleware's "claimed elsewhere" deferral and the
/// worker's unstarted give-backs do) keeps the attempt count, with or without a
/// delay, and a delayed release still holds the key and is not redelivered early.
#[tokio::test(start_paused = true)]
async fn release_keeps_the_attempt_count_and_the_key_order() {
    let (p, c) = config().connect().unwrap();
    assert!(c.capabilities().release_keeps_attempt);
    p.send(Message::new("head").key("k")).await.unwrap();
    p.send(Message::new("next").key("k")).await.unwrap();
    for _ in 0..50 {
        let d = one(&c).await.unwrap();
        assert_eq!((payload(&d), d.attempt()), ("head".to_string(), 1));
        d.release(Some(Duration::from_secs(1))).await.unwrap();
        assert!(
            one(&c).await.is_none(),
            "not early, and the key stays blocked"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let d = one(&c).await.unwrap();
    d.release(None).await.unwrap();
    let d = one(&c).await.unwrap();
    assert_eq!(d.attempt(), 1, "fifty-one releases, no attempt spent");
    d.nack(None).await.unwrap();
    let d = one(&c).await.unwrap();
    assert_eq!(d.attempt(), 2, "a nack does count");
    d.ack().await.unwrap();
    assert_eq!(payload(&one(&c).await.unwrap()), "next");
}

/// #9: any duration a user or a network can hand the queue — as a send delay, a nack
/// or release delay, an extension, a receive wait — including zero, 1 ns, the
/// longest the queue schedules, `u64::MAX` seconds, `Duration::MAX` and values around
/// the clock's range. Before, `now + d` panicked after the entry had been taken out
/// of its index: the message was never redelivered and its key stayed blocked.
///
/// Random operations from a fixed seed, with invariants after each: no panic, every
/// accepted and un-acked message is somewhere (depth), a refused operation changed
/// nothing; and at the end, with the clock run forward, every message is delivered
/// and acked — no message lost, no key left blocked.
#[tokio::test(start_paused = true)]
async fn any_duration_leaves_the_queue_consistent() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashSet;

    let special = [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_millis(1),
        Duration::from_secs(1),
        MAX_DELAY - Duration::from_nanos(1),
        MAX_DELAY,
        MAX_DELAY + Duration::from_nanos(1),
        crate::time::FAR_FUTURE - Duration::from_nanos(1),
        crate::time::FAR_FUTURE,
        crate::time::FAR_FUTURE + Duration::from_secs(1),
        Duration::from_secs(i64::MAX as u64),
        Duration::from_secs(u64::MAX / 2),
        Duration::from_secs(u64::MAX),
        Duration::from_nanos(u64::MAX),
        Duration::MAX,
    ];
    let mut rng = StdRng::seed_from_u64(0x00fe_44e3);
    let pick = move |rng: &mut StdRng| -> Duration {
        match rng.gen_range(0..4) {
            0 | 1 => special[rng.gen_range(0..special.len())],
            // Anything at all, every magnitude equally likely.
            2 => Duration::new(
                rng.gen::<u64>() >> rng.gen_range(0..64),
                rng.gen_range(0..1_000_000_000),
            ),
            _ => Duration::from_millis(rng.gen_range(0..20_000)),
        }
    };

    let (p, c) = config().connect().unwrap();
    let keys = ["k0", "k1", "k2"];
    let mut accepted: HashSet<String> = HashSet::new();
    let mut acked: HashSet<String> = HashSet::new();
    let mut held: Vec<Delivery> = Vec::new();
    let unsupported = |r: &crate::Result<()>, d: Duration| match r {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            assert!(d > MAX_DELAY, "{d:?} refused: {e}");
        }
        Ok(()) => assert!(d <= MAX_DELAY, "{d:?} accepted"),
    };

    for step in 0..4000u32 {
        let d = pick(&mut rng);
        let before = c.depth().await.unwrap();
        match rng.gen_range(0..9) {
            0 | 1 => {
                let mut m = Message::new(format!("m{step}")).delay(d);
                if rng.gen_bool(0.5) {
                    m = m.key(keys[rng.gen_range(0..keys.len())]);
                }
                match p.send(m).await {
                    Ok(r) => {
                        assert!(d <= MAX_DELAY, "a delay of {d:?} was accepted");
                        accepted.insert(r.into_id());
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                        assert!(d > MAX_DELAY);
                        assert_eq!(c.depth().await.unwrap(), before, "nothing enqueued");
                    }
                }
            }
            2 => {
                let max = rng.gen_range(1..4);
                // A long wait is cut short (losing nothing); the clock moves 5 s.
                if let Ok(got) =
                    tokio::time::timeout(Duration::from_secs(5), c.receive(max, d)).await
                {
                    held.extend(got.unwrap());
                }
            }
            op @ 3..=6 if !held.is_empty() => {
                let i = rng.gen_range(0..held.len());
                let result = match op {
                    3 => held[i].nack(Some(d)).await,
                    4 => held[i].release(Some(d)).await,
                    5 => held[i].extend(d).await,
                    _ => held[i].ack().await,
                };
                match result {
                    Err(e) if e.kind() == ErrorKind::LeaseExpired => {
                        held.swap_remove(i);
                    }
                    other => {
                        if op == 6 {
                            other.unwrap();
                            let d = held.swap_remove(i);
                            assert!(acked.insert(d.id().to_string()), "acked twice");
                        } else {
                            unsupported(&other, d);
                            match other {
                                // Extended (by zero: let go now), still held.
                                Ok(()) if op == 5 => {}
                                Ok(()) => {
                                    held.swap_remove(i);
                                }
                                Err(_) => assert_eq!(
                                    c.depth().await.unwrap(),
                                    before,
                                    "a refused settle changed nothing"
                                ),
                            }
                        }
                    }
                }
            }
            7 if !held.is_empty() => {
                // Dropped: comes back after its lease.
                let i = rng.gen_range(0..held.len());
                held.swap_remove(i);
            }
            _ => {
                let by = if rng.gen_bool(0.05) {
                    MAX_DELAY
                } else {
                    Duration::from_millis(rng.gen_range(0..30_000))
                };
                tokio::time::advance(by).await;
            }
        }
        let depth = c.depth().await.unwrap();
        assert_eq!(
            depth.total() as usize,
            accepted.len() - acked.len(),
            "step {step}: every accepted, un-acked message is somewhere: {depth:?}"
        );
    }

    // Run the clock forward: everything comes back (leases run out, delays pass) and
    // is acked; a key left blocked would keep its messages from ever being delivered.
    held.clear();
    for _ in 0..1000 {
        let got = c.receive(1000, NOW).await.unwrap();
        if got.is_empty() {
            if c.depth().await.unwrap().total() == 0 {
                break;
            }
            tokio::time::advance(MAX_DELAY).await;
            continue;
        }
        for d in got {
            d.ack().await.unwrap();
            assert!(acked.insert(d.id().to_string()), "acked twice");
        }
    }
    assert_eq!(c.depth().await.unwrap().total(), 0);
    assert_eq!(
        acked, accepted,
        "every message delivered and acked exactly once"
    );
    assert!(accepted.len() > 500, "the run exercised the queue");
}

/// The lease index drops the records of settled leases lazily; a lease at its front
/// that is never settled must not make it grow with every later delivery.
#[tokio::test(start_paused = true)]
async fn a_stuck_lease_does_not_grow_the_lease_index() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("stuck")).await.unwrap();
    let stuck = one(&c).await.unwrap();
    for i in 0..20_000u32 {
        p.send(Message::new(i.to_string())).await.unwrap();
        let d = one(&c).await.unwrap();
        d.ack().await.unwrap();
    }
    let records = {
        let state = c.queue.lock();
        state.lease_records()
    };
    assert!(
        records <= 2 + 1024,
        "{records} lease records kept for 1 live lease"
    );
    assert_eq!(c.depth().await.unwrap().in_flight, 1);
    stuck.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().in_flight, 0);
}

/// A lease shortened by an extend (earlier than leases handed out after it) expires
/// at its new deadline, and the later ones at theirs.
#[tokio::test(start_paused = true)]
async fn a_shortened_lease_expires_before_later_ones() {
    let (p, c) = config().connect().unwrap();
    p.send(Message::new("a")).await.unwrap();
    p.send(Message::new("b")).await.unwrap();
    let a = one(&c).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let b = one(&c).await.unwrap();
    a.extend(Duration::from_millis(500)).await.unwrap();
    tokio::time::advance(Duration::from_millis(500)).await;
    let again = one(&c).await.expect("a's shortened lease ran out");
    assert_eq!(payload(&again), "a");
    assert_eq!(again.attempt(), 2);
    assert!(one(&c).await.is_none(), "b is still leased");
    assert_eq!(
        a.ack().await.unwrap_err().kind(),
        ErrorKind::LeaseExpired,
        "the old lease lost the message to the redelivery"
    );
    // b's lease ends 10 s after it was taken.
    tokio::time::advance(Duration::from_millis(9499)).await;
    assert!(one(&c).await.is_none());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(payload(&one(&c).await.expect("b came back")), "b");
    drop(b);
}

/// Messages that become ready out of send order (a nack, an expired lease) are
/// delivered by priority, then send order, ahead of later sends.
#[tokio::test(start_paused = true)]
async fn redelivered_messages_keep_their_place_by_send_order_and_priority() {
    let (p, c) = config().connect().unwrap();
    for name in ["a", "b", "c"] {
        p.send(Message::new(name)).await.unwrap();
    }
    let first = c.receive(2, NOW).await.unwrap();
    assert_eq!(first.iter().map(payload).collect::<Vec<_>>(), ["a", "b"]);
    p.send(Message::new("d")).await.unwrap();
    p.send(Message::new("urgent").priority(5)).await.unwrap();
    first[1].nack(None).await.unwrap();
    first[0].nack(None).await.unwrap();
    let order: Vec<String> = c
        .receive(10, NOW)
        .await
        .unwrap()
        .iter()
        .map(payload)
        .collect();
    assert_eq!(order, ["urgent", "a", "b", "c", "d"]);
}

#[test]
fn sequence_ids_are_decimal() {
    for n in [0u64, 7, 10, 99, 12_345, u64::MAX] {
        assert_eq!(seq_id(n), n.to_string());
    }
}

/// A delivery does not copy its message: the queue reads it back from the delivery's
/// handle, for a redelivery after a nack or an expired lease (also while the first
/// delivery is still held), and for `peek`.
#[tokio::test(start_paused = true)]
async fn redeliveries_and_peek_see_the_message_a_delivery_holds() {
    let config = config();
    let (p, c) = config.clone().connect().unwrap();
    let message = Message::new("body")
        .header("h", "v")
        .key("k")
        .dedup_id("d-1");
    p.send(message.clone()).await.unwrap();
    let first = one(&c).await.unwrap();
    assert_eq!(first.message(), &message);
    first.nack(None).await.unwrap();
    let peeked = crate::Admin::peek(&config.admin(), 10).await.unwrap();
    assert_eq!(peeked[0].message.payload().as_ref(), b"body");
    let second = one(&c).await.unwrap();
    assert_eq!((payload(&second), second.attempt()), ("body".into(), 2));
    assert_eq!(second.headers().get("h"), Some("v"));
    // Expired while `second` is still held: the third reads it from `second`.
    tokio::time::advance(Duration::from_secs(10)).await;
    let third = one(&c).await.expect("redelivered after the timeout");
    assert_eq!((payload(&third), third.attempt()), ("body".into(), 3));
    assert_eq!(payload(&second), "body", "the old delivery keeps its own");
    assert_eq!(
        second.ack().await.unwrap_err().kind(),
        ErrorKind::LeaseExpired
    );
    drop(second);
    tokio::time::advance(Duration::from_secs(10)).await;
    let fourth = one(&c).await.expect("redelivered again");
    assert_eq!(payload(&fourth), "body");
    drop(third);
    fourth.ack().await.unwrap();
    assert!(one(&c).await.is_none());
}

/// The queue's entries hold the handles of their deliveries and the handles hold the
/// queue weakly: a deleted queue that no producer or consumer holds any more is
/// freed with its messages, and a delivery still out finds nothing to settle. (With
/// the handle holding the queue strongly the two would keep each other alive.)
#[tokio::test(start_paused = true)]
async fn a_deleted_and_dropped_queue_is_freed_with_deliveries_out() {
    let config = config();
    let (p, c) = config.clone().connect().unwrap();
    p.send(Message::new("a")).await.unwrap();
    let d = one(&c).await.unwrap();
    assert!(delete_queue(&config.queue));
    drop((p, c));
    assert_eq!(d.ack().await.unwrap_err().kind(), ErrorKind::LeaseExpired);
    assert!(d.acker().is_settled() && !d.acker().is_acked());
}

#[tokio::test(start_paused = true)]
async fn ack_all_acks_every_delivery_and_reports_the_first_failure() {
    let (p, c) = config().connect().unwrap();
    for i in 0..4 {
        p.send(Message::new(format!("m{i}"))).await.unwrap();
    }
    let batch = c.receive(4, NOW).await.unwrap();
    assert_eq!(batch.len(), 4);
    // Settled twice: the second is refused, the others are acked all the same.
    batch[2].ack().await.unwrap();
    let e = Delivery::ack_all(&batch).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyAcked);
    assert!(batch.iter().all(|d| !d.acker().is_live()));
    // Nothing comes back after the visibility timeout: all four were acked.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(c.receive(4, NOW).await.unwrap().is_empty());
    Delivery::ack_all(&[]).await.unwrap();
}
