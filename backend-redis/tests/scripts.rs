//! The Lua scripts never leave a half-done write behind (FERRYMQ_TEST_REDIS_URL):
//! each validates and computes first and writes last, with no `unpack` over a list
//! that grows with the data (audit #3); poison in the delayed set is moved aside
//! instead of breaking every receive (#5); per-message and per-consumer state in
//! Redis stays bounded (#12).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config, connect, raw, WAIT};
use ferrymq_core::{Consumer, ErrorKind, Message, Producer};
use ferrymq_redis::RedisConsumer;
use redis::AsyncCommands;

fn key(queue: &str, suffix: &str) -> String {
    format!("ferrymq:{{{queue}}}:{suffix}")
}

/// Make a pending entry look delivered `count` times and idle for a minute, so the
/// next receive reclaims it with `count + 1`.
async fn craft_deliveries(c: &RedisConsumer, queue: &str, id: &str, count: u64) {
    let mut r = raw().await;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(key(queue, "ready:0"))
        .arg("ferrymq")
        .arg(c.name())
        .arg(0)
        .arg(id)
        .arg("IDLE")
        .arg(60_000)
        .arg("RETRYCOUNT")
        .arg(count)
        .arg("JUSTID")
        .query_async(&mut r)
        .await
        .unwrap();
}

#[tokio::test]
async fn nack_and_ack_of_a_message_delivered_over_8000_times() {
    let (p, c, cfg) = connect("many", "visibility=200ms").await;
    let a = p.send(Message::new("nack-me")).await.unwrap().into_id();
    let b = p.send(Message::new("ack-me")).await.unwrap().into_id();
    assert_eq!(c.receive(10, WAIT).await.unwrap().len(), 2);
    craft_deliveries(&c, &cfg.queue, &a, 9000).await;
    craft_deliveries(&c, &cfg.queue, &b, 9000).await;
    let mut ds = c.receive(10, WAIT).await.unwrap();
    ds.sort_by_key(|d| d.payload().clone());
    assert_eq!(ds.len(), 2);
    assert_eq!(ds[0].payload().as_ref(), b"ack-me");
    assert_eq!(ds[0].attempt(), 9001);
    ds[0].ack().await.unwrap();
    ds[1].nack(None).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"nack-me");
    assert_eq!(d.attempt(), 9002);
    d.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().total(), 0);
    let mut r = raw().await;
    let left: u64 = r.scard(key(&cfg.queue, "revoked")).await.unwrap();
    assert_eq!(left, 0, "no revoked token outlives its entry");
}

#[tokio::test]
async fn dead_letter_of_a_message_delivered_over_8000_times() {
    let (p, c, cfg) = connect("manydlq", "visibility=200ms&max_deliveries=9001").await;
    let by_reclaim = p.send(Message::new("timed out")).await.unwrap().into_id();
    let by_nack = p.send(Message::new("nacked")).await.unwrap().into_id();
    assert_eq!(c.receive(10, WAIT).await.unwrap().len(), 2);
    // The reclaim finds the 9002nd delivery over the limit: dead-lettered there.
    craft_deliveries(&c, &cfg.queue, &by_reclaim, 9001).await;
    craft_deliveries(&c, &cfg.queue, &by_nack, 9000).await;
    let d = c.receive(10, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"nacked");
    assert_eq!(d.attempt(), 9001);
    d.nack(None).await.unwrap();
    let depth = c.depth().await.unwrap();
    assert_eq!((depth.total(), depth.dead_lettered), (0, 2), "{depth:?}");
}

