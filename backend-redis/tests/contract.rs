//! The backend contract of 0be1ef8 on Redis: lease deadlines and capabilities on
//! every delivery, release without an attempt, typed refusals of durations past the
//! limits, close giving back the read-ahead buffer, the Driver / BackendConfig
//! registration and the Admin trait (FERRYMQ_TEST_REDIS_URL).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::{config, connect, WAIT};
use ferrymq_core::admin::{Admin, QueueSpec, RedriveProgress};
use ferrymq_core::backend::{BackendConfig, Driver};
use ferrymq_core::{Consumer, ErrorKind, Message, Producer};
use ferrymq_redis::RedisDriver;
use tokio::time::Instant;

#[tokio::test]
async fn deliveries_carry_their_lease_deadline_and_capabilities() {
    let (p, c, _) = connect("lease", "visibility=3s").await;
    p.send(Message::new("x")).await.unwrap();
    let before = Instant::now();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    let after = Instant::now();
    let deadline = d.lease_deadline().expect("a redis delivery has a lease");
    // Counted from when the receive was sent: not before the call, not after it.
    assert!(deadline >= before + Duration::from_secs(3), "{deadline:?}");
    assert!(deadline <= after + Duration::from_secs(3), "{deadline:?}");
    assert!(d.is_live());
    let caps = d.capabilities().expect("capabilities on every delivery");
    assert_eq!(caps, c.capabilities());
    assert!(caps.release_keeps_attempt);
    // An extend moves the local clock too.
    d.extend(Duration::from_secs(10)).await.unwrap();
    assert!(d.lease_remaining().unwrap() > Duration::from_secs(9));
    d.ack().await.unwrap();
    assert!(!d.is_live());
}

#[tokio::test]
async fn release_keeps_the_attempt_nack_counts_it() {
    let (p, c, _) = connect("release", "visibility=5s").await;
    p.send(Message::new("r")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 1);
    d.release(None).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 1, "a release spends no attempt");
    d.nack(None).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 2, "a nack does");
    d.release(None).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 2);
    // A release with a delay is not redelivered early.
    let t0 = Instant::now();
    d.release(Some(Duration::from_millis(800))).await.unwrap();
    assert!(c
        .receive(1, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(d.attempt(), 2);
    d.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().total(), 0);
}

#[tokio::test]
async fn release_never_dead_letters() {
    let (p, c, _) = connect("reldlq", "max_deliveries=1").await;
    p.send(Message::new("r")).await.unwrap();
    for _ in 0..3 {
        let d = c.receive(1, WAIT).await.unwrap().remove(0);
        assert_eq!(d.attempt(), 1);
        d.release(None).await.unwrap();
    }
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    d.nack(None).await.unwrap();
    let depth = c.depth().await.unwrap();
    assert_eq!((depth.total(), depth.dead_lettered), (0, 1));
}

