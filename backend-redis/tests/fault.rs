//! Fault tests against a redis-server of their own (`appendonly yes`,
//! `appendfsync always`): kill -9 and restart it, or freeze it (SIGSTOP 5 s), while
//! 20k messages are in flight between a producer and a worker. Every message must be
//! processed at least once and none may be left unacked; errors while the server is
//! gone must be typed (`Connection` / `Timeout`, and `OutcomeUnknown` for sends), never a panic. Also: the startup
//! warning for an eviction policy that can drop queue keys (a server of its own, so
//! the shared one's config is left alone).
//!
//! Needs `redis-server` on PATH (`scripts/redis.sh start` installs it).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrymq_core::{Consumer, ErrorKind, Message, Producer};
use ferrymq_redis::{RedisConfig, RedisConsumer, RedisProducer};

const TOTAL: usize = 20_000;

/// A redis-server child process with AOF on, in a temp dir of its own.
struct Server {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start() -> Server {
        Server::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("ferrymq-fault-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server {
            port,
            dir,
            child: None,
        };
        s.spawn_with(extra);
        s
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    fn spawn_with(&mut self, extra: &[&str]) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); install it with scripts/redis.sh start")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "ping"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
                .unwrap_or(false);
            if ok {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                panic!(
                    "redis-server on port {} did not answer PING within 10 s; log:\n{log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> String {
        self.child.as_ref().unwrap().id().to_string()
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn url(&self, queue: &str) -> String {
        format!(
            "redis://127.0.0.1:{}/{queue}?visibility=2s&command_timeout=1s&connect_timeout=1s",
            self.port
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the producer and worker saw.
#[derive(Default)]
struct Seen {
    sent: AtomicUsize,
    processed: Mutex<HashSet<u32>>,
    deliveries: AtomicUsize,
    errors: Mutex<BTreeMap<String, usize>>,
    bad_errors: Mutex<Vec<String>>,
}

impl Seen {
    fn error(&self, what: &str, e: &ferrymq_core::Error, allowed: &[ErrorKind]) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(format!("{what}: {:?}", e.kind()))
            .or_default() += 1;
        if !allowed.contains(&e.kind()) {
            self.bad_errors.lock().unwrap().push(format!("{what}: {e}"));
        }
    }
    fn processed(&self) -> usize {
        self.processed.lock().unwrap().len()
    }
}

const TRANSIENT: &[ErrorKind] = &[ErrorKind::Connection, ErrorKind::Timeout];
/// A send may also not know whether it landed (written, then no answer).
const SEND_TRANSIENT: &[ErrorKind] = &[
    ErrorKind::Connection,
    ErrorKind::Timeout,
    ErrorKind::OutcomeUnknown,
];

async fn produce(p: RedisProducer, seen: Arc<Seen>) {
    let mut next = 0u32;
    while (next as usize) < TOTAL {
        let batch: Vec<Message> = (next..next + 100)
            .map(|i| Message::new(i.to_le_bytes().to_vec()))
            .collect();
        match p.send_batch(batch).await {
            Ok(results) => {
                let mut all_ok = true;
                for r in results {
                    if let Err(e) = r {
                        seen.error("send entry", &e, SEND_TRANSIENT);
                        all_ok = false;
                    }
                }
                if all_ok {
                    next += 100;
                    seen.sent.store(next as usize, Ordering::Relaxed);
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(e) => {
                // Retry the batch: some of it may have landed (duplicates are fine).
                seen.error("send", &e, SEND_TRANSIENT);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn work(c: RedisConsumer, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match c.receive(100, Duration::from_millis(200)).await {
            Ok(ds) => {
                seen.deliveries.fetch_add(ds.len(), Ordering::Relaxed);
                // "Handle" each message, then ack the batch.
                {
                    let mut processed = seen.processed.lock().unwrap();
                    for d in &ds {
                        processed.insert(u32::from_le_bytes(d.payload()[..4].try_into().unwrap()));
                    }
                }
                let acks = futures::future::join_all(ds.iter().map(|d| d.ack())).await;
                for r in acks {
                    match r {
                        Ok(()) => {}
                        // Not known to be acked: if the ack did not land, the message
                        // comes back after the visibility timeout and is handled again.
                        Err(e) => seen.error(
                            "ack",
                            &e,
                            &[
                                ErrorKind::Connection,
                                ErrorKind::Timeout,
                                ErrorKind::LeaseExpired,
                            ],
                        ),
                    }
                }
            }
            Err(e) => {
                seen.error("receive", &e, TRANSIENT);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Run producer + worker; call `fault` once `at` messages were processed; then wait
/// until all are processed and the queue is empty. Returns a report line.
async fn run_with_fault(
    server: &mut Server,
    queue: &str,
    fault: impl FnOnce(&mut Server),
) -> String {
    let cfg = RedisConfig::from_url(&server.url(queue)).unwrap();
    let (p, c) = cfg.connect().await.unwrap();
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let producer = tokio::spawn(produce(p.clone(), seen.clone()));
    let worker = tokio::spawn(work(c.clone(), seen.clone(), stop.clone()));

    while seen.processed() < TOTAL / 4 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no progress before the fault"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at = seen.processed();
    let sent_at = seen.sent.load(Ordering::Relaxed);
    let fault_at = t0.elapsed();
    // The fault blocks this thread (a std sleep inside it) — the runtime's other
    // threads keep producing and working.
    tokio::task::block_in_place(|| fault(server));
    let recovered_from = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(40);
    let empty = loop {
        if seen.processed() == TOTAL {
            if let Ok(d) = c.depth().await {
                if d.total() == 0 {
                    break d;
                }
            }
        }
        if Instant::now() > deadline {
            let errors = format!("{:?}", seen.errors.lock().unwrap());
            panic!(
                "not all processed: {} of {TOTAL}, depth {:?}, errors {errors}",
                seen.processed(),
                c.depth().await,
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let recovery = recovered_from.elapsed();
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    worker.await.unwrap();
    let bad = seen.bad_errors.lock().unwrap().clone();
    assert!(bad.is_empty(), "untyped errors: {bad:?}");
    let processed = seen.processed.lock().unwrap().clone();
    assert_eq!(processed.len(), TOTAL);
    assert!((0..TOTAL as u32).all(|i| processed.contains(&i)));
    assert_eq!(empty.total(), 0, "nothing left unacked");
    format!(
        "{queue}: fault after {fault_at:?}, {sent_at} sent, {at} processed; all {TOTAL} processed and queue empty {recovery:?} after recovery; \
         {} deliveries ({} redelivered or duplicated); errors while down: {:?}",
        seen.deliveries.load(Ordering::Relaxed),
        seen.deliveries.load(Ordering::Relaxed) - TOTAL,
        seen.errors.lock().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_loses_nothing() {
    let mut server = Server::start();
    let report = run_with_fault(&mut server, "fault-kill", |s| {
        s.kill9();
        std::thread::sleep(Duration::from_millis(500));
        s.spawn(); // replays the append-only file
    })
    .await;
    eprintln!("kill -9: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_for_5s_then_sigcont_loses_nothing() {
    let mut server = Server::start();
    let report = run_with_fault(&mut server, "fault-stop", |s| {
        s.signal("-STOP");
        std::thread::sleep(Duration::from_secs(5));
        s.signal("-CONT");
    })
    .await;
    eprintln!("SIGSTOP 5 s: {report}");
}

/// A writer collecting tracing output for the eviction-policy check.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn warns_when_maxmemory_policy_can_evict_queue_keys() {
    let server = Server::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]);
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let cfg = RedisConfig::from_url(&server.url("evictable")).unwrap();
    let (p, _c) = cfg.connect().await.unwrap();
    p.send(Message::new("still works")).await.unwrap();
    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(out.contains("WARN"), "{out}");
    assert!(out.contains("allkeys-lru"), "{out}");
    assert!(out.contains("evict queue keys"), "{out}");
}

/// Issue 12 (a worker that never silently stops): Redis killed -9 under a running
/// `Worker` and restarted from its AOF 3 s later. The worker keeps retrying by
/// itself — no restart of the process, no call from the application — and its
/// health says `Degraded` while Redis is gone and `Running` once it consumes again;
/// messages sent before the kill and after the restart are all handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_resumes_by_itself_after_a_restart_and_its_health_says_so() {
    use ferrymq_core::middleware::handler_fn;
    use ferrymq_core::worker::{HealthState, Worker};
    use ferrymq_core::{BoxError, Delivery};

    let mut server = Server::start();
    let cfg = RedisConfig::from_url(&server.url("fault-health")).unwrap();
    let (p, c) = cfg.connect().await.unwrap();
    let worker = Worker::new(c)
        .concurrency(4)
        .poll_wait(Duration::from_millis(200))
        .receive_error_backoff(Duration::from_millis(200));
    let health = worker.health();
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let h = handled.clone();
    let svc = handler_fn(move |d: Delivery| {
        let h = h.clone();
        async move {
            h.lock().unwrap().insert(d.payload().to_vec());
            Ok::<_, BoxError>(())
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(svc, async {
        let _ = stop_rx.await;
    }));
    let wait_for = |what: &'static str, limit: Duration, cond: Box<dyn Fn() -> bool + Send>| async move {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    for i in 0..100 {
        p.send(Message::new(format!("before-{i}"))).await.unwrap();
    }
    let h = handled.clone();
    wait_for(
        "the first 100",
        Duration::from_secs(10),
        Box::new(move || h.lock().unwrap().len() == 100),
    )
    .await;
    assert!(health.is_healthy(), "{:?}", health.report());

    tokio::task::block_in_place(|| server.kill9());
    let down_at = Instant::now();
    let hc = health.clone();
    wait_for(
        "Degraded",
        Duration::from_secs(5),
        Box::new(move || hc.report().state == HealthState::Degraded),
    )
    .await;
    let noticed = down_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_down = health.report();
    assert_eq!(while_down.state, HealthState::Degraded, "{while_down:?}");
    assert!(
        matches!(
            while_down.last_error_kind,
            Some(ErrorKind::Connection | ErrorKind::Timeout)
        ),
        "{while_down:?}"
    );

    tokio::task::block_in_place(|| server.spawn());
    let up_at = Instant::now();
    let hc = health.clone();
    wait_for(
        "Running again",
        Duration::from_secs(10),
        Box::new(move || hc.is_healthy()),
    )
    .await;
    let resumed = up_at.elapsed();
    for i in 0..100 {
        p.send(Message::new(format!("after-{i}"))).await.unwrap();
    }
    let h = handled.clone();
    wait_for(
        "all 200",
        Duration::from_secs(10),
        Box::new(move || h.lock().unwrap().len() == 200),
    )
    .await;
    eprintln!(
        "health: Degraded {noticed:?} after the kill ({} failed receives in a row while down), \
         Running {resumed:?} after the restart",
        while_down.consecutive_errors
    );
    stop_tx.send(()).unwrap();
    let summary = run.await.unwrap().unwrap();
    // Acks in flight at the kill fail (counted as failed) and those messages come
    // back: every one was handled (checked above), and every delivery is accounted.
    assert!(summary.received >= 200, "{summary:?}");
    assert_eq!(
        summary.received,
        summary.succeeded + summary.failed,
        "{summary:?}"
    );
}

/// A consumer keeps receiving while its server is killed and comes back *empty*
/// (no persistence: the stream, its consumer group and the loaded scripts are
/// gone): it resumes by itself — reconnects, reloads its scripts, creates the group
/// again — and receives what is sent after the restart, within seconds. For a plain
/// queue and an ordered one (`ordered=true`, whose receive is a script of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_a_restart_that_lost_everything() {
    for (queue, extra) in [("restart-plain", ""), ("restart-ordered", "&ordered=true")] {
        let mut server = Server::start_with(&["--appendonly", "no"]);
        let url = format!("{}{extra}", server.url(queue));
        let cfg = RedisConfig::from_url(&url).unwrap();
        let (p, c) = cfg.connect().await.unwrap();
        let got: Arc<Mutex<Vec<String>>> = Arc::default();
        let errors: Arc<Mutex<Vec<ErrorKind>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let consumer = {
            let (c, got, errors, stop) = (c.clone(), got.clone(), errors.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match c.receive(10, Duration::from_millis(200)).await {
                        Ok(ds) => {
                            for d in ds {
                                got.lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(d.payload()).into_owned());
                                let _ = d.ack().await;
                            }
                        }
                        Err(e) => {
                            errors.lock().unwrap().push(e.kind());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        };
        p.send(Message::new("before").key("k")).await.unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while got.lock().unwrap().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            *got.lock().unwrap(),
            ["before"],
            "{queue}: before the restart"
        );

        tokio::task::block_in_place(|| {
            server.kill9();
            std::thread::sleep(Duration::from_millis(1500));
            server.spawn_with(&["--appendonly", "no"]);
        });
        let back = Instant::now();
        // Sends retry until the server answers (the producer reconnects too).
        let mut sent = false;
        while !sent && back.elapsed() < Duration::from_secs(10) {
            sent = p.send(Message::new("after").key("k")).await.is_ok();
            if !sent {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(
            sent,
            "{queue}: the producer could not send after the restart"
        );
        let until = Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().len() < 2 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let resumed = back.elapsed();
        stop.store(true, Ordering::Relaxed);
        consumer.await.unwrap();
        assert_eq!(
            *got.lock().unwrap(),
            ["before", "after"],
            "{queue}: the consumer did not resume within 10 s of the restart (errors {:?})",
            errors.lock().unwrap()
        );
        let errors = errors.lock().unwrap().clone();
        assert!(
            errors.iter().all(|k| TRANSIENT.contains(k)),
            "{queue}: untyped errors while down: {errors:?}"
        );
        eprintln!(
            "{queue}: resumed {resumed:?} after the restart; {} receive errors while down ({errors:?})",
            errors.len()
        );
    }
}
