//! The chaos worker: a `Worker` with the default middleware stack over a Redis queue,
//! that writes down every step it takes before taking the next one, so a test can kill
//! it with SIGKILL at any moment and still account for every message from the log.
//!
//! ```text
//! scripts/redis.sh start 6419
//! CHAOS_URL='redis://127.0.0.1:6419/chaos?visibility=2s' \
//! CHAOS_DLQ_URL='redis://127.0.0.1:6419/chaos-dlq' CHAOS_LOG=/tmp/chaos.log \
//!     cargo run -p ferrymq-redis --example chaos_worker
//! ```
//!
//! The tests (`tests/kill9.rs`, `tests/soak.rs`) and the soak (`examples/soak.rs`)
//! include this file with `#[path]` and start it as a child process — the test binary
//! re-executing itself in "worker mode", since a test cannot build an example — then
//! kill it, restart it, and read its log. They also use the rest of this file: the log
//! reader, a `redis-server` child of their own, and the Redis figures.
//!
//! # The worker
//!
//! `ExtendVisibility` (from the queue's capabilities) → `RetryToDlq` (3 attempts,
//! backoff from 50 ms, to the queue at `CHAOS_DLQ_URL`) → `CatchPanic` → the handler.
//! A message's payload is its decimal id; the handler sleeps a random
//! 0..=`CHAOS_SLEEP_MAX_US` µs (the mid-handler window a kill lands in) and succeeds,
//! except for [poison](is_poison) ids (1 in 100), which always fail and so end in the
//! DLQ after 3 attempts.
//!
//! # The log
//!
//! One line per event, `<event> <id> <pid> <attempt> [note]`, each written with one
//! `write(2)` to a file opened with `O_APPEND`: a line is complete once the call
//! returns — a SIGKILL afterwards cannot take it back, the kernel has it — and lines
//! of workers running at the same time never interleave. Every line is written
//! *before* the step it reports returns to the middleware, so the log never misses a
//! handler run that the queue might consider done. Events:
//!
//! | event | written | meaning |
//! |---|---|---|
//! | `W` | at start | worker process started (note: consumer name) |
//! | `S` | handler start | a run of message `id`, delivery attempt `attempt` |
//! | `K` | before the handler returns `Ok` | the run succeeded |
//! | `F` | before the handler returns `Err` | the run failed (poison) |
//! | `A` / `N` / `R` | after the ack / nack / release returned `Ok` | settled |
//! | `E` | after a settle or DLQ send failed | note: `ack:Kind`, `nack:Kind`, … |
//! | `P` / `D` | before / after a DLQ publish that returned `Ok` | dead-lettered copy |
//! | `X` | just before a self-inflicted abort | note: the abort point |
//! | `Q` | after a clean shutdown | note: the worker summary |
//!
//! With `CHAOS_LOG_EVENTS=min` only `W K F D E X Q` are written (the soak's million
//! messages).
//!
//! # Environment
//!
//! - `CHAOS_URL` (required): the source queue; `CHAOS_DLQ_URL` (required): the DLQ.
//! - `CHAOS_LOG` (required): the log file (created, appended to).
//! - `CHAOS_CONCURRENCY` (8), `CHAOS_PREFETCH` (16), `CHAOS_SLEEP_MAX_US` (3000).
//! - `CHAOS_EXIT_WHEN_EMPTY=1`: shut down gracefully once the source queue's depth
//!   was 0 three times in a row, 200 ms apart (otherwise: run until killed).
//! - `CHAOS_ABORT=<point>:<n>`: call `std::process::abort()` at the n-th time (1-based)
//!   this process reaches `<point>`:
//!   - `before-ack`: an ack was asked for (the handler returned `Ok`, or `RetryToDlq`
//!     published the DLQ copy) and was not sent yet;
//!   - `after-dlq`: a DLQ publish returned `Ok`, before `RetryToDlq` acks the source;
//!   - `mid-nack`: a nack is being sent: the process aborts 0–1.5 ms later, from
//!     another thread, while the nack is on the wire or just answered.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ferrymq_core::middleware::{
    handler_fn, Backoff, CatchPanicLayer, ExtendVisibilityLayer, RetryToDlqLayer,
};
use ferrymq_core::worker::Worker;
use ferrymq_core::{
    Ack, AckHandle, BoxError, Capabilities, Consumer, Delivery, Depth, Message, Producer,
    SendReceipt,
};
use ferrymq_redis::{RedisConfig, RedisConsumer, RedisProducer};
use rand::Rng;
use tower::ServiceBuilder;

