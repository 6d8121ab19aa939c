//! Fault test against a LocalStack of its own (started with `scripts/sqs.sh` on a
//! free port, so the shared test server is left alone): the server is frozen
//! (SIGSTOP) for 10 s and thawed (SIGCONT) while a producer sends and a Worker
//! handles. Nothing may panic; every error a send or the worker sees must be a typed,
//! retryable one (`Timeout`, `OutcomeUnknown`, `Connection`, `Throttled`); every
//! message whose send returned `Ok` must be handled (at least once — a lease that
//! ran out during the freeze redelivers).
//!
//! What it cannot show: a server killed and restarted. LocalStack without
//! persistence forgets its queues on restart, so there every send afterwards is
//! `NotFound` and the messages that were in the queue are gone with it — that loss
//! is the server's, not something a client can test for.
//!
//! Needs the LocalStack install of `scripts/sqs.sh` (it installs it on first use).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq_core::middleware::handler_fn;
use ferrymq_core::{Delivery, ErrorKind, Message, Producer, Worker};
use ferrymq_sqs::SqsConfig;
use tokio::time::Instant;

/// A LocalStack of this test's own, stopped when dropped.
struct Server {
    port: u16,
    state: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/sqs.sh")
}

impl Server {
    fn start() -> Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let state =
            std::env::temp_dir().join(format!("ferrymq-sqs-fault-{}-{port}", std::process::id()));
        let out = Command::new("bash")
            .arg(script())
            .args(["start", &port.to_string()])
            .env("FERRYMQ_SQS_STATE", &state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/sqs.sh start {port} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Server { port, state }
    }

    fn pid(&self) -> String {
        std::fs::read_to_string(self.state.join("localstack.pid"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} failed");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Thaw first, in case a failed assertion left it frozen.
        let _ = Command::new("kill").args(["-CONT", &self.pid()]).status();
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", &self.port.to_string()])
            .env("FERRYMQ_SQS_STATE", &self.state)
            .status();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn retryable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Timeout
            | ErrorKind::OutcomeUnknown
            | ErrorKind::Connection
            | ErrorKind::Throttled
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freeze_and_thaw_loses_nothing_sent() {
    let server = Server::start();
    let cfg = SqsConfig::from_url(&format!(
        "sqs://fault-{}?endpoint=http://127.0.0.1:{}&region=us-east-1&access_key_id=test\
         &secret_access_key=test&create=true&visibility=5s&request_timeout=2s&max_attempts=2\
         &connect_timeout=1s&wait=2s",
        std::process::id(),
        server.port
    ))
    .unwrap();
    let producer = Arc::new(cfg.producer().await.unwrap());
    let consumer = cfg.consumer().await.unwrap();

    let handled: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let handled = handled.clone();
        Worker::new(consumer)
            .concurrency(4)
            .poll_wait(Duration::from_secs(1))
            .receive_error_backoff(Duration::from_millis(200))
            .run_until(
                handler_fn(move |d: Delivery| {
                    let handled = handled.clone();
                    async move {
                        let text = String::from_utf8_lossy(d.payload()).into_owned();
                        *handled.lock().unwrap().entry(text).or_insert(0) += 1;
                        Ok::<_, std::convert::Infallible>(())
                    }
                }),
                async move {
                    let _ = stop_rx.await;
                },
            )
    };
    let worker = tokio::spawn(worker);

    // The producer: one message every 20 ms for about 16 s; the freeze in between.
    let sending = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut ok = Vec::new();
            let mut errors: BTreeMap<String, usize> = BTreeMap::new();
            let start = Instant::now();
            let mut i = 0usize;
            while start.elapsed() < Duration::from_secs(16) {
                let text = format!("m{i:05}");
                i += 1;
                match producer.send(Message::new(text.clone())).await {
                    Ok(_) => ok.push(text),
                    Err(e) => {
                        assert!(retryable(e.kind()), "send error not retryable: {e}");
                        *errors.entry(format!("{:?}", e.kind())).or_insert(0) += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, errors, i)
        })
    };

    // A bare consumer of another (empty) queue, polling through the freeze: its
    // receive errors must be typed and retryable too, and it must work afterwards.
    let idle = SqsConfig::from_url(&cfg.to_string().replace("sqs://fault-", "sqs://fault-idle-"))
        .unwrap()
        .consumer()
        .await
        .unwrap();
    let polling = tokio::spawn(async move {
        use ferrymq_core::Consumer;
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(16) {
            match idle.receive(10, Duration::from_secs(1)).await {
                Ok(ds) => assert!(ds.is_empty()),
                Err(e) => {
                    assert!(retryable(e.kind()), "receive error not retryable: {e}");
                    *kinds.entry(format!("{:?}", e.kind())).or_insert(0) += 1;
                }
            }
        }
        // Works again after the thaw.
        idle.receive(10, Duration::from_secs(1)).await.unwrap();
        kinds
    });

    tokio::time::sleep(Duration::from_secs(3)).await;
    server.signal("-STOP");
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    server.signal("-CONT");
    let thawed_after = frozen_at.elapsed();

    let (ok, errors, attempted) = sending.await.unwrap();
    let receive_errors = polling.await.unwrap();
    assert!(
        !receive_errors.is_empty(),
        "the freeze should have failed some receives (typed)"
    );
    assert!(!ok.is_empty());
    // Every message whose send succeeded is handled, within a bounded time.
    let want: HashSet<String> = ok.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let handled = handled.lock().unwrap();
            want.iter().filter(|t| !handled.contains_key(*t)).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} successfully sent messages were never handled",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(());
    let summary = worker.await.unwrap().unwrap();
    let handled = handled.lock().unwrap();
    let duplicates = handled.values().filter(|&&n| n > 1).count();
    let unknown_but_handled = handled.keys().filter(|t| !want.contains(*t)).count();
    eprintln!(
        "fault: frozen {thawed_after:?}; {attempted} sends, {} ok, errors {errors:?}; \
         handled {} distinct ({duplicates} more than once, {unknown_but_handled} whose send \
         reported an error); idle receive errors {receive_errors:?}; worker {summary:?}",
        ok.len(),
        handled.len()
    );
    assert!(
        errors.values().sum::<usize>() > 0,
        "the freeze should have made some sends fail (typed)"
    );
    assert_eq!(summary.panics, 0);
}
