//! The job side on the memory backend, on a paused clock.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tower::{Layer, ServiceBuilder};

use super::*;
use crate::middleware::testing::queue;
use crate::middleware::{handler_fn, Backoff, RetryToDlqLayer};
use crate::{BoxError, Delivery, Message, Producer, Worker};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    fail_until: u32,
}

#[derive(serde::Serialize)]
struct Invoice {
    order: u64,
    total: u64,
}

fn order(id: u64, fail_until: u32) -> Message {
    Message::json(&json!({ "id": id, "fail_until": fail_until }))
        .unwrap()
        .job_id(format!("order-{id}"))
}

/// A handler reporting progress 50 and returning an invoice, failing its first
/// `fail_until` attempts.
fn invoicer() -> JobJson<
    impl FnMut(
            Order,
            Delivery,
        )
            -> futures::future::BoxFuture<'static, std::result::Result<Invoice, BoxError>>
        + Clone,
    Order,
> {
    json_job_handler(|o: Order, d: Delivery| {
        Box::pin(async move {
            progress(json!({ "step": "pricing", "pct": 50 })).await;
            if d.attempt() <= o.fail_until {
                return Err::<Invoice, BoxError>(format!("attempt {} fails", d.attempt()).into());
            }
            Ok(Invoice {
                order: o.id,
                total: o.id * 10,
            })
        }) as futures::future::BoxFuture<'static, _>
    })
}