/// Set (to anything) in a test binary's environment to run it as the chaos worker.
pub const CHILD_ENV: &str = "CHAOS_CHILD";

fn main() {
    std::process::exit(child_main());
}

/// Poison messages (always fail): one id in 100.
pub fn is_poison(id: u64) -> bool {
    id % 100 == 42
}

/// A message's id from its payload; `u64::MAX` when it is not one of ours.
pub fn message_id(payload: &[u8]) -> u64 {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The message carrying `id`.
pub fn message(id: u64) -> Message {
    Message::new(id.to_string())
}

// ---------------------------------------------------------------------------------
// The worker (child process side)
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    BeforeAck,
    AfterDlq,
    MidNack,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::BeforeAck => "before-ack",
            Point::AfterDlq => "after-dlq",
            Point::MidNack => "mid-nack",
        }
    }
}

#[derive(Debug)]
struct Options {
    url: String,
    dlq_url: String,
    log: PathBuf,
    concurrency: usize,
    prefetch: usize,
    sleep_max_us: u64,
    exit_when_empty: bool,
    abort: Option<(Point, u64)>,
    all_events: bool,
}

fn env_required(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a whole number")),
    }
}

impl Options {
    fn from_env() -> Result<Options, String> {
        let abort = match std::env::var("CHAOS_ABORT") {
            Err(_) => None,
            Ok(v) if v.is_empty() || v == "none" => None,
            Ok(v) => {
                let (point, n) = v
                    .split_once(':')
                    .ok_or_else(|| format!("CHAOS_ABORT={v:?}: expected <point>:<n>"))?;
                let point = match point {
                    "before-ack" => Point::BeforeAck,
                    "after-dlq" => Point::AfterDlq,
                    "mid-nack" => Point::MidNack,
                    other => {
                        return Err(format!(
                            "CHAOS_ABORT: unknown point {other:?} (before-ack, after-dlq, mid-nack)"
                        ))
                    }
                };
                let n = n
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("CHAOS_ABORT={v:?}: <n> must be 1 or more"))?;
                Some((point, n))
            }
        };
        Ok(Options {
            url: env_required("CHAOS_URL")?,
            dlq_url: env_required("CHAOS_DLQ_URL")?,
            log: env_required("CHAOS_LOG")?.into(),
            concurrency: env_number("CHAOS_CONCURRENCY", 8)? as usize,
            prefetch: env_number("CHAOS_PREFETCH", 16)? as usize,
            sleep_max_us: env_number("CHAOS_SLEEP_MAX_US", 3000)?,
            exit_when_empty: std::env::var("CHAOS_EXIT_WHEN_EMPTY").is_ok_and(|v| v == "1"),
            abort,
            all_events: std::env::var("CHAOS_LOG_EVENTS").map_or(true, |v| v != "min"),
        })
    }
}

/// The log, the abort knob and the per-point counters of one worker process.
#[derive(Debug)]
struct Ctx {
    log: File,
    pid: u32,
    all_events: bool,
    abort: Option<(Point, u64)>,
    /// Times each point was reached (BeforeAck, AfterDlq, MidNack).
    reached: [AtomicU64; 3],
}

impl Ctx {
    fn record(&self, event: char, id: u64, attempt: u32, note: &str) {
        if !self.all_events && !"WKFDEXQ".contains(event) {
            return;
        }
        let line = if note.is_empty() {
            format!("{event} {id} {} {attempt}\n", self.pid)
        } else {
            format!("{event} {id} {} {attempt} {note}\n", self.pid)
        };
        // One write(2) on an O_APPEND file: atomic with respect to other appenders.
        if let Err(e) = (&self.log).write_all(line.as_bytes()) {
            // A run the log does not have would make every count after it wrong.
            eprintln!("chaos_worker: cannot write the log: {e}");
            std::process::exit(3);
        }
    }

    /// Whether this is the moment to abort at `point`.
    fn fires(&self, point: Point) -> bool {
        match self.abort {
            Some((p, n)) if p == point => {
                self.reached[point as usize].fetch_add(1, Ordering::Relaxed) + 1 == n
            }
            _ => false,
        }
    }

    fn abort_now(&self, point: Point, id: u64, attempt: u32) -> ! {
        self.record('X', id, attempt, point.name());
        std::process::abort();
    }
}

/// Settles through the backend's handle, logging each settle, aborting where asked.
#[derive(Debug)]
struct TracedAck {
    inner: AckHandle,
    id: u64,
    attempt: u32,
    ctx: Arc<Ctx>,
}

