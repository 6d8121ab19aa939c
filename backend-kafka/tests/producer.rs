//! The producer against a real Apache Kafka broker (`FERRYMQ_TEST_KAFKA_BROKERS`):
//! delivery reports reach the right entry of the right batch, also when some fail
//! after they were handed to librdkafka, and a dropped send disturbs no other.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{cleanup, config, receive_n, WAIT};
use ferrymq_core::{Consumer, ErrorKind, Message, Producer};
use futures::future::join_all;

/// Entries failing at different stages — before producing (too large), in the
/// delivery report (a tier topic that does not exist) — between entries that
/// succeed: every entry gets its own result, in order, and each receipt names where
/// that entry's record landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_records_partly_fail_gets_per_entry_results_in_order() {
    let cfg = config("partial", "retry_tiers=1s&max_message_size=2000");
    // Creates the topic and its 1 s tier.
    let creator = cfg.producer().await.unwrap();
    creator.close().await.unwrap();
    // The same topic with a 3 s tier nobody created: a 2 s delay goes there.
    let mut missing_tier = cfg.clone();
    missing_tier.create = false;
    missing_tier.retry_tiers = vec![Duration::from_secs(1), Duration::from_secs(3)];
    missing_tier
        .rdkafka
        .insert("topic.metadata.propagation.max.ms".into(), "1000".into());
    let p = missing_tier.producer().await.unwrap();
    let mut batch = Vec::new();
    for i in 0..30 {
        batch.push(match i % 3 {
            0 => Message::new(format!("ok-{i}")).key(format!("k{i}")),
            1 if i == 4 => Message::new(vec![0u8; 2001]),
            1 => Message::new(format!("ok-{i}")),
            _ => Message::new(format!("lost-{i}")).delay(Duration::from_secs(2)),
        });
    }
    let results = p.send_batch(batch).await.unwrap();
    assert_eq!(results.len(), 30);
    let mut receipts = HashMap::new();
    for (i, r) in results.into_iter().enumerate() {
        match i % 3 {
            1 if i == 4 => assert_eq!(r.unwrap_err().kind(), ErrorKind::TooLarge),
            0 | 1 => {
                receipts.insert(format!("ok-{i}"), r.unwrap().into_id());
            }
            _ => {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::NotFound, "entry {i}: {e}");
                assert!(e.to_string().contains(".retry-3s"), "entry {i}: {e}");
            }
        }
    }
    assert_eq!(receipts.len(), 19);
    let c = cfg.consumer().await.unwrap();
    for d in receive_n(&c, 19, WAIT).await {
        let body = String::from_utf8(d.payload().to_vec()).unwrap();
        assert_eq!(receipts.get(&body), Some(&d.id().to_string()), "{body}");
        d.ack().await.unwrap();
    }
    assert!(c
        .receive(1, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    c.close().await.unwrap();
    p.close().await.unwrap();
    cleanup(&cfg).await;
}

/// A `send_batch` future dropped after its records were handed to librdkafka: the
/// other sends in flight complete, the dropped batch's records are still produced
/// (at-least-once: a dropped send is an unknown outcome, not a withdrawal), and
/// the producer keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_send_future_still_completes_the_others() {
    let cfg = config("dropped", "");
    let p = cfg.producer().await.unwrap();
    let batch = |tag: &str| {
        (0..100)
            .map(|i| Message::new(format!("{tag}-{i}")))
            .collect::<Vec<_>>()
    };
    // `send_batch` is a boxed future: dropping it drops the send.
    let mut dropped = p.send_batch(batch("dropped"));
    let others = join_all((0..4).map(|b| p.send_batch(batch(&format!("kept{b}")))));
    let single = p.send(Message::new("single"));
    // One poll hands all 100 records to librdkafka; no report can be back yet.
    tokio::select! {
        biased;
        _ = &mut dropped => panic!("delivered without a round trip"),
        _ = std::future::ready(()) => {}
    }
    drop(dropped);
    let (others, single) = tokio::join!(others, single);
    single.unwrap();
    for results in others {
        for r in results.unwrap() {
            r.unwrap();
        }
    }
    p.send(Message::new("after")).await.unwrap();
    let c = cfg.consumer().await.unwrap();
    let got = receive_n(&c, 502, WAIT).await;
    let mut bodies: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8(d.payload().to_vec()).unwrap())
        .collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 502, "every record exactly once");
    assert_eq!(
        bodies.iter().filter(|b| b.starts_with("dropped-")).count(),
        100
    );
    for d in &got {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
    p.close().await.unwrap();
    cleanup(&cfg).await;
}

/// More batches in flight than librdkafka's local queue holds (50 records): the
/// batches that meet the full queue wait for room and every record is produced
/// once, each receipt naming where its own record landed (the messages are freed
/// once handed over, before their reports), and a key's records of one batch stay
/// in the batch's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_beyond_a_full_local_queue_wait_for_room_and_all_land_once() {
    let cfg = config("full", "rdkafka.queue.buffering.max.messages=50");
    let p = cfg.producer().await.unwrap();
    let batches = (0..20).map(|b| {
        p.send_batch(
            (0..100)
                .map(|i| Message::new(format!("b{b:02}-{i:03}")).key(format!("k{}", i % 7)))
                .collect(),
        )
    });
    let mut receipts = HashMap::new();
    for (b, results) in join_all(batches).await.into_iter().enumerate() {
        for (i, r) in results.unwrap().into_iter().enumerate() {
            let id = r
                .unwrap_or_else(|e| panic!("b{b:02}-{i:03}: {e}"))
                .into_id();
            receipts.insert(format!("b{b:02}-{i:03}"), id);
        }
    }
    assert_eq!(receipts.len(), 2000);
    let c = cfg.consumer().await.unwrap();
    let got = receive_n(&c, 2000, Duration::from_secs(30)).await;
    let mut seen = HashMap::new();
    let mut last: HashMap<(String, String), String> = HashMap::new();
    for d in &got {
        let body = String::from_utf8(d.payload().to_vec()).unwrap();
        assert_eq!(receipts.get(&body), Some(&d.id().to_string()), "{body}");
        *seen.entry(body.clone()).or_insert(0) += 1;
        // Same batch, same key: one partition, in the order of the batch.
        let (batch, _) = body.split_once('-').unwrap();
        let key = (batch.to_string(), d.key().unwrap_or_default().to_string());
        if let Some(prev) = last.insert(key, body.clone()) {
            assert!(prev < body, "{prev} after {body}");
        }
    }
    assert_eq!(seen.len(), 2000);
    assert!(seen.values().all(|&n| n == 1), "a record twice");
    for d in &got {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
    p.close().await.unwrap();
    cleanup(&cfg).await;
}
