use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tower::{Layer, ServiceBuilder, ServiceExt};

use super::dead_letter::parse_rfc3339;
use super::*;
use crate::memory::{MemoryConsumer, MemoryProducer};
use crate::middleware::outcome::{self, Outcome};
use crate::middleware::testing::{loose_delivery, loose_delivery_with, queue};
use crate::middleware::{handler_fn, json_handler, permanent, CatchPanicLayer};
use crate::worker::Worker;
use crate::{reserved, BoxError, Consumer, Delivery, Message, Producer, WorkerSummary};

const NOW: Duration = Duration::ZERO;

fn no_jitter(base_ms: u64) -> Backoff {
    Backoff::new(Duration::from_millis(base_ms)).jitter(0.0)
}

thread_local! {
    static EPOCH: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
}

/// Wall clock that follows tokio's paused clock (tests run on one thread each).
fn tokio_wall_clock() -> SystemTime {
    let now = tokio::time::Instant::now().into_std();
    let start = EPOCH.with(|e| {
        let start = e.get().unwrap_or(now);
        e.set(Some(start));
        start
    });
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + now.duration_since(start)
}

struct Setup {
    producer: MemoryProducer,
    consumer: MemoryConsumer,
    dlq: MemoryConsumer,
    dlq_producer: MemoryProducer,
}

fn setup(name: &str) -> Setup {
    let (producer, consumer) = queue(name).connect().unwrap();
    let (dlq_producer, dlq) = queue(&format!("{name}-dlq")).connect().unwrap();
    Setup {
        producer,
        consumer,
        dlq,
        dlq_producer,
    }
}

/// A handler failing its first `fail` calls (all of them when `u32::MAX`).
fn flaky(
    calls: Arc<AtomicU32>,
    fail: u32,
) -> impl tower::Service<Delivery, Response = (), Error = BoxError, Future = impl Send> + Clone + Send
{
    handler_fn(move |_d: Delivery| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < fail {
                return Err::<(), BoxError>(format!("gateway timeout #{}", n + 1).into());
            }
            Ok(())
        }
    })
}

async fn run_for<S>(consumer: MemoryConsumer, svc: S, secs: u64) -> WorkerSummary
where
    S: tower::Service<Delivery, Response = (), Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    Worker::new(consumer)
        .concurrency(4)
        .run_until(svc, tokio::time::sleep(Duration::from_secs(secs)))
        .await
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn poison_reaches_the_dlq_after_exactly_n_attempts_with_headers() {
    let s = setup("retry-poison");
    let receipt = s
        .producer
        .send(Message::new("poison").key("order-13").header("trace", "t1"))
        .await
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(3)
        .backoff(no_jitter(1000))
        .layer_with_clock(flaky(calls.clone(), u32::MAX), tokio_wall_clock);
    let summary = run_for(s.consumer.clone(), svc, 20).await;

    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "exactly max_attempts handler calls"
    );
    assert_eq!(
        (summary.retried, summary.dead_lettered, summary.failed),
        (2, 1, 0)
    );
    assert_eq!(
        s.producer.depth().await.unwrap().total(),
        0,
        "gone from the source"
    );
    let dead = s.dlq.receive(10, NOW).await.unwrap();
    assert_eq!(dead.len(), 1);
    let h = dead[0].headers();
    assert_eq!(dead[0].payload().as_ref(), b"poison");
    assert_eq!(dead[0].key(), Some("order-13"));
    assert_eq!(h.get("trace"), Some("t1"), "user headers kept");
    assert_eq!(h.get(reserved::FAILURE_REASON), Some("gateway timeout #3"));
    assert_eq!(h.get(reserved::ORIGIN_QUEUE), Some(s.producer.queue()));
    assert_eq!(h.get(reserved::ATTEMPTS), Some("3"));
    assert_eq!(h.get(reserved::ORIGIN_MESSAGE_ID), Some(receipt.id()));
    // Backoff 1 s then 2 s: the first failure was 3 s before the dead-lettering, which
    // shows it survived two redeliveries.
    let first = parse_rfc3339(h.get(reserved::FIRST_FAILURE_AT).unwrap()).unwrap();
    let dead_at = parse_rfc3339(h.get(reserved::DEAD_LETTERED_AT).unwrap()).unwrap();
    assert_eq!(
        dead_at.duration_since(first).unwrap(),
        Duration::from_secs(3)
    );
}