impl TracedAck {
    fn settled(&self, what: &str, event: char, r: &ferrymq_core::Result<()>) {
        match r {
            Ok(()) => self.ctx.record(event, self.id, self.attempt, ""),
            Err(e) => self.ctx.record(
                'E',
                self.id,
                self.attempt,
                &format!("{what}:{:?}", e.kind()),
            ),
        }
    }
}

#[async_trait]
impl Ack for TracedAck {
    async fn ack(&self) -> ferrymq_core::Result<()> {
        if self.ctx.fires(Point::BeforeAck) {
            self.ctx.abort_now(Point::BeforeAck, self.id, self.attempt);
        }
        let r = self.inner.ack().await;
        self.settled("ack", 'A', &r);
        r
    }

    async fn nack(&self, redeliver_after: Option<Duration>) -> ferrymq_core::Result<()> {
        if self.ctx.fires(Point::MidNack) {
            self.ctx
                .record('X', self.id, self.attempt, Point::MidNack.name());
            let after = Duration::from_micros(rand::thread_rng().gen_range(0..=1500));
            // A thread of its own: the abort must not wait for the runtime.
            std::thread::spawn(move || {
                std::thread::sleep(after);
                std::process::abort();
            });
        }
        let r = self.inner.nack(redeliver_after).await;
        self.settled("nack", 'N', &r);
        r
    }

    async fn extend(&self, by: Duration) -> ferrymq_core::Result<()> {
        self.inner.extend(by).await
    }

    async fn release(&self, redeliver_after: Option<Duration>) -> ferrymq_core::Result<()> {
        let r = self.inner.release(redeliver_after).await;
        self.settled("release", 'R', &r);
        r
    }

    fn is_live(&self) -> bool {
        self.inner.is_live()
    }
}

/// The Redis consumer, its deliveries' handles wrapped in [`TracedAck`] (lease
/// deadline and capabilities kept).
struct TracedConsumer {
    inner: RedisConsumer,
    caps: Arc<Capabilities>,
    ctx: Arc<Ctx>,
}

impl TracedConsumer {
    fn wrap(&self, d: Delivery) -> Delivery {
        let id = message_id(d.payload());
        let attempt = d.attempt();
        let deadline = d.lease_deadline();
        let (message, meta, acker) = d.into_parts();
        let traced = TracedAck {
            inner: acker,
            id,
            attempt,
            ctx: self.ctx.clone(),
        };
        let handle = match deadline {
            Some(at) => AckHandle::with_lease(traced, at),
            None => AckHandle::new(traced),
        };
        Delivery::new(message, meta, handle).with_capabilities(self.caps.clone())
    }
}

#[async_trait]
impl Consumer for TracedConsumer {
    async fn receive(&self, max: usize, wait: Duration) -> ferrymq_core::Result<Vec<Delivery>> {
        let ds = self.inner.receive(max, wait).await?;
        Ok(ds.into_iter().map(|d| self.wrap(d)).collect())
    }
    async fn depth(&self) -> ferrymq_core::Result<Depth> {
        self.inner.depth().await
    }
    async fn close(&self) -> ferrymq_core::Result<()> {
        self.inner.close().await
    }
    fn queue(&self) -> &str {
        self.inner.queue()
    }
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
}

/// The DLQ producer, logging each publish, aborting where asked.
struct TracedDlq {
    inner: RedisProducer,
    ctx: Arc<Ctx>,
}

#[async_trait]
impl Producer for TracedDlq {
    async fn send(&self, message: Message) -> ferrymq_core::Result<SendReceipt> {
        let id = message_id(message.payload());
        self.ctx.record('P', id, 0, "");
        let r = self.inner.send(message).await;
        match &r {
            Ok(_) => {
                self.ctx.record('D', id, 0, "");
                if self.ctx.fires(Point::AfterDlq) {
                    self.ctx.abort_now(Point::AfterDlq, id, 0);
                }
            }
            Err(e) => self.ctx.record('E', id, 0, &format!("dlq:{:?}", e.kind())),
        }
        r
    }
    async fn flush(&self) -> ferrymq_core::Result<()> {
        self.inner.flush().await
    }
    async fn close(&self) -> ferrymq_core::Result<()> {
        self.inner.close().await
    }
    async fn depth(&self) -> ferrymq_core::Result<Depth> {
        self.inner.depth().await
    }
    fn queue(&self) -> &str {
        self.inner.queue()
    }
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
}

/// Run the chaos worker configured by the environment; the process exit code.
pub fn child_main() -> i32 {
    let options = match Options::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chaos_worker: {e}");
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos_worker: no runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(run_worker(options)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("chaos_worker: {e}");
            1
        }
    }
}

