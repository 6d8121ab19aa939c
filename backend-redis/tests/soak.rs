//! The one-minute soak (audit #13): `examples/soak.rs` for 60 s over 50k messages —
//! a steady worker plus two killed with SIGKILL and restarted every 1–5 s — asserting
//! its bounds: nothing lost, the queue empty, duplicates within what the kills
//! explain, Redis memory and key count bounded, consumer names pruned (never more
//! than a few however many workers died), the steady worker's RSS bounded. The long
//! run is `scripts/soak.sh` (20 minutes, 1M messages), not part of the suite.
//!
//! Needs `redis-server` on PATH; starts its own on a free loopback port.

#![allow(clippy::unwrap_used)]

#[path = "../examples/soak.rs"]
mod soak;

use std::time::Duration;

use soak::chaos_worker::{WorkerCommand, CHILD_ENV};
use soak::{run_soak, Bounds, SoakOptions};

/// The worker, when this binary is re-executed as one; a no-op test otherwise.
#[test]
fn chaos_worker_child() {
    if std::env::var_os(CHILD_ENV).is_some() {
        std::process::exit(soak::chaos_worker::child_main());
    }
}

#[test]
fn one_minute_soak_of_churning_workers_stays_bounded() {
    let options = SoakOptions {
        duration: Duration::from_secs(60),
        messages: 50_000,
        port: soak::chaos_worker::free_port().unwrap(),
        ..SoakOptions::default()
    };
    let report = run_soak(&options, &WorkerCommand::test_binary("chaos_worker_child")).unwrap();
    report.print();
    let problems = report.check(&Bounds::for_run(&options));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        report.kills >= 10,
        "the churn killed too few workers: {report:?}"
    );
}