#[tokio::test(start_paused = true)]
async fn retries_wait_for_the_backoff_without_blocking_other_messages() {
    let s = setup("retry-nonblocking");
    s.producer.send(Message::new("bad")).await.unwrap();
    for i in 0..5 {
        s.producer
            .send(Message::new(format!("good-{i}")))
            .await
            .unwrap();
    }
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = handled.clone();
    let handler = handler_fn(move |d: Delivery| {
        let handled = h2.clone();
        async move {
            let body = String::from_utf8_lossy(d.payload()).into_owned();
            handled
                .lock()
                .unwrap()
                .push((body.clone(), tokio::time::Instant::now()));
            if body == "bad" {
                return Err::<(), BoxError>("nope".into());
            }
            Ok(())
        }
    });
    let start = tokio::time::Instant::now();
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(2)
        .backoff(no_jitter(60_000))
        .layer(handler);
    // Concurrency 1: a sleeping retry would hold up every good message for a minute.
    let summary = Worker::new(s.consumer.clone())
        .run_until(svc, tokio::time::sleep(Duration::from_secs(120)))
        .await
        .unwrap();
    let handled = handled.lock().unwrap();
    for (body, at) in handled.iter().filter(|(b, _)| b != "bad") {
        assert_eq!(at.duration_since(start), NOW, "{body} handled at once");
    }
    let bad: Vec<_> = handled
        .iter()
        .filter(|(b, _)| b == "bad")
        .map(|(_, at)| at.duration_since(start))
        .collect();
    assert_eq!(
        bad,
        [NOW, Duration::from_secs(60)],
        "redelivered by the broker after the backoff"
    );
    assert_eq!(
        (summary.succeeded, summary.retried, summary.dead_lettered),
        (5, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failure_then_success_is_handled_once_and_not_dead_lettered() {
    let s = setup("retry-transient");
    s.producer.send(Message::new("order-3")).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(3)
        .backoff(no_jitter(100))
        .layer(flaky(calls.clone(), 2));
    let summary = run_for(s.consumer.clone(), svc, 5).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        (summary.retried, summary.succeeded, summary.dead_lettered),
        (2, 1, 0)
    );
    assert!(s.dlq.receive(10, NOW).await.unwrap().is_empty());
    assert_eq!(s.producer.depth().await.unwrap().total(), 0);
}

#[tokio::test(start_paused = true)]
async fn permanent_and_undecodable_go_to_the_dlq_at_once() {
    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        id: u64,
    }
    let s = setup("retry-permanent");
    s.producer.send(Message::new("{not json")).await.unwrap();
    s.producer.send(Message::new(r#"{"id": 1}"#)).await.unwrap();
    let svc = ServiceBuilder::new()
        .layer(RetryToDlqLayer::new(s.dlq_producer.clone()).max_attempts(10))
        .service(json_handler(|_o: Order, _d: Delivery| async {
            Err::<(), BoxError>(permanent("customer does not exist"))
        }));
    let summary = run_for(s.consumer.clone(), svc, 1).await;
    assert_eq!((summary.retried, summary.dead_lettered), (0, 2));
    let dead = s.dlq.receive(10, NOW).await.unwrap();
    let reasons: Vec<_> = dead
        .iter()
        .map(|d| {
            d.headers()
                .get(reserved::FAILURE_REASON)
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(reasons[0].starts_with("decode error"), "{reasons:?}");
    assert_eq!(reasons[1], "customer does not exist");
    assert!(dead
        .iter()
        .all(|d| d.headers().get(reserved::ATTEMPTS) == Some("1")));
}

#[tokio::test(start_paused = true)]
async fn a_failed_dlq_publish_acks_nothing_and_is_retried() {
    let (producer, consumer) = queue("retry-dlq-full").connect().unwrap();
    let dlq_cfg = queue("retry-dlq-full-dlq").capacity(1);
    let (dlq_producer, dlq) = dlq_cfg.connect().unwrap();
    dlq_producer.send(Message::new("occupant")).await.unwrap(); // DLQ now full
    producer.send(Message::new("poison")).await.unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryToDlqLayer::new(dlq_producer.clone())
        .max_attempts(1)
        .backoff(no_jitter(1000))
        .layer(flaky(calls.clone(), u32::MAX));

    let d = consumer.receive(1, NOW).await.unwrap().remove(0);
    let (result, recorded) = outcome::scope(svc.clone().oneshot(d.clone())).await;
    let err = result.unwrap_err();
    assert!(err.to_string().contains("dead-lettering"), "{err}");
    assert_eq!(recorded, Some(Outcome::Failed));
    assert!(!d.acker().is_acked(), "not acked while the DLQ refuses");
    assert_eq!(
        producer.depth().await.unwrap().total(),
        1,
        "still in the source"
    );

    // Once the DLQ has room, the redelivery is dead-lettered.
    dlq.receive(1, NOW).await.unwrap()[0].ack().await.unwrap();
    let d = consumer
        .receive(1, Duration::from_secs(5))
        .await
        .unwrap()
        .remove(0);
    let (_, recorded) = outcome::scope(svc.oneshot(d.clone())).await;
    assert_eq!(recorded, Some(Outcome::DeadLettered));
    assert!(d.acker().is_acked());
    assert_eq!(
        dlq.receive(1, NOW).await.unwrap()[0].payload().as_ref(),
        b"poison"
    );
}

#[tokio::test(start_paused = true)]
async fn panics_are_retried_then_dead_lettered() {
    let s = setup("retry-panic");
    s.producer.send(Message::new("boom")).await.unwrap();
    let svc = ServiceBuilder::new()
        .layer(
            RetryToDlqLayer::new(s.dlq_producer.clone())
                .max_attempts(2)
                .backoff(no_jitter(10)),
        )
        .layer(CatchPanicLayer::new())
        .service(handler_fn(|_d: Delivery| async {
            if true {
                panic!("index out of bounds");
            }
            Ok::<(), BoxError>(())
        }));
    let summary = run_for(s.consumer.clone(), svc, 1).await;
    assert_eq!(
        (summary.retried, summary.dead_lettered, summary.panics),
        (1, 1, 2)
    );
    let dead = s.dlq.receive(1, NOW).await.unwrap();
    assert_eq!(
        dead[0].headers().get(reserved::FAILURE_REASON),
        Some("handler panicked: index out of bounds")
    );
}

#[tokio::test(start_paused = true)]
async fn first_failure_header_from_a_redrive_is_kept() {
    let s = setup("retry-redrive");
    s.producer
        .send(Message::new("again").header(reserved::FIRST_FAILURE_AT, "2020-01-02T03:04:05.678Z"))
        .await
        .unwrap();
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(1)
        .layer(flaky(Arc::default(), u32::MAX));
    run_for(s.consumer.clone(), svc, 1).await;
    let dead = s.dlq.receive(1, NOW).await.unwrap();
    assert_eq!(
        dead[0].headers().get(reserved::FIRST_FAILURE_AT),
        Some("2020-01-02T03:04:05.678Z")
    );
}

/// A backend that does not count attempts (always 1) still dead-letters after
/// `max_attempts` failures seen by this process.
#[tokio::test(start_paused = true)]
async fn attempts_are_counted_locally_when_the_backend_does_not() {
    let s = setup("retry-local-count");
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(3)
        .backoff(no_jitter(1))
        .layer(flaky(Arc::default(), u32::MAX));
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let (d, counts) = loose_delivery(Message::new("same"), "id-1", 1);
        let (_, o) = outcome::scope(svc.clone().oneshot(d)).await;
        outcomes.push((
            o,
            counts.acks.load(Ordering::SeqCst),
            counts.nacks.load(Ordering::SeqCst),
        ));
    }
    let retried = Some(Outcome::Retried {
        after: Duration::from_millis(1),
    });
    assert_eq!(outcomes[0], (retried, 0, 1));
    assert_eq!(
        outcomes[1].0,
        Some(Outcome::Retried {
            after: Duration::from_millis(2)
        })
    );
    assert_eq!(outcomes[2], (Some(Outcome::DeadLettered), 1, 0));
    assert_eq!(
        s.dlq.receive(1, NOW).await.unwrap()[0]
            .headers()
            .get(reserved::ATTEMPTS),
        Some("3")
    );
}

/// The copy a redrive sends back to the work queue (what `ferry dlq redrive` does,
/// with the dedup id restored from the dead-letter header).
fn redrive_copy(dead: &Delivery) -> Message {
    restore_origin_dedup_id(dead.message().clone())
}

/// #1: a message redriven from the DLQ that fails again while the DLQ still remembers
/// its dedup id was acked at the source and dropped by the DLQ: in neither queue.
#[tokio::test(start_paused = true)]
async fn a_redriven_message_that_fails_again_is_dead_lettered_again() {
    let s = setup("retry-redrive-window");
    s.producer
        .send(Message::new("order 7").dedup_id("order-7"))
        .await
        .unwrap();
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(1)
        .layer(flaky(Arc::default(), u32::MAX));
    // t = 200 s: the first failure; the DLQ's 5 min window starts now.
    tokio::time::advance(Duration::from_secs(200)).await;
    let d = s.consumer.receive(1, NOW).await.unwrap().remove(0);
    let (_, o) = outcome::scope(svc.clone().oneshot(d)).await;
    assert_eq!(o, Some(Outcome::DeadLettered));
    let dead = s.dlq.receive(1, NOW).await.unwrap().remove(0);
    assert_eq!(
        dead.message().get_dedup_id(),
        None,
        "the DLQ copy has no dedup id"
    );
    assert_eq!(
        dead.headers().get(reserved::ORIGIN_DEDUP_ID),
        Some("order-7"),
        "it travels in a header"
    );
    // t = 350 s: the source's window is over, the DLQ's is not. Redrive it.
    tokio::time::advance(Duration::from_secs(150)).await;
    let copy = redrive_copy(&dead);
    assert_eq!(copy.get_dedup_id(), Some("order-7"), "restored on redrive");
    assert!(!s.producer.send(copy).await.unwrap().is_duplicate());
    dead.ack().await.unwrap();
    // It fails again.
    let d = s.consumer.receive(1, NOW).await.unwrap().remove(0);
    let (_, o) = outcome::scope(svc.clone().oneshot(d)).await;
    assert_eq!(o, Some(Outcome::DeadLettered));
    assert_eq!(s.producer.depth().await.unwrap().total(), 0);
    let again = s.dlq.receive(10, NOW).await.unwrap();
    assert_eq!(
        again.len(),
        1,
        "dead-lettered a second time, not dropped by the DLQ's dedup window"
    );
    assert_eq!(again[0].payload().as_ref(), b"order 7");
    assert_eq!(
        again[0].headers().get(reserved::ORIGIN_DEDUP_ID),
        Some("order-7")
    );
}

/// A DLQ producer that accepts everything and drops it as a duplicate.
#[derive(Debug)]
struct DroppingDlq(crate::Capabilities);

#[async_trait::async_trait]
impl Producer for DroppingDlq {
    async fn send(&self, _: Message) -> crate::Result<crate::SendReceipt> {
        Ok(crate::SendReceipt::duplicate("seen-before"))
    }
    async fn close(&self) -> crate::Result<()> {
        Ok(())
    }
    async fn depth(&self) -> crate::Result<crate::Depth> {
        Ok(crate::Depth::default())
    }
    fn queue(&self) -> &str {
        "dropping-dlq"
    }
    fn capabilities(&self) -> &crate::Capabilities {
        &self.0
    }
}

/// #1: a `duplicate` receipt from the DLQ means the copy is not there: never ack.
#[tokio::test(start_paused = true)]
async fn a_duplicate_receipt_from_the_dlq_is_a_failed_publish() {
    let svc = RetryToDlqLayer::new(DroppingDlq(crate::Capabilities::minimal("dropping")))
        .max_attempts(1)
        .backoff(no_jitter(2000))
        .layer(flaky(Arc::default(), u32::MAX));
    let (d, acks) = loose_delivery(Message::new("x").dedup_id("order-1"), "m1", 1);
    let (result, o) = outcome::scope(svc.oneshot(d.clone())).await;
    let err = result.unwrap_err();
    assert!(err.to_string().contains("duplicate"), "{err}");
    assert!(err.to_string().contains("dead-lettering"), "{err}");
    assert_eq!(o, Some(Outcome::Failed));
    assert_eq!(acks.acks.load(Ordering::SeqCst), 0, "not acked");
    assert_eq!(
        acks.nack_delays(),
        vec![Some(Duration::from_secs(2))],
        "nacked with backoff"
    );
}

/// #4: two different orders with byte-identical payloads and no dedup id must not
/// share a failure count: each gets its own `max_attempts`.
#[tokio::test(start_paused = true)]
async fn identical_payloads_do_not_share_a_failure_count() {
    let s = setup("retry-identical");
    for _ in 0..2 {
        s.producer
            .send(Message::new(r#"{"sku":"A1","qty":1}"#))
            .await
            .unwrap();
    }
    let calls = Arc::new(AtomicU32::new(0));
    let c2 = calls.clone();
    // Every message fails its first two attempts and succeeds on the third.
    let handler = handler_fn(move |d: Delivery| {
        c2.fetch_add(1, Ordering::SeqCst);
        async move {
            if d.attempt() < 3 {
                return Err::<(), BoxError>("gateway timeout".into());
            }
            Ok(())
        }
    });
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(3)
        .backoff(no_jitter(100))
        .layer(handler);
    let summary = run_for(s.consumer.clone(), svc, 10).await;
    assert_eq!(
        (summary.succeeded, summary.retried, summary.dead_lettered),
        (2, 4, 0),
        "{summary}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert!(s.dlq.receive(10, NOW).await.unwrap().is_empty());
}

fn caps(f: impl FnOnce(&mut crate::Capabilities)) -> crate::Capabilities {
    let mut c = crate::Capabilities::minimal("caps-test");
    c.max_nack_delay = Some(Duration::from_secs(3600));
    c.attempts = crate::Attempts::Exact;
    f(&mut c);
    c
}

/// #8: the backoff is capped at the backend's longest nack delay.
#[tokio::test(start_paused = true)]
async fn backoff_is_capped_at_the_backends_max_nack_delay() {
    let s = setup("retry-cap");
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(5)
        .backoff(no_jitter(10_000))
        .layer(flaky(Arc::default(), u32::MAX));
    let limited = caps(|c| c.max_nack_delay = Some(Duration::from_secs(2)));
    let (d, acks) = loose_delivery_with(Message::new("x"), "m1", 1, limited);
    let (_, o) = outcome::scope(svc.clone().oneshot(d)).await;
    assert_eq!(
        o,
        Some(Outcome::Retried {
            after: Duration::from_secs(2)
        })
    );
    assert_eq!(acks.nack_delays(), vec![Some(Duration::from_secs(2))]);
    // Without capabilities, full support is assumed.
    let (d, acks) = loose_delivery(Message::new("y"), "m2", 1);
    svc.oneshot(d).await.unwrap_err();
    assert_eq!(acks.nack_delays(), vec![Some(Duration::from_secs(10))]);
}

/// #8: a backend that cannot delay a nack gets a plain nack (redelivered at once,
/// still counted as an attempt), not a delayed one it would refuse.
#[tokio::test(start_paused = true)]
async fn without_nack_delay_a_retry_is_an_immediate_nack() {
    let s = setup("retry-no-delay");
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(5)
        .backoff(no_jitter(1000))
        .layer(flaky(Arc::default(), u32::MAX));
    let (d, acks) = loose_delivery_with(
        Message::new("x"),
        "m1",
        1,
        caps(|c| c.max_nack_delay = None),
    );
    let (_, o) = outcome::scope(svc.oneshot(d.clone())).await;
    assert_eq!(o, Some(Outcome::Retried { after: NOW }));
    assert_eq!(acks.nack_delays(), vec![None]);
    assert!(d.acker().is_settled() && !d.acker().is_acked());
}

/// Wraps a memory consumer to look like a backend that neither counts attempts nor
/// delays nacks (every delivery says attempt 1, a delayed nack is refused as the
/// contract says): a retry loop there is bounded only by the middleware.
struct Forgetful {
    inner: MemoryConsumer,
    caps: Arc<crate::Capabilities>,
}

#[derive(Debug)]
struct NoDelayAck(crate::AckHandle);

#[async_trait::async_trait]
impl crate::Ack for NoDelayAck {
    async fn ack(&self) -> crate::Result<()> {
        self.0.ack().await
    }
    async fn nack(&self, after: Option<Duration>) -> crate::Result<()> {
        if after.is_some_and(|d| !d.is_zero()) {
            return Err(crate::Error::unsupported("cannot delay a redelivery"));
        }
        self.0.nack(None).await
    }
    async fn extend(&self, by: Duration) -> crate::Result<()> {
        self.0.extend(by).await
    }
}

#[async_trait::async_trait]
impl Consumer for Forgetful {
    async fn receive(&self, max: usize, wait: Duration) -> crate::Result<Vec<Delivery>> {
        let got = self.inner.receive(max, wait).await?;
        Ok(got
            .into_iter()
            .map(|d| {
                let (message, mut meta, acker) = d.into_parts();
                meta.attempt = 1;
                Delivery::new(message, meta, crate::AckHandle::new(NoDelayAck(acker)))
                    .with_capabilities(self.caps.clone())
            })
            .collect())
    }
    async fn depth(&self) -> crate::Result<crate::Depth> {
        self.inner.depth().await
    }
    async fn close(&self) -> crate::Result<()> {
        self.inner.close().await
    }
    fn queue(&self) -> &str {
        self.inner.queue()
    }
    fn capabilities(&self) -> &crate::Capabilities {
        &self.caps
    }
}

/// #8: attempts untracked and no nack delay: the message comes straight back as
/// "attempt 1" every time. The failure table still stops it after `max_attempts`.
#[tokio::test(start_paused = true)]
async fn untracked_attempts_without_nack_delay_still_reach_the_dlq() {
    let s = setup("retry-forgetful");
    s.producer.send(Message::new("poison")).await.unwrap();
    let consumer = Forgetful {
        inner: s.consumer.clone(),
        caps: Arc::new(caps(|c| {
            c.attempts = crate::Attempts::Untracked;
            c.max_nack_delay = None;
        })),
    };
    let calls = Arc::new(AtomicU32::new(0));
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(3)
        .backoff(no_jitter(1000))
        .layer(flaky(calls.clone(), u32::MAX));
    let summary = Worker::new(consumer)
        .run_until(svc, tokio::time::sleep(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "bounded by max_attempts");
    assert_eq!(
        (summary.retried, summary.dead_lettered, summary.failed),
        (2, 1, 0),
        "{summary}"
    );
    assert_eq!(s.producer.depth().await.unwrap().total(), 0);
    let dead = s.dlq.receive(1, NOW).await.unwrap();
    assert_eq!(dead[0].headers().get(reserved::ATTEMPTS), Some("3"));
}

/// Counts WARN events that carry a field named `field`.
struct CountWarnings {
    field: &'static str,
    count: Arc<AtomicU32>,
}

impl tracing::Subscriber for CountWarnings {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN
            && event.metadata().fields().field(self.field).is_some()
        {
            self.count.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// #8: with a native dead-letter threshold of n, `max_attempts` above n is lowered to
/// n — the middleware dead-letters on delivery n, before the broker moves the message
/// without headers — and this is logged once, not per message.
#[tokio::test(start_paused = true)]
async fn max_attempts_is_clamped_to_the_native_dead_letter_threshold() {
    let warnings = Arc::new(AtomicU32::new(0));
    let _guard = tracing::subscriber::set_default(CountWarnings {
        field: "native_dead_letter_after",
        count: warnings.clone(),
    });
    let s = setup("retry-native");
    let svc = RetryToDlqLayer::new(s.dlq_producer.clone())
        .max_attempts(5)
        .backoff(no_jitter(10))
        .layer(flaky(Arc::default(), u32::MAX));
    let native = caps(|c| c.native_dead_letter_after = Some(2));
    for m in ["a", "b"] {
        let (d1, _) = loose_delivery_with(Message::new(m), m, 1, native.clone());
        let (_, o) = outcome::scope(svc.clone().oneshot(d1)).await;
        assert!(matches!(o, Some(Outcome::Retried { .. })), "{o:?}");
        let (d2, acks) = loose_delivery_with(Message::new(m), m, 2, native.clone());
        let (_, o) = outcome::scope(svc.clone().oneshot(d2)).await;
        assert_eq!(
            o,
            Some(Outcome::DeadLettered),
            "dead-lettered on delivery 2 of 5"
        );
        assert_eq!(acks.acks.load(Ordering::SeqCst), 1);
    }
    let dead = s.dlq.receive(10, NOW).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead
        .iter()
        .all(|d| d.headers().get(reserved::ATTEMPTS) == Some("2")));
    assert_eq!(warnings.load(Ordering::SeqCst), 1, "warned once");
    // A threshold above max_attempts changes nothing.
    let high = caps(|c| c.native_dead_letter_after = Some(10));
    let (d, _) = loose_delivery_with(Message::new("c"), "c", 4, high);
    let (_, o) = outcome::scope(svc.clone().oneshot(d)).await;
    assert!(matches!(o, Some(Outcome::Retried { .. })), "{o:?}");
}

/// A backend that dead-letters on the nack itself (Redis `max_deliveries`) records
/// `DeadLettered`; the retry layer's nack must not overwrite it with `Retried`.
#[tokio::test]
async fn a_native_dead_letter_on_the_retry_nack_is_not_reported_as_retried() {
    #[derive(Debug)]
    struct DeadLettersOnNack;
    #[async_trait::async_trait]
    impl crate::Ack for DeadLettersOnNack {
        async fn ack(&self) -> crate::Result<()> {
            Ok(())
        }
        async fn nack(&self, _: Option<Duration>) -> crate::Result<()> {
            outcome::record(Outcome::DeadLettered);
            Ok(())
        }
        async fn extend(&self, _: Duration) -> crate::Result<()> {
            Ok(())
        }
    }
    let dlq = queue("retry-native-dlq").producer().unwrap();
    let meta = crate::DeliveryMeta::new("m-1", 1, SystemTime::now(), "native".into());
    let delivery = Delivery::new(
        Message::new("poison"),
        meta,
        crate::AckHandle::new(DeadLettersOnNack),
    );
    let svc = RetryToDlqLayer::new(dlq.clone())
        .max_attempts(5)
        .layer(handler_fn(|_d: Delivery| async move {
            Err::<(), BoxError>("always fails".into())
        }));
    let (result, recorded) = outcome::scope(svc.oneshot(delivery)).await;
    assert!(result.is_err());
    assert_eq!(recorded, Some(Outcome::DeadLettered));
    assert_eq!(
        dlq.depth().await.unwrap().total(),
        0,
        "not dead-lettered twice"
    );
}
