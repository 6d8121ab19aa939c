//! Defects of the outside audit, each shown by a test that failed before its fix
//! (FERRYMQ_TEST_REDIS_URL): #6 a native dead-letter reads as "retried", #8 a
//! partial batch reads as a total failure.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{connect, OwnServer, WAIT};
use ferrymq_core::middleware::outcome::{self, Outcome};
use ferrymq_core::{BoxError, Consumer, Delivery, ErrorKind, Message, Producer, Worker};
use ferrymq_redis::RedisConfig;

/// #6: a nack that hit `max_deliveries` dead-lettered the message; whoever nacked
/// inside the worker's outcome scope learns it.
#[tokio::test]
async fn a_nack_that_dead_letters_records_it() {
    let (p, c, _) = connect("dlqoutcome", "max_deliveries=2").await;
    p.send(Message::new("x")).await.unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    let ((), recorded) = outcome::scope(async { d.nack(None).await.unwrap() }).await;
    assert_eq!(
        recorded, None,
        "re-enqueued: the caller decides what to record"
    );
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.attempt(), 2);
    let ((), recorded) = outcome::scope(async { d.nack(None).await.unwrap() }).await;
    assert_eq!(recorded, Some(Outcome::DeadLettered));
    assert_eq!(c.depth().await.unwrap().dead_lettered, 1);
}

