//! The Redis backend on a Redis Cluster (`cluster=true`, redis-rs' cluster client):
//! queues on every master, blocking reads that leave the shared connections free,
//! ordered queues, dead letters, redrive and queue deletion where the queue's slot is.
//!
//! ```text
//! scripts/redis-cluster.sh start 7000
//! FERRYMQ_TEST_REDIS_CLUSTER_URL=redis://127.0.0.1:7000 cargo test -p ferrymq-redis --test cluster
//! ```
//!
//! The conformance suite runs against the cluster too (`redis-cluster` setup of
//! tests/conformance.rs); these are the cluster's own promises.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use ferrymq_core::admin::Admin;
use ferrymq_core::{Consumer, Message, Producer};
use ferrymq_redis::RedisConfig;
use redis::Value;

const WAIT: Duration = Duration::from_secs(5);

/// `redis://127.0.0.1:7000`: a seed node. Panics — fails the test — when unset.
fn seed_url() -> String {
    match std::env::var("FERRYMQ_TEST_REDIS_CLUSTER_URL") {
        Ok(url) if !url.trim().is_empty() => url.trim().trim_end_matches('/').to_string(),
        _ => panic!(
            "FERRYMQ_TEST_REDIS_CLUSTER_URL is not set: start a cluster with \
             `scripts/redis-cluster.sh start 7000` and export \
             FERRYMQ_TEST_REDIS_CLUSTER_URL=redis://127.0.0.1:7000"
        ),
    }
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(queue: &str, query: &str) -> RedisConfig {
    let sep = if query.is_empty() { "" } else { "&" };
    RedisConfig::from_url(&format!("{}/{queue}?cluster=true{sep}{query}", seed_url())).unwrap()
}

/// A plain (not cluster-aware) connection to one node.
async fn node(addr: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The masters and the slot ranges they hold: `host:port` -> [(start, end)].
async fn masters() -> BTreeMap<String, Vec<(i64, i64)>> {
    let seed = seed_url();
    let addr = seed.trim_start_matches("redis://");
    let slots: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut node(addr).await)
        .await
        .unwrap();
    let mut out: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for range in slots {
        let Value::Array(parts) = range else {
            panic!("CLUSTER SLOTS: {range:?}")
        };
        let int = |v: &Value| match v {
            Value::Int(i) => *i,
            other => panic!("CLUSTER SLOTS: {other:?}"),
        };
        let Value::Array(master) = &parts[2] else {
            panic!("CLUSTER SLOTS: {parts:?}")
        };
        let host = match &master[0] {
            Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("CLUSTER SLOTS host: {other:?}"),
        };
        out.entry(format!("{host}:{}", int(&master[1])))
            .or_default()
            .push((int(&parts[0]), int(&parts[1])));
    }
    out
}

/// The master holding `key`'s slot.
async fn owner(key: &str) -> String {
    let seed = seed_url();
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut node(seed.trim_start_matches("redis://")).await)
        .await
        .unwrap();
    masters()
        .await
        .into_iter()
        .find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .map(|(addr, _)| addr)
        .unwrap_or_else(|| panic!("no master holds slot {slot}"))
}

/// `TYPE key` asked of `addr` directly (a node that does not hold the slot answers
/// MOVED, an error).
async fn type_on(addr: &str, key: &str) -> redis::RedisResult<String> {
    redis::cmd("TYPE")
        .arg(key)
        .query_async(&mut node(addr).await)
        .await
}

#[tokio::test]
async fn queues_on_every_master_round_trip_and_keep_their_keys_in_their_slot() {
    let masters = masters().await;
    assert_eq!(masters.len(), 3, "a 3-master cluster: {masters:?}");
    // One queue per master: names tried until every master holds one.
    let mut per_master: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..200 {
        let queue = unique(&format!("spread{i}"));
        let at = owner(&format!("ferrymq:{{{queue}}}:meta")).await;
        per_master.entry(at).or_insert(queue);
        if per_master.len() == masters.len() {
            break;
        }
    }
    assert_eq!(per_master.len(), 3, "{per_master:?}");

    for (addr, queue) in &per_master {
        let cfg = config(queue, "visibility=2s");
        let (producer, consumer) = cfg.connect().await.unwrap();
        producer
            .send(Message::new(format!("to {addr}")).priority(2))
            .await
            .unwrap();
        producer
            .send(Message::new("delayed").delay(Duration::from_millis(200)))
            .await
            .unwrap();
        assert_eq!(producer.depth().await.unwrap().waiting, 1);
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < 2 && tokio::time::Instant::now() < deadline {
            for d in consumer.receive(10, Duration::from_secs(1)).await.unwrap() {
                got.push(String::from_utf8(d.payload().to_vec()).unwrap());
                d.ack().await.unwrap();
            }
        }
        got.sort();
        assert_eq!(got, vec!["delayed".to_string(), format!("to {addr}")]);
        // The queue's keys are on the master of its slot, and only there.
        for key in ["ready:0", "ready:2", "meta"] {
            let key = format!("ferrymq:{{{queue}}}:{key}");
            let t = type_on(addr, &key).await.unwrap();
            assert_ne!(t, "none", "{key} on {addr}");
            for other in masters.keys().filter(|a| *a != addr) {
                let e = type_on(other, &key).await.unwrap_err();
                assert!(
                    e.to_string().to_ascii_lowercase().contains("moved"),
                    "{key} on {other}: {e}"
                );
            }
        }
        assert!(cfg.delete_queue().await.unwrap() > 0);
        assert_eq!(
            type_on(addr, &format!("ferrymq:{{{queue}}}:meta"))
                .await
                .unwrap(),
            "none",
            "deleted where the slot is"
        );
    }
}

