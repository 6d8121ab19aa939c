//! `ferry schedule …`, run as a user would, against the Redis server named by
//! FERRYMQ_TEST_REDIS_URL (which fails the test when missing, never skips it).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrymq::schedule::{SCHEDULED_FOR, SCHEDULE_ID};
use ferrymq::Consumer;

mod common;
use common::{ferry, redis_base, stderr, stdout, unique};

fn redis_url(queue: &str) -> String {
    format!("{}/{}", redis_base("ferry schedule"), unique(queue))
}

#[test]
fn add_list_run_remove_on_redis() {
    let url = redis_url("cli-schedule");
    let add = |args: &[&str]| {
        let mut all = vec!["schedule", "add", url.as_str()];
        all.extend_from_slice(args);
        ferry(&all)
    };
    let nightly = [
        "nightly",
        "--cron",
        "0 2 * * *",
        "--tz",
        "Europe/Berlin",
        "--payload",
        r#"{"report":"nightly"}"#,
    ];
    let out = add(&nightly);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("schedule nightly: created"),
        "{}",
        stdout(&out)
    );
    // The same again (a redeploy running the same command): nothing changes.
    let out = add(&nightly);
    assert!(
        stdout(&out).contains("schedule nightly: unchanged"),
        "{}",
        stdout(&out)
    );
    let out = add(&[
        "hb",
        "--every",
        "300ms",
        "--catch-up",
        "all:5",
        "-H",
        "kind=heartbeat",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = ferry(&["schedule", "list", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "nightly",
        "  timing         cron `0 2 * * *` (Europe/Berlin)",
        "  catch-up       once",
        r#"  payload        {"report":"nightly"}"#,
        "hb",
        "  timing         every 300ms",
        "  catch-up       all:5",
        "  last enqueued  -",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    // 02:00 in Berlin is 00:00 or 01:00 UTC.
    assert!(
        text.contains("T01:00:00.000Z") || text.contains("T00:00:00.000Z"),
        "{text}"
    );

    let out = ferry(&["schedule", "run", &url, "--for", "1500ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("runs enqueued"), "{}", stdout(&out));

    let out = ferry(&["schedule", "list", &url, "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let hb = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "hb")
        .unwrap();
    assert!(hb["last_enqueued"].is_string(), "{hb}");
    assert_eq!(hb["definition"]["catch_up"]["max"], 5);

    // The runs are on the queue, with the schedule's headers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let runs = rt.block_on(async {
        let consumer = ferrymq::connect_consumer(&url).await.unwrap();
        let got = consumer.receive(100, Duration::from_secs(2)).await.unwrap();
        for d in &got {
            d.ack().await.unwrap();
        }
        got.iter()
            .map(|d| {
                let h = d.message().headers();
                assert_eq!(h.get(SCHEDULE_ID), Some("hb"));
                assert_eq!(h.get("kind"), Some("heartbeat"));
                h.get(SCHEDULED_FOR).unwrap().to_string()
            })
            .collect::<Vec<_>>()
    });
    assert!(!runs.is_empty(), "the scheduler enqueued runs");

    let out = ferry(&["schedule", "remove", &url, "hb"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ferry(&["schedule", "remove", &url, "hb"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = ferry(&["schedule", "remove", &url, "nightly"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&ferry(&["schedule", "list", &url])).contains("no schedules"));
}

#[test]
fn bad_schedules_are_refused_naming_the_parameter() {
    let url = redis_url("cli-schedule-bad");
    for (args, param) in [
        (vec!["x", "--every", "0s"], "`every`"),
        (vec!["x", "--every", "20years"], "`every`"),
        (vec!["x", "--cron", "61 * * * *"], "`cron`"),
        (
            vec!["x", "--cron", "0 9 * * *", "--tz", "Mars/Olympus"],
            "`tz`",
        ),
        (
            vec!["x", "--every", "1s", "--catch-up", "all:0"],
            "`catch_up.max`",
        ),
        (vec!["a b", "--every", "1s"], "`id`"),
    ] {
        let mut all = vec!["schedule", "add", url.as_str()];
        all.extend_from_slice(&args);
        let out = ferry(&all);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(param), "{args:?}: {}", stderr(&out));
    }
    // Neither --cron nor --every: a usage error.
    let out = ferry(&["schedule", "add", &url, "x"]);
    assert!(!out.status.success());
    assert!(stdout(&ferry(&["schedule", "list", &url])).contains("no schedules"));
}