/// A key of the wrong type breaks a nack before it writes anything: the error is
/// typed and the delivery is still pending, so it can be settled again.
#[tokio::test]
async fn a_wrong_type_key_fails_a_nack_before_it_writes() {
    for (suffix, query, delay) in [
        ("delayed", "", Some(Duration::from_secs(1))),
        ("jobs", "", Some(Duration::from_secs(1))),
        ("dead", "max_deliveries=1", None),
    ] {
        let (p, c, cfg) = connect("wrongnack", query).await;
        p.send(Message::new("keep me")).await.unwrap();
        let d = c.receive(1, WAIT).await.unwrap().remove(0);
        let mut r = raw().await;
        let bad = key(&cfg.queue, suffix);
        let _: () = r.set(&bad, "not ferrymq's").await.unwrap();
        let e = d.nack(delay).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Backend, "{suffix}: {e}");
        assert!(e.to_string().contains("wrong type"), "{suffix}: {e}");
        // Nothing happened to the message.
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(key(&cfg.queue, "ready:0"))
            .arg("ferrymq")
            .query_async(&mut r)
            .await
            .unwrap();
        let redis::Value::Array(summary) = pending else {
            panic!("{pending:?}")
        };
        assert_eq!(summary[0], redis::Value::Int(1), "{suffix}: still pending");
        let len: u64 = r.xlen(key(&cfg.queue, "ready:0")).await.unwrap();
        assert_eq!(len, 1, "{suffix}: still in its stream");
        // Repaired, the same handle settles.
        let _: () = r.del(&bad).await.unwrap();
        d.nack(None).await.unwrap();
        if suffix != "dead" {
            let d = c.receive(1, WAIT).await.unwrap().remove(0);
            assert_eq!(d.attempt(), 2);
            d.ack().await.unwrap();
        }
        assert_eq!(c.depth().await.unwrap().total(), 0, "{suffix}");
    }
}

/// One undecodable value in the delayed set must not re-add the messages due before
/// it on every receive, nor stop the reclaim: it goes to the dead stream with a
/// reason, once.
#[tokio::test]
async fn poison_in_the_delayed_set_is_moved_aside() {
    let (p, c, cfg) = connect("poison", "visibility=300ms").await;
    p.send(Message::new("held")).await.unwrap();
    let held = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(held.attempt(), 1);
    drop(held); // its lease runs out: the reclaim must still run
    let good = p
        .send(Message::new("good").delay(Duration::from_millis(100)))
        .await
        .unwrap()
        .into_id();
    let mut r = raw().await;
    let due: f64 = r.zscore(key(&cfg.queue, "delayed"), &good).await.unwrap();
    // Due right after "good": the promotion meets it in the same pass.
    let _: () = r
        .zadd(key(&cfg.queue, "delayed"), "poison", due + 1.0)
        .await
        .unwrap();
    let _: () = r
        .hset(key(&cfg.queue, "jobs"), "poison", &b"\x05"[..])
        .await
        .unwrap();
    let _: () = r
        .zadd(key(&cfg.queue, "delayed"), "poison2", due + 2.0)
        .await
        .unwrap();
    let _: () = r
        .hset(key(&cfg.queue, "jobs"), "poison2", &b"\xc1\xc1"[..])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut got = Vec::new();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) {
        match c.receive(10, Duration::from_millis(100)).await {
            Ok(ds) => {
                for d in ds {
                    got.push((
                        String::from_utf8(d.payload().to_vec()).unwrap(),
                        d.attempt(),
                    ));
                    d.ack().await.unwrap();
                }
            }
            Err(e) => panic!("receive failed: {e}"),
        }
    }
    got.sort();
    let shown = format!("{} deliveries: {:?}", got.len(), &got[..got.len().min(6)]);
    assert_eq!(
        got,
        [("good".to_string(), 1), ("held".to_string(), 2)],
        "each once; the reclaim ran ({shown})"
    );
    let depth = c.depth().await.unwrap();
    assert_eq!((depth.total(), depth.dead_lettered), (0, 2), "{depth:?}");
    let dead = c.dead_letters(10).await.unwrap();
    for d in &dead {
        let reason = d.message.headers().get("ferrymq-failure-reason").unwrap();
        assert!(reason.contains("undecodable"), "{reason}");
    }
    let jobs: u64 = r.hlen(key(&cfg.queue, "jobs")).await.unwrap();
    assert_eq!(jobs, 0);
}

#[tokio::test]
async fn dlq_retention_past_the_epoch_is_refused() {
    for bad in ["60y", "100years"] {
        let url = format!("{}/q?dlq_retention={bad}", common::base_url());
        let e = ferrymq_redis::RedisConfig::from_url(&url).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
        assert!(e.to_string().contains("dlq_retention"), "{e}");
    }
    let cfg = config("retention", "dlq_retention=30y");
    assert!(cfg.connect().await.is_ok());
}