/// #6 through a worker: a handler that gives up by nacking on its last delivery.
#[tokio::test]
async fn the_worker_summary_counts_a_native_dead_letter() {
    let (p, c, _) = connect("dlqworker", "max_deliveries=1").await;
    p.send(Message::new("poison")).await.unwrap();
    let service = tower::service_fn(|d: Delivery| async move {
        d.nack(None).await?;
        Ok::<(), BoxError>(())
    });
    let probe = c.clone();
    let summary = Worker::new(c)
        .run_until(service, async move {
            while probe.depth().await.unwrap().dead_lettered == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
    assert_eq!(summary.dead_lettered, 1, "{summary}");
    assert_eq!(summary.succeeded, 0, "{summary}");
}

/// #8: a batch whose pipeline breaks part-way. The server drops the connection
/// without a reply when a command outgrows its `client-query-buffer-limit`, after
/// running the commands before it (their replies are lost with the connection). The entries of chunks that went through are receipts; those of the broken
/// chunk are `OutcomeUnknown` (some of them did land); later chunks were not sent.
#[tokio::test]
async fn a_batch_broken_part_way_says_which_entries_went_in() {
    let server = OwnServer::start(&["--client-query-buffer-limit", "1mb"]);
    let cfg = RedisConfig::from_url(&format!(
        "{}?max_message_size=4194304",
        server.url("partial")
    ))
    .unwrap();
    let p = cfg.producer().await.unwrap();
    let mut batch: Vec<Message> = (0..1999).map(|i| Message::new(format!("m{i}"))).collect();
    // The last message of the second chunk breaks the connection.
    batch.insert(1999, Message::new(vec![b'x'; 2 * 1024 * 1024]));
    batch.extend((0..10).map(|i| Message::new(format!("after{i}"))));
    let results = p.send_batch(batch).await.expect("per-entry results");
    assert_eq!(results.len(), 2010);
    assert!(
        results[..1000].iter().all(|r| r.is_ok()),
        "first chunk went in"
    );
    let unknown = results[1000..2000]
        .iter()
        .filter(|r| matches!(r, Err(e) if e.kind() == ErrorKind::OutcomeUnknown))
        .count();
    let kinds: std::collections::BTreeMap<String, usize> =
        results[1000..2000]
            .iter()
            .fold(Default::default(), |mut m, r| {
                *m.entry(match r {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("{e}"),
                })
                .or_default() += 1;
                m
            });
    assert_eq!(
        unknown, 1000,
        "the broken chunk is unknown, not failed: {kinds:?}"
    );
    for r in &results[2000..] {
        let e = r.as_ref().unwrap_err();
        assert_ne!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
        assert!(e.to_string().contains("not sent"), "{e}");
    }
    // Why "unknown": the commands before the break did run.
    let landed = p.depth().await.unwrap().waiting;
    assert!(landed > 1000 && landed < 2000, "{landed}");
}

fn same_queue(cfg: &RedisConfig, query: &str) -> RedisConfig {
    RedisConfig::from_url(&format!("{}/{}?{query}", common::base_url(), cfg.queue)).unwrap()
}

/// #2: `ferry send --url '…/pq?priority_levels=8' --priority 7`, then a consumer
/// with the default 4 levels would never see the message. The queue's settings
/// are recorded with it; a client that disagrees is refused, naming the setting.
#[tokio::test]
async fn clients_that_disagree_on_priority_levels_are_refused() {
    let cfg = common::config("levels", "priority_levels=8");
    let p = cfg.producer().await.unwrap();
    p.send(Message::new("urgent").priority(7)).await.unwrap();
    let e = same_queue(&cfg, "").consumer().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("`priority_levels`"), "{e}");
    assert!(e.to_string().contains("priority_levels=8"), "{e}");
    let e = same_queue(&cfg, "priority_levels=2")
        .producer()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`priority_levels`"), "{e}");
    // The agreeing consumer sees it.
    let c = same_queue(&cfg, "priority_levels=8")
        .consumer()
        .await
        .unwrap();
    let d = c.receive(1, WAIT).await.unwrap().remove(0);
    assert_eq!(d.payload().as_ref(), b"urgent");
    d.ack().await.unwrap();
}

#[tokio::test]
async fn a_second_group_or_another_visibility_is_refused() {
    let cfg = common::config("onegroup", "group=billing&visibility=30s");
    let _c = cfg.consumer().await.unwrap();
    let e = same_queue(&cfg, "group=audit&visibility=30s")
        .consumer()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("`group`"), "{e}");
    let e = same_queue(&cfg, "group=billing&visibility=1s")
        .consumer()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`visibility`"), "{e}");
    assert!(e.to_string().contains("visibility=30s"), "{e}");
    let e = same_queue(&cfg, "group=billing&visibility=30s&max_deliveries=3")
        .consumer()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("`max_deliveries`"), "{e}");
    // Producers do not consume: their group and visibility do not matter.
    let p = same_queue(&cfg, "group=other&visibility=1s")
        .producer()
        .await
        .unwrap();
    p.send(Message::new("x")).await.unwrap();
    assert!(same_queue(&cfg, "group=billing&visibility=30s")
        .consumer()
        .await
        .is_ok());
}

#[tokio::test]
async fn an_admin_adopts_the_recorded_settings_and_can_forget_them() {
    use ferrymq_core::admin::Admin;
    let cfg = common::config("adopt", "priority_levels=8&visibility=9s");
    let (p, _c) = cfg.connect().await.unwrap();
    p.send(Message::new("urgent").priority(7)).await.unwrap();
    let admin = same_queue(&cfg, "").admin().await.unwrap();
    let info = admin.describe().await.unwrap();
    assert_eq!(info.depth.waiting, 1, "counted on level 7");
    assert!(info
        .settings
        .contains(&("priority_levels".to_string(), "8".to_string())));
    assert!(info
        .settings
        .contains(&("visibility_timeout".to_string(), "9s".to_string())));
    assert_eq!(admin.peek(5).await.unwrap().len(), 1);
    assert!(admin.forget_settings().await.unwrap());
    drop(p);
    admin.purge().await.unwrap();
    // The next client records its own.
    let c = same_queue(&cfg, "visibility=2s").consumer().await.unwrap();
    assert_eq!(
        c.capabilities().visibility_timeout,
        Some(Duration::from_secs(2))
    );
    assert!(same_queue(&cfg, "visibility=9s").consumer().await.is_err());
}