async fn run_worker(o: Options) -> Result<(), BoxError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&o.log)
        .map_err(|e| format!("CHAOS_LOG {}: {e}", o.log.display()))?;
    let ctx = Arc::new(Ctx {
        log,
        pid: std::process::id(),
        all_events: o.all_events,
        abort: o.abort,
        reached: Default::default(),
    });
    let cfg = RedisConfig::from_url(&o.url)?;
    let consumer = cfg.consumer().await?;
    let depth_of = cfg.producer().await?;
    let dlq = RedisConfig::from_url(&o.dlq_url)?.producer().await?;
    ctx.record('W', 0, 0, consumer.name());

    let caps = consumer.capabilities().clone();
    let consumer = TracedConsumer {
        caps: Arc::new(caps.clone()),
        inner: consumer,
        ctx: ctx.clone(),
    };
    let dlq: Arc<dyn Producer> = Arc::new(TracedDlq {
        inner: dlq,
        ctx: ctx.clone(),
    });
    let sleep_max_us = o.sleep_max_us;
    let handler = {
        let ctx = ctx.clone();
        handler_fn(move |d: Delivery| {
            let ctx = ctx.clone();
            let pause = Duration::from_micros(rand::thread_rng().gen_range(0..=sleep_max_us));
            async move {
                let id = message_id(d.payload());
                ctx.record('S', id, d.attempt(), "");
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                if is_poison(id) || id == u64::MAX {
                    ctx.record('F', id, d.attempt(), "");
                    Err::<(), BoxError>("poison message: always fails".into())
                } else {
                    ctx.record('K', id, d.attempt(), "");
                    Ok(())
                }
            }
        })
    };
    let service = ServiceBuilder::new()
        .layer(ExtendVisibilityLayer::from_capabilities(&caps))
        .layer(
            RetryToDlqLayer::from_arc(dlq.clone())
                .max_attempts(3)
                .backoff(Backoff::new(Duration::from_millis(50))),
        )
        .layer(CatchPanicLayer::new())
        .service(handler);
    let worker = Worker::new(consumer)
        .concurrency(o.concurrency)
        .prefetch(o.prefetch)
        .poll_wait(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5))
        .depth_interval(None)
        .flush_on_shutdown(dlq);
    let exit_when_empty = o.exit_when_empty;
    let shutdown = async move {
        if !exit_when_empty {
            return std::future::pending::<()>().await;
        }
        let mut empty = 0;
        while empty < 3 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match depth_of.depth().await {
                Ok(d) if d.total() == 0 => empty += 1,
                _ => empty = 0,
            }
        }
    };
    let summary = worker.run_until(service, shutdown).await?;
    ctx.record('Q', 0, 0, &summary.to_string().replace('\n', " "));
    Ok(())
}

// ---------------------------------------------------------------------------------
// The driver side: starting workers, reading their log
// ---------------------------------------------------------------------------------

/// How to start a chaos worker process: this very binary, re-executed.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl WorkerCommand {
    /// A test binary running only its test `entry`, which calls [`child_main`] when
    /// [`CHILD_ENV`] is set.
    pub fn test_binary(entry: &str) -> WorkerCommand {
        WorkerCommand {
            program: std::env::current_exe().expect("the test binary's path"),
            args: vec![
                entry.into(),
                "--exact".into(),
                "--nocapture".into(),
                "--test-threads=1".into(),
            ],
            env: vec![(CHILD_ENV.into(), "1".into())],
        }
    }

    /// Start one worker with `env` added; stdout discarded, stderr inherited.
    pub fn spawn(&self, env: &[(&str, String)]) -> Child {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start a chaos worker {:?}: {e}", self.program))
    }
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: char,
    pub id: u64,
    pub pid: u32,
    pub attempt: u32,
    pub note: String,
}

impl Event {
    pub fn parse(line: &str) -> Option<Event> {
        let mut it = line.splitn(5, ' ');
        let kind = it.next()?.chars().next()?;
        let id = it.next()?.parse().ok()?;
        let pid = it.next()?.parse().ok()?;
        let attempt = it.next()?.parse().ok()?;
        let note = it.next().unwrap_or("").to_string();
        Some(Event {
            kind,
            id,
            pid,
            attempt,
            note,
        })
    }
}

/// Reads the lines appended to a log since the last call.
#[derive(Debug)]
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl LogTail {
    pub fn new(path: &Path) -> LogTail {
        LogTail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The complete lines written since the last call (none when the file is absent).
    pub fn poll(&mut self) -> Vec<Event> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = std::mem::take(&mut self.partial);
        let start = buf.len();
        f.read_to_end(&mut buf).unwrap();
        self.offset += (buf.len() - start) as u64;
        let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.partial = buf.split_off(complete);
        String::from_utf8_lossy(&buf)
            .lines()
            .map(|l| Event::parse(l).unwrap_or_else(|| panic!("bad log line {l:?}")))
            .collect()
    }
}

