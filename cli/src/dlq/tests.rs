//! Peek and redrive on the in-process backend, with dead letters made by the real
//! `RetryToDlq` middleware.

use std::collections::HashSet;
use std::time::Duration;

use ferrymq::middleware::{handler_fn, RetryToDlqLayer};
use ferrymq::{reserved, BoxError, Consumer, Delivery, ErrorKind, Message, Producer};
use tower::{Layer, ServiceExt};

use super::peek::peek;
use super::redrive::{redrive, RedriveOptions, Step};
use crate::queue::peek_messages;

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
    let report = redrive(&*dlq_c, &*full, &opts(), |step| {
        if !matches!(step, Step::Started { .. }) {
            steps += 1;
        }
    })
    .await;
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

async fn admin(name: &str) -> Box<dyn ferrymq::Admin> {
    ferrymq::connect_admin(&format!("memory://{name}"))
        .await
        .unwrap()
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
    let dlq_admin = admin(&dlq).await;
    let (shown, more) = peek_messages(&*dlq_admin, 10, false).await.unwrap();
    assert_eq!((shown.len(), more), (3, Some(0)));
    for p in &shown {
        assert_eq!(
            p.message.headers().get(reserved::FAILURE_REASON),
            Some("invoicing service rejected it")
        );
    }
    assert_eq!(
        shown.iter().map(|p| &p.id).collect::<HashSet<_>>().len(),
        3,
        "no repeats"
    );
    let dlq_c = consumer(&dlq).await;
    let depth = dlq_c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (3, 0), "nothing leased");

    // --max: shows fewer, says how many it did not show.
    let (shown, more) = peek_messages(&*dlq_admin, 2, false).await.unwrap();
    assert_eq!((shown.len(), more), (2, Some(1)));

    // Still all there for a real consumer.
    assert_eq!(drain(&*dlq_c).await.len(), 3);
}

#[tokio::test]
async fn native_peek_sees_past_a_keys_first_message() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(
        &source,
        &dlq,
        vec![Message::new("1").key("k"), Message::new("2").key("k")],
    )
    .await;
    let (shown, more) = peek_messages(&*admin(&dlq).await, 10, false).await.unwrap();
    assert_eq!((shown.len(), more), (2, Some(0)));
}

#[tokio::test]
async fn peek_of_an_empty_queue_shows_nothing() {
    let name = unique("empty");
    let _created = consumer(&name).await;
    let (shown, more) = peek_messages(&*admin(&name).await, 10, false)
        .await
        .unwrap();
    assert_eq!((shown.len(), more), (0, Some(0)));
}

#[tokio::test]
async fn peek_of_a_missing_memory_queue_is_not_found() {
    let err = peek_messages(&*admin(&unique("missing")).await, 10, false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// `--lease`, for backends without a native peek: receive, show, release.
#[tokio::test]
async fn lease_peek_shows_and_releases() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(
        &source,
        &dlq,
        vec![
            Message::new("1").key("k"),
            Message::new("2").key("k"),
            Message::new("3"),
        ],
    )
    .await;
    let dlq_c = consumer(&dlq).await;
    let mut shown = Vec::new();
    let peeked = peek(&*dlq_c, 10, WAIT, |n, d| {
        assert_eq!(n, shown.len() + 1);
        shown.push(d.id().to_string());
    })
    .await
    .unwrap();
    // Per-key ordering hides a key's second message while its first is leased.
    assert_eq!((peeked.shown, peeked.not_shown), (2, 1));
    let depth = dlq_c.depth().await.unwrap();
    assert_eq!((depth.waiting, depth.in_flight), (3, 0), "released");
    // Released, not nacked: memory keeps the attempt (release_keeps_attempt).
    for d in drain(&*dlq_c).await {
        assert_eq!(d.attempt(), 1);
    }
}

#[tokio::test]
async fn the_snapshot_is_the_dlq_size_at_the_start_capped_at_max() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(&source, &dlq, vec![Message::new("1"), Message::new("2")]).await;
    let dlq_c = consumer(&dlq).await;
    assert_eq!(super::redrive::snapshot(&*dlq_c, None).await.unwrap(), 2);
    assert_eq!(super::redrive::snapshot(&*dlq_c, Some(1)).await.unwrap(), 1);
    assert_eq!(super::redrive::snapshot(&*dlq_c, Some(9)).await.unwrap(), 2);
}

