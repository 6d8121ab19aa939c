//! Scheduler tests on tokio's paused clock: hours of schedules in milliseconds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::*;
use crate::memory::{MemoryConfig, MemoryConsumer, MemoryProducer};
use crate::{Consumer, ErrorKind, Producer, Result};

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn at(min: i64) -> DateTime<Utc> {
    t0() + chrono::TimeDelta::minutes(min)
}

fn queue(prefix: &str) -> MemoryConfig {
    static N: AtomicUsize = AtomicUsize::new(0);
    MemoryConfig::new(format!(
        "sched-{prefix}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn connect(cfg: &MemoryConfig) -> (MemoryProducer, MemoryConsumer) {
    cfg.connect().unwrap()
}

fn minutely(id: &str) -> ScheduleDef {
    ScheduleDef::new(id, Every::interval(Duration::from_secs(60)).unwrap()).payload("tick")
}

/// Every message on the queue, acked: (schedule id, scheduled-for).
async fn drain(consumer: &MemoryConsumer) -> Vec<(String, DateTime<Utc>)> {
    let mut out = Vec::new();
    loop {
        let batch = consumer.receive(100, Duration::ZERO).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        for d in batch {
            let h = d.message().headers();
            let id = h.get(SCHEDULE_ID).unwrap().to_string();
            let when = DateTime::parse_from_rfc3339(h.get(SCHEDULED_FOR).unwrap())
                .unwrap()
                .with_timezone(&Utc);
            if let Some(dedup) = d.message().get_dedup_id() {
                assert_eq!(dedup, dedup_id(&id, when));
            }
            out.push((id, when));
            d.ack().await.unwrap();
        }
    }
}

fn runs_of(msgs: &[(String, DateTime<Utc>)], id: &str) -> Vec<DateTime<Utc>> {
    let mut v: Vec<_> = msgs
        .iter()
        .filter(|(i, _)| i == id)
        .map(|(_, t)| *t)
        .collect();
    v.sort();
    v
}

/// A store that yields to the runtime around every call, so that concurrent
/// schedulers on one thread interleave at every step of claim → send → complete.
#[derive(Clone)]
struct Yielding(MemoryScheduleStore);

#[async_trait]
impl ScheduleStore for Yielding {
    async fn upsert(
        &self,
        def: &ScheduleDef,
        now: DateTime<Utc>,
    ) -> Result<(Upserted, ScheduleEntry)> {
        tokio::task::yield_now().await;
        self.0.upsert(def, now).await
    }
    async fn remove(&self, id: &str) -> Result<bool> {
        tokio::task::yield_now().await;
        self.0.remove(id).await
    }
    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>> {
        tokio::task::yield_now().await;
        self.0.get(id).await
    }
    async fn list(&self) -> Result<Vec<ScheduleEntry>> {
        tokio::task::yield_now().await;
        let r = self.0.list().await;
        tokio::task::yield_now().await;
        r
    }
    async fn claim(&self, id: &str, request: &ClaimRequest) -> Result<ClaimOutcome> {
        tokio::task::yield_now().await;
        let r = self.0.claim(id, request).await;
        tokio::task::yield_now().await;
        r
    }
    async fn complete(
        &self,
        id: &str,
        owner: &str,
        run: DateTime<Utc>,
    ) -> Result<Option<ScheduleEntry>> {
        tokio::task::yield_now().await;
        self.0.complete(id, owner, run).await
    }
    async fn abandon(&self, id: &str, owner: &str, run: DateTime<Utc>) -> Result<()> {
        self.0.abandon(id, owner, run).await
    }
}

/// A producer that drops the dedup id: a backend without dedup (Kafka, SQS
/// standard), so that only the store's claims keep runs from being duplicated.
struct NoDedup(MemoryProducer);

#[async_trait]
impl Producer for NoDedup {
    async fn send(&self, mut message: crate::Message) -> Result<crate::SendReceipt> {
        message.take_dedup_id();
        self.0.send(message).await
    }
    async fn close(&self) -> Result<()> {
        self.0.close().await
    }
    async fn depth(&self) -> Result<crate::Depth> {
        self.0.depth().await
    }
    fn queue(&self) -> &str {
        self.0.queue()
    }
    fn capabilities(&self) -> &crate::Capabilities {
        self.0.capabilities()
    }
}

/// A running scheduler task and the switch that stops it cleanly.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<SchedulerSummary>,
}

fn spawn(scheduler: Scheduler) -> Running {
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
    /// Kill it: the task is dropped wherever it is (a crash).
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn scheduler(cfg: &MemoryConfig, store: impl ScheduleStore + 'static, clock: &Clock) -> Scheduler {
    Scheduler::new(connect(cfg).0, store).clock(clock.clone())
}

/// Minutes from t0 as expected run times.
fn minutes(range: impl IntoIterator<Item = i64>) -> Vec<DateTime<Utc>> {
    range.into_iter().map(at).collect()
}

#[tokio::test(start_paused = true)]
async fn three_schedulers_enqueue_every_run_exactly_once() {
    let cfg = queue("three");
    let (_, consumer) = connect(&cfg);
    let store = Yielding(MemoryScheduleStore::new());
    let clock = Clock::tokio_at(t0());
    // Without the backend's dedup: the claims alone keep each run to one message.
    let schedulers: Vec<Scheduler> = (0..3)
        .map(|_| Scheduler::new(NoDedup(connect(&cfg).0), store.clone()).clock(clock.clone()))
        .collect();
    assert_eq!(
        schedulers[0].upsert(minutely("a")).await.unwrap(),
        Upserted::Created
    );
    // The others start too and upsert the same schedule: nothing changes.
    for s in &schedulers[1..] {
        assert_eq!(s.upsert(minutely("a")).await.unwrap(), Upserted::Unchanged);
    }
    schedulers[2]
        .upsert(ScheduleDef::new(
            "b",
            Every::cron("*/15 * * * * *").unwrap(),
        ))
        .await
        .unwrap();
    let running: Vec<Running> = schedulers.into_iter().map(spawn).collect();
    tokio::time::sleep(Duration::from_secs(30 * 60 + 5)).await;
    let mut summaries = Vec::new();
    for r in running {
        summaries.push(r.stop().await);
    }
    let msgs = drain(&consumer).await;
    assert_eq!(runs_of(&msgs, "a"), minutes(1..=30));
    let b = runs_of(&msgs, "b");
    assert_eq!(b.len(), 30 * 4, "every 15 s for 30 min");
    assert!(b
        .windows(2)
        .all(|w| w[1] - w[0] == chrono::TimeDelta::seconds(15)));
    let enqueued: u64 = summaries.iter().map(|s| s.enqueued).sum();
    assert_eq!(enqueued as usize, msgs.len());
    assert!(
        summaries.iter().all(|s| s.duplicates == 0 && s.errors == 0),
        "{summaries:?}"
    );
    // The work was shared, not done by one scheduler only.
    assert!(
        summaries.iter().filter(|s| s.enqueued > 0).count() >= 2,
        "{summaries:?}"
    );
}

/// A scheduler killed mid-way and a new one started after ten minutes of downtime:
/// the runs before the kill are there once, the missed ones follow the policy, the
/// ones after the restart are there once.
#[tokio::test(start_paused = true)]
async fn restart_after_downtime_follows_the_catch_up_policy() {
    let cases = [
        (
            CatchUp::Skip {
                grace: Duration::from_secs(5),
            },
            vec![],
        ),
        (CatchUp::Once, vec![15]),
        (CatchUp::All { max: 3 }, vec![13, 14, 15]),
        (CatchUp::All { max: 100 }, (6..=15).collect()),
    ];
    for (policy, caught_up) in cases {
        let cfg = queue("restart");
        let (_, consumer) = connect(&cfg);
        let store = MemoryScheduleStore::new();
        let clock = Clock::tokio_at(t0());
        let first = scheduler(&cfg, store.clone(), &clock);
        first.upsert(minutely("r").catch_up(policy)).await.unwrap();
        let first = spawn(first);
        tokio::time::sleep(Duration::from_secs(5 * 60 + 30)).await;
        first.kill().await;
        // Down from 5:30 to 15:30: runs 6..=15 are missed.
        tokio::time::sleep(Duration::from_secs(10 * 60)).await;
        let second = scheduler(&cfg, store.clone(), &clock);
        // A restarted service upserts its schedules again: progress is kept.
        assert_eq!(
            second.upsert(minutely("r").catch_up(policy)).await.unwrap(),
            Upserted::Unchanged
        );
        let second = spawn(second);
        tokio::time::sleep(Duration::from_secs(5 * 60)).await;
        second.stop().await;
        let mut expected = minutes(1..=5);
        expected.extend(minutes(caught_up));
        expected.extend(minutes(16..=20));
        assert_eq!(runs_of(&drain(&consumer).await, "r"), expected, "{policy}");
    }
}

/// A scheduler that died holding a claim: after the lease, another takes the claim
/// over and sends the same run — once if the dead one had not sent it, and
/// deduplicated by the backend if it had.
#[tokio::test(start_paused = true)]
async fn a_claim_of_a_crashed_scheduler_is_taken_over_after_its_lease() {
    for dead_sent in [false, true] {
        let cfg = queue("takeover");
        let (producer, consumer) = connect(&cfg);
        let store = MemoryScheduleStore::new();
        let clock = Clock::tokio_at(t0());
        let def = minutely("t");
        let (_, entry) = store.upsert(&def, clock.now()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        // The dead scheduler's steps: claim the 1-minute run, maybe send, then die.
        let won = store
            .claim(
                "t",
                &ClaimRequest {
                    revision: entry.state.revision,
                    cursor: entry.state.cursor,
                    run: at(1),
                    enqueue: true,
                    owner: "dead".into(),
                    lease: Duration::from_secs(30),
                    now: clock.now(),
                },
            )
            .await
            .unwrap();
        assert!(
            matches!(won, ClaimOutcome::Won(ref p) if p.run == at(1)),
            "{won:?}"
        );
        if dead_sent {
            producer.send(def.message_for(at(1))).await.unwrap();
        }
        let live = scheduler(&cfg, store.clone(), &clock).lease(Duration::from_secs(30));
        let report = live.tick().await.unwrap();
        assert_eq!(report.busy, vec!["t".to_string()], "the claim is live");
        assert!(report.enqueued.is_empty());
        tokio::time::sleep(Duration::from_secs(31)).await;
        let report = live.tick().await.unwrap();
        let took_over = Run {
            schedule: "t".into(),
            at: at(1),
        };
        if dead_sent {
            assert_eq!(report.duplicates, vec![took_over]);
            assert!(report.enqueued.is_empty());
        } else {
            assert_eq!(report.enqueued, vec![took_over]);
        }
        let running = spawn(live);
        tokio::time::sleep(Duration::from_secs(3 * 60)).await;
        running.stop().await;
        assert_eq!(
            runs_of(&drain(&consumer).await, "t"),
            minutes(1..=4),
            "dead_sent={dead_sent}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn upsert_is_by_id_and_a_new_timing_starts_over() {
    let cfg = queue("upsert");
    let (_, consumer) = connect(&cfg);
    let store = MemoryScheduleStore::new();
    let clock = Clock::tokio_at(t0());
    let s = scheduler(&cfg, store.clone(), &clock);
    assert_eq!(s.upsert(minutely("u")).await.unwrap(), Upserted::Created);
    assert_eq!(s.upsert(minutely("u")).await.unwrap(), Upserted::Unchanged);
    tokio::time::sleep(Duration::from_secs(150)).await; // 2:30
    assert_eq!(
        s.tick().await.unwrap().enqueued.len(),
        1,
        "the 2:00 run (Once)"
    );
    // A new payload keeps the progress.
    assert_eq!(
        s.upsert(minutely("u").payload("v2")).await.unwrap(),
        Upserted::Updated
    );
    let e = store.get("u").await.unwrap().unwrap();
    assert_eq!((e.state.revision, e.state.cursor), (1, at(2)));
    // A new interval starts over from now: 2:30 + 2 min, + 4 min.
    let every2 = ScheduleDef::new("u", Every::interval(Duration::from_secs(120)).unwrap());
    assert_eq!(s.upsert(every2).await.unwrap(), Upserted::Rescheduled);
    let e = store.get("u").await.unwrap().unwrap();
    assert_eq!(e.state.revision, 2);
    assert_eq!(e.state.last_enqueued, Some(at(2)));
    assert_eq!(s.list().await.unwrap().len(), 1, "one schedule per id");
    let running = spawn(s);
    tokio::time::sleep(Duration::from_secs(5 * 60)).await; // to 7:30
    running.stop().await;
    let start = at(2) + chrono::TimeDelta::seconds(30);
    assert_eq!(
        runs_of(&drain(&consumer).await, "u"),
        vec![
            at(2),
            start + chrono::TimeDelta::minutes(2),
            start + chrono::TimeDelta::minutes(4)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_removed_schedule_enqueues_nothing_more() {
    let cfg = queue("remove");
    let (_, consumer) = connect(&cfg);
    let store = MemoryScheduleStore::new();
    let clock = Clock::tokio_at(t0());
    let s = scheduler(&cfg, store.clone(), &clock);
    s.upsert(minutely("x")).await.unwrap();
    let running = spawn(s);
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert!(store.remove("x").await.unwrap());
    assert!(!store.remove("x").await.unwrap());
    tokio::time::sleep(Duration::from_secs(300)).await;
    running.stop().await;
    assert_eq!(runs_of(&drain(&consumer).await, "x"), minutes(1..=2));
}

/// A send that fails (a full queue) gives the run back: it is enqueued by a later
/// tick, not lost.
#[tokio::test(start_paused = true)]
async fn a_failed_send_is_retried_not_lost() {
    let mut cfg = queue("full");
    cfg.capacity = 1;
    let (_, consumer) = connect(&cfg);
    let store = MemoryScheduleStore::new();
    let clock = Clock::tokio_at(t0());
    let s = scheduler(&cfg, store.clone(), &clock);
    s.upsert(minutely("f").catch_up(CatchUp::All { max: 10 }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(150)).await;
    let report = s.tick().await.unwrap();
    assert_eq!(report.enqueued.len(), 1);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].1.kind(), ErrorKind::QueueFull);
    assert!(store
        .get("f")
        .await
        .unwrap()
        .unwrap()
        .state
        .pending
        .is_none());
    let mut got = drain(&consumer).await;
    let report = s.tick().await.unwrap();
    assert_eq!(report.enqueued.len(), 1);
    got.extend(drain(&consumer).await);
    assert_eq!(runs_of(&got, "f"), minutes(1..=2));
}

/// A day of downtime on a 1-second schedule: `All` enqueues its bound, not 86 400.
#[tokio::test(start_paused = true)]
async fn catch_up_all_is_bounded() {
    let mut cfg = queue("bounded");
    cfg.capacity = 10_000;
    let (_, consumer) = connect(&cfg);
    let store = MemoryScheduleStore::new();
    let clock = Clock::tokio_at(t0());
    let s = scheduler(&cfg, store.clone(), &clock);
    s.upsert(
        ScheduleDef::new("s", Every::interval(Duration::from_secs(1)).unwrap())
            .catch_up(CatchUp::All { max: MAX_CATCH_UP }),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(86_400)).await;
    let report = s.tick().await.unwrap();
    assert_eq!(report.enqueued.len(), MAX_CATCH_UP as usize);
    let runs = runs_of(&drain(&consumer).await, "s");
    assert_eq!(
        runs.first(),
        Some(&(at(24 * 60) - chrono::TimeDelta::seconds(999)))
    );
    assert_eq!(runs.last(), Some(&at(24 * 60)));
    assert!(s.tick().await.unwrap().enqueued.is_empty());
}

/// A cron in a time zone, over the spring-forward night in Berlin, on the
/// scheduler (paused clock, 3 days).
#[tokio::test(start_paused = true)]
async fn cron_in_a_time_zone_runs_at_local_time() {
    let cfg = queue("tz");
    let (_, consumer) = connect(&cfg);
    let start = DateTime::parse_from_rfc3339("2026-03-27T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let clock = Clock::tokio_at(start);
    let s = scheduler(&cfg, MemoryScheduleStore::new(), &clock)
        .poll_interval(Duration::from_secs(3600));
    s.upsert(ScheduleDef::new(
        "nine",
        Every::cron_in("0 9 * * *", "Europe/Berlin").unwrap(),
    ))
    .await
    .unwrap();
    let running = spawn(s);
    tokio::time::sleep(Duration::from_secs(3 * 86_400)).await;
    running.stop().await;
    let utc = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    assert_eq!(
        runs_of(&drain(&consumer).await, "nine"),
        vec![
            utc("2026-03-28T08:00:00Z"),
            utc("2026-03-29T07:00:00Z"),
            utc("2026-03-30T07:00:00Z"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn bad_settings_are_typed_errors_naming_the_parameter() {
    let cfg = queue("bad");
    let clock = Clock::tokio_at(t0());
    let store = MemoryScheduleStore::new();
    for (s, param) in [
        (
            scheduler(&cfg, store.clone(), &clock).lease(Duration::ZERO),
            "`lease`",
        ),
        (
            scheduler(&cfg, store.clone(), &clock).lease(Duration::MAX),
            "`lease`",
        ),
        (
            scheduler(&cfg, store.clone(), &clock).poll_interval(Duration::ZERO),
            "`poll_interval`",
        ),
    ] {
        let e = s.tick().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains(param), "{e}");
        let e = s.run_until(async {}).await.unwrap_err();
        assert!(e.to_string().contains(param), "{e}");
    }
    let s = scheduler(&cfg, store.clone(), &clock);
    let every = Every::interval(Duration::from_secs(1)).unwrap();
    for (def, param) in [
        (ScheduleDef::new("", every.clone()), "`id`"),
        (ScheduleDef::new("a b", every.clone()), "`id`"),
        (ScheduleDef::new("x".repeat(201), every.clone()), "`id`"),
        (
            ScheduleDef::new("ok", every.clone()).catch_up(CatchUp::All { max: 0 }),
            "`catch_up.max`",
        ),
        (
            ScheduleDef::new("ok", every.clone()).catch_up(CatchUp::Skip {
                grace: Duration::MAX,
            }),
            "`catch_up.grace`",
        ),
        (
            ScheduleDef::new("ok", every.clone()).header("ferrymq-attempt", "1"),
            "`template.headers`",
        ),
        (
            ScheduleDef::new("ok", every.clone()).header("bad name", "1"),
            "`template.headers`",
        ),
    ] {
        let e = s.upsert(def).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains(param), "{e}");
    }
    assert!(store.list().await.unwrap().is_empty(), "nothing stored");
}

#[tokio::test]
async fn definitions_round_trip_through_json() {
    let def = ScheduleDef::new(
        "j",
        Every::cron_in("0 9 * * MON-FRI", "Europe/Berlin").unwrap(),
    )
    .catch_up(CatchUp::All { max: 5 })
    .payload(vec![0xff, 0x00, 0x10])
    .header("content-type", "application/octet-stream")
    .key("k")
    .priority(2);
    let json = def.to_json();
    assert!(json.contains("payload_hex"), "{json}");
    assert_eq!(ScheduleDef::from_json(&json).unwrap(), def);
    let text =
        ScheduleDef::new("j", Every::interval(Duration::from_secs(5)).unwrap()).payload("hi");
    assert!(text.to_json().contains(r#""payload":"hi""#));
    let bad = r#"{"id":"j","every":{"kind":"interval","every_ms":0}}"#;
    assert!(ScheduleDef::from_json(bad).is_err());
    // The run's message carries the schedule's headers and is valid to send.
    let m = def.message_for(t0());
    assert_eq!(m.headers().get(SCHEDULE_ID), Some("j"));
    assert_eq!(
        m.headers().get(SCHEDULED_FOR),
        Some("2026-01-01T00:00:00.000Z")
    );
    assert!(m.validate(1024).is_ok());
    assert_eq!(m.get_key(), Some("k"));
}

#[tokio::test]
async fn next_run_is_shown_for_listing() {
    let store = MemoryScheduleStore::new();
    let (_, e) = store.upsert(&minutely("n"), t0()).await.unwrap();
    assert_eq!(e.next_run(t0()), Some(at(1)));
    assert_eq!(e.next_run(at(3)), Some(at(3)), "due (Once: the latest)");
    let _ = Arc::new(store);
}

/// A producer whose first send is applied but unanswered (`OutcomeUnknown`, like a
/// response lost on the wire).
struct LostAnswer {
    inner: MemoryProducer,
    lost: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Producer for LostAnswer {
    async fn send(&self, message: crate::Message) -> Result<crate::SendReceipt> {
        let receipt = self.inner.send(message).await?;
        if !self.lost.swap(true, Ordering::SeqCst) {
            return Err(crate::Error::new(ErrorKind::OutcomeUnknown, "answer lost"));
        }
        Ok(receipt)
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
    async fn depth(&self) -> Result<crate::Depth> {
        self.inner.depth().await
    }
    fn queue(&self) -> &str {
        self.inner.queue()
    }
    fn capabilities(&self) -> &crate::Capabilities {
        self.inner.capabilities()
    }
}

/// A send whose outcome is unknown keeps its claim: the next tick sends the same
/// run again (same dedup id, dropped by the backend), and the schedule moves on —
/// the run is neither lost nor doubled.
#[tokio::test(start_paused = true)]
async fn an_unknown_send_outcome_is_resent_under_the_same_dedup_id() {
    let cfg = queue("unknown");
    let (producer, consumer) = connect(&cfg);
    let store = MemoryScheduleStore::new();
    let clock = Clock::tokio_at(t0());
    let s = Scheduler::new(
        LostAnswer {
            inner: producer,
            lost: Default::default(),
        },
        store.clone(),
    )
    .clock(clock.clone());
    s.upsert(minutely("o")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(61)).await;
    let report = s.tick().await.unwrap();
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].1.kind(), ErrorKind::OutcomeUnknown);
    let pending = store.get("o").await.unwrap().unwrap().state.pending;
    assert_eq!(pending.map(|p| p.run), Some(at(1)), "the claim is kept");
    let report = s.tick().await.unwrap();
    assert_eq!(
        report.duplicates,
        vec![Run {
            schedule: "o".into(),
            at: at(1)
        }]
    );
    let e = store.get("o").await.unwrap().unwrap();
    assert_eq!((e.state.cursor, e.state.pending), (at(1), None));
    assert_eq!(runs_of(&drain(&consumer).await, "o"), minutes(1..=1));
}

/// A producer whose every send takes `delay`, over a queue that does not
/// deduplicate: what a scheduler sees on Kafka or SQS standard with a slow broker.
struct SlowNoDedup {
    inner: MemoryProducer,
    caps: crate::Capabilities,
    delay: Duration,
}

#[async_trait]
impl Producer for SlowNoDedup {
    async fn send(&self, message: crate::Message) -> Result<crate::SendReceipt> {
        tokio::time::sleep(self.delay).await;
        // No dedup on this "broker": the dedup id is dropped before the send.
        let mut plain = crate::Message::new(message.payload().clone());
        *plain.headers_mut() = message.headers().clone();
        self.inner.send(plain).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
    async fn depth(&self) -> Result<crate::depth::Depth> {
        self.inner.depth().await
    }
    fn queue(&self) -> &str {
        self.inner.queue()
    }
    fn capabilities(&self) -> &crate::Capabilities {
        &self.caps
    }
}

/// A send slower than the lease is not a crash: the scheduler holds its claim for
/// as long as its send takes, so on a backend without dedup no other scheduler
/// takes the run over and sends it a second time.
#[tokio::test(start_paused = true)]
async fn a_send_slower_than_the_lease_keeps_its_claim() {
    let cfg = queue("slow-send");
    let (_, consumer) = connect(&cfg);
    let store = Yielding(MemoryScheduleStore::new());
    let clock = Clock::tokio_at(t0());
    let lease = Duration::from_secs(1);
    let slow = || {
        let inner = connect(&cfg).0;
        let mut caps = inner.capabilities().clone();
        caps.dedup_window = None;
        let producer = SlowNoDedup {
            inner,
            caps,
            delay: lease * 3,
        };
        Scheduler::new(producer, store.clone())
            .clock(clock.clone())
            .lease(lease)
            .poll_interval(Duration::from_millis(100))
    };
    slow().upsert(minutely("s")).await.unwrap();
    let running: Vec<Running> = (0..3).map(|_| spawn(slow())).collect();
    tokio::time::sleep(Duration::from_secs(5 * 60 + 30)).await;
    for r in running {
        r.stop().await;
    }
    let runs = runs_of(&drain(&consumer).await, "s");
    // Compared by count first: the broken way enqueues one run thousands of times.
    assert_eq!(
        runs.len(),
        5,
        "runs enqueued: {:?}",
        &runs[..runs.len().min(8)]
    );
    assert_eq!(runs, minutes(1..=5));
}