/// Progress seen in the log: messages handled (non-poison: a successful run; poison:
/// a DLQ copy published).
#[derive(Debug, Default)]
pub struct Progress {
    pub done: std::collections::HashSet<u64>,
    pub ok_runs: u64,
    pub dlq_published: u64,
    pub events: u64,
}

impl Progress {
    pub fn add(&mut self, events: &[Event]) {
        for e in events {
            self.events += 1;
            match e.kind {
                'K' => {
                    self.ok_runs += 1;
                    self.done.insert(e.id);
                }
                'D' => {
                    self.dlq_published += 1;
                    self.done.insert(e.id);
                }
                _ => {}
            }
        }
    }
}

/// SIGKILL a child and reap it.
pub fn kill9(child: &mut Child) {
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
}

/// VmRSS and VmHWM (peak) of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

// ---------------------------------------------------------------------------------
// A redis-server of our own, and what it holds
// ---------------------------------------------------------------------------------

/// A loopback port nobody listens on now, for a server of a test's own: a fixed
/// port collides with whatever else runs on the machine (another suite, a
/// developer's own Redis) and fails the run for nothing.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// A `redis-server` child on a fixed port, data in a temp dir of its own; killed
/// (SIGKILL) and its dir removed on drop. Restartable on the same dir (AOF replay).
#[derive(Debug)]
pub struct RedisServer {
    pub port: u16,
    pub dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Start one on `port` with `extra` arguments (`--appendonly yes`, …).
    pub fn start(port: u16, extra: &[&str]) -> Result<RedisServer, String> {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            return Err(format!(
                "port {port} is taken (a redis-server left from an earlier run? \
                 `redis-cli -p {port} shutdown nosave`)"
            ));
        }
        let dir = std::env::temp_dir().join(format!("ferrymq-chaos-{port}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut server = RedisServer {
            port,
            dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// (Re)start the process on the same port and dir.
    pub fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                format!("cannot run redis-server ({e}); `scripts/redis.sh start` installs it")
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok();
            if up {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "redis-server on {} exited ({status}); log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on {} did not answer PING within 20 s; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// SIGKILL the server process and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill9(&mut child);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn base_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT/queue?query`.
    pub fn url(&self, queue: &str, query: &str) -> String {
        if query.is_empty() {
            format!("{}/{queue}", self.base_url())
        } else {
            format!("{}/{queue}?{query}", self.base_url())
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw connection to look at keys directly.
pub async fn raw(base_url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(base_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub fn key(queue: &str, suffix: &str) -> String {
    format!("ferrymq:{{{queue}}}:{suffix}")
}

/// Stream levels of a queue with the default 4 priority levels.
pub const LEVELS: usize = 4;

/// The ids of every message in the queue's streams (ready, in flight), by count.
pub async fn ids_in_streams(
    conn: &mut redis::aio::MultiplexedConnection,
    queue: &str,
) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for level in 0..LEVELS {
        let stream = key(queue, &format!("ready:{level}"));
        let mut start = "-".to_string();
        loop {
            let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await
                .unwrap();
            let Some(last) = page.ids.last() else { break };
            start = format!("({}", last.id);
            for entry in &page.ids {
                if let Some(redis::Value::BulkString(p)) = entry.map.get("p") {
                    *out.entry(message_id(p)).or_default() += 1;
                }
            }
        }
    }
    out
}

/// Consumer names in the group of each level stream (XINFO CONSUMERS).
pub async fn consumers(
    conn: &mut redis::aio::MultiplexedConnection,
    queue: &str,
    group: &str,
) -> Vec<usize> {
    let mut out = Vec::new();
    for level in 0..LEVELS {
        let v: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(key(queue, &format!("ready:{level}")))
            .arg(group)
            .query_async(conn)
            .await;
        out.push(v.map(|v| v.len()).unwrap_or(0));
    }
    out
}

/// A field of `INFO <section>`.
pub async fn info_field(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
}

pub async fn dbsize(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    redis::cmd("DBSIZE").query_async(conn).await.unwrap()
}

/// Count per id, as a map, of a list of ids.
pub fn counts<I: IntoIterator<Item = u64>>(ids: I) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for id in ids {
        *m.entry(id).or_default() += 1;
    }
    m
}
