//! The `ferry` binary, run as a user would.

#![allow(clippy::unwrap_used)]

mod common;
use common::{ferry, stdout};

#[test]
fn demo_runs_the_pipeline_and_checks_its_story() {
    let out = ferry(&["demo", "--orders", "12"]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Progress lines, then the summary and the DLQ listing.
    assert!(
        text.contains("invoice worker  ok     ORD-1000 invoiced"),
        "{text}"
    );
    assert!(
        text.contains("retry  ORD-1002 attempt 1 failed: payment gateway timed out"),
        "{text}"
    );
    assert!(text.contains("dup    ORD-1007 already invoiced"), "{text}");
    assert!(
        text.contains("DLQ    ORD-1008 dead-lettered after 3 attempts"),
        "{text}"
    );
    assert!(
        text.contains("email worker    sent   INV-1000 to alice@example.com"),
        "{text}"
    );
    for line in [
        "orders sent         13",
        "invoiced            11",
        "dead-lettered        1  ORD-1008",
        "deduplicated         1  ORD-1007",
        "emails sent         11",
        "reason         currency XXX is not supported by the invoicing service",
        "orders: waiting 0  active 0  delayed 0  completed 11  failed 0  dead-lettered 1",
        "invoices: waiting 0  active 0  delayed 0  completed 11  failed 0  dead-lettered 0",
        "attempts       3",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains("\nok: every order invoiced and emailed once"),
        "{text}"
    );
}

#[test]
fn quiet_demo_prints_only_the_summary() {
    let out = ferry(&["demo", "--orders", "5", "--quiet"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(!text.contains("invoice worker  ok"), "{text}");
    assert!(text.contains("Summary ("), "{text}");
}

#[test]
fn depth_and_send_over_a_url() {
    let out = ferry(&["depth", "--url", "memory://cli-depth"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        "cli-depth: waiting 0  in flight 0  delayed 0  dead-lettered 0"
    );
    let out = ferry(&[
        "send",
        "--url",
        "memory://cli-send",
        "-H",
        "a=b",
        "one",
        "two",
    ]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out)
            .lines()
            .filter(|l| l.starts_with("sent "))
            .count(),
        2
    );
    let out = ferry(&["receive", "--url", "memory://cli-receive", "--wait", "10ms"]);
    assert!(out.status.success());
}

#[test]
fn bad_urls_fail_with_the_parameter_named() {
    let out = ferry(&["depth", "--url", "memory://q?bogus=1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`bogus`"), "{err}");
    let out = ferry(&["send", "--url", "memory://q", "-H", "no-equals-sign", "x"]);
    assert!(!out.status.success());
}

#[test]
fn a_backend_that_is_not_compiled_in_is_named() {
    for (url, feature, compiled_in) in [
        (
            "kafka://h1:9092,h2:9092/orders",
            "kafka",
            cfg!(feature = "kafka"),
        ),
        (
            "https://sqs.eu-west-1.amazonaws.com/123456789012/orders",
            "sqs",
            cfg!(feature = "sqs"),
        ),
    ] {
        if compiled_in {
            // This build has it (`--all-features`): nothing to name.
            continue;
        }
        let out = ferry(&["depth", "--url", url]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("cargo feature `{feature}`")), "{err}");
    }
}
