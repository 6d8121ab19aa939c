//! kill -9 of worker processes completing flows on Redis: every parent is sent once
//! — none lost, none duplicated — with every child's result.
//!
//! 600 flows of two children each on an invoices queue; a worker process (this test
//! binary re-executed with `FLOW_KILL9_CHILD=1`, running only [`flow_worker_child`])
//! handles the children with `TrackJobs::flows` and is SIGKILLed at a random moment,
//! four times; then a worker in this process finishes the rest. The handler takes
//! 0–3 ms, so kills land mid-handler, between a child's result and its parent's send,
//! between the send and the mark, and before acks. Needs the server of
//! FERRYMQ_TEST_REDIS_URL.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferrymq_core::jobs::{children, json_job_handler, Flow, JobMessage, TrackJobsLayer};
use ferrymq_core::{BoxError, Consumer, Delivery, Message, Producer, Worker};
use ferrymq_redis::RedisConfig;
use rand::Rng;
use tower::Layer;

const CHILD_ENV: &str = "FLOW_KILL9_CHILD";
const FLOWS: u64 = 600;
const KILLS: usize = 4;

#[derive(serde::Serialize, serde::Deserialize)]
struct Part {
    order: u64,
    part: u64,
}

fn configs(invoices: &str, emails: &str) -> (RedisConfig, RedisConfig) {
    let base = common::base_url();
    let cfg = |q: &str| RedisConfig::from_url(&format!("{base}/{q}?visibility=1s")).unwrap();
    (cfg(invoices), cfg(emails))
}

/// The worker of the children, until `stop` completes.
async fn work(
    invoices: &RedisConfig,
    emails: &RedisConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let consumer = invoices.consumer().await.unwrap();
    let parents = emails.producer().await.unwrap();
    let service = TrackJobsLayer::new(consumer.job_store())
        .flows(parents)
        .layer(json_job_handler(|p: Part, _d: Delivery| async move {
            let ms = rand::thread_rng().gen_range(0..=3);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(serde_json::json!({ "order": p.order, "part": p.part }))
        }));
    Worker::new(consumer)
        .concurrency(8)
        .prefetch(16)
        .run_until(service, stop)
        .await
        .unwrap();
}

/// The worker process, when this binary is re-executed as one; a no-op otherwise.
#[test]
fn flow_worker_child() {
    let Ok(queues) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (invoices, emails) = queues.split_once(',').unwrap();
    let (invoices, emails) = configs(invoices, emails);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(work(&invoices, &emails, std::future::pending()));
}

#[test]
fn kill_9_while_completing_flows_loses_and_duplicates_no_parent() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let invoices_q = common::unique("flow-k9-invoices");
    let emails_q = common::unique("flow-k9-emails");
    let (invoices, emails) = configs(&invoices_q, &emails_q);
    runtime.block_on(async {
        let producer = invoices.producer().await.unwrap();
        let store = invoices.consumer().await.unwrap().job_store();
        for order in 0..FLOWS {
            let part = |part| {
                Message::json(&Part { order, part })
                    .unwrap()
                    .job_id(format!("inv-{order}-{part}"))
            };
            Flow::new(
                format!("email-{order}"),
                emails_q.as_str(),
                Message::new(order.to_string()),
            )
            .child(&producer, part(1))
            .child(&producer, part(2))
            .add(&store)
            .await
            .unwrap();
        }
    });

    let mut rng = rand::thread_rng();
    for life in 0..KILLS {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "flow_worker_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{invoices_q},{emails_q}"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let after = Duration::from_millis(rng.gen_range(150..=400));
        std::thread::sleep(after);
        // SIGKILL: no shutdown, no release, no flush.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        println!("life {life}: killed after {after:?} ({status})");
    }

    runtime.block_on(async {
        let by_killed = emails
            .consumer()
            .await
            .unwrap()
            .depth()
            .await
            .unwrap()
            .total();
        println!("parents sent by the killed workers: {by_killed} of {FLOWS}");
        assert!(
            by_killed > 0,
            "the killed workers made no progress: the test shows nothing"
        );
        // The last worker: until every parent is on the emails queue, or 30 s.
        let emails_consumer = emails.consumer().await.unwrap();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = {
            let emails = emails.clone();
            tokio::spawn(async move {
                let c = emails.consumer().await.unwrap();
                let t0 = Instant::now();
                while c.depth().await.unwrap().total() < FLOWS
                    && t0.elapsed() < Duration::from_secs(30)
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Time for a duplicate send, if any, to land.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = done_tx.send(());
            })
        };
        work(&invoices, &emails, async {
            let _ = done_rx.await;
        })
        .await;
        watcher.await.unwrap();

        let mut seen: HashMap<String, usize> = HashMap::new();
        loop {
            let batch = emails_consumer
                .receive(500, Duration::from_millis(300))
                .await
                .unwrap();
            if batch.is_empty() {
                break;
            }
            for d in batch {
                let order = String::from_utf8_lossy(d.payload()).into_owned();
                let kids = children(&d).unwrap();
                assert_eq!(
                    kids.results.len(),
                    2,
                    "email-{order}: both results: {kids:?}"
                );
                for part in [1, 2] {
                    let result = &kids.results[&format!("inv-{order}-{part}")];
                    assert_eq!(result["part"], part, "email-{order}");
                }
                *seen.entry(order).or_default() += 1;
                d.ack().await.unwrap();
            }
        }
        let missing: Vec<u64> = (0..FLOWS)
            .filter(|o| !seen.contains_key(&o.to_string()))
            .collect();
        let doubled: Vec<(&String, &usize)> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(missing.is_empty(), "parents never sent: {missing:?}");
        assert!(doubled.is_empty(), "parents sent twice: {doubled:?}");
        let left = invoices.consumer().await.unwrap().depth().await.unwrap();
        assert_eq!(left.total(), 0, "children left: {left:?}");
    });
}

