//! The Redis schedule store against a real server: the store's contract, one winner
//! among concurrent claims, and three schedulers — restarted and killed mid-way —
//! enqueueing every run exactly once.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use common::config;
use ferrymq_core::schedule::{
    CatchUp, ClaimOutcome, ClaimRequest, Every, ScheduleDef, ScheduleStore, Scheduler,
    SchedulerSummary, Upserted, SCHEDULED_FOR, SCHEDULE_ID,
};
use ferrymq_core::{Capabilities, Consumer, Depth, Message, Producer, SendReceipt};
use ferrymq_redis::{RedisConfig, RedisConsumer, RedisProducer, RedisScheduleStore};

fn request(
    entry: &ferrymq_core::schedule::ScheduleEntry,
    run: DateTime<Utc>,
    owner: &str,
    lease: Duration,
) -> ClaimRequest {
    ClaimRequest {
        revision: entry.state.revision,
        cursor: entry.state.cursor,
        run,
        enqueue: true,
        owner: owner.into(),
        lease,
        now: Utc::now(),
    }
}

#[tokio::test]
async fn store_contract() {
    let cfg = config("sched-store", "");
    let a = RedisScheduleStore::connect(&cfg).await.unwrap();
    let b = RedisScheduleStore::connect(&cfg).await.unwrap();
    let t0 = Utc::now();
    let def = ScheduleDef::new("s", Every::interval(Duration::from_secs(60)).unwrap());

    let (up, e) = a.upsert(&def, t0).await.unwrap();
    assert_eq!(up, Upserted::Created);
    assert_eq!(e.state.revision, 1);
    assert_eq!(e.state.cursor.timestamp_millis(), t0.timestamp_millis());
    assert_eq!(
        b.upsert(&def, Utc::now()).await.unwrap().0,
        Upserted::Unchanged
    );
    let (up, e2) = b
        .upsert(&def.clone().payload("v2"), Utc::now())
        .await
        .unwrap();
    assert_eq!(up, Upserted::Updated);
    assert_eq!(e2.state, e.state, "progress kept");
    assert_eq!(a.list().await.unwrap().len(), 1);
    assert_eq!(
        a.get("s")
            .await
            .unwrap()
            .unwrap()
            .def
            .template()
            .payload()
            .as_ref(),
        b"v2"
    );

    // One claim; the other store is busy, then moved once it completed.
    let run = e.state.cursor + TimeDelta::minutes(1);
    let lease = Duration::from_secs(30);
    let won = a.claim("s", &request(&e, run, "A", lease)).await.unwrap();
    assert!(
        matches!(won, ClaimOutcome::Won(ref p) if p.run == run && p.owner == "A"),
        "{won:?}"
    );
    let busy = b.claim("s", &request(&e, run, "B", lease)).await.unwrap();
    assert!(
        matches!(busy, ClaimOutcome::Busy(ref p) if p.owner == "A"),
        "{busy:?}"
    );
    assert_eq!(
        b.complete("s", "B", run).await.unwrap(),
        None,
        "B holds no claim"
    );
    let done = a.complete("s", "A", run).await.unwrap().unwrap();
    assert_eq!(done.state.cursor, run);
    assert_eq!(done.state.last_enqueued, Some(run));
    assert!(done.state.pending.is_none());
    let moved = b.claim("s", &request(&e, run, "B", lease)).await.unwrap();
    assert!(
        matches!(moved, ClaimOutcome::Moved(ref m) if m.state.cursor == run),
        "{moved:?}"
    );

    // A claim whose lease ran out (server clock) is taken over as it was.
    let next = run + TimeDelta::minutes(1);
    let short = Duration::from_millis(200);
    assert!(matches!(
        a.claim("s", &request(&done, next, "A", short))
            .await
            .unwrap(),
        ClaimOutcome::Won(_)
    ));
    let other = next + TimeDelta::minutes(5);
    assert!(matches!(
        b.claim("s", &request(&done, other, "B", lease))
            .await
            .unwrap(),
        ClaimOutcome::Busy(_)
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = b
        .claim("s", &request(&done, other, "B", lease))
        .await
        .unwrap();
    assert!(
        matches!(taken, ClaimOutcome::Won(ref p) if p.run == next && p.owner == "B"),
        "the expired claim's run, not the one asked for: {taken:?}"
    );
    assert_eq!(a.complete("s", "A", next).await.unwrap(), None, "A lost it");
    assert!(b.complete("s", "B", next).await.unwrap().is_some());

    // Abandon drops only the holder's claim.
    let e = a.get("s").await.unwrap().unwrap();
    let run3 = next + TimeDelta::minutes(1);
    assert!(matches!(
        a.claim("s", &request(&e, run3, "A", lease)).await.unwrap(),
        ClaimOutcome::Won(_)
    ));
    b.abandon("s", "B", run3).await.unwrap();
    assert!(a.get("s").await.unwrap().unwrap().state.pending.is_some());
    a.abandon("s", "A", run3).await.unwrap();
    assert!(a.get("s").await.unwrap().unwrap().state.pending.is_none());

    // A new timing: new revision, anchor and cursor at the upsert, claim dropped.
    let every2 = ScheduleDef::new("s", Every::cron_in("0 9 * * *", "Europe/Berlin").unwrap());
    let later = Utc::now() + TimeDelta::hours(1);
    let (up, e) = a.upsert(&every2, later).await.unwrap();
    assert_eq!(up, Upserted::Rescheduled);
    assert_eq!(e.state.revision, 2);
    assert_eq!(e.state.anchor.timestamp_millis(), later.timestamp_millis());
    assert_eq!(e.state.last_enqueued, Some(next));

    assert!(a.remove("s").await.unwrap());
    assert!(!b.remove("s").await.unwrap());
    assert!(a.list().await.unwrap().is_empty());
    assert_eq!(
        b.claim("s", &request(&e, later, "B", lease)).await.unwrap(),
        ClaimOutcome::Gone
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_of_many_concurrent_claims_wins() {
    let cfg = config("sched-race", "");
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(RedisScheduleStore::connect(&cfg).await.unwrap());
    }
    let def = ScheduleDef::new("race", Every::interval(Duration::from_secs(1)).unwrap());
    let (_, mut entry) = stores[0].upsert(&def, Utc::now()).await.unwrap();
    for round in 1..=20 {
        let run = entry.state.cursor + TimeDelta::seconds(1);
        let outcomes = futures::future::join_all((0..40).map(|i| {
            let store = stores[i % stores.len()].clone();
            let req = request(&entry, run, &format!("owner-{i}"), Duration::from_secs(30));
            async move { store.claim("race", &req).await.unwrap() }
        }))
        .await;
        let winners: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                ClaimOutcome::Won(p) => Some(p.owner.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        entry = stores[1]
            .complete("race", &winners[0], run)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A producer without the dedup id: on it, only the claims keep runs single.
struct NoDedup(RedisProducer);

#[async_trait]
impl Producer for NoDedup {
    async fn send(&self, mut message: Message) -> ferrymq_core::Result<SendReceipt> {
        message.take_dedup_id();
        self.0.send(message).await
    }
    async fn close(&self) -> ferrymq_core::Result<()> {
        self.0.close().await
    }
    async fn depth(&self) -> ferrymq_core::Result<Depth> {
        self.0.depth().await
    }
    fn queue(&self) -> &str {
        self.0.queue()
    }
    fn capabilities(&self) -> &Capabilities {
        self.0.capabilities()
    }
}

const EVERY: Duration = Duration::from_millis(200);

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<SchedulerSummary>,
}

async fn start(cfg: &RedisConfig, dedup: bool) -> Running {
    let store = RedisScheduleStore::connect(cfg).await.unwrap();
    let producer = cfg.producer().await.unwrap();
    let scheduler = if dedup {
        Scheduler::new(producer, store)
    } else {
        Scheduler::new(NoDedup(producer), store)
    }
    .poll_interval(Duration::from_millis(50))
    .lease(Duration::from_millis(800));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        scheduler
            .run_until(async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
    });
    Running { stop, task }
}

impl Running {
    async fn stop(self) -> SchedulerSummary {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Every message on the queue, acked: run time → how many messages.
async fn drain(consumer: &RedisConsumer) -> BTreeMap<DateTime<Utc>, usize> {
    let mut runs = BTreeMap::new();
    loop {
        let batch = consumer
            .receive(500, Duration::from_millis(200))
            .await
            .unwrap();
        if batch.is_empty() {
            return runs;
        }
        for d in batch {
            let h = d.message().headers();
            assert_eq!(h.get(SCHEDULE_ID), Some("every-200ms"));
            let at = DateTime::parse_from_rfc3339(h.get(SCHEDULED_FOR).unwrap())
                .unwrap()
                .with_timezone(&Utc);
            *runs.entry(at).or_insert(0) += 1;
            d.ack().await.unwrap();
        }
    }
}

/// Every run from the first to the last of the schedule is on the queue, once.
async fn assert_every_run_once(cfg: &RedisConfig, store: &RedisScheduleStore, min_runs: usize) {
    let (_, consumer) = cfg.connect().await.unwrap();
    let runs = drain(&consumer).await;
    let entry = store.get("every-200ms").await.unwrap().unwrap();
    let step = TimeDelta::from_std(EVERY).unwrap();
    let expected: Vec<DateTime<Utc>> = (1..)
        .map(|k| entry.state.anchor + step * k)
        .take_while(|t| *t <= entry.state.cursor)
        .collect();
    let dups: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "runs enqueued more than once: {dups:?}");
    let got: Vec<DateTime<Utc>> = runs.keys().copied().collect();
    assert_eq!(
        got, expected,
        "every run from the anchor to the cursor, none missed"
    );
    assert!(got.len() >= min_runs, "only {} runs", got.len());
}

async fn upsert(cfg: &RedisConfig) -> RedisScheduleStore {
    let store = RedisScheduleStore::connect(cfg).await.unwrap();
    store
        .upsert(
            &ScheduleDef::new("every-200ms", Every::interval(EVERY).unwrap())
                .catch_up(CatchUp::All { max: 100 })
                .payload("run"),
            Utc::now(),
        )
        .await
        .unwrap();
    store
}

/// Three schedulers on a producer that does not deduplicate: one is replaced
/// mid-way, then all three stop for a second of downtime and three new ones catch
/// up (`All`). Every run is on the queue exactly once — by the claims alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_restarted_enqueue_every_run_once_by_the_claims_alone() {
    let cfg = config("sched-three", "");
    let store = upsert(&cfg).await;
    let mut running = Vec::new();
    for _ in 0..3 {
        running.push(start(&cfg, false).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let replaced = running.remove(0).stop().await;
    running.push(start(&cfg, false).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut summaries = vec![replaced];
    for r in running.drain(..) {
        summaries.push(r.stop().await);
    }
    // Down for a second: five runs missed, caught up by the next schedulers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        running.push(start(&cfg, false).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for r in running.drain(..) {
        summaries.push(r.stop().await);
    }
    assert!(summaries.iter().all(|s| s.duplicates == 0), "{summaries:?}");
    assert_every_run_once(&cfg, &store, 20).await;
}

/// Three schedulers, killed (the task dropped wherever it was: mid-claim, mid-send)
/// one after another and replaced, on the real producer: a claim a killed scheduler
/// left is taken over after its lease and re-sent with the same dedup id, so every
/// run is on the queue exactly once and none is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_killed_mid_way_miss_nothing_and_duplicate_nothing() {
    let cfg = config("sched-kill", "");
    let store = upsert(&cfg).await;
    let mut running = Vec::new();
    for _ in 0..3 {
        running.push(start(&cfg, true).await);
    }
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(450 + 70 * i)).await;
        running.remove(0).kill().await;
        running.push(start(&cfg, true).await);
    }
    // Kill them all, stay down for a second, come back.
    for r in running.drain(..) {
        r.kill().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        running.push(start(&cfg, true).await);
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for r in running.drain(..) {
        r.stop().await;
    }
    assert_every_run_once(&cfg, &store, 20).await;
    let _ = Arc::new(());
}

/// A redis-server of the test's own with the append-only file on (`appendfsync
/// always`), killed with SIGKILL and restarted on the same port and directory.
struct AofServer {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl AofServer {
    fn start() -> AofServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("ferrymq-sched-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = AofServer {
            port,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}); install it with scripts/redis.sh start")
            });
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while redis::Client::open(format!("redis://127.0.0.1:{}", self.port))
            .and_then(|c| c.get_connection())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for AofServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three schedulers while the Redis server is killed (-9) and restarted: the
/// runs that came due while it was down are caught up (`All`), and every run from
/// the schedule's start to its last is on the queue exactly once. Errors while it
/// is down are typed and retried; no scheduler stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_three_schedulers_every_run_once() {
    let mut server = AofServer::start();
    let url = format!(
        "redis://127.0.0.1:{}/sched-fault?command_timeout=500ms&connect_timeout=500ms",
        server.port
    );
    let cfg = RedisConfig::from_url(&url).unwrap();
    let store = upsert(&cfg).await;
    let mut running = Vec::new();
    for _ in 0..3 {
        running.push(start(&cfg, true).await);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tokio::task::block_in_place(|| {
        server.kill9();
        std::thread::sleep(Duration::from_millis(1000));
        server.spawn(); // replays the append-only file
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut errors = 0;
    for r in running {
        let summary = r.stop().await;
        errors += summary.errors;
    }
    assert!(errors > 0, "the schedulers noticed the server was gone");
    drop(store); // its connection broke with the server; read with a new one
    let store = RedisScheduleStore::connect(&cfg).await.unwrap();
    assert_every_run_once(&cfg, &store, 20).await;
}