/// A message redelivered again and again without being settled keeps one revoked
/// marker, not one per redelivery.
#[tokio::test]
async fn revoked_leases_stay_bounded_per_message() {
    let (p, c, cfg) = connect("revokedgrowth", "visibility=30ms").await;
    p.send(Message::new("never settled")).await.unwrap();
    let mut last = None;
    for _ in 0..12 {
        let d = c.receive(1, WAIT).await.unwrap().remove(0);
        tokio::time::sleep(Duration::from_millis(40)).await;
        last = Some(d);
    }
    let last = last.unwrap();
    assert!(last.attempt() >= 10, "{}", last.attempt());
    let mut r = raw().await;
    let members: u64 = r.scard(key(&cfg.queue, "revoked")).await.unwrap();
    assert!(members <= 1, "{members} revoked markers for one message");
    // Stale handles are still refused; the live one settles.
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(
        last.ack().await.unwrap_err().kind(),
        ErrorKind::LeaseExpired
    );
    d.ack().await.unwrap();
    let members: u64 = r.scard(key(&cfg.queue, "revoked")).await.unwrap();
    assert_eq!(members, 0);
}

/// Consumers that went away without closing are removed from the group once idle
/// and holding nothing; one still holding a lease is kept.
#[tokio::test]
async fn idle_consumers_holding_nothing_are_pruned() {
    let cfg = config("ghosts", "visibility=1s");
    let (p, c) = cfg.connect().await.unwrap();
    for i in 0..3 {
        // A consumer joins the group with its first delivery; this one handles
        // one message, then its process dies without closing.
        p.send(Message::new(format!("m{i}"))).await.unwrap();
        let ghost = cfg
            .clone()
            .consumer_name(format!("ghost-{i}"))
            .consumer()
            .await
            .unwrap();
        let d = ghost.receive(1, WAIT).await.unwrap().remove(0);
        d.ack().await.unwrap();
        std::mem::forget(ghost);
    }
    p.send(Message::new("held")).await.unwrap();
    let holder = cfg
        .clone()
        .consumer_name("holder")
        .consumer()
        .await
        .unwrap();
    let d = holder.receive(1, WAIT).await.unwrap().remove(0);
    d.extend(Duration::from_secs(60)).await.unwrap();
    std::mem::forget(holder);
    let names = |r: &mut redis::aio::MultiplexedConnection| {
        let mut r = r.clone();
        let stream = key(&cfg.queue, "ready:0");
        async move {
            let v: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg("ferrymq")
                .query_async(&mut r)
                .await
                .unwrap();
            let mut names: Vec<String> = v
                .iter()
                .map(|m| redis::from_redis_value(m["name"].clone()).unwrap())
                .collect();
            names.sort();
            names
        }
    };
    let mut r = raw().await;
    assert_eq!(names(&mut r).await.len(), 4);
    let t0 = std::time::Instant::now();
    loop {
        let _ = c.receive(1, Duration::from_millis(200)).await.unwrap();
        let now = names(&mut r).await;
        if now == ["holder".to_string()] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "ghosts still in the group: {now:?}"
        );
    }
    d.ack().await.unwrap();
}

#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Trimming a dead-letter store deletes data: it is logged as a warning when it
/// happens, and `describe` shows the bounds.
#[tokio::test]
async fn dead_letter_trimming_is_never_silent() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (p, c, cfg) = connect("dlqtrim", "max_deliveries=1&dlq_max_len=10").await;
    let msgs: Vec<Message> = (0..250).map(|i| Message::new(format!("m{i}"))).collect();
    p.send_batch(msgs).await.unwrap();
    let mut nacked = 0;
    while nacked < 250 {
        for d in c.receive(100, WAIT).await.unwrap() {
            d.nack(None).await.unwrap();
            nacked += 1;
        }
    }
    let depth = c.depth().await.unwrap();
    assert!(depth.dead_lettered < 250, "trimmed: {depth:?}");
    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(out.contains("WARN"), "{out}");
    assert!(out.contains("dead-letter stream was trimmed"), "{out}");
    use ferrymq_core::admin::Admin;
    let info = cfg.admin().await.unwrap().describe().await.unwrap();
    assert!(
        info.warnings
            .iter()
            .any(|w| w.contains("dlq_max_len of 10")),
        "{:?}",
        info.warnings
    );
    assert!(info
        .settings
        .contains(&("dlq_retention".to_string(), "7days".to_string())));
}
