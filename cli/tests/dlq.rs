//! `ferry dlq peek` / `ferry dlq redrive`, run as a user would.
//!
//! memory:// queues live inside one process, so the binary cannot be handed a DLQ
//! with something in it on memory://. Hence: argument handling and error paths run on
//! memory:// here; the peek/redrive logic itself is unit-tested on memory:// in
//! `src/dlq/tests.rs`; and the full round trip through the binary runs against the
//! Redis server named by FERRYMQ_TEST_REDIS_URL (set by `scripts/test.sh`). That test
//! fails — it does not skip — when the variable is missing.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrymq::middleware::{handler_fn, RetryToDlqLayer};
use ferrymq::{reserved, BoxError, Consumer, Delivery, Message, Producer};
use tower::{Layer, ServiceExt};

mod common;
use common::{ferry, redis_base, stderr, stdout, unique};

#[test]
fn help_states_what_peek_and_redrive_promise() {
    let out = ferry(&["dlq", "--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("peek") && text.contains("redrive"), "{text}");

    let out = ferry(&["dlq", "peek", "--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("Peek reads the messages without receiving them"),
        "{text}"
    );
    assert!(
        text.contains("no lease is taken, no receive count or attempt is spent"),
        "{text}"
    );
    assert!(text.contains("they stay in the DLQ"), "{text}");
    assert!(text.contains("--lease"), "{text}");

    let out = ferry(&["dlq", "redrive", "--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("at-least-once"), "{text}");
    assert!(
        text.contains("acked in the DLQ only after the send succeeded"),
        "{text}"
    );
    assert!(text.contains("--to <TARGET_URL>"), "{text}");
    assert!(text.contains("from a snapshot"), "{text}");
    assert!(text.contains("never \"until empty\""), "{text}");
}

#[test]
fn redrive_needs_a_target() {
    let out = ferry(&["dlq", "redrive", "memory://orders-dlq"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    assert!(
        stderr(&out).contains("--to <TARGET_URL>"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn max_must_be_positive() {
    for cmd in ["peek", "redrive"] {
        let out = ferry(&[
            "dlq",
            cmd,
            "memory://orders-dlq",
            "--to",
            "memory://orders",
            "--max",
            "0",
        ]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
    }
}

#[test]
fn bad_urls_are_typed_errors() {
    let out = ferry(&["dlq", "peek", "not a url"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid config"), "{}", stderr(&out));

    let out = ferry(&["dlq", "peek", "nats://127.0.0.1/orders-dlq"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown scheme nats://"),
        "{}",
        stderr(&out)
    );

    let out = ferry(&["dlq", "redrive", "memory://dlq", "--to", "bogus://x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid config"), "{}", stderr(&out));
}

#[test]
fn redrive_refuses_to_target_the_dlq_itself() {
    let out = ferry(&[
        "dlq",
        "redrive",
        "memory://orders-dlq?visibility=5s",
        "--to",
        "memory://orders-dlq",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the target is the dead-letter queue itself"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn empty_memory_dlq_says_so() {
    // A fresh process has no memory queue of that name: peeking creates nothing.
    let out = ferry(&["dlq", "peek", "memory://orders-dlq"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let err = stderr(&out);
    assert!(
        err.contains("memory:// queues live inside one process"),
        "{err}"
    );
    assert!(err.contains("\"orders-dlq\" does not exist"), "{err}");

    // --lease receives, which creates the queue: empty.
    let out = ferry(&[
        "dlq",
        "peek",
        "memory://orders-dlq",
        "--lease",
        "--wait",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("orders-dlq: no dead-lettered message within 50ms"),
        "{}",
        stderr(&out)
    );

    let out = ferry(&[
        "dlq",
        "redrive",
        "memory://orders-dlq",
        "--to",
        "memory://orders",
        "--wait",
        "50ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("redrive orders-dlq -> orders: 0 moved, 0 kept in the DLQ"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("nothing to redrive (the DLQ was empty)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn native_and_to_are_exclusive_and_memory_has_no_native_store() {
    let out = ferry(&[
        "dlq",
        "redrive",
        "memory://orders",
        "--native",
        "--to",
        "memory://x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = ferry(&["dlq", "redrive", "memory://orders", "--native"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("memory does not support native redrive"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("--to TARGET_URL"), "{}", stderr(&out));
}

// ---- against Redis -------------------------------------------------------------

/// Put `messages` into `dlq_url` the way a worker does: through `RetryToDlq`, failing
/// each once with max_attempts = 1.
async fn dead_letter(source_url: &str, dlq_url: &str, messages: Vec<Message>) {
    let n = messages.len();
    let (producer, consumer) = ferrymq::connect(source_url).await.unwrap();
    let dlq = ferrymq::connect_producer(dlq_url).await.unwrap();
    for m in messages {
        producer.send(m).await.unwrap();
    }
    let layer = RetryToDlqLayer::new(dlq).max_attempts(1);
    let mut failed = 0;
    while failed < n {
        let batch = consumer.receive(n, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "source ran dry after {failed} of {n}");
        for d in batch {
            let service = layer.layer(handler_fn(|_d: Delivery| async {
                Err::<(), BoxError>("invoicing service rejected it".into())
            }));
            assert!(service.oneshot(d).await.is_err());
            failed += 1;
        }
    }
    consumer.close().await.unwrap();
}

async fn delete_queues(urls: &[&str]) {
    for url in urls {
        let admin = ferrymq::connect_admin(url).await.unwrap();
        admin.delete().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn peek_and_redrive_through_the_binary_on_redis() {
    let base = redis_base("ferry dlq");
    let source_name = unique("ferry-dlq-test-orders");
    let dlq_name = unique("ferry-dlq-test-orders-dlq");
    let source_url = format!("{base}/{source_name}?visibility=5s");
    let dlq_url = format!("{base}/{dlq_name}?visibility=5s");
    dead_letter(
        &source_url,
        &dlq_url,
        vec![
            Message::new(r#"{"order":1}"#)
                .key("customer-1")
                .header("tenant", "acme"),
            Message::new(r#"{"order":2}"#),
        ],
    )
    .await;
    let dlq = ferrymq::connect_consumer(&dlq_url).await.unwrap();
    assert_eq!(dlq.depth().await.unwrap().waiting, 2, "seeded");

    // peek: shows both with their dead-letter headers, leaves both in the queue.
    let out = ferry(&["dlq", "peek", &dlq_url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "reason          invoicing service rejected it",
        &format!("origin queue    {source_name}"),
        "attempts        1",
        "header          tenant: acme",
        r#"payload         {"order":1}"#,
        r#"payload         {"order":2}"#,
        "key customer-1",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert_eq!(text.matches("first failure   20").count(), 2, "{text}");
    assert_eq!(text.matches("dead-lettered   20").count(), 2, "{text}");
    assert!(
        stderr(&out).contains("2 message(s) shown; peek leaves them in the DLQ untouched"),
        "{}",
        stderr(&out)
    );
    let depth = dlq.depth().await.unwrap();
    assert_eq!(
        (depth.waiting, depth.in_flight),
        (2, 0),
        "peek consumed nothing"
    );
    // Nor did it count a delivery: received now, each is on its first attempt.
    let leased = dlq.receive(2, Duration::from_secs(5)).await.unwrap();
    assert_eq!(leased.len(), 2);
    for d in &leased {
        assert_eq!(d.attempt(), 1, "peek spent an attempt");
    }
    for d in leased {
        d.release(None).await.unwrap();
    }

    // peek --json --max 1: one object, fields parsed.
    let out = ferry(&["dlq", "peek", &dlq_url, "--json", "--max", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = stdout(&out);
    let lines: Vec<&str> = json.lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["reason"], "invoicing service rejected it");
    assert_eq!(v["origin_queue"], source_name.as_str());
    assert_eq!(v["attempts"], 1);
    assert!(
        stderr(&out).contains("1 more waiting, not shown"),
        "{}",
        stderr(&out)
    );

    // redrive to an unreachable target fails and moves nothing.
    let out = ferry(&[
        "dlq",
        "redrive",
        &dlq_url,
        "--to",
        "redis://127.0.0.1:1/nowhere?connect_timeout=300ms",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert_eq!(dlq.depth().await.unwrap().total(), 2, "nothing lost");

    // redrive: both back in the source, with their history; the DLQ is empty.
    let out = ferry(&["dlq", "redrive", &dlq_url, "--to", &source_url]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("moved ").count(), 2, "{text}");
    assert!(
        text.contains(&format!(
            "redrive {dlq_name} -> {source_name}: 2 moved, 0 kept in the DLQ"
        )),
        "{text}"
    );
    assert_eq!(dlq.depth().await.unwrap().total(), 0, "DLQ emptied");

    let source = ferrymq::connect_consumer(&source_url).await.unwrap();
    let mut back = Vec::new();
    while back.len() < 2 {
        let batch = source.receive(2, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "only {} came back", back.len());
        back.extend(batch);
    }
    back.sort_by_key(|d| d.payload().clone());
    assert_eq!(back[0].payload().as_ref(), br#"{"order":1}"#);
    assert_eq!(back[1].payload().as_ref(), br#"{"order":2}"#);
    assert_eq!(back[0].key(), Some("customer-1"));
    assert_eq!(back[0].headers().get("tenant"), Some("acme"));
    for d in &back {
        assert_eq!(d.attempt(), 1, "attempts count afresh");
        assert_eq!(
            d.headers().get(reserved::FAILURE_REASON),
            Some("invoicing service rejected it")
        );
        assert_eq!(
            d.headers().get(reserved::ORIGIN_QUEUE),
            Some(source_name.as_str())
        );
        d.ack().await.unwrap();
    }

    // Nothing left: a second redrive moves nothing and says so.
    let out = ferry(&[
        "dlq",
        "redrive",
        &dlq_url,
        "--to",
        &source_url,
        "--wait",
        "200ms",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("0 moved"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("nothing to redrive"),
        "{}",
        stderr(&out)
    );

    source.close().await.unwrap();
    dlq.close().await.unwrap();
    delete_queues(&[&source_url, &dlq_url]).await;
}