#[tokio::test]
async fn a_blocking_receive_leaves_the_shared_connections_free() {
    // One shared connection: a blocking read on it would hold it (and every
    // command queued behind it) until the read ends — up to 250 ms per read, as
    // long as the receive waits.
    let queue = unique("blocking");
    let cfg = config(&queue, "command_timeout=1s&connections=1&pool_size=2");
    let (producer, consumer) = cfg.connect().await.unwrap();

    // A wait longer than command_timeout is a blocking read, not a timeout.
    let empty = consumer
        .receive(1, Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(empty.is_empty());

    let waiting = tokio::spawn({
        let consumer = consumer.clone();
        async move { consumer.receive(1, Duration::from_secs(3)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 20 round trips on the shared connection while the receive blocks. Queued
    // behind its reads they would take ~20 × 250 ms, longer than the receive
    // waits; beside them, a few ms each. This is an order of events (all done
    // before the receive gave up), not a speed: the margin is ~100×.
    for _ in 0..20 {
        assert_eq!(producer.depth().await.unwrap().total(), 0);
    }
    assert!(
        !waiting.is_finished(),
        "the commands on the shared connection waited for the blocking reads"
    );
    producer.send(Message::new("while blocked")).await.unwrap();
    let got = waiting.await.unwrap().unwrap();
    assert_eq!(
        got.len(),
        1,
        "the blocked receive got the message sent meanwhile"
    );
    assert_eq!(got[0].payload().as_ref(), b"while blocked");
    got.into_iter().next().unwrap().ack().await.unwrap();
    cfg.delete_queue().await.unwrap();
}

#[tokio::test]
async fn ordered_queues_dead_letters_and_redrive_work_on_the_cluster() {
    // Ordered: one head per key, the next after the ack (the wake stream and the
    // receive script, all in the queue's slot).
    let queue = unique("ordered");
    let cfg = config(&queue, "ordered=true&visibility=2s");
    let (producer, consumer) = cfg.connect().await.unwrap();
    for i in 0..3 {
        producer
            .send(Message::new(format!("a{i}")).key("a"))
            .await
            .unwrap();
    }
    for i in 0..3 {
        let got = consumer.receive(10, WAIT).await.unwrap();
        assert_eq!(got.len(), 1, "one head of key a at a time");
        assert_eq!(got[0].payload().as_ref(), format!("a{i}").as_bytes());
        got.into_iter().next().unwrap().ack().await.unwrap();
    }
    cfg.delete_queue().await.unwrap();

    // Dead letters after max_deliveries, redriven back, described by the admin.
    let queue = unique("dlq");
    let cfg = config(&queue, "max_deliveries=1&visibility=2s");
    let (producer, consumer) = cfg.connect().await.unwrap();
    producer.send(Message::new("poison")).await.unwrap();
    let got = consumer.receive(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    got.into_iter().next().unwrap().nack(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while consumer.dead_letters(10).await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        consumer
            .receive(1, Duration::from_millis(200))
            .await
            .unwrap();
    }
    let admin = cfg.admin().await.unwrap();
    assert_eq!(admin.peek_dead_letters(10).await.unwrap().len(), 1);
    assert_eq!(consumer.redrive(10).await.unwrap(), 1);
    let got = consumer.receive(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1, "redriven");
    assert_eq!(got[0].payload().as_ref(), b"poison");
    got.into_iter().next().unwrap().ack().await.unwrap();
    assert_eq!(admin.describe().await.unwrap().depth.total(), 0);
    cfg.delete_queue().await.unwrap();
}

#[test]
fn a_cluster_url_is_database_0_and_names_its_seeds() {
    let cfg = RedisConfig::from_url(
        "redis://127.0.0.1:7000/orders?cluster=true&cluster_nodes=127.0.0.1:7001,[::1]:7002",
    )
    .unwrap();
    assert!(cfg.cluster);
    assert_eq!(cfg.cluster_nodes, ["127.0.0.1:7001", "[::1]:7002"]);
    assert_eq!(
        cfg.to_string(),
        "redis://127.0.0.1:7000/0/orders?group=ferrymq&cluster=true&cluster_nodes=127.0.0.1:7001,[::1]:7002"
    );
    assert_eq!(RedisConfig::from_url(&cfg.to_string()).unwrap(), cfg);
    for (url, param) in [
        ("redis://h:7000/3/orders?cluster=true", "db"),
        (
            "redis://h:7000/orders?cluster_nodes=h2:7001",
            "cluster_nodes",
        ),
        (
            "redis://h:7000/orders?cluster=true&cluster_nodes=h2",
            "cluster_nodes",
        ),
        (
            "redis://h:7000/orders?cluster=true&cluster_nodes=h2:0",
            "cluster_nodes",
        ),
        ("redis://h:7000/orders?cluster=yes-please", "cluster"),
    ] {
        let e = RedisConfig::from_url(url).unwrap_err();
        assert_eq!(e.kind(), ferrymq_core::ErrorKind::InvalidConfig, "{url}");
        assert!(e.to_string().contains(param), "{url}: {e}");
    }
}
