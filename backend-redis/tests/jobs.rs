//! The Redis job store against a real server: states, results, progress, retention,
//! bounds and cross-process events.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config, connect, raw};
use ferrymq_core::jobs::{
    self, json_job_handler, JobEventKind, JobMessage, JobState, JobStore, JobUpdate, Keep,
    TrackJobsLayer,
};
use ferrymq_core::middleware::{Backoff, RetryToDlqLayer};
use ferrymq_core::{BoxError, Delivery, ErrorKind, Message, Producer, Worker};
use ferrymq_redis::{RedisConfig, RedisJobStore};
use futures::StreamExt;
use serde_json::json;
use tower::{Layer, ServiceBuilder};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    fail_until: u32,
}

fn order(id: u64, fail_until: u32) -> Message {
    Message::json(&json!({ "id": id, "fail_until": fail_until }))
        .unwrap()
        .job_id(format!("order-{id}"))
}

#[tokio::test]
async fn a_worker_records_states_results_and_progress_that_another_process_reads_and_follows() {
    let (p, c, cfg) = connect("jobs-life", "visibility=2s").await;
    let dlq = config("jobs-life-dlq", "").producer().await.unwrap();
    // The worker's store and an observer's, on connections of their own.
    let store = c.job_store();
    let observer = RedisJobStore::connect(&cfg).await.unwrap();
    let mut events = observer.subscribe().await.unwrap();

    jobs::send(&p, &store, order(1, 0)).await.unwrap();
    jobs::send(&p, &store, order(2, 1)).await.unwrap();
    jobs::send(&p, &store, order(3, 99)).await.unwrap();
    let waiting = observer.get("order-1").await.unwrap().unwrap();
    assert_eq!((waiting.state, waiting.attempts), (JobState::Waiting, 0));
    assert_eq!(observer.counts().await.unwrap().waiting, 3);

    let service = ServiceBuilder::new()
        .layer(
            TrackJobsLayer::new(store.clone())
                .keep_completed(Keep::Count(10))
                .keep_failed(Keep::Count(10)),
        )
        .layer(
            RetryToDlqLayer::new(dlq)
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_millis(50))),
        )
        .service(json_job_handler(|o: Order, d: Delivery| async move {
            jobs::progress(json!({ "pct": 50 })).await;
            if d.attempt() <= o.fail_until {
                return Err::<serde_json::Value, BoxError>(
                    format!("attempt {} fails", d.attempt()).into(),
                );
            }
            Ok(json!({ "invoice": o.id * 10 }))
        }));
    let worker = Worker::new(c).concurrency(3);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(service, async {
        let _ = stopped.await;
    }));

    // Follow the events until every job finished.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut finished = 0;
    while finished < 3 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        assert_eq!(event.queue, cfg.queue);
        if matches!(
            event.kind,
            JobEventKind::Completed { .. } | JobEventKind::DeadLettered { .. }
        ) {
            finished += 1;
        }
        if let JobEventKind::Completed { result } = &event.kind {
            let n: u64 = event.id.trim_start_matches("order-").parse().unwrap();
            assert_eq!(
                result,
                &Some(json!({ "invoice": n * 10 })),
                "the result rides the event"
            );
        }
        seen.push((event.id, event.kind.name().to_string()));
    }
    let _ = stop.send(());
    let summary = run.await.unwrap().unwrap();
    assert_eq!(
        (summary.succeeded, summary.dead_lettered),
        (2, 1),
        "{summary}"
    );

    let of = |id: &str| -> Vec<&str> {
        seen.iter()
            .filter(|(i, _)| i == id)
            .map(|(_, k)| k.as_str())
            .collect()
    };
    // The waiting events went out before the subscriber's first read: they are in.
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
    assert_eq!(of("order-3").last(), Some(&"dead_lettered"));
    assert_eq!(of("order-3").iter().filter(|k| **k == "retried").count(), 2);

    let one = observer.get("order-1").await.unwrap().unwrap();
    assert_eq!((one.state, one.attempts), (JobState::Completed, 1));
    assert_eq!(one.result, Some(json!({ "invoice": 10 })));
    assert_eq!(one.progress, Some(json!({ "pct": 50 })));
    assert!(one.started_at.is_some() && one.finished_at.is_some());
    assert!(one.created_at <= one.started_at.unwrap());
    let two = observer.get("order-2").await.unwrap().unwrap();
    assert_eq!((two.state, two.attempts), (JobState::Completed, 2));
    assert_eq!(two.failure.as_deref(), Some("attempt 1 fails"));
    let three = observer.get("order-3").await.unwrap().unwrap();
    assert_eq!((three.state, three.attempts), (JobState::DeadLettered, 3));
    assert_eq!(three.failure.as_deref(), Some("attempt 3 fails"));

    let counts = observer.counts().await.unwrap();
    assert_eq!(
        (
            counts.waiting,
            counts.active,
            counts.completed,
            counts.failed,
            counts.dead_lettered
        ),
        (0, 0, 2, 0, 1)
    );
    let completed: Vec<String> = observer
        .list(JobState::Completed, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(completed.len(), 2);
    assert!(
        completed.contains(&"order-1".to_string()) && completed.contains(&"order-2".to_string())
    );
}

