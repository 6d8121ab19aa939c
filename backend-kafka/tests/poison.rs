//! Records someone else wrote into the queue's topics with ferrymq's header names
//! and garbage or hostile values (another tool, a mirror of a tier topic, a bug in
//! a producer of another language): each is delivered, none blocks its partition,
//! nothing panics.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use ferrymq_core::{Consumer, Producer};
use ferrymq_kafka::headers::{H_ATTEMPT, H_ENQUEUED_AT, H_ID, H_NOT_BEFORE};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// A plain rdkafka producer: what "someone else" uses.
fn foreign_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("rdkafka producer")
}

async fn write(p: &FutureProducer, topic: &str, payload: &str, headers: &[(&str, &str)]) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    p.send(
        FutureRecord::<(), _>::to(topic)
            .partition(0)
            .payload(payload)
            .headers(h),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)
    .expect("foreign record written");
}

/// Milliseconds since the epoch of a time far away (year ~3000).
fn far_future_ms() -> String {
    let t = SystemTime::now() + Duration::from_secs(1000 * 365 * 24 * 3600);
    t.duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string()
}

/// A not-before on the queue's own topic is none of ferrymq's (delays and retries
/// go to the tier topics): it must not hold the partition, least of all for a
/// thousand years. Garbage attempts, times and ids read as absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_headers_on_the_queue_topic_never_block_the_partition() {
    let cfg = config("poison-queue", "partitions=1");
    let p = cfg.producer().await.unwrap(); // creates the topics
    let foreign = foreign_producer();
    let far = far_future_ms();
    write(
        &foreign,
        &cfg.topic,
        "far",
        &[(H_NOT_BEFORE, &far), (H_ATTEMPT, "abc")],
    )
    .await;
    write(
        &foreign,
        &cfg.topic,
        "garbage",
        &[
            (H_ATTEMPT, "4294967295"),
            (H_ENQUEUED_AT, "-5"),
            (H_NOT_BEFORE, "not a number"),
            (H_ID, ""),
        ],
    )
    .await;
    p.send(ferrymq_core::Message::new("plain")).await.unwrap();
    let c = cfg.consumer().await.unwrap();
    let started = Instant::now();
    let got = receive_n(&c, 3, WAIT).await;
    let payloads: Vec<&[u8]> = got.iter().map(|d| d.payload().as_ref()).collect();
    assert_eq!(
        payloads,
        [&b"far"[..], b"garbage", b"plain"],
        "in offset order"
    );
    assert!(started.elapsed() < WAIT);
    assert_eq!(got[0].attempt(), 1, "a garbage attempt reads as absent");
    assert_eq!(got[1].attempt(), u32::MAX);
    // Nacking the highest attempt there is neither panics nor wraps to 0.
    got[1].nack(None).await.unwrap();
    for d in [&got[0], &got[2]] {
        d.ack().await.unwrap();
    }
    let again = receive_n(&c, 1, WAIT).await;
    assert_eq!(again[0].payload().as_ref(), b"garbage");
    assert_eq!(again[0].attempt(), u32::MAX, "saturated");
    again[0].ack().await.unwrap();
    c.close().await.unwrap();
    cleanup(&cfg).await;
}

/// On a tier topic a not-before is ferrymq's own, but never later than the tier's
/// delay from now: one that is (poison, or a producer's clock far ahead) waits at
/// most that long instead of holding the tier's partition until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_before_beyond_its_tier_waits_at_most_the_tier_delay() {
    let cfg = config("poison-tier", "partitions=1&retry_tiers=1s");
    let _p = cfg.producer().await.unwrap(); // creates the topics
    let tier = cfg.tier_topic(cfg.retry_tiers[0]);
    let foreign = foreign_producer();
    let far = far_future_ms();
    write(
        &foreign,
        &tier,
        "far",
        &[(H_NOT_BEFORE, &far), (H_ATTEMPT, "2")],
    )
    .await;
    let c = cfg.consumer().await.unwrap();
    let got = receive_n(&c, 1, WAIT).await;
    assert_eq!(got[0].payload().as_ref(), b"far");
    assert_eq!(got[0].attempt(), 2);
    got[0].ack().await.unwrap();
    c.close().await.unwrap();
    cleanup(&cfg).await;
}
