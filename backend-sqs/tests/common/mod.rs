//! Shared helpers of the SQS backend tests: the server comes from
//! FERRYMQ_TEST_SQS_ENDPOINT (start one with `scripts/sqs.sh start 4571`).
//! Credentials are static dummies set in the config, never read from `~/.aws`.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrymq_core::{Consumer, Delivery};
use ferrymq_sqs::{SqsConfig, SqsConsumer, SqsProducer};

/// `http://127.0.0.1:4571`. Panics — fails the test — when unset.
pub fn endpoint() -> String {
    match std::env::var("FERRYMQ_TEST_SQS_ENDPOINT") {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_string(),
        _ => panic!(
            "FERRYMQ_TEST_SQS_ENDPOINT is not set: start a server with `scripts/sqs.sh start 4571` \
             and export FERRYMQ_TEST_SQS_ENDPOINT=http://127.0.0.1:4571"
        ),
    }
}

/// A queue name no other test (or earlier run) uses; `.fifo` when `fifo`.
pub fn unique(prefix: &str, fifo: bool) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}-{:08x}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>(),
        if fifo { ".fifo" } else { "" }
    )
}

/// The URL of queue `name` on the test server: dummy credentials, `create=true`,
/// `visibility=2s`, each overridden by the same parameter in `query` (`a=1&b=2`).
pub fn url(name: &str, query: &str) -> String {
    let given: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    let mut params: Vec<String> = given.iter().map(|p| p.to_string()).collect();
    for default in [
        format!("endpoint={}", endpoint()),
        "region=us-east-1".to_string(),
        "access_key_id=test".to_string(),
        "secret_access_key=test".to_string(),
        "create=true".to_string(),
        "visibility=2s".to_string(),
    ] {
        let key = default.split('=').next().unwrap_or_default();
        if !given.iter().any(|p| p.split('=').next() == Some(key)) {
            params.push(default);
        }
    }
    format!("sqs://{name}?{}", params.join("&"))
}

/// Config for a fresh queue.
pub fn config(prefix: &str, fifo: bool, query: &str) -> SqsConfig {
    SqsConfig::from_url(&url(&unique(prefix, fifo), query)).unwrap()
}

pub async fn connect(
    prefix: &str,
    fifo: bool,
    query: &str,
) -> (SqsProducer, SqsConsumer, SqsConfig) {
    let cfg = config(prefix, fifo, query);
    let (p, c) = cfg.connect().await.unwrap();
    (p, c, cfg)
}

/// Receive until `n` deliveries arrived or `within` passed.
pub async fn receive_n(c: &dyn Consumer, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        got.extend(
            c.receive(10, left.min(Duration::from_secs(2)))
                .await
                .unwrap(),
        );
    }
    got
}

/// Delete the queue (and its DLQ when there is one).
pub async fn cleanup(cfg: &SqsConfig) {
    use ferrymq_core::Admin;
    let _ = cfg.admin().await.unwrap().delete().await;
    if cfg.max_receives.is_some() {
        let dlq = SqsConfig::from_url(&url(&cfg.dlq_name(), "")).unwrap();
        let _ = dlq.admin().await.unwrap().delete().await;
    }
}