#[tokio::test]
async fn durations_past_the_limits_are_unsupported_never_a_panic() {
    let (p, c, _) = connect("limits", "").await;
    let e = p
        .send(Message::new("late").delay(Duration::MAX))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let huge = c.capabilities().max_delay.unwrap() + Duration::from_secs(1);
    let results = p
        .send_batch(vec![
            Message::new("late").delay(huge),
            Message::new("ok"),
            Message::new("late").delay(Duration::MAX),
        ])
        .await
        .unwrap();
    assert_eq!(
        results[0].as_ref().unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    assert!(results[1].is_ok());
    assert_eq!(
        results[2].as_ref().unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    let depth = c.depth().await.unwrap();
    assert_eq!(
        (depth.waiting, depth.delayed),
        (1, 0),
        "nothing late enqueued"
    );

    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    let e = d.nack(Some(Duration::MAX)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let e = d.release(Some(Duration::MAX)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let e = d.extend(Duration::MAX).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let max_vis = c.capabilities().max_visibility.unwrap();
    let e = d
        .extend(max_vis + Duration::from_millis(1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    // The lease is untouched by the refusals.
    assert!(d.is_live());
    d.ack().await.unwrap();
    // `receive` with an endless wait does not panic either.
    p.send(Message::new("y")).await.unwrap();
    let ds = c.receive(1, Duration::MAX).await.unwrap();
    ds[0].ack().await.unwrap();
}

#[tokio::test]
async fn close_gives_back_the_read_ahead_buffer_at_once() {
    let cfg = config("closebuf", "priority_levels=2&visibility=30s");
    let (p, c) = cfg.connect().await.unwrap();
    p.send_batch(vec![Message::new("low"), Message::new("high").priority(1)])
        .await
        .unwrap();
    // Both levels answer one read of max 1: "low" is leased but buffered.
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"high");
    d.ack().await.unwrap();
    assert_eq!(c.depth().await.unwrap().in_flight, 1, "low is leased");
    c.close().await.unwrap();
    // Without the release it would wait out the 30 s visibility timeout.
    let c2 = cfg.consumer().await.unwrap();
    let t0 = Instant::now();
    let ds = c2.receive(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(ds.len(), 1, "the buffered delivery came back at once");
    assert_eq!(ds[0].payload().as_ref(), b"low");
    assert_eq!(ds[0].attempt(), 1, "it was never handed out");
    assert!(t0.elapsed() < Duration::from_secs(1));
    ds[0].ack().await.unwrap();
}

#[tokio::test]
async fn driver_and_config_round_trip() {
    let cfg = config("driver", "visibility=7s&priority_levels=2");
    let url = format!(
        "{}/{}?visibility=7s&priority_levels=2",
        common::base_url(),
        cfg.queue
    );
    assert!(RedisDriver.accepts(&url));
    let boxed: Box<dyn BackendConfig> = RedisDriver.parse_url(&url).unwrap();
    assert_eq!(boxed.backend(), "redis");
    assert_eq!(boxed.identity(), cfg.identity());
    let back = RedisDriver.parse_value(boxed.to_value(true)).unwrap();
    assert_eq!(back.identity(), boxed.identity());
    let (p, c) = back.connect().await.unwrap();
    p.send(Message::new("via the trait")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"via the trait");
    d.ack().await.unwrap();
    let admin = back.admin().await.unwrap();
    assert_eq!(admin.backend(), "redis");
    assert_eq!(admin.queue(), cfg.queue);
}

#[tokio::test]
async fn admin_ensure_describe_peek_purge() {
    let cfg = config("admin", "priority_levels=3&max_deliveries=2");
    let admin = cfg.admin().await.unwrap();
    assert_eq!(
        admin.describe().await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let e = admin
        .ensure(&QueueSpec::new().priority_levels(5))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    assert!(e.to_string().contains("priority_levels"), "{e}");
    let e = admin
        .ensure(&QueueSpec::new().partitions(3))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("partitions"), "{e}");
    let info = admin
        .ensure(&QueueSpec::new().priority_levels(3))
        .await
        .unwrap();
    assert_eq!(info.depth.total(), 0);
    let setting = |info: &ferrymq_core::admin::QueueInfo, name: &str| {
        info.settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no setting {name}: {:?}", info.settings))
    };
    assert_eq!(setting(&info, "priority_levels"), "3");
    assert_eq!(setting(&info, "max_deliveries"), "2");
    assert_eq!(setting(&info, "dlq_max_len"), "10000");
    assert_eq!(setting(&info, "group"), "ferrymq");
    assert!(
        info.warnings
            .iter()
            .any(|w| w.contains("dead-letter stream is trimmed")),
        "{:?}",
        info.warnings
    );
    assert_eq!(
        admin.create(&QueueSpec::new()).await.unwrap_err().kind(),
        ErrorKind::InvalidConfig,
        "create refuses an existing queue"
    );

    let (p, c) = cfg.connect().await.unwrap();
    p.send_batch(vec![
        Message::new("low-1"),
        Message::new("top").priority(2),
        Message::new("low-2"),
        Message::new("mid").priority(1),
        Message::new("later").delay(Duration::from_secs(60)),
    ])
    .await
    .unwrap();
    let peeked = admin.peek(10).await.unwrap();
    let payloads: Vec<&[u8]> = peeked
        .iter()
        .map(|p| p.message.payload().as_ref())
        .collect();
    assert_eq!(payloads, [&b"top"[..], b"mid", b"low-1", b"low-2"]);
    assert_eq!(admin.peek(2).await.unwrap().len(), 2);
    let depth = admin.describe().await.unwrap().depth;
    assert_eq!((depth.waiting, depth.in_flight, depth.delayed), (4, 0, 1));

    // Receiving after a peek: nothing was leased or counted.
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"top");
    assert_eq!(d.attempt(), 1);
    assert_eq!(d.id(), peeked[0].id, "peek reports the id a receive does");
    // One read of max 1 leased a head of every level; the rest waits in the
    // consumer's buffer until close gives it back.
    c.close().await.unwrap();
    // In flight stays; waiting and delayed go.
    let purged = admin.purge().await.unwrap();
    let depth = admin.describe().await.unwrap().depth;
    assert_eq!(
        (purged, depth.waiting, depth.in_flight, depth.delayed),
        (4, 0, 1, 0),
        "purged {purged}, depth {depth:?}"
    );
    d.ack().await.unwrap();
    assert!(admin.peek(10).await.unwrap().is_empty());
    assert!(admin.delete().await.unwrap());
    assert!(!admin.delete().await.unwrap());
}

#[tokio::test]
async fn redrive_moves_a_snapshot_only() {
    let cfg = config("redrive", "max_deliveries=1");
    let (p, c) = cfg.connect().await.unwrap();
    let admin = cfg.admin().await.unwrap();
    for i in 0..3 {
        p.send(Message::new(format!("bad{i}"))).await.unwrap();
    }
    for _ in 0..3 {
        let d = c.receive(1, WAIT).await.unwrap().remove(0);
        d.nack(None).await.unwrap();
    }
    let dead = admin.peek_dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert_eq!(dead[0].message.payload().as_ref(), b"bad0");
    assert!(dead[0]
        .message
        .headers()
        .get("ferrymq-failure-reason")
        .is_some());
    // A message that fails again while the redrive runs lands after the snapshot:
    // simulated by adding a dead letter from the first progress report.
    let sync = Mutex::new(
        redis::Client::open(common::base_url())
            .unwrap()
            .get_connection()
            .unwrap(),
    );
    let dead_key = format!("ferrymq:{{{}}}:dead", cfg.queue);
    let reports = Mutex::new(Vec::<RedriveProgress>::new());
    let progress = |p: RedriveProgress| {
        let mut reports = reports.lock().unwrap();
        if reports.is_empty() {
            let _: String = redis::cmd("XADD")
                .arg(&dead_key)
                .arg("*")
                .arg("p")
                .arg("failed again")
                .query(&mut *sync.lock().unwrap())
                .unwrap();
        }
        reports.push(p);
    };
    let moved = admin.redrive_dead_letters(None, &progress).await.unwrap();
    assert_eq!(moved, 3);
    let reports = reports.into_inner().unwrap();
    assert_eq!(
        reports.first().map(|r| (r.moved, r.total)),
        Some((0, Some(3)))
    );
    assert_eq!(
        reports.last().map(|r| (r.moved, r.total)),
        Some((3, Some(3)))
    );
    let left = admin.peek_dead_letters(10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message.payload().as_ref(), b"failed again");
    let depth = admin.describe().await.unwrap().depth;
    assert_eq!((depth.waiting, depth.dead_lettered), (3, 1));
    // A limit is honoured.
    let moved = admin.redrive_dead_letters(Some(0), &|_| {}).await.unwrap();
    assert_eq!(moved, 0);
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 1, "a redriven message starts over");
}