#[tokio::test(start_paused = true)]
async fn completed_failed_and_dead_lettered_jobs_with_results_progress_and_events() {
    let cfg = queue("jobs-life");
    let (p, c) = cfg.connect().unwrap();
    let dlq = queue("jobs-life-dlq").producer().unwrap();
    let store = MemoryJobStore::new(cfg.queue.clone());
    let mut events = store.subscribe().await.unwrap();

    send(&p, &store, order(1, 0)).await.unwrap();
    send(&p, &store, order(2, 1)).await.unwrap();
    send(&p, &store, order(3, 99)).await.unwrap();
    let waiting = store.get("order-1").await.unwrap().unwrap();
    assert_eq!((waiting.state, waiting.attempts), (JobState::Waiting, 0));

    let service = ServiceBuilder::new()
        .layer(
            TrackJobsLayer::new(store.clone())
                .keep_completed(Keep::Count(10))
                .keep_failed(Keep::Count(10)),
        )
        .layer(
            RetryToDlqLayer::new(dlq)
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_millis(100))),
        )
        .service(invoicer());
    let summary = Worker::new(c)
        .concurrency(3)
        .run_until(service, tokio::time::sleep(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(
        (summary.succeeded, summary.dead_lettered),
        (2, 1),
        "{summary}"
    );

    let one = store.get("order-1").await.unwrap().unwrap();
    assert_eq!(one.state, JobState::Completed);
    assert_eq!(one.attempts, 1);
    assert_eq!(one.result, Some(json!({ "order": 1, "total": 10 })));
    assert_eq!(one.progress, Some(json!({ "step": "pricing", "pct": 50 })));
    assert!(one.started_at.is_some() && one.finished_at.is_some());
    let two = store.get("order-2").await.unwrap().unwrap();
    assert_eq!((two.state, two.attempts), (JobState::Completed, 2));
    assert_eq!(
        two.failure.as_deref(),
        Some("attempt 1 fails"),
        "the last failure stays readable"
    );
    let three = store.get("order-3").await.unwrap().unwrap();
    assert_eq!((three.state, three.attempts), (JobState::DeadLettered, 3));
    assert_eq!(three.failure.as_deref(), Some("attempt 3 fails"));
    assert_eq!(three.result, None);

    let counts = store.counts().await.unwrap();
    assert_eq!(
        (
            counts.waiting,
            counts.active,
            counts.completed,
            counts.dead_lettered
        ),
        (0, 0, 2, 1)
    );

    // The events, per job, in order.
    let mut seen: Vec<(String, String)> = Vec::new();
    while let Some(Some(event)) = events.next().now_or_never() {
        let event = event.unwrap();
        // Every event of a delivery carries its attempt; order-2 fails attempt 1.
        if event.id == "order-2" && event.kind.name() != "waiting" {
            let retried = seen.iter().any(|(i, k)| i == "order-2" && k == "retried");
            assert_eq!(event.attempt, if retried { 2 } else { 1 }, "{event:?}");
        }
        seen.push((event.id.clone(), event.kind.name().to_string()));
        if let JobEventKind::Completed { result } = &event.kind {
            assert!(result.is_some(), "a completed event carries the result");
        }
    }
    let of = |id: &str| -> Vec<&str> {
        seen.iter()
            .filter(|(i, _)| i == id)
            .map(|(_, k)| k.as_str())
            .collect()
    };
    assert_eq!(
        of("order-1"),
        ["waiting", "active", "progress", "completed"]
    );
    assert_eq!(
        of("order-2"),
        [
            "waiting",
            "active",
            "progress",
            "retried",
            "active",
            "progress",
            "completed"
        ]
    );
    assert_eq!(
        of("order-3"),
        [
            "waiting",
            "active",
            "progress",
            "retried",
            "active",
            "progress",
            "retried",
            "active",
            "progress",
            "dead_lettered"
        ]
    );
}

use futures::FutureExt;

#[tokio::test(start_paused = true)]
async fn nothing_is_kept_by_default_and_a_header_overrides_the_queue() {
    let cfg = queue("jobs-keep");
    let (p, c) = cfg.connect().unwrap();
    let store = MemoryJobStore::new(cfg.queue.clone());
    p.send(Message::new("a").job_id("dropped")).await.unwrap();
    p.send(
        Message::new("b")
            .job_id("kept")
            .keep_completed(Keep::Age(Duration::from_secs(60))),
    )
    .await
    .unwrap();
    let service =
        TrackJobsLayer::new(store.clone()).layer(tower::service_fn(|_d: Delivery| async {
            Ok::<_, BoxError>(json!("done"))
        }));
    Worker::new(c)
        .run_until(service, tokio::time::sleep(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(
        store.get("dropped").await.unwrap(),
        None,
        "default keeps nothing"
    );
    let kept = store.get("kept").await.unwrap().unwrap();
    assert_eq!(kept.state, JobState::Completed);
    assert_eq!(
        kept.result,
        Some(json!("done")),
        "a handler's response is the result"
    );
    assert_eq!(store.counts().await.unwrap().completed, 1);
    // The age runs out on tokio's clock.
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(store.get("kept").await.unwrap(), None, "gone after its age");
    assert_eq!(store.counts().await.unwrap().completed, 0);
}

#[tokio::test(start_paused = true)]
async fn count_retention_keeps_the_newest_and_the_cap_bounds_every_policy() {
    let store = MemoryJobStore::with_max_per_state("jobs-cap", 5);
    for i in 0..20 {
        store
            .record(JobUpdate::new(format!("c{i}"), JobState::Completed, 1).keep(Keep::Count(3)))
            .await
            .unwrap();
        store
            .record(
                JobUpdate::new(format!("f{i}"), JobState::Failed, 1)
                    .keep(Keep::Age(Duration::from_secs(365 * 24 * 3600))),
            )
            .await
            .unwrap();
        // Active records of crashed workers are bounded too.
        store
            .record(JobUpdate::new(format!("a{i}"), JobState::Active, 1))
            .await
            .unwrap();
    }
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.completed, counts.failed, counts.active), (3, 5, 5));
    let newest: Vec<String> = store
        .list(JobState::Completed, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        newest,
        ["c19", "c18", "c17"],
        "newest first, oldest trimmed"
    );
    assert!(
        store.get("f0").await.unwrap().is_none(),
        "the cap trims the oldest"
    );
    assert!(store.get("f19").await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_send_never_turns_an_active_job_back_into_waiting() {
    let store = MemoryJobStore::new("jobs-race");
    store
        .record(JobUpdate::new("j", JobState::Active, 1))
        .await
        .unwrap();
    store
        .record(JobUpdate::new("j", JobState::Waiting, 0).only_if_new())
        .await
        .unwrap();
    assert_eq!(
        store.get("j").await.unwrap().unwrap().state,
        JobState::Active
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_without_retry_layer_is_failed_and_comes_back() {
    let cfg = queue("jobs-fail");
    let (p, c) = cfg.connect().unwrap();
    let store = MemoryJobStore::new(cfg.queue.clone());
    p.send(Message::new("x").job_id("f").keep_failed(Keep::Count(5)))
        .await
        .unwrap();
    let service = TrackJobsLayer::new(store.clone()).layer(handler_fn(|d: Delivery| async move {
        if d.attempt() == 1 {
            Err::<(), BoxError>("boom".into())
        } else {
            Ok(())
        }
    }));
    let worker = Worker::new(c).nack_delay(Some(Duration::from_secs(5)));
    let run = tokio::spawn(worker.run_until(service, tokio::time::sleep(Duration::from_secs(10))));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed = store.get("f").await.unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.failure.as_deref(), Some("boom"));
    run.await.unwrap().unwrap();
    // Completed with the default `none`: the record goes, though failed was kept.
    assert_eq!(store.get("f").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn progress_and_result_outside_a_tracked_handler_do_nothing() {
    progress(10).await;
    set_result(json!(1)).unwrap();
    assert!(current().is_none());
}

#[tokio::test(start_paused = true)]
async fn named_stores_are_shared_in_the_process() {
    let a = MemoryJobStore::named("jobs-named-shared");
    let b = MemoryJobStore::named("jobs-named-shared");
    a.record(JobUpdate::new("x", JobState::Active, 1))
        .await
        .unwrap();
    assert!(b.get("x").await.unwrap().is_some());
    assert!(MemoryJobStore::named("jobs-named-other")
        .get("x")
        .await
        .unwrap()
        .is_none());
}

#[test]
fn keep_reads_none_counts_and_ages() {
    assert_eq!("none".parse::<Keep>().unwrap(), Keep::None);
    assert_eq!("0".parse::<Keep>().unwrap(), Keep::None);
    assert_eq!("100".parse::<Keep>().unwrap(), Keep::Count(100));
    assert_eq!(
        "1h".parse::<Keep>().unwrap(),
        Keep::Age(Duration::from_secs(3600))
    );
    let e = "lots".parse::<Keep>().unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::InvalidConfig);
    assert!(e.to_string().contains("keep"), "{e}");
    for k in [
        Keep::None,
        Keep::Count(7),
        Keep::Age(Duration::from_secs(90)),
    ] {
        assert_eq!(k.to_string().parse::<Keep>().unwrap(), k);
    }
    assert_eq!(
        "dead_lettered".parse::<JobState>().unwrap(),
        JobState::DeadLettered
    );
    assert!("nope".parse::<JobState>().is_err());
}

#[test]
fn events_serialize_with_an_event_tag() {
    let e = JobUpdate::new("j", JobState::Completed, 2)
        .result(Some(json!({"ok": true})))
        .event("q");
    let v = serde_json::to_value(&e).unwrap();
    assert_eq!(v["event"], "completed");
    assert_eq!(v["result"], json!({"ok": true}));
    assert_eq!(v["id"], "j");
    let back: JobEvent = serde_json::from_value(v).unwrap();
    assert_eq!(back.kind, e.kind);
}

/// A job id: the header, else the dedup id, else the backend's id.
#[test]
fn job_ids() {
    let m = Message::new("x");
    assert_eq!(job_id_of(&m, Some("7")), Some("7"));
    let m = m.dedup_id("d");
    assert_eq!(job_id_of(&m, Some("7")), Some("d"));
    let m = m.job_id("j");
    assert_eq!(job_id_of(&m, Some("7")), Some("j"));
    assert_eq!(job_id_of(&Message::new("x"), Some("")), None);
    // The headers pass a send's validation.
    m.validate(1 << 20).unwrap();
    Message::new("x")
        .keep_completed(Keep::Count(1))
        .keep_failed(Keep::None)
        .validate(1 << 20)
        .unwrap();
}

/// `send` takes trait objects, and its future crosses `tokio::spawn`.
#[allow(dead_code)]
fn send_takes_trait_objects_and_is_send(p: &dyn Producer, s: &dyn JobStore) {
    fn assert_send<T: Send>(_: T) {}
    assert_send(send(p, s, Message::new("x")));
}

mod flows {
    use super::*;
    use crate::jobs::flow::{decode_message, encode_message};
    use crate::{Consumer, Producer};
    use std::sync::Arc;
    use tokio::sync::Notify;

    #[derive(serde::Deserialize, serde::Serialize)]
    struct Invoice {
        order: u64,
        part: u64,
    }

    /// Invoices complete with `{invoice: "INV-<order>-<part>"}`; part 2 of order 1
    /// waits for `gate`; order 9 always fails.
    fn invoicer(
        gate: Arc<Notify>,
    ) -> impl tower::Service<Delivery, Response = (), Error = BoxError, Future = impl Send> + Clone
    {
        json_job_handler(move |i: Invoice, _d: Delivery| {
            let gate = gate.clone();
            async move {
                if i.order == 1 && i.part == 2 {
                    gate.notified().await;
                }
                if i.order == 9 {
                    return Err::<serde_json::Value, BoxError>("card declined".into());
                }
                Ok(json!({ "invoice": format!("INV-{}-{}", i.order, i.part) }))
            }
        })
    }

    fn invoice(order: u64, part: u64) -> Message {
        Message::json(&Invoice { order, part })
            .unwrap()
            .job_id(format!("inv-{order}-{part}"))
    }

    #[tokio::test(start_paused = true)]
    async fn the_parent_runs_only_after_its_children_with_their_results() {
        let invoices = queue("flow-invoices");
        let emails = queue("flow-emails");
        let (inv_p, inv_c) = invoices.connect().unwrap();
        let (email_p, email_c) = emails.connect().unwrap();
        let dlq = queue("flow-dlq").producer().unwrap();
        let store = MemoryJobStore::new(invoices.queue.clone());

        for order in [1, 9] {
            Flow::new(
                format!("email-{order}"),
                emails.queue.clone(),
                Message::new(format!("mail {order}")),
            )
            .child(&inv_p, invoice(order, 1))
            .child(&inv_p, invoice(order, 2))
            .add(&store)
            .await
            .unwrap();
        }
        let gate = Arc::new(Notify::new());
        let service = ServiceBuilder::new()
            .layer(
                TrackJobsLayer::new(store.clone())
                    .keep_failed(Keep::Count(10))
                    .flows(email_p.clone()),
            )
            .layer(
                RetryToDlqLayer::new(dlq)
                    .max_attempts(2)
                    .backoff(Backoff::new(Duration::from_millis(10))),
            )
            .service(invoicer(gate.clone()));
        let run = tokio::spawn(
            Worker::new(inv_c)
                .concurrency(4)
                .run_until(service, tokio::time::sleep(Duration::from_secs(5))),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            email_c.depth().await.unwrap().total(),
            0,
            "one child still running: no parent yet"
        );
        assert!(
            store.get("inv-1-1").await.unwrap().is_none(),
            "completed children are not kept by default"
        );
        gate.notify_one();
        run.await.unwrap().unwrap();

        let parents = email_c.receive(10, Duration::ZERO).await.unwrap();
        assert_eq!(
            parents.len(),
            1,
            "order 9's parent failed with its child: never sent"
        );
        let parent = &parents[0];
        assert_eq!(parent.payload().as_ref(), b"mail 1");
        assert_eq!(job_id_of(parent.message(), None), Some("email-1"));
        let kids = children(parent).unwrap();
        assert_eq!(kids.results.len(), 2);
        assert_eq!(kids.results["inv-1-2"], json!({ "invoice": "INV-1-2" }));
        let typed: serde_json::Value = kids.get("inv-1-1").unwrap();
        assert_eq!(typed, json!({ "invoice": "INV-1-1" }));

        let failed = store.get("email-9").await.unwrap().unwrap();
        assert_eq!(failed.state, JobState::DeadLettered);
        assert!(failed.failure.unwrap().contains("card declined"));
    }

    /// A worker killed after recording the last child's result, or after sending
    /// the parent but before marking it: the child's redelivery completes the flow,
    /// and the parent is on its queue once.
    #[tokio::test(start_paused = true)]
    async fn a_crash_between_steps_loses_nothing_and_duplicates_nothing() {
        for sent_before_crash in [false, true] {
            let invoices = queue("flow-crash-invoices");
            let emails = queue("flow-crash-emails");
            let (inv_p, inv_c) = invoices.connect().unwrap();
            let (email_p, email_c) = emails.connect().unwrap();
            let store = MemoryJobStore::new(invoices.queue.clone());
            Flow::new("email-5", emails.queue.clone(), Message::new("mail 5"))
                .child(&inv_p, invoice(5, 1))
                .add(&store)
                .await
                .unwrap();
            // The first run: the child handled, its result recorded, then the crash.
            let release = store
                .child_done(
                    "email-5",
                    "inv-5-1",
                    ChildOutcome::Completed(Some(json!("first"))),
                )
                .await
                .unwrap();
            let Release::Send { message, .. } = release else {
                panic!("the last child releases the parent: {release:?}");
            };
            if sent_before_crash {
                email_p.send(message).await.unwrap();
            }
            // The child was never acked: it comes back and is handled again.
            let service = TrackJobsLayer::new(store.clone())
                .flows(email_p.clone())
                .layer(invoicer(Arc::new(Notify::new())));
            Worker::new(inv_c)
                .run_until(service, tokio::time::sleep(Duration::from_secs(1)))
                .await
                .unwrap();
            let parents = email_c.receive(10, Duration::ZERO).await.unwrap();
            assert_eq!(
                parents.len(),
                1,
                "sent before the crash: {sent_before_crash}"
            );
            // The flow is done: a late rerun of the child sends nothing more.
            assert_eq!(
                store
                    .child_done("email-5", "inv-5-1", ChildOutcome::Completed(None))
                    .await
                    .unwrap(),
                Release::Wait
            );
        }
    }

    #[tokio::test]
    async fn failure_policies() {
        let store = MemoryJobStore::new("flow-policies");
        let flow = |id: &str, policy| FlowRecord {
            parent: id.to_string(),
            parent_queue: "p".into(),
            message: Message::new("parent"),
            children: vec!["a".into(), "b".into()],
            on_child_failure: policy,
        };
        let failed = || ChildOutcome::Failed("no".into());
        let ok = || ChildOutcome::Completed(Some(json!(1)));
        store
            .create_flow(flow("fail", OnChildFailure::FailParent))
            .await
            .unwrap();
        store
            .create_flow(flow("ignore", OnChildFailure::Ignore))
            .await
            .unwrap();
        store
            .create_flow(flow("continue", OnChildFailure::Continue))
            .await
            .unwrap();

        assert!(matches!(
            store.child_done("fail", "a", failed()).await.unwrap(),
            Release::Failed { .. }
        ));
        assert_eq!(
            store.child_done("fail", "b", ok()).await.unwrap(),
            Release::Wait,
            "a failed flow is over"
        );

        assert_eq!(
            store.child_done("ignore", "a", failed()).await.unwrap(),
            Release::Wait
        );
        let Release::Send { message, .. } = store.child_done("ignore", "b", ok()).await.unwrap()
        else {
            panic!("ignore: the parent runs once the others are done");
        };
        let kids: FlowChildren = serde_json::from_str(
            message
                .headers()
                .get(crate::reserved::FLOW_CHILDREN)
                .unwrap(),
        )
        .unwrap();
        assert_eq!((kids.results.len(), kids.failed.len()), (1, 1));
        assert_eq!(message.get_dedup_id(), Some("flow:ignore"));

        assert!(
            matches!(
                store.child_done("continue", "a", failed()).await.unwrap(),
                Release::Send { .. }
            ),
            "continue: at once"
        );
        store.parent_sent("continue").await.unwrap();
        assert_eq!(
            store.child_done("continue", "b", ok()).await.unwrap(),
            Release::Wait
        );
        // Unknown flows and children wait.
        assert_eq!(
            store.child_done("nope", "a", ok()).await.unwrap(),
            Release::Wait
        );
    }

    #[tokio::test]
    async fn a_flow_needs_children_and_a_parent_survives_storage() {
        let store = MemoryJobStore::new("flow-empty");
        let e = Flow::new("p", "q", Message::new("x"))
            .add(&store)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidMessage);
        let m = Message::new(vec![0u8, 255, 7])
            .header("a", "b")
            .key("k")
            .priority(3)
            .dedup_id("d");
        assert_eq!(decode_message(&encode_message(&m)).unwrap(), m);
    }
}

#[tokio::test(start_paused = true)]
async fn oversized_progress_is_refused_and_an_oversized_result_is_not_kept() {
    let cfg = queue("jobs-big");
    let (p, c) = cfg.connect().unwrap();
    let store = MemoryJobStore::new(cfg.queue.clone());
    p.send(
        Message::new("x")
            .job_id("big")
            .keep_completed(Keep::Count(1)),
    )
    .await
    .unwrap();
    let refused = std::sync::Arc::new(std::sync::Mutex::new(None));
    let r2 = refused.clone();
    let big = "x".repeat(MAX_VALUE_BYTES + 1);
    let service =
        TrackJobsLayer::new(store.clone()).layer(tower::service_fn(move |_d: Delivery| {
            let (r2, big) = (r2.clone(), big.clone());
            async move {
                let job = current().unwrap();
                *r2.lock().unwrap() = job.progress(&big).await.err().map(|e| e.kind());
                Ok::<_, BoxError>(big)
            }
        }));
    Worker::new(c)
        .run_until(service, tokio::time::sleep(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(*refused.lock().unwrap(), Some(crate::ErrorKind::TooLarge));
    let job = store.get("big").await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.result, job.progress),
        (JobState::Completed, None, None)
    );
}

/// A store that refuses everything: tracking must not fail the deliveries.
#[derive(Debug)]
struct Broken;

#[async_trait::async_trait]
impl JobStore for Broken {
    fn queue(&self) -> &str {
        "broken"
    }
    async fn record(&self, _: JobUpdate) -> crate::Result<()> {
        Err(crate::Error::new(
            crate::ErrorKind::Connection,
            "store down",
        ))
    }
    async fn progress(&self, _: &str, _: u32, _: serde_json::Value) -> crate::Result<()> {
        Err(crate::Error::new(
            crate::ErrorKind::Connection,
            "store down",
        ))
    }
    async fn get(&self, _: &str) -> crate::Result<Option<JobRecord>> {
        Ok(None)
    }
    async fn list(&self, _: JobState, _: usize) -> crate::Result<Vec<JobRecord>> {
        Ok(Vec::new())
    }
    async fn counts(&self) -> crate::Result<StoredCounts> {
        Ok(StoredCounts::default())
    }
    async fn subscribe(&self) -> crate::Result<JobEvents> {
        Ok(Box::pin(futures::stream::empty()))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_never_fails_the_delivery() {
    let cfg = queue("jobs-broken");
    let (p, c) = cfg.connect().unwrap();
    p.send(order(1, 0)).await.unwrap();
    let service = TrackJobsLayer::new(Broken).layer(invoicer());
    let summary = Worker::new(c.clone())
        .run_until(service, tokio::time::sleep(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!((summary.succeeded, summary.failed), (1, 0), "{summary}");
    assert_eq!(
        crate::Consumer::depth(&c).await.unwrap().total(),
        0,
        "acked"
    );
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_skipped_by_dedup_leaves_the_original_record() {
    use crate::middleware::{DedupLayer, MemoryDedupStore};
    let cfg = queue("jobs-dedup");
    let (p, c) = cfg.connect().unwrap();
    let store = MemoryJobStore::new(cfg.queue.clone());
    p.send(order(1, 0).dedup_id("o-1")).await.unwrap();
    let service = ServiceBuilder::new()
        .layer(DedupLayer::new(MemoryDedupStore::new(Duration::from_secs(
            3600,
        ))))
        .layer(TrackJobsLayer::new(store.clone()).keep_completed(Keep::Count(10)))
        .service(invoicer());
    let worker = Worker::new(c);
    let run = tokio::spawn(worker.run_until(service, tokio::time::sleep(Duration::from_secs(600))));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = store.get("order-1").await.unwrap().unwrap();
    assert_eq!(first.state, JobState::Completed);
    // Past the broker's dedup window, the same order again: Dedup skips it.
    tokio::time::sleep(Duration::from_secs(400)).await;
    let mut events = store.subscribe().await.unwrap();
    p.send(order(1, 0).dedup_id("o-1")).await.unwrap();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(
        (summary.succeeded, summary.deduplicated),
        (1, 1),
        "{summary}"
    );
    assert_eq!(
        store.get("order-1").await.unwrap(),
        Some(first),
        "untouched"
    );
    assert!(
        events.next().now_or_never().flatten().is_none(),
        "no event for a skipped duplicate"
    );
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_that_falls_behind_is_told_how_much_it_missed() {
    let store = MemoryJobStore::new("jobs-lag");
    let mut events = store.subscribe().await.unwrap();
    for i in 0..1100 {
        store.progress("j", 1, json!(i)).await.unwrap();
    }
    let e = events.next().await.unwrap().unwrap_err();
    assert!(e.to_string().contains("missed 76 events"), "{e}");
    let next = events.next().await.unwrap().unwrap();
    assert_eq!(
        next.kind,
        JobEventKind::Progress { value: json!(76) },
        "then it goes on"
    );
}