#[test]
fn same_queue_ignores_query_and_credentials() {
    let same = |a: &str, b: &str| {
        ferrymq::Config::from_url(a)
            .unwrap()
            .same_queue(&ferrymq::Config::from_url(b).unwrap())
    };
    assert!(same("memory://a?visibility=1s", "memory://a"));
    assert!(!same("memory://a", "memory://b"));
    #[cfg(feature = "redis")]
    {
        assert!(same(
            "redis://u:p@127.0.0.1:6379/orders-dlq",
            "redis://127.0.0.1:6379/orders-dlq?group=x"
        ));
        // Audit #15: spelled differently, the same queue.
        assert!(same(
            "redis://127.0.0.1/orders-dlq",
            "redis://127.0.0.1:6379/0/orders-dlq"
        ));
        assert!(!same(
            "redis://127.0.0.1:6379/orders-dlq",
            "redis://127.0.0.1:6380/orders-dlq"
        ));
        assert!(!same(
            "redis://127.0.0.1:6379/orders-dlq",
            "redis://127.0.0.1:6379/orders"
        ));
    }
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

async fn still_broken(_d: Delivery) -> Result<(), BoxError> {
    Err("still broken".into())
}

/// A target queue whose worker fails every message at once: each send lands in the
/// target, is received there and goes through a real `RetryToDlq(max_attempts = 1)`
/// back into the DLQ before `send` returns (a worker infinitely fast at failing).
struct Bouncing {
    target: Box<dyn Producer>,
    target_consumer: Box<dyn Consumer>,
    layer: RetryToDlqLayer,
}

#[async_trait::async_trait]
impl Producer for Bouncing {
    async fn send(&self, message: Message) -> ferrymq::Result<ferrymq::SendReceipt> {
        let receipt = self.target.send(message).await?;
        for d in self.target_consumer.receive(10, WAIT).await? {
            let _ = self.layer.layer(handler_fn(still_broken)).oneshot(d).await;
        }
        Ok(receipt)
    }
    async fn close(&self) -> ferrymq::Result<()> {
        self.target.close().await
    }
    async fn depth(&self) -> ferrymq::Result<ferrymq::Depth> {
        self.target.depth().await
    }
    fn queue(&self) -> &str {
        self.target.queue()
    }
    fn capabilities(&self) -> &ferrymq::Capabilities {
        self.target.capabilities()
    }
}

/// Audit #15: a target whose handler fails again puts every redriven message straight
/// back into the DLQ. A redrive that runs "until the DLQ is empty" never ends; one that
/// redrives a snapshot moves exactly the messages that were there when it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_into_a_failing_target_moves_the_snapshot_and_stops() {
    const N: usize = 5;
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(
        &source,
        &dlq,
        (0..N).map(|i| Message::new(i.to_string())).collect(),
    )
    .await;
    let target = Bouncing {
        target: producer(&source).await,
        target_consumer: consumer(&source).await,
        layer: RetryToDlqLayer::new(producer(&dlq).await).max_attempts(1),
    };
    let dlq_c = consumer(&dlq).await;
    // On a thread and runtime of its own, watched from this one: the in-process
    // queue never makes a receive wait, so a redrive that never stops would starve
    // any timer on its own runtime.
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let report = redrive(&*dlq_c, &target, &opts(), |_| {}).await;
            let _ = done.send((report, dlq_c.depth().await));
        });
    });
    let (report, depth) =
        tokio::task::spawn_blocking(move || finished.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("redrive did not stop: it keeps redriving what comes back");
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.moved, N, "exactly the snapshot");
    assert_eq!(
        depth.unwrap().waiting,
        N as u64,
        "the bounced copies are back in the DLQ, not redriven again"
    );
}

/// `dlq peek` must not spend a delivery attempt: after a peek, the next receive is
/// still the message's first attempt in the DLQ.
#[tokio::test]
async fn peek_spends_no_attempt() {
    let (source, dlq) = (unique("src"), unique("dlq"));
    dead_letter(&source, &dlq, vec![Message::new("1")]).await;
    let (shown, _) = peek_messages(&*admin(&dlq).await, 10, false).await.unwrap();
    assert_eq!(shown.len(), 1);
    let got = consumer(&dlq).await.receive(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].attempt(), 1, "peek counted as a delivery");
}
