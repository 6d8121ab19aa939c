//! What the `ferry` binary tests share: run the binary as a user would (no
//! `FERRYMQ_URL` or `RUST_LOG` inherited from the test's environment), read its
//! output, and name queues of their own on the test Redis. A test that needs Redis
//! fails loudly when FERRYMQ_TEST_REDIS_URL is missing; it never skips itself.

#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Command, Output};

/// Run `ferry ARGS` and wait for it.
pub fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRYMQ_URL")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The test Redis (`redis://host:port`, no trailing slash). `command` names what the
/// calling test runs against it, for the message when the variable is missing.
pub fn redis_base(command: &str) -> String {
    match std::env::var("FERRYMQ_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_string(),
        _ => panic!(
            "FERRYMQ_TEST_REDIS_URL is not set: this test runs `{command}` against Redis. \
             Run scripts/test.sh, or start a server with `scripts/redis.sh start 6399` and \
             export FERRYMQ_TEST_REDIS_URL=redis://127.0.0.1:6399"
        ),
    }
}

/// A queue name no other run uses: `PREFIX-<pid>-<nanos>`.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}
