//! `ferry queue …` and `ferry dlq … --native`, run as a user would: argument handling
//! on memory://, the commands themselves against the Redis server named by
//! FERRYMQ_TEST_REDIS_URL (which fails the test when missing, never skips it).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrymq::{Consumer, Message, Producer};

mod common;
use common::{ferry, redis_base, stderr, stdout, unique};

#[test]
fn create_describes_every_capability() {
    let out = ferry(&["queue", "create", "memory://cli-queue-create?visibility=3s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "queue           cli-queue-create",
        "backend         memory",
        "identity        memory:cli-queue-create",
        "depth           waiting 0  in flight 0  delayed 0  dead-lettered 0  (exact)",
        "  ordering               per key (one in flight per key)",
        "  priority               exact",
        "  visibility timeout     3s",
        "  extend visibility      yes",
        "  max visibility",
        "  max delay",
        "  max nack delay",
        "  nack delay blocks      no",
        "  release keeps attempt  yes",
        "  attempts               exact",
        "  dedup window           5m",
        "  depth                  exact",
        "  bounded                yes",
        "  max message size       262144 bytes",
        "  max batch",
        "  native dead letter     never",
        "settings",
        "  capacity",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    let out = ferry(&["queue", "ensure", "memory://cli-queue-json", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["depth"]["accuracy"], "exact");
    assert_eq!(v["capabilities"].as_object().unwrap().len(), 16, "{v}");
    assert_eq!(v["capabilities"]["release_keeps_attempt"], true);
}

#[test]
fn a_spec_field_the_backend_lacks_is_refused_by_name() {
    let out = ferry(&[
        "queue",
        "create",
        "memory://cli-queue-spec",
        "--partitions",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("`partitions`"), "{}", stderr(&out));
    let out = ferry(&["queue", "create", "memory://q", "--max-receives", "3"]);
    assert_eq!(out.status.code(), Some(2), "needs --dead-letter-queue");
}

#[test]
fn delete_and_purge_need_yes() {
    for cmd in ["delete", "purge"] {
        let out = ferry(&["queue", cmd, "memory://cli-queue-yes"]);
        assert_eq!(out.status.code(), Some(1), "{cmd}");
        assert!(stderr(&out).contains("pass --yes"), "{}", stderr(&out));
    }
    let out = ferry(&["queue", "delete", "memory://cli-queue-yes", "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cli-queue-yes: did not exist"));
}

#[test]
fn describe_of_a_missing_memory_queue_is_not_found() {
    let out = ferry(&["queue", "describe", "memory://cli-queue-missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
}

// ---- against Redis -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn queue_commands_on_redis() {
    let name = unique("ferry-queue-test-orders");
    let url = format!("{}/{name}?visibility=5s", redis_base("ferry queue"));

    let out = ferry(&["queue", "ensure", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("queue           {name}")));
    assert!(stdout(&out).contains("backend         redis"));

    let producer = ferrymq::connect_producer(&url).await.unwrap();
    for i in 0..3 {
        producer
            .send(
                Message::new(format!("m{i}"))
                    .key("k")
                    .header("tenant", "acme"),
            )
            .await
            .unwrap();
    }

    let out = ferry(&["queue", "describe", &url, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["depth"]["waiting"], 3, "{v}");
    assert_eq!(v["backend"], "redis");
    assert_eq!(v["capabilities"].as_object().unwrap().len(), 16, "{v}");
    assert!(v["identity"].as_str().unwrap().ends_with(&name), "{v}");

    // peek: the oldest, no side effects.
    let out = ferry(&["queue", "peek", &url, "-n", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("--- #").count(), 2, "{text}");
    assert!(text.contains("payload         m0"), "{text}");
    assert!(text.contains("header          tenant: acme"), "{text}");
    assert!(stderr(&out).contains("1 more waiting"), "{}", stderr(&out));
    let consumer = ferrymq::connect_consumer(&url).await.unwrap();
    let depth = consumer.depth().await.unwrap();
    assert_eq!(
        (depth.waiting, depth.in_flight),
        (3, 0),
        "peek leased nothing"
    );

    let out = ferry(&["queue", "purge", &url, "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("{name}: purged 3 message(s)")),
        "{}",
        stdout(&out)
    );
    assert_eq!(consumer.depth().await.unwrap().total(), 0);

    producer.close().await.unwrap();
    consumer.close().await.unwrap();
    let out = ferry(&["queue", "delete", &url, "--yes"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("{name}: deleted")));
}

/// The backend's own dead-letter store (Redis `max_deliveries`): peeked and
/// redriven natively through the work queue's URL.
#[tokio::test(flavor = "multi_thread")]
async fn native_dead_letters_on_redis() {
    let name = unique("ferry-queue-test-native");
    let url = format!(
        "{}/{name}?visibility=5s&max_deliveries=1",
        redis_base("ferry queue")
    );
    let (producer, consumer) = ferrymq::connect(&url).await.unwrap();
    producer.send(Message::new("a")).await.unwrap();
    producer.send(Message::new("b")).await.unwrap();
    let mut failed = 0;
    while failed < 2 {
        let batch = consumer.receive(2, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "ran dry after {failed}");
        for d in batch {
            d.nack(None).await.unwrap();
            failed += 1;
        }
    }
    let depth = consumer.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.dead_lettered), (0, 2), "{depth:?}");

    let out = ferry(&["dlq", "peek", &url, "--native"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("--- #").count(), 2, "{text}");
    assert!(text.contains("payload         a"), "{text}");
    assert!(
        stderr(&out).contains("peek leaves them in the dead-letter store untouched"),
        "{}",
        stderr(&out)
    );
    assert_eq!(consumer.depth().await.unwrap().dead_lettered, 2);

    let out = ferry(&["dlq", "redrive", &url, "--native"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(": 2 moved"), "{}", stdout(&out));
    let depth = consumer.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.dead_lettered), (2, 0), "{depth:?}");

    producer.close().await.unwrap();
    consumer.close().await.unwrap();
    ferrymq::connect_admin(&url)
        .await
        .unwrap()
        .delete()
        .await
        .unwrap();
}