#[tokio::test]
async fn nothing_is_kept_by_default_counts_keep_the_newest_ages_expire_and_the_cap_bounds_all() {
    let cfg = config("jobs-keep", "");
    let store = RedisJobStore::connect(&cfg).await.unwrap().max_per_state(5);
    let done = |id: &str, keep: Keep| JobUpdate::new(id, JobState::Completed, 1).keep(keep);

    store
        .record(JobUpdate::new("a", JobState::Active, 1))
        .await
        .unwrap();
    assert_eq!(
        store.get("a").await.unwrap().unwrap().state,
        JobState::Active
    );
    store.record(done("a", Keep::None)).await.unwrap();
    assert_eq!(
        store.get("a").await.unwrap(),
        None,
        "none: dropped when done"
    );

    for i in 0..8 {
        store
            .record(done(&format!("c{i}"), Keep::Count(3)))
            .await
            .unwrap();
    }
    let ids: Vec<String> = store
        .list(JobState::Completed, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(
        ids,
        ["c7", "c6", "c5"],
        "count keeps the newest, newest first"
    );

    store
        .record(
            JobUpdate::new("old", JobState::Failed, 1)
                .failure("x")
                .keep(Keep::Age(Duration::from_millis(300))),
        )
        .await
        .unwrap();
    assert!(store.get("old").await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.get("old").await.unwrap(), None, "gone after its age");
    assert_eq!(store.counts().await.unwrap().failed, 0);

    // A year's age and records of crashed workers are bounded by the cap.
    for i in 0..12 {
        store
            .record(
                JobUpdate::new(format!("f{i}"), JobState::Failed, 1)
                    .keep(Keep::Age(Duration::from_secs(365 * 24 * 3600))),
            )
            .await
            .unwrap();
        store
            .record(JobUpdate::new(format!("w{i}"), JobState::Active, 1))
            .await
            .unwrap();
    }
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.failed, counts.active, counts.completed), (5, 5, 3));
    assert_eq!(store.get("f0").await.unwrap(), None);
    // The trimmed records' hashes are gone too, not only their index entries.
    let mut conn = raw().await;
    let pattern = format!("ferrymq:{{{}}}:job:*", cfg.queue);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 13, "{keys:?}");
}

#[tokio::test]
async fn a_message_header_overrides_the_queue_retention() {
    let (p, c, _cfg) = connect("jobs-header", "visibility=2s").await;
    let store = c.job_store();
    p.send(Message::new("a").job_id("plain")).await.unwrap();
    p.send(
        Message::new("b")
            .job_id("kept")
            .keep_completed(Keep::Count(5)),
    )
    .await
    .unwrap();
    let service = Layer::layer(
        &TrackJobsLayer::new(store.clone()),
        tower::service_fn(|_d: Delivery| async { Ok::<_, BoxError>(json!("ok")) }),
    );
    Worker::new(c)
        .run_until(service, tokio::time::sleep(Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(store.get("plain").await.unwrap(), None);
    let kept = store.get("kept").await.unwrap().unwrap();
    assert_eq!(
        (kept.state, kept.result),
        (JobState::Completed, Some(json!("ok")))
    );
}

#[tokio::test]
async fn stale_and_racing_updates_do_not_rewind_a_job() {
    let store = RedisJobStore::connect(&config("jobs-race", ""))
        .await
        .unwrap();
    store
        .record(JobUpdate::new("j", JobState::Active, 2))
        .await
        .unwrap();
    // The send's `waiting` arriving after the worker's `active`.
    store
        .record(JobUpdate::new("j", JobState::Waiting, 0).only_if_new())
        .await
        .unwrap();
    // Attempt 1's retry reported after attempt 2 started elsewhere.
    store
        .record(JobUpdate::new("j", JobState::Waiting, 1).failure("late"))
        .await
        .unwrap();
    let j = store.get("j").await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempts, j.failure),
        (JobState::Active, 2, None)
    );
}

