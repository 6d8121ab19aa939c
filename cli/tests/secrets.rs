//! Audit #14: `ferry` never prints a password or token it was given in a URL — not in
//! its output, not in its errors, not in its debug logs. The URLs point at a port
//! where nothing listens (or are malformed): the error paths are the point.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

const SECRET: &str = "hunter2-secret";

fn ferry(args: &[&str], rust_log: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args)
        .env_remove("FERRYMQ_URL")
        .env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    cmd.output().unwrap()
}

/// URLs carrying [`SECRET`] as a password, as a query parameter, and inside URLs that
/// do not parse.
fn urls() -> Vec<String> {
    vec![
        format!("redis://user:{SECRET}@127.0.0.1:1/orders?connect_timeout=300ms"),
        format!("redis://:{SECRET}@127.0.0.1:1/orders?connect_timeout=300ms"),
        format!("redis://127.0.0.1:1/orders?password={SECRET}&connect_timeout=300ms"),
        format!("redis://user:{SECRET}@127.0.0.1:99999/orders"),
        format!("redis://user:{SECRET}@127.0.0.1:1/orders?visibility=soon"),
        format!("redis://user:{SECRET}@127.0.0.1:1/a/b/c"),
        format!("memory://orders?token={SECRET}"),
        format!("kafka://user:{SECRET}@h1:9092,h2:9092/orders"),
        format!("nats://user:{SECRET}@127.0.0.1/orders"),
    ]
}

fn assert_no_secret(args: &[&str], out: &Output) {
    for (stream, bytes) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(SECRET),
            "`ferry {}` printed the secret on {stream}:\n{text}",
            args.join(" ")
        );
    }
}

fn commands(url: &str) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let other = "redis://127.0.0.1:1/elsewhere?connect_timeout=300ms";
    vec![
        s(&["send", "--url", url, "hello"]),
        s(&["receive", "--url", url, "--wait", "10ms"]),
        s(&["depth", "--url", url]),
        s(&["queue", "describe", url]),
        s(&["queue", "peek", url, "-n", "3"]),
        s(&["dlq", "peek", url]),
        s(&["dlq", "redrive", url, "--to", other]),
        s(&["dlq", "redrive", other, "--to", url]),
        s(&["dlq", "redrive", url, "--to", url]),
        s(&["dlq", "redrive", url, "--to", url, "--max", "0"]),
        s(&["dlq", "redrive", url]),
        s(&["demo", "--url", url, "--orders", "3", "--timeout", "2s"]),
    ]
}

#[test]
fn no_subcommand_prints_a_secret_from_its_urls() {
    for url in urls() {
        for args in commands(&url) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = ferry(&args, None);
            assert!(
                !out.status.success(),
                "`ferry {}` should fail",
                args.join(" ")
            );
            assert_no_secret(&args, &out);
        }
    }
}

#[test]
fn a_url_from_ferrymq_url_is_scrubbed_too() {
    for url in urls() {
        for args in [
            &["depth"][..],
            &["receive", "--wait", "10ms"],
            &["send", "x"],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
                .args(args)
                .env("FERRYMQ_URL", &url)
                .env("RUST_LOG", "trace")
                .output()
                .unwrap();
            assert!(!out.status.success(), "{url}");
            assert_no_secret(args, &out);
        }
    }
}

#[test]
fn debug_logs_print_no_secret_either() {
    for url in urls() {
        for args in commands(&url) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            for filter in ["debug", "trace"] {
                let out = ferry(&args, Some(filter));
                assert_no_secret(&args, &out);
            }
        }
    }
}

/// Audit #15: the same-queue guard compares what the URLs resolve to, not how they
/// are spelled. Refused before connecting: nothing listens on these ports.
#[test]
fn redrive_refuses_the_dlq_itself_however_it_is_spelled() {
    for (dlq, to) in [
        (
            "redis://127.0.0.1/orders-dlq",
            "redis://127.0.0.1:6379/orders-dlq",
        ),
        (
            "redis://127.0.0.1:1/orders-dlq",
            "redis://127.0.0.1:1/0/orders-dlq?group=other",
        ),
        ("memory://orders-dlq", "memory://orders-dlq?visibility=5s"),
    ] {
        let out = ferry(&["dlq", "redrive", dlq, "--to", to], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{dlq} -> {to}: {err}");
        assert!(
            err.contains("the target is the dead-letter queue itself"),
            "{dlq} -> {to}: {err}"
        );
    }
}

/// A server that answers, with credentials it refuses: the authentication error path,
/// and whatever the client library logs on the way, at every level.
#[test]
fn a_refused_password_is_not_printed() {
    let base = match std::env::var("FERRYMQ_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "FERRYMQ_TEST_REDIS_URL is not set: this test needs a Redis server \
             (scripts/redis.sh start 6399; FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399)"
        ),
    };
    let address = base
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    for url in [
        format!("redis://nobody:{SECRET}@{address}/orders"),
        format!("redis://:{SECRET}@{address}/orders"),
    ] {
        for args in commands(&url) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            for filter in [None, Some("trace")] {
                let out = ferry(&args, filter);
                assert_no_secret(&args, &out);
            }
        }
    }
}
