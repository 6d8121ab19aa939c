//! Shared helpers: the broker address, fresh topics, bounded waits.
#![allow(dead_code)]

use std::time::Duration;

use ferrymq_core::admin::Admin;
use ferrymq_core::{Consumer, Delivery};
use ferrymq_kafka::KafkaConfig;

pub const WAIT: Duration = Duration::from_secs(10);

/// `FERRYMQ_TEST_KAFKA_BROKERS`, or a loud failure saying how to start a broker.
pub fn brokers() -> String {
    match std::env::var("FERRYMQ_TEST_KAFKA_BROKERS") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "FERRYMQ_TEST_KAFKA_BROKERS is not set: start a broker with \
             `scripts/kafka.sh start 9101` and set FERRYMQ_TEST_KAFKA_BROKERS=127.0.0.1:9101"
        ),
    }
}

pub fn unique(label: &str) -> String {
    format!(
        "fmqk-{label}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A config for a fresh topic with test-friendly timings and `extra` URL params.
pub fn config(label: &str, extra: &str) -> KafkaConfig {
    let mut params: Vec<(String, String)> = [
        ("retry_tiers", "1s,3s,10s"),
        ("revoke_grace", "1s"),
        ("close_timeout", "3s"),
        ("commit_interval", "100ms"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for pair in extra.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').expect("k=v");
        params.retain(|(n, _)| n != k);
        params.push((k.to_string(), v.to_string()));
    }
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let url = format!(
        "kafka://{}/{}?{}",
        brokers(),
        unique(label),
        query.join("&")
    );
    KafkaConfig::from_url(&url).expect("test config")
}

/// Receive until `n` deliveries arrived (or panic after `within`).
pub async fn receive_n(c: &dyn Consumer, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {n} deliveries within {within:?}",
            got.len()
        );
        got.extend(
            c.receive(n - got.len(), left.min(Duration::from_millis(500)))
                .await
                .expect("receive"),
        );
    }
    got
}

pub async fn cleanup(cfg: &KafkaConfig) {
    let _ = cfg.admin().expect("admin").delete().await;
}

/// Produce a backlog of `n` records of 100 bytes, numbered in their first
/// digits, in batches of 1,000 (each entry's result checked).
pub async fn produce_backlog(cfg: &KafkaConfig, n: usize) {
    use ferrymq_core::{Message, Producer};
    let p = cfg.producer().await.expect("producer");
    for start in (0..n).step_by(1000) {
        let batch: Vec<Message> = (start..n.min(start + 1000))
            .map(|i| Message::new(format!("{i:<100}")))
            .collect();
        for r in p.send_batch(batch).await.expect("send_batch") {
            r.expect("record produced");
        }
    }
    p.close().await.expect("producer closed");
}
