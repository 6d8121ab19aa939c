//! Fault injection on librdkafka's in-process mock cluster — in addition to (never
//! instead of) the real-broker tests: broker down and up, produce and commit
//! errors. Nothing may be lost, and a record whose commit failed comes back.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferrymq_core::{Consumer, Delivery, ErrorKind, Message, Producer};
use ferrymq_kafka::KafkaConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn config(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    extra: &str,
) -> KafkaConfig {
    for t in [topic.to_string(), format!("{topic}.retry-1s")] {
        mock.create_topic(&t, 2, 1).unwrap();
    }
    let url = format!(
        "kafka://{}/{topic}?create=false&retry_tiers=1s&partitions=2&revoke_grace=500ms&close_timeout=2s\
         &commit_interval=100ms&rdkafka.session.timeout.ms=6000&rdkafka.heartbeat.interval.ms=500\
         &rdkafka.reconnect.backoff.max.ms=500{extra}",
        mock.bootstrap_servers()
    );
    KafkaConfig::from_url(&url).unwrap()
}

async fn drain(c: &dyn Consumer, want: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        got.extend(
            c.receive(want - got.len(), Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    got
}

fn counts(ds: &[Delivery]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for d in ds {
        *m.entry(String::from_utf8_lossy(d.payload()).into_owned())
            .or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_without_duplicates() {
    let mock = MockCluster::new(1).unwrap();
    let cfg = config(&mock, "produce-errors", "");
    let p = cfg.producer().await.unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    let batch = (0..50).map(|i| Message::new(format!("m{i}"))).collect();
    for r in p.send_batch(batch).await.unwrap() {
        r.unwrap();
    }
    let c = cfg.consumer().await.unwrap();
    let got = drain(&c, 50, Duration::from_secs(20)).await;
    let n = counts(&got);
    assert_eq!(n.len(), 50, "lost some: {}", n.len());
    assert!(
        n.values().all(|v| *v == 1),
        "the idempotent producer duplicated"
    );
    for d in &got {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_is_outcome_unknown_then_sends_succeed_once_it_is_back() {
    let mock = MockCluster::new(1).unwrap();
    let cfg = config(&mock, "down-up", "&send_timeout=2s");
    let p = cfg.producer().await.unwrap();
    p.send(Message::new("before")).await.unwrap();
    mock.broker_down(1).unwrap();
    let e = p.send(Message::new("while-down")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutcomeUnknown, "{e}");
    assert!(e.kind().is_transient());
    mock.broker_up(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match p.send(Message::new("after")).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never recovered: {e}"),
        }
    }
    let c = cfg.consumer().await.unwrap();
    let got = drain(&c, 2, Duration::from_secs(20)).await;
    let n = counts(&got);
    assert_eq!(n.get("before"), Some(&1));
    assert!(n.get("after").is_some_and(|v| *v >= 1));
    for d in &got {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_replay_instead_of_losing() {
    let mock = MockCluster::new(1).unwrap();
    let cfg = config(&mock, "commit-errors", "");
    let p = cfg.producer().await.unwrap();
    for i in 0..20 {
        p.send(Message::new(format!("m{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    let c = cfg.consumer().await.unwrap();
    // Every commit from now on fails (not retriable), the close commit included.
    let errs = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED; 1000];
    mock.request_errors(RDKafkaApiKey::OffsetCommit, &errs);
    let got = drain(&c, 20, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 20);
    for d in &got {
        d.ack().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.close().await.unwrap();
    drop(c);
    mock.clear_request_errors(RDKafkaApiKey::OffsetCommit);
    // Nothing committed: every record comes back (at-least-once), none lost.
    let c = cfg.consumer().await.unwrap();
    let again = drain(&c, 20, Duration::from_secs(20)).await;
    let n = counts(&again);
    assert_eq!(n.len(), 20, "records lost after failed commits: {n:?}");
    for d in &again {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
    drop(c);
    // Commits work again: nothing replays now.
    let c = cfg.consumer().await.unwrap();
    assert!(c
        .receive(10, Duration::from_secs(2))
        .await
        .unwrap()
        .is_empty());
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_stales_handles_and_the_records_come_back() {
    let mock = MockCluster::new(1).unwrap();
    let cfg = config(&mock, "lost", "");
    let p = cfg.producer().await.unwrap();
    for i in 0..10 {
        p.send(Message::new(format!("m{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    let c = cfg.consumer().await.unwrap();
    let held = drain(&c, 10, Duration::from_secs(20)).await;
    assert_eq!(held.len(), 10);
    // The coordinator forgets the member: librdkafka treats its assignment as lost.
    mock.request_errors(
        RDKafkaApiKey::Heartbeat,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID; 3],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while held.iter().any(Delivery::is_live) {
        assert!(
            Instant::now() < deadline,
            "the lost assignment never reached the handles"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in &held {
        assert_eq!(d.ack().await.unwrap_err().kind(), ErrorKind::LeaseExpired);
    }
    // The member rejoins by itself; nothing was committed, so everything comes back.
    let again = drain(&c, 10, Duration::from_secs(30)).await;
    let n = counts(&again);
    assert_eq!(n.len(), 10, "records lost with the assignment: {n:?}");
    for d in &again {
        d.ack().await.unwrap();
    }
    c.close().await.unwrap();
}
