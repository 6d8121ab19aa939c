//! Peek and redrive on the in-process backend, with dead letters made by the real
//! `RetryToDlq` middleware.

use std::collections::HashSet;
use std::time::Duration;

use ferrymq::middleware::{handler_fn, RetryToDlqLayer};
use ferrymq::{reserved, BoxError, Consumer, Delivery, ErrorKind, Message, Producer};
use tower::{Layer, ServiceExt};

use super::peek::peek;
use super::redrive::{redrive, RedriveOptions, Step};
use super::same_queue;

const WAIT: Duration = Duration::from_millis(200);

fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("dlq-test-{name}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Send `messages` to `source`, fail each once in a `RetryToDlq(max_attempts = 1)`
/// stack, so that each lands in `dlq` the way a worker would put it there.
async fn dead_letter(source: &str, dlq: &str, messages: Vec<Message>) {
    let n = messages.len();
    let (producer, consumer) = ferrymq::connect(&format!("memory://{source}"))
        .await
        .unwrap();
    let dlq_producer = ferrymq::connect_producer(&format!("memory://{dlq}"))
        .await
        .unwrap();
    for m in messages {
        producer.send(m).await.unwrap();
    }
    let layer = RetryToDlqLayer::new(dlq_producer).max_attempts(1);
    let mut failed = 0;
    while failed < n {
        let batch = consumer.receive(n, WAIT).await.unwrap();
        assert!(!batch.is_empty(), "source ran dry after {failed} of {n}");
        for d in batch {
            let service = layer.layer(handler_fn(|_d: Delivery| async {
                Err::<(), BoxError>("invoicing service rejected it".into())
            }));
            assert!(service.oneshot(d).await.is_err());
            failed += 1;
        }
    }
    assert_eq!(consumer.depth().await.unwrap().total(), 0);
}

async fn consumer(name: &str) -> Box<dyn Consumer> {
    ferrymq::connect_consumer(&format!("memory://{name}"))
        .await
        .unwrap()
}

async fn producer(name: &str) -> Box<dyn Producer> {
    ferrymq::connect_producer(&format!("memory://{name}"))
        .await
        .unwrap()
}

async fn drain(c: &dyn Consumer) -> Vec<Delivery> {
    let mut all = Vec::new();
    loop {
        let batch = c.receive(100, WAIT).await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

fn opts() -> RedriveOptions {
    RedriveOptions {
        wait: WAIT,
        ..RedriveOptions::default()
    }
}

#[tokio::test]
async fn redrive_moves_every_message_back_with_its_history() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(
        &source,
        &dlq,
        vec![
            Message::new("a").key("customer-1").header("tenant", "acme"),
            Message::new("b").key("customer-2").priority(3),
            Message::new("c"),
        ],
    )
    .await;
    let dlq_c = consumer(&dlq).await;
    let target = producer(&source).await;

    let mut moved_ids = Vec::new();
    let report = redrive(&*dlq_c, &*target, &opts(), |step| {
        if let Step::Moved { from, .. } = step {
            moved_ids.push(from.id().to_string());
        }
    })
    .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.moved, report.held_back), (3, 0));
    assert_eq!(moved_ids.len(), 3);
    assert_eq!(dlq_c.depth().await.unwrap().total(), 0, "DLQ emptied");

    let back = drain(&*consumer(&source).await).await;
    let payloads: HashSet<_> = back.iter().map(|d| d.payload().to_vec()).collect();
    assert_eq!(
        payloads,
        HashSet::from([b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
    );
    for d in &back {
        let h = d.headers();
        assert_eq!(d.attempt(), 1, "attempts count afresh in the target");
        assert_eq!(
            h.get(reserved::FAILURE_REASON),
            Some("invoicing service rejected it")
        );
        assert_eq!(h.get(reserved::ORIGIN_QUEUE), Some(source.as_str()));
        assert_eq!(h.get(reserved::ATTEMPTS), Some("1"));
        assert!(h.get(reserved::FIRST_FAILURE_AT).is_some());
        assert!(h.get(reserved::DEAD_LETTERED_AT).is_some());
        assert!(h.get(reserved::ATTEMPT).is_none());
        match d.payload().as_ref() {
            b"a" => {
                assert_eq!(d.key(), Some("customer-1"));
                assert_eq!(h.get("tenant"), Some("acme"));
            }
            b"b" => {
                assert_eq!(d.key(), Some("customer-2"));
                assert_eq!(d.message().get_priority(), Some(3));
            }
            _ => assert_eq!(d.key(), None),
        }
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn redrive_stops_at_max_and_leaves_the_rest_waiting() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(
        &source,
        &dlq,
        vec![Message::new("1"), Message::new("2"), Message::new("3")],
    )
    .await;
    let dlq_c = consumer(&dlq).await;
    let options = RedriveOptions {
        max: Some(2),
        ..opts()
    };
    let report = redrive(&*dlq_c, &*producer(&source).await, &options, |_| {}).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.moved, 2);
    let depth = dlq_c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (1, 0));
    assert_eq!(producer(&source).await.depth().await.unwrap().waiting, 2);
}

#[tokio::test]
async fn a_failed_send_acks_nothing() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(&source, &dlq, vec![Message::new("1"), Message::new("2")]).await;
    // A target that is full: every send fails with QueueFull.
    let full_url = format!("memory://{}?capacity=1", unique("full"));
    let full = ferrymq::connect_producer(&full_url).await.unwrap();
    full.send(Message::new("already here")).await.unwrap();

    let dlq_c = consumer(&dlq).await;
    let mut steps = 0;
    let report = redrive(&*dlq_c, &*full, &opts(), |_| steps += 1).await;
    let error = report.error.expect("the send failed");
    assert_eq!(error.kind(), ErrorKind::QueueFull);
    assert!(error.message().contains("stays in the DLQ"), "{error}");
    assert_eq!((report.moved, steps), (0, 0));
    let depth = dlq_c.depth().await.unwrap();
    assert_eq!(
        (depth.waiting, depth.in_flight),
        (2, 0),
        "both still in the DLQ, released"
    );
    assert_eq!(full.depth().await.unwrap().total(), 1);
}