const ACK_CHILD_ENV: &str = "FLOW_ACK_CHILD";

/// Child queue (plain or ordered) and parent queue of the atomic-step test. The
/// acks linger 400 ms: a flow step that is not part of the ack leaves a wide
/// window between the parent's send and the child's ack.
fn ack_configs(children: &str, parents: &str, ordered: bool) -> (RedisConfig, RedisConfig) {
    let base = common::base_url();
    let extra = if ordered { "&ordered=true" } else { "" };
    (
        RedisConfig::from_url(&format!(
            "{base}/{children}?visibility=1s&ack_linger=400ms{extra}"
        ))
        .unwrap(),
        RedisConfig::from_url(&format!("{base}/{parents}?visibility=1s")).unwrap(),
    )
}

/// Children's worker of the atomic-step test, until `stop` completes.
async fn ack_work(
    children: &RedisConfig,
    parents: &RedisConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let consumer = children.consumer().await.unwrap();
    let producer = parents.producer().await.unwrap();
    let service = TrackJobsLayer::new(consumer.job_store())
        .keep_completed(ferrymq_core::jobs::Keep::Count(100))
        .flows(producer)
        .layer(json_job_handler(|p: Part, _d: Delivery| async move {
            Ok::<_, BoxError>(serde_json::json!({ "order": p.order, "part": p.part }))
        }));
    Worker::new(consumer)
        .concurrency(1)
        .prefetch(1)
        .run_until(service, stop)
        .await
        .unwrap();
}

/// The worker process of the atomic-step test, when re-executed as one.
#[test]
fn flow_ack_worker_child() {
    let Ok(spec) = std::env::var(ACK_CHILD_ENV) else {
        return;
    };
    let mut parts = spec.split(',');
    let (children, parents, ordered) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next() == Some("1"),
    );
    let (children, parents) = ack_configs(children, parents, ordered);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(ack_work(&children, &parents, std::future::pending()));
}

/// The last child's ack and its flow step are one atomic step on Redis (plain and
/// ordered child queues): the worker process is SIGKILLed the moment the parent
/// appears on its queue, and by then both children are acked — nothing is left
/// to redo: no child runs again, the parent is there once with both results.
#[test]
fn a_kill_right_after_the_last_childs_ack_leaves_nothing_to_redo() {
    if std::env::var_os(CHILD_ENV).is_some() || std::env::var_os(ACK_CHILD_ENV).is_some() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for ordered in [false, true] {
        let children_q = common::unique(if ordered { "flow-ack-ord" } else { "flow-ack" });
        let parents_q = common::unique("flow-ack-emails");
        let (kids_q, parents) = ack_configs(&children_q, &parents_q, ordered);
        let store = runtime.block_on(async {
            let producer = kids_q.producer().await.unwrap();
            let store = kids_q.consumer().await.unwrap().job_store();
            let part = |part: u64| {
                Message::json(&Part { order: 1, part })
                    .unwrap()
                    .job_id(format!("inv-1-{part}"))
                    .key("order-1")
            };
            Flow::new("email-1", parents_q.as_str(), Message::new("1"))
                .child(&producer, part(1))
                .child(&producer, part(2))
                .add(&store)
                .await
                .unwrap();
            store
        });
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "flow_ack_worker_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                ACK_CHILD_ENV,
                format!("{children_q},{parents_q},{}", u8::from(ordered)),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (left, parents_now) = runtime.block_on(async {
            let watch = parents.producer().await.unwrap();
            let t0 = Instant::now();
            while watch.depth().await.unwrap().total() == 0 {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "the worker never released the parent"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // SIGKILL the moment the parent is there: no shutdown, no flush.
            child.kill().unwrap();
            child.wait().unwrap();
            let left = kids_q.producer().await.unwrap().depth().await.unwrap();
            (left, watch.depth().await.unwrap().total())
        });
        assert_eq!(
            left.total(),
            0,
            "ordered={ordered}: the parent was on its queue while a child was not acked yet: {left:?}"
        );
        assert_eq!(parents_now, 1, "ordered={ordered}");

        runtime.block_on(async {
            // A worker past the visibility timeout: nothing comes back to it.
            ack_work(
                &kids_q,
                &parents,
                tokio::time::sleep(Duration::from_millis(1500)),
            )
            .await;
            for part in [1, 2] {
                let job = ferrymq_core::jobs::JobStore::get(&store, &format!("inv-1-{part}"))
                    .await
                    .unwrap()
                    .expect("kept");
                assert_eq!(
                    job.attempts, 1,
                    "ordered={ordered}: inv-1-{part} ran again: {job:?}"
                );
            }
            let c = parents.consumer().await.unwrap();
            let batch = c.receive(10, Duration::from_millis(300)).await.unwrap();
            assert_eq!(batch.len(), 1, "ordered={ordered}: the parent once");
            let kids = children(&batch[0]).unwrap();
            for part in [1, 2] {
                assert_eq!(
                    kids.results[&format!("inv-1-{part}")],
                    serde_json::json!({ "order": 1, "part": part }),
                    "ordered={ordered}"
                );
            }
            batch[0].ack().await.unwrap();
            kids_q.delete_queue().await.unwrap();
            parents.delete_queue().await.unwrap();
        });
    }
}