#[tokio::test]
async fn the_event_stream_is_bounded() {
    let cfg = config("jobs-events", "");
    let store = RedisJobStore::connect(&cfg)
        .await
        .unwrap()
        .events_max_len(10);
    for i in 0..1000 {
        store
            .progress(&format!("p{}", i % 3), 1, json!(i))
            .await
            .unwrap();
    }
    let mut conn = raw().await;
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("ferrymq:{{{}}}:events", cfg.queue))
        .query_async(&mut conn)
        .await
        .unwrap();
    // `MAXLEN ~` trims whole stream nodes (100 entries by default).
    assert!(len <= 10 + 200, "events stream holds {len} entries");
}

#[tokio::test]
async fn a_key_of_the_wrong_type_is_refused_with_nothing_changed() {
    let cfg = config("jobs-type", "");
    let store = RedisJobStore::connect(&cfg).await.unwrap();
    let mut conn = raw().await;
    let _: () = redis::cmd("SET")
        .arg(format!("ferrymq:{{{}}}:jobstate:completed", cfg.queue))
        .arg("foreign")
        .query_async(&mut conn)
        .await
        .unwrap();
    let e = store
        .record(JobUpdate::new("j", JobState::Active, 1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Backend, "{e}");
    assert!(e.to_string().contains("jobstate:completed"), "{e}");
    // Reads say so too, and nothing was written.
    assert_eq!(store.get("j").await.unwrap_err().kind(), ErrorKind::Backend);
    let exists: u64 = redis::cmd("EXISTS")
        .arg(format!("ferrymq:{{{}}}:job:j", cfg.queue))
        .arg(format!("ferrymq:{{{}}}:jobstate:active", cfg.queue))
        .arg(format!("ferrymq:{{{}}}:events", cfg.queue))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn progress_of_an_untracked_job_is_an_event_only() {
    let cfg = config("jobs-progress", "");
    let store = RedisJobStore::connect(&cfg).await.unwrap();
    let mut events = store.subscribe().await.unwrap();
    store.progress("ghost", 3, json!(42)).await.unwrap();
    assert_eq!(store.get("ghost").await.unwrap(), None);
    let e = tokio::time::timeout(Duration::from_secs(3), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.kind, JobEventKind::Progress { value: json!(42) });
    assert_eq!(e.attempt, 3);
}

mod flows {
    use super::*;
    use ferrymq_core::jobs::{children, ChildOutcome, Flow, OnChildFailure, Release};
    use ferrymq_core::{Consumer, Producer};

    #[derive(serde::Deserialize, serde::Serialize)]
    struct Invoice {
        order: u64,
    }

    fn invoicer(
    ) -> impl tower::Service<Delivery, Response = (), Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        json_job_handler(|i: Invoice, _d: Delivery| async move {
            if i.order == 9 {
                return Err::<serde_json::Value, BoxError>("card declined".into());
            }
            Ok(json!({ "invoice": format!("INV-{}", i.order) }))
        })
    }

    #[tokio::test]
    async fn parents_run_after_their_children_with_results_across_processes() {
        let (inv_p, inv_c, inv_cfg) = connect("flow-invoices", "visibility=2s").await;
        let (email_p, email_c, _) = connect("flow-emails", "visibility=2s").await;
        let dlq = config("flow-dlq", "").producer().await.unwrap();
        // The process adding flows has a store of its own.
        let adder = RedisJobStore::connect(&inv_cfg).await.unwrap();
        for order in [1, 2, 9] {
            Flow::new(
                format!("email-{order}"),
                email_p.queue(),
                Message::new(format!("mail {order}")),
            )
            .child(
                &inv_p,
                Message::json(&Invoice { order })
                    .unwrap()
                    .job_id(format!("inv-{order}-a")),
            )
            .child(
                &inv_p,
                Message::json(&Invoice {
                    order: if order == 9 { 9 } else { order * 10 },
                })
                .unwrap()
                .job_id(format!("inv-{order}-b")),
            )
            .on_child_failure(OnChildFailure::FailParent)
            .add(&adder)
            .await
            .unwrap();
        }
        assert_eq!(
            email_c.depth().await.unwrap().total(),
            0,
            "no parent before its children"
        );
        let service = ServiceBuilder::new()
            .layer(
                TrackJobsLayer::new(inv_c.job_store())
                    .keep_failed(Keep::Count(10))
                    .flows(email_p),
            )
            .layer(RetryToDlqLayer::new(dlq).max_attempts(1))
            .service(invoicer());
        Worker::new(inv_c)
            .concurrency(4)
            .run_until(service, tokio::time::sleep(Duration::from_secs(3)))
            .await
            .unwrap();
        let mut parents = email_c.receive(10, Duration::from_secs(1)).await.unwrap();
        parents.sort_by_key(|d| d.payload().clone());
        let bodies: Vec<&[u8]> = parents.iter().map(|d| d.payload().as_ref()).collect();
        assert_eq!(
            bodies,
            [b"mail 1".as_ref(), b"mail 2".as_ref()],
            "order 9's parent failed with its child"
        );
        let kids = children(&parents[0]).unwrap();
        assert_eq!(kids.results["inv-1-a"], json!({ "invoice": "INV-1" }));
        assert_eq!(kids.results["inv-1-b"], json!({ "invoice": "INV-10" }));
        let failed = adder.get("email-9").await.unwrap().unwrap();
        assert_eq!(failed.state, JobState::DeadLettered);
        assert!(
            failed
                .failure
                .as_deref()
                .unwrap_or("")
                .contains("card declined"),
            "{failed:?}"
        );
    }

    /// A parent queue the child's script cannot reach (another database: another
    /// server as far as a script goes): the ack declines to carry the flow step —
    /// nothing sent, the delivery still pending — and the layer goes step by step.
    #[tokio::test]
    async fn a_parent_queue_elsewhere_goes_step_by_step() {
        let (inv_p, inv_c, _) = connect("flow-elsewhere-invoices", "visibility=2s").await;
        let emails = RedisConfig::from_url(&format!(
            "{}/1/{}?visibility=2s",
            common::base_url(),
            common::unique("flow-elsewhere-emails")
        ))
        .unwrap();
        let (email_p, email_c) = emails.connect().await.unwrap();
        let store = inv_c.job_store();
        Flow::new("email-3", email_p.queue(), Message::new("mail 3"))
            .child(
                &inv_p,
                Message::json(&Invoice { order: 3 })
                    .unwrap()
                    .job_id("inv-3"),
            )
            .add(&store)
            .await
            .unwrap();
        let service = TrackJobsLayer::new(store.clone())
            .keep_completed(Keep::Count(10))
            .flows(email_p)
            .layer(invoicer());
        Worker::new(inv_c.clone())
            .run_until(service, tokio::time::sleep(Duration::from_millis(1500)))
            .await
            .unwrap();
        let parents = email_c.receive(10, Duration::from_secs(1)).await.unwrap();
        assert_eq!(parents.len(), 1);
        let kids = children(&parents[0]).unwrap();
        assert_eq!(kids.results["inv-3"], json!({ "invoice": "INV-3" }));
        assert_eq!(inv_c.depth().await.unwrap().total(), 0, "the child acked");
        let job = store.get("inv-3").await.unwrap().unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Completed, 1));
        emails.delete_queue().await.unwrap();
    }

    #[tokio::test]
    async fn a_crash_after_releasing_the_parent_sends_it_once() {
        let (inv_p, inv_c, _) = connect("flow-crash-invoices", "visibility=2s").await;
        let (email_p, email_c, _) = connect("flow-crash-emails", "visibility=2s").await;
        let store = inv_c.job_store();
        Flow::new("email-5", email_p.queue(), Message::new("mail 5"))
            .child(&inv_p, Message::json(&Invoice { order: 5 }).unwrap())
            .add(&store)
            .await
            .unwrap();
        // A first run recorded the result, sent the parent, and died before the mark
        // and the ack.
        let Release::Send { message, .. } = store
            .child_done(
                "email-5",
                "email-5/1",
                ChildOutcome::Completed(Some(json!("first"))),
            )
            .await
            .unwrap()
        else {
            panic!("the only child releases the parent");
        };
        email_p.send(message).await.unwrap();
        // The child comes back; its rerun completes the flow again.
        let service = TrackJobsLayer::new(store.clone())
            .flows(email_p)
            .layer(invoicer());
        Worker::new(inv_c)
            .run_until(service, tokio::time::sleep(Duration::from_secs(3)))
            .await
            .unwrap();
        let parents = email_c
            .receive(10, Duration::from_millis(500))
            .await
            .unwrap();
        assert_eq!(
            parents.len(),
            1,
            "the second send was dropped by the queue's dedup"
        );
        assert_eq!(
            children(&parents[0]).unwrap().results["email-5/1"],
            json!("first"),
            "the copy that went out first is the one on the queue"
        );
        assert_eq!(
            store
                .child_done("email-5", "email-5/1", ChildOutcome::Completed(None))
                .await
                .unwrap(),
            Release::Wait,
            "done flows are forgotten"
        );
    }

    #[tokio::test]
    async fn ignore_and_continue_policies() {
        let store = RedisJobStore::connect(&config("flow-policies", ""))
            .await
            .unwrap();
        let (p, _c, _) = connect("flow-policies-q", "").await;
        for (id, policy) in [
            ("ignore", OnChildFailure::Ignore),
            ("continue", OnChildFailure::Continue),
        ] {
            // Children are not consumed here: only the store's decisions are checked.
            Flow::new(id, "parents", Message::new(id))
                .child(&p, Message::new("a").job_id(format!("{id}-a")))
                .child(&p, Message::new("b").job_id(format!("{id}-b")))
                .on_child_failure(policy)
                .add(&store)
                .await
                .unwrap();
        }
        let failed = |s: &str| ChildOutcome::Failed(s.to_string());
        assert_eq!(
            store
                .child_done("ignore", "ignore-a", failed("x"))
                .await
                .unwrap(),
            Release::Wait
        );
        let Release::Send { queue, message } = store
            .child_done(
                "ignore",
                "ignore-b",
                ChildOutcome::Completed(Some(json!(2))),
            )
            .await
            .unwrap()
        else {
            panic!("ignore: released once the others are done");
        };
        assert_eq!(queue, "parents");
        let header = message
            .headers()
            .get(ferrymq_core::reserved::FLOW_CHILDREN)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(header).unwrap();
        assert_eq!(
            v,
            json!({ "results": { "ignore-b": 2 }, "failed": { "ignore-a": "x" } })
        );
        assert!(matches!(
            store
                .child_done("continue", "continue-a", failed("y"))
                .await
                .unwrap(),
            Release::Send { .. }
        ));
        assert_eq!(
            store.child_done("nope", "a", failed("z")).await.unwrap(),
            Release::Wait
        );
    }
}