#[tokio::test]
async fn a_copy_the_target_drops_as_duplicate_stays_in_the_dlq() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    // The source's dedup window (5 min) remembers "order-1" from the original send.
    dead_letter(
        &source,
        &dlq,
        vec![Message::new("order 1").dedup_id("order-1")],
    )
    .await;
    let dlq_c = consumer(&dlq).await;
    let target = producer(&source).await;

    let mut held = Vec::new();
    let report = redrive(&*dlq_c, &*target, &opts(), |step| {
        if let Step::HeldBack { from } = step {
            held.push(from.id().to_string());
        }
    })
    .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.moved, report.held_back, held.len()), (0, 1, 1));
    let depth = dlq_c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (1, 0), "kept, released");
    assert_eq!(target.depth().await.unwrap().total(), 0);

    // Without the dedup id the target takes it.
    let options = RedriveOptions {
        drop_dedup_id: true,
        ..opts()
    };
    let report = redrive(&*dlq_c, &*target, &options, |_| {}).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.moved, report.held_back), (1, 0));
    assert_eq!(dlq_c.depth().await.unwrap().total(), 0);
    let back = drain(&*consumer(&source).await).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].payload().as_ref(), b"order 1");
    assert_eq!(back[0].message().get_dedup_id(), None);
}

#[tokio::test]
async fn peek_shows_messages_and_leaves_them_in_the_queue() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(
        &source,
        &dlq,
        vec![Message::new("1"), Message::new("2"), Message::new("3")],
    )
    .await;
    let dlq_c = consumer(&dlq).await;

    let mut shown = Vec::new();
    let peeked = peek(&*dlq_c, 10, WAIT, |n, d| {
        assert_eq!(n, shown.len() + 1);
        assert_eq!(
            d.headers().get(reserved::FAILURE_REASON),
            Some("invoicing service rejected it")
        );
        shown.push(d.id().to_string());
    })
    .await
    .unwrap();
    assert_eq!((peeked.shown, peeked.not_shown), (3, 0));
    assert_eq!(shown.iter().collect::<HashSet<_>>().len(), 3, "no repeats");
    let depth = dlq_c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (3, 0), "released");

    // --max: shows fewer, says how many it did not show.
    let peeked = peek(&*dlq_c, 2, WAIT, |_, _| {}).await.unwrap();
    assert_eq!((peeked.shown, peeked.not_shown), (2, 1));

    // Still all there for a real consumer.
    assert_eq!(drain(&*dlq_c).await.len(), 3);
}

#[tokio::test]
async fn peek_on_per_key_backend_shows_a_keys_first_message() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(
        &source,
        &dlq,
        vec![Message::new("1").key("k"), Message::new("2").key("k")],
    )
    .await;
    let dlq_c = consumer(&dlq).await;
    let peeked = peek(&*dlq_c, 10, WAIT, |_, _| {}).await.unwrap();
    assert_eq!((peeked.shown, peeked.not_shown), (1, 1));
}

#[tokio::test]
async fn peek_of_an_empty_queue_shows_nothing() {
    let dlq_c = consumer(&unique("empty")).await;
    let peeked = peek(&*dlq_c, 10, Duration::from_millis(50), |_, _| {
        panic!("nothing to show")
    })
    .await
    .unwrap();
    assert_eq!((peeked.shown, peeked.not_shown), (0, 0));
}

#[test]
fn same_queue_ignores_query_and_credentials() {
    assert!(same_queue("memory://a?visibility=1s", "memory://a"));
    assert!(!same_queue("memory://a", "memory://b"));
    assert!(same_queue(
        "redis://u:p@127.0.0.1:6379/orders-dlq",
        "redis://127.0.0.1:6379/orders-dlq?group=x"
    ));
    assert!(!same_queue(
        "redis://127.0.0.1:6379/orders-dlq",
        "redis://127.0.0.1:6380/orders-dlq"
    ));
    assert!(!same_queue(
        "redis://127.0.0.1:6379/orders-dlq",
        "redis://127.0.0.1:6379/orders"
    ));
}

#[tokio::test]
async fn redrive_drops_the_backend_attempt_header() {
    // As a backend that counts attempts in a header (Kafka) would have left it.
    let (source, dlq) = (unique("src"), unique("dlq"));
    producer(&dlq)
        .await
        .send(
            Message::new("x")
                .header(reserved::ATTEMPT, "4")
                .header(reserved::FAILURE_REASON, "boom"),
        )
        .await
        .unwrap();
    let dlq_c = consumer(&dlq).await;
    let report = redrive(&*dlq_c, &*producer(&source).await, &opts(), |_| {}).await;
    assert_eq!(report.moved, 1);
    let back = consumer(&source).await.receive(1, WAIT).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].headers().get(reserved::ATTEMPT), None);
    assert_eq!(
        back[0].headers().get(reserved::FAILURE_REASON),
        Some("boom")
    );
}
