//! `ferry jobs`, `ferry depth --jobs` and `ferry events` against the Redis server named
//! by FERRYMQ_TEST_REDIS_URL (the test fails, never skips, without it).

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferrymq::jobs::{JobState, JobUpdate, Keep};
use serde_json::{json, Value};

mod common;
use common::{ferry, redis_base, unique};

fn redis_url(queue: &str) -> String {
    format!("{}/{queue}", redis_base("ferry jobs"))
}

fn json_out(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "ferry failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_counts_get_list_and_depth_read_the_redis_store() {
    let url = redis_url(&unique("cli-jobs"));
    let store = ferrymq::connect_jobs(&url).await.unwrap();
    store
        .record(
            JobUpdate::new("inv-1", JobState::Completed, 1)
                .result(Some(json!({ "total": 42 })))
                .keep(Keep::Count(10)),
        )
        .await
        .unwrap();
    store
        .record(
            JobUpdate::new("inv-2", JobState::DeadLettered, 3)
                .failure("card declined")
                .keep(Keep::Count(10)),
        )
        .await
        .unwrap();

    let counts = json_out(&ferry(&["jobs", "counts", "--url", &url, "--json"]));
    assert_eq!(counts["completed"], 1, "{counts}");
    assert_eq!(counts["dead_lettered"], 1, "{counts}");
    assert_eq!(counts["waiting"], 0, "{counts}");
    let depth = json_out(&ferry(&["depth", "--jobs", "--url", &url, "--json"]));
    assert_eq!(depth, counts);
    let text = ferry(&["depth", "--jobs", "--url", &url]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("completed 1  failed 0  dead-lettered 1"),
        "{text}"
    );

    let job = json_out(&ferry(&["jobs", "get", "inv-1", "--url", &url, "--json"]));
    assert_eq!(job["state"], "completed");
    assert_eq!(job["result"], json!({ "total": 42 }));
    let text = ferry(&["jobs", "get", "inv-2", "--url", &url]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("inv-2  dead_lettered  attempts 3"), "{text}");
    assert!(text.contains("failure   card declined"), "{text}");
    let missing = ferry(&["jobs", "get", "nope", "--url", &url]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no record"));

    let list = ferry(&["jobs", "list", "completed", "--url", &url, "--json"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["id"], "inv-1");
    let bad = ferry(&["jobs", "list", "finished", "--url", &url]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a job state"));
}

#[tokio::test(flavor = "multi_thread")]
async fn events_tails_what_another_process_records() {
    let url = redis_url(&unique("cli-events"));
    let store = ferrymq::connect_jobs(&url).await.unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "events", "--url", &url, "--json", "--max", "2", "--for", "30s",
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Record until the tail has seen two events (it may subscribe after the first).
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let started = Instant::now();
    let mut n = 0u64;
    while !waiter.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "ferry events (pid {pid}) did not finish"
        );
        n += 1;
        store
            .record(
                JobUpdate::new(format!("job-{n}"), JobState::Completed, 1).result(Some(json!(n))),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = waiter.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(e["event"], "completed", "{e}");
        let id = e["id"].as_str().unwrap();
        assert_eq!(
            e["result"],
            json!(id.trim_start_matches("job-").parse::<u64>().unwrap())
        );
    }
}

#[test]
fn memory_queues_answer_from_an_in_process_store() {
    let out = ferry(&["jobs", "counts", "--url", "memory://cli-jobs-mem", "--json"]);
    let v = json_out(&out);
    assert_eq!(v["completed"], 0);
    let out = ferry(&[
        "events",
        "--url",
        "memory://cli-events-mem",
        "--for",
        "100ms",
    ]);
    assert!(out.status.success());
}