/// A redis-server on `port` (no persistence), for restarting on the same port.
fn spawn_server(port: u16, dir: &std::path::Path) -> std::process::Child {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server on PATH (scripts/redis.sh start installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .and_then(|c| c.get_connection())
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server on {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_goes_on_after_the_server_restarted() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!(
        "ferrymq-jobs-restart-{}-{port}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = spawn_server(port, &dir);
    let cfg = ferrymq_redis::RedisConfig::from_url(&format!(
        "redis://127.0.0.1:{port}/events-restart?connect_timeout=1s&command_timeout=1s"
    ))
    .unwrap();
    let store = RedisJobStore::connect(&cfg).await.unwrap();
    let mut events = store.subscribe().await.unwrap();
    store.progress("before", 1, json!(1)).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.id, "before");

    server.kill().unwrap();
    server.wait().unwrap();
    let mut server = spawn_server(port, &dir);
    // Events recorded after the restart reach the old subscription.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut errors = 0;
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event after the restart ({errors} errors)"
        );
        let _ = store.progress("after", 1, json!(2)).await;
        match tokio::time::timeout(Duration::from_millis(1500), events.next()).await {
            Ok(Some(Ok(e))) => break e,
            Ok(Some(Err(_))) => errors += 1,
            Ok(None) => panic!("the subscription ended"),
            Err(_) => {}
        }
    };
    assert_eq!(got.id, "after");
    assert_eq!(got.kind, JobEventKind::Progress { value: json!(2) });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
