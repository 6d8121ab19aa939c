//! Helpers shared by the examples: where the queues are, and how an example reports
//! whether the guarantee it shows held. Not an example itself.
//!
//! Every example runs on the in-process queue by default and on any backend when
//! `FERRYMQ_URL` is set. Each run names its queues afresh (`<queue>-<what>-<run id>`),
//! so runs against a persistent broker never see each other's leftovers.

#![allow(dead_code)]

use std::fmt::Display;
use std::process::ExitCode;
use std::time::Duration;

use ferrymq::Config;

/// The backend: `$FERRYMQ_URL`, else `default`. A URL whose queue is written as
/// `{queue}` gets `example` there; each example then names its own queues from it
/// with [`queue`].
pub fn base_config(default: &str) -> ferrymq::Result<Config> {
    let url = std::env::var("FERRYMQ_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| default.to_string());
    Config::from_url(&url.replace("{queue}", "example"))
}

/// `base` for the queue `<base queue>-<suffix>`, same server and settings
/// (`Config::with_queue`: no URL rewriting, whatever the backend). An SQS FIFO
/// queue's name must end in `.fifo`, so the suffix goes before it there.
pub fn queue(base: &Config, suffix: &str) -> ferrymq::Result<Config> {
    let name = base.queue();
    let name = match name.strip_suffix(".fifo") {
        Some(stem) => format!("{stem}-{suffix}.fifo"),
        None => format!("{name}-{suffix}"),
    };
    base.with_queue(&name)
}

/// A short id, different on every run (time and process id, base 36).
pub fn run_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut n = millis ^ (u64::from(std::process::id()) << 40);
    let mut s = String::new();
    for _ in 0..6 {
        s.push(char::from(
            b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize],
        ));
        n /= 36;
    }
    s
}

/// Remove the example's queues from a broker that keeps them (Redis), so that runs
/// leave nothing behind. In-process queues go away with the process anyway.
pub async fn delete_queues(queues: &[&Config]) {
    for queue in queues {
        let deleted = match queue.admin().await {
            Ok(admin) => admin.delete().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = deleted {
            if e.kind() != ferrymq::ErrorKind::Unsupported {
                eprintln!("note: could not delete queue {}: {e}", queue.queue());
            }
        }
    }
}

/// How long an example waits for something that should happen "soon" before it
/// declares the guarantee broken: generous, so a slow CI machine or a remote broker
/// does not fail it, yet bounded, so a broken build never hangs.
pub fn patience(visibility: Duration) -> Duration {
    Duration::from_secs(20) + visibility * 4
}

/// The list of checks an example makes; its exit code says whether all held.
#[derive(Debug, Default)]
pub struct Checks {
    failed: Vec<String>,
}

impl Checks {
    pub fn new() -> Self {
        Checks::default()
    }

    /// Print `what` as held or not.
    pub fn check(&mut self, held: bool, what: impl Display) {
        let what = what.to_string();
        println!("  [{}] {what}", if held { "ok" } else { "FAILED" });
        if !held {
            self.failed.push(what);
        }
    }

    /// Success when every check held; otherwise list the failures and exit with 1.
    pub fn exit_code(self) -> ExitCode {
        if self.failed.is_empty() {
            println!("\nok: every guarantee held");
            ExitCode::SUCCESS
        } else {
            eprintln!("\n{} guarantee(s) did NOT hold:", self.failed.len());
            for f in &self.failed {
                eprintln!("  - {f}");
            }
            ExitCode::FAILURE
        }
    }
}
