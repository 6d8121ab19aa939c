//! Admin against a real broker: topics with their tiers and DLQ, describe, peek
//! without committing, lag, offset resets.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::{config, receive_n, WAIT};
use ferrymq_core::admin::{Admin, OffsetReset, QueueSpec};
use ferrymq_core::{Consumer, ErrorKind, Message, Producer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_describe_peek_lag_reset_delete() {
    let cfg = config("admin", "create=false");
    let admin = cfg.admin().unwrap();
    assert_eq!(
        admin.describe().await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let info = admin
        .create(&QueueSpec::new().partitions(2).replication(1))
        .await
        .unwrap();
    assert_eq!(info.name, cfg.topic);
    let setting = |k: &str| {
        info.settings
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(setting("partitions").as_deref(), Some("2"));
    assert!(info.warnings.is_empty(), "{:?}", info.warnings);
    // The DLQ topic exists too: a producer with create=false can use it.
    let dlq = cfg.for_topic(&cfg.dlq_topic()).unwrap();
    let mut dlq = dlq;
    dlq.retry_tiers.clear();
    dlq.producer()
        .await
        .unwrap()
        .send(Message::new("dead"))
        .await
        .unwrap();
    // Same spec again: fine; another partition count: refused.
    admin.create(&QueueSpec::new().partitions(2)).await.unwrap();
    let e = admin
        .create(&QueueSpec::new().partitions(3))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);

    let p = cfg.producer().await.unwrap();
    let t0 = SystemTime::now();
    for i in 0..4 {
        p.send(
            Message::new(format!("m{i}"))
                .key("k")
                .header("n", format!("{i}")),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t_mid = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 4..6 {
        p.send(Message::new(format!("m{i}")).key("k"))
            .await
            .unwrap();
    }
    // Peek twice: same records, nothing committed.
    let a = admin.peek(3).await.unwrap();
    let b = admin.peek(3).await.unwrap();
    let bodies = |ps: &[ferrymq_core::admin::Peeked]| {
        ps.iter()
            .map(|p| String::from_utf8_lossy(p.message.payload()).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(bodies(&a), ["m0", "m1", "m2"]);
    assert_eq!(bodies(&a), bodies(&b));
    assert_eq!(a[1].message.headers().get("n"), Some("1"));
    let lag = admin.lag(None).await.unwrap();
    assert_eq!(lag.iter().map(|l| l.lag).sum::<u64>(), 6);
    assert!(lag.iter().all(|l| l.committed.is_none()));

    // Consume and ack 2, then stop: lag 4.
    let c = cfg.consumer().await.unwrap();
    // Resetting while the group has a member is refused.
    let e = admin
        .reset_offsets(&cfg.group(), OffsetReset::Latest)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    for d in receive_n(&c, 2, WAIT).await {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
    let lag: u64 = admin.lag(None).await.unwrap().iter().map(|l| l.lag).sum();
    assert_eq!(lag, 4);
    assert_eq!(
        bodies(&admin.peek(10).await.unwrap()),
        ["m2", "m3", "m4", "m5"]
    );
    drop(c);

    // Reset: latest skips everything, earliest replays everything, a timestamp
    // starts at the first record at or after it.
    let group = cfg.group();
    admin
        .reset_offsets(&group, OffsetReset::Latest)
        .await
        .unwrap();
    assert_eq!(
        admin
            .lag(None)
            .await
            .unwrap()
            .iter()
            .map(|l| l.lag)
            .sum::<u64>(),
        0
    );
    admin
        .reset_offsets(&group, OffsetReset::Earliest)
        .await
        .unwrap();
    assert_eq!(
        admin
            .lag(None)
            .await
            .unwrap()
            .iter()
            .map(|l| l.lag)
            .sum::<u64>(),
        6
    );
    admin
        .reset_offsets(&group, OffsetReset::Timestamp(t_mid))
        .await
        .unwrap();
    assert_eq!(
        admin
            .lag(None)
            .await
            .unwrap()
            .iter()
            .map(|l| l.lag)
            .sum::<u64>(),
        2
    );
    let c = cfg.consumer().await.unwrap();
    let got = receive_n(&c, 2, WAIT).await;
    let b: Vec<_> = got
        .iter()
        .map(|d| String::from_utf8_lossy(d.payload()).into_owned())
        .collect();
    assert_eq!(b, ["m4", "m5"]);
    for d in &got {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
    let _ = t0;
    assert!(admin.delete().await.unwrap());
    assert!(!admin.delete().await.unwrap());
}
