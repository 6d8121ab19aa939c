//! Fault tests against a LocalStack of their own (each started with
//! `scripts/sqs.sh` on a free port, so the shared test server is left alone).
//!
//! `freeze_and_thaw_loses_nothing_sent`: the server is frozen (SIGSTOP) for 10 s and
//! thawed (SIGCONT) while a producer sends and a Worker handles. Nothing may panic;
//! every error a send or the worker sees must be a typed, retryable one (`Timeout`,
//! `OutcomeUnknown`, `Connection`, `Throttled`); every message whose send returned
//! `Ok` must be handled (at least once — a lease that ran out during the freeze
//! redelivers).
//!
//! `kill_and_restart_keeps_clients_going`: the server is killed (`kill -9`, its whole
//! process group) and restarted on the same port while a producer sends and a
//! Worker handles. What it shows: no panic; while the server is down every send
//! error is typed and retryable (`Connection` when nothing could connect,
//! `OutcomeUnknown` when a send's request had left); the same producer, consumer and
//! Worker — no reconnect by user code — work again once the server is back, and
//! every message sent successfully after the restart is handled.
//! What it cannot show: LocalStack without persistence (`PERSISTENCE=0`, and
//! persistence is not in the community build) comes back with no queues, so the
//! messages that were in the queue are gone with it — that loss is the server's,
//! and no delivery guarantee across a server restart is tested here. The test
//! recreates the queue before letting its clients reach the new server (its clients
//! talk to it through a relay in the test that refuses connections from the kill
//! until then): a Worker whose receive finds the queue missing stops for good
//! (`NotFound` is permanent), which is right for a deleted queue but would make the
//! test a race with its own restart.
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

    /// `kill -9` of its whole process group (the pid leads it: `setsid`).
    fn kill(&self) {
        let status = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid())])
            .status()
            .unwrap();
        assert!(status.success(), "kill -9 failed");
    }

    /// `scripts/sqs.sh start` on the same port and state folder: returns once the new
    /// server answers.
    fn restart(&self) {
        let out = Command::new("bash")
            .arg(script())
            .args(["start", &self.port.to_string()])
            .env("FERRYMQ_SQS_STATE", &self.state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restart on port {} failed: {}{}",
            self.port,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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

/// A TCP relay from a port of its own to the server, which can be closed (its port
/// refuses connections and the relayed ones are cut) and opened again on the same
/// port.
struct Relay {
    port: u16,
    upstream: u16,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay {
            port: listener.local_addr().unwrap().port(),
            upstream,
            tasks: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (upstream, tasks) = (self.upstream, self.tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let relayed = tokio::spawn(async move {
                    if let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut tasks = tasks.lock().unwrap();
                tasks.retain(|t| !t.is_finished());
                tasks.push(relayed.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Refuse connections and cut the open ones.
    fn close(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Accept again, on the same port.
    async fn open(&self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

/// Where the kill test is: what a send's result is judged by.
const BEFORE: u8 = 0;
const DOWN: u8 = 1;
const BACK: u8 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_and_restart_keeps_clients_going() {
    use std::sync::atomic::{AtomicU8, Ordering};

    let server = Server::start();
    let relay = Relay::start(server.port).await;
    let queue = format!("kill-{}", std::process::id());
    let url = |port: u16| {
        format!(
            "sqs://{queue}?endpoint=http://127.0.0.1:{port}&region=us-east-1&access_key_id=test\
             &secret_access_key=test&create=true&visibility=5s&request_timeout=2s&max_attempts=2\
             &connect_timeout=1s&wait=1s"
        )
    };
    let cfg = SqsConfig::from_url(&url(relay.port)).unwrap();
    let producer = Arc::new(cfg.producer().await.unwrap());
    let consumer = cfg.consumer().await.unwrap();

    let handled: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let handled = handled.clone();
        tokio::spawn(
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
                ),
        )
    };

    // One message every 20 ms until told to stop; each result filed under the phase
    // it was sent in (a send that started before the kill but ended after it is
    // filed as DOWN).
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop_sending = Arc::new(tokio::sync::Notify::new());
    let sending = {
        let (producer, phase, stop) = (producer.clone(), phase.clone(), stop_sending.clone());
        tokio::spawn(async move {
            let mut ok: BTreeMap<u8, Vec<String>> = BTreeMap::new();
            let mut errors: BTreeMap<(u8, String), usize> = BTreeMap::new();
            let stopped = stop.notified();
            tokio::pin!(stopped);
            for i in 0usize.. {
                let text = format!("k{i:05}");
                let sent_in = phase.load(Ordering::SeqCst);
                let result = producer.send(Message::new(text.clone())).await;
                let sent_in = sent_in.max(phase.load(Ordering::SeqCst));
                match result {
                    Ok(_) => ok.entry(sent_in).or_default().push(text),
                    Err(e) => {
                        assert!(
                            retryable(e.kind()),
                            "send error (phase {sent_in}) not retryable: {e}"
                        );
                        *errors
                            .entry((sent_in, format!("{:?}", e.kind())))
                            .or_insert(0) += 1;
                    }
                }
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            (ok, errors)
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    phase.store(DOWN, Ordering::SeqCst);
    let down_at = Instant::now();
    tokio::task::block_in_place(|| server.kill());
    // From the kill on the relay refuses: the restarted server must have the queue
    // before the clients reach it (see the module docs).
    relay.close();
    tokio::task::block_in_place(|| server.restart());
    SqsConfig::from_url(&url(server.port))
        .unwrap()
        .producer()
        .await
        .unwrap();
    let restart = down_at.elapsed();
    relay.open().await;
    phase.store(BACK, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_sending.notify_one();
    let (ok, errors) = sending.await.unwrap();

    let after: HashSet<String> = ok
        .get(&BACK)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert!(
        after.len() >= 20,
        "sends after the restart should succeed again: {} ok, errors {errors:?}",
        after.len()
    );
    assert!(
        errors.keys().any(|(p, _)| *p == DOWN),
        "the kill should have made some sends fail (typed): {errors:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing = {
            let handled = handled.lock().unwrap();
            after.iter().filter(|t| !handled.contains_key(*t)).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            !worker.is_finished(),
            "the worker stopped after the restart; {missing} messages sent afterwards unhandled"
        );
        assert!(
            Instant::now() < deadline,
            "{missing} of {} messages sent after the restart were never handled",
            after.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!worker.is_finished(), "the worker must still be running");
    let _ = stop_tx.send(());
    let summary = worker.await.unwrap().unwrap();
    let before = ok.get(&BEFORE).map_or(0, Vec::len);
    let handled = handled.lock().unwrap();
    let before_handled = ok
        .get(&BEFORE)
        .map_or(0, |v| v.iter().filter(|t| handled.contains_key(*t)).count());
    eprintln!(
        "kill: restart took {restart:?}; sends ok per phase (0 before, 1 down, 2 back): {:?}; \
         errors {errors:?}; {before_handled} of {before} sent before the kill were handled \
         (the rest went with the server's queue); worker {summary:?}",
        ok.iter().map(|(p, v)| (*p, v.len())).collect::<Vec<_>>()
    );
    assert_eq!(summary.panics, 0);
}
