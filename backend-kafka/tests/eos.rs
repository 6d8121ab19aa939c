//! Exactly-once consume-transform-produce on the real broker (issue 10): a processor
//! *process* (this binary re-executed, [`eos_child`]) is killed with SIGKILL at
//! random points — mid-handler, mid-transaction, right after a commit — several
//! times and restarted; at the end a `read_committed` reader of the output topic
//! must see every input's output exactly once.
//!
//! - [`transactional_outputs_are_exactly_once_across_kill9`], with [`ExactlyOnce`]
//!   (outputs and offsets in one transaction per batch): no duplicate, no loss.
//! - [`plain_produce_then_ack_duplicates_across_the_same_kill9`], the same inputs,
//!   kills and checker with transactions off — the at-least-once way, a ferrymq
//!   `Worker` whose handler sends the output through a `KafkaProducer` and whose
//!   ack commits the input — loses nothing but duplicates: the check the first test
//!   passes is one that fails without transactions.
//! - [`failing_inputs_are_dead_lettered_in_the_transaction`]: a handler failing
//!   `max_attempts` times sends its input to the dead-letter topic, once, and no
//!   output.
//!
//! Uses the shared broker (`FERRYMQ_TEST_KAFKA_BROKERS`).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferrymq_core::admin::Admin;
use ferrymq_core::middleware::handler_fn;
use ferrymq_core::worker::Worker;
use ferrymq_core::{BoxError, Delivery, Message, Producer};
use ferrymq_kafka::{ExactlyOnce, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const CHILD_ENV: &str = "FERRYMQ_EOS_CHILD";
/// Inputs.
const N: usize = 2000;
/// Kills before the last (graceful) run.
const KILLS: usize = 4;
const PARTITIONS: u32 = 3;
/// Partitions of the takeover test's input.
const PARTITIONS_TAKEOVER: usize = 4;

/// The processor process, when this binary is re-executed as one (a no-op test
/// otherwise). `EOS_MODE` is `transactional` or `plain`; reads `EOS_URL` (the input
/// queue) and writes `out-<payload>` per input to `EOS_OUT`; prints `EOS handled
/// <payload>` when a handler returns (before anything is committed); stops
/// gracefully when its stdin closes.
#[test]
fn eos_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(child_main());
    std::process::exit(0);
}

/// Completes when stdin reaches EOF (the parent dropped its end).
fn stdin_closed() -> impl std::future::Future<Output = ()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// A handler's work: 1-3 ms (`EOS_HANDLER_MS`, default 1, plus 0-2), so a run
/// spans many transactions.
async fn work(d: &Delivery) -> Message {
    let base: u64 = std::env::var("EOS_HANDLER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ms = base + u64::from(rand::random::<u8>() % 3);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let payload = String::from_utf8_lossy(d.payload()).into_owned();
    // The id is `partition/offset`.
    let partition = d.id().split('/').next().unwrap_or("?");
    println!("EOS handled {payload} partition {partition}");
    let out = Message::new(format!("out-{payload}"));
    match d.key() {
        Some(k) => out.key(k),
        None => out,
    }
}

async fn child_main() {
    // The processor's transaction steps, on stdout: the parent can kill it inside
    // a transaction (offsets sent, commit not done).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "ferrymq_kafka::transaction=debug",
        ))
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .init();
    let cfg = KafkaConfig::from_url(&std::env::var("EOS_URL").unwrap()).unwrap();
    let out = std::env::var("EOS_OUT").unwrap();
    match std::env::var("EOS_MODE").unwrap().as_str() {
        "transactional" => {
            let instance = std::env::var("EOS_INSTANCE").unwrap_or_else(|_| "eos-test-0".into());
            let mut processor = cfg.exactly_once(&out, &instance).unwrap();
            if let Ok(ms) = std::env::var("EOS_TXN_TIMEOUT_MS") {
                processor =
                    processor.transaction_timeout(Duration::from_millis(ms.parse().unwrap()));
            }
            let summary = processor
                .max_batch(50)
                .concurrency(4)
                .run_until(
                    |d: Delivery| async move { Ok::<_, BoxError>(vec![work(&d).await]) },
                    stdin_closed(),
                )
                .await
                .unwrap();
            println!("EOS summary {summary:?}");
        }
        "plain" => {
            let producer = Arc::new(cfg.for_topic(&out).unwrap().producer().await.unwrap());
            let consumer = cfg.consumer().await.unwrap();
            let p = producer.clone();
            let summary = Worker::new(consumer)
                .concurrency(4)
                .run_until(
                    handler_fn(move |d: Delivery| {
                        let p = p.clone();
                        async move {
                            p.send(work(&d).await).await?;
                            Ok::<_, BoxError>(())
                        }
                    }),
                    stdin_closed(),
                )
                .await
                .unwrap();
            producer.close().await.unwrap();
            println!("EOS summary {summary:?}");
        }
        other => panic!("EOS_MODE {other:?}"),
    }
}

/// What a processor process printed.
enum Event {
    /// A handler returned (nothing committed yet), for an input of this partition.
    Handled(i32),
    /// The offsets were sent to the transaction; its commit is next.
    OffsetsSent,
    /// Partitions assigned to it.
    Assigned(Vec<i32>),
}

/// The partition list of a `partitions=[0, 2]` field.
fn partition_list(line: &str) -> Vec<i32> {
    let Some(i) = line.find("partitions=[") else {
        return Vec::new();
    };
    let rest = &line[i + 12..];
    let list = &rest[..rest.find(']').unwrap_or(0)];
    list.split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// A running processor process and the events it printed.
struct Proc {
    child: Child,
    events: mpsc::Receiver<Event>,
    /// `Handled` events received so far.
    seen: usize,
    /// Of those, per input partition.
    by_partition: HashMap<i32, usize>,
    /// Every partition assigned to it so far (in the order first assigned).
    assigned: Vec<i32>,
}

impl Proc {
    fn spawn(mode: &str, url: &str, out: &str) -> Proc {
        Self::spawn_with(mode, url, out, &[])
    }

    fn spawn_with(mode: &str, url: &str, out: &str, env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["eos_child", "--exact", "--nocapture", "--test-threads=1"])
            .envs(env.iter().copied())
            .env(CHILD_ENV, "1")
            .env("EOS_MODE", mode)
            .env("EOS_URL", url)
            .env("EOS_OUT", out)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                // Anywhere in the line: the first one follows libtest's
                // `test eos_child ... ` (no newline).
                let event = if line.contains("EOS handled ") {
                    let p = line.rsplit(' ').next().and_then(|p| p.parse().ok());
                    Event::Handled(p.unwrap_or(-1))
                } else if line.contains("offsets sent to the transaction") {
                    Event::OffsetsSent
                } else if line.contains("partitions assigned") {
                    Event::Assigned(partition_list(&line))
                } else {
                    if let Some(i) = line.find("EOS ") {
                        eprintln!("child: {}", &line[i..]);
                    }
                    continue;
                };
                let _ = tx.send(event);
            }
        });
        Proc {
            child,
            events,
            seen: 0,
            by_partition: HashMap::new(),
            assigned: Vec::new(),
        }
    }

    /// The next event (None after `idle` without one), counted.
    fn next(&mut self, idle: Duration) -> Option<Event> {
        let e = self.events.recv_timeout(idle).ok()?;
        match &e {
            Event::Handled(p) => {
                self.seen += 1;
                *self.by_partition.entry(*p).or_default() += 1;
            }
            Event::Assigned(parts) => {
                for p in parts {
                    if !self.assigned.contains(p) {
                        self.assigned.push(*p);
                    }
                }
            }
            Event::OffsetsSent => {}
        }
        Some(e)
    }

    /// Wait until the process has handled `n` inputs in this run (false if it
    /// stopped making progress for `idle`).
    fn wait_handled(&mut self, n: usize, idle: Duration) -> bool {
        while self.seen < n {
            if self.next(idle).is_none() {
                return false;
            }
        }
        true
    }

    /// Wait for the next transaction's offsets to be sent (false after `idle`).
    fn wait_offsets_sent(&mut self, idle: Duration) -> bool {
        loop {
            match self.next(idle) {
                Some(Event::OffsetsSent) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    }

    /// Wait until `p` was assigned to it (false after `within`).
    fn wait_assigned(&mut self, p: i32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.assigned.contains(&p) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.next(left);
        }
        true
    }

    /// Every input this run handled (drained after the process ended).
    fn handled_total(&mut self) -> usize {
        while self.next(Duration::from_secs(30)).is_some() {}
        self.seen
    }

    fn kill9(&mut self) -> usize {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
        self.handled_total()
    }

    /// Close stdin (the graceful stop) and wait for the exit.
    fn stop(&mut self) -> usize {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the processor process failed: {status}");
                return self.handled_total();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the processor process did not stop within 30 s of its stdin closing");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    /// A test that failed midway leaves no processor running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every record of `topic` as a `read_committed` reader sees it: payload → count.
fn read_committed(brokers: &str, topic: &str) -> HashMap<String, usize> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-verify"))
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    assert!(!parts.is_empty(), "{topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut at_end = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_end.len() < parts.len() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} to its end took over 30 s ({} partitions at the end)",
            at_end.len()
        );
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let payload = rdkafka::Message::payload(&m).unwrap_or_default();
                *counts
                    .entry(String::from_utf8_lossy(payload).into_owned())
                    .or_default() += 1;
                at_end.remove(&rdkafka::Message::partition(&m));
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    counts
}

/// Wait until the input group has committed every input (lag 0).
async fn wait_all_committed(cfg: &KafkaConfig, within: Duration) {
    let admin = cfg.admin().unwrap();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(lag) = admin.lag(None).await {
            if !lag.is_empty()
                && lag
                    .iter()
                    .all(|l| l.lag == 0 && (l.committed.is_some() || l.end == 0))
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the inputs were not all committed within {within:?}: {:?}",
            admin.lag(None).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `(duplicates, lost, unexpected)` among the outputs of inputs `m0..m{n-1}`.
fn tally(counts: &HashMap<String, usize>, n: usize) -> (usize, usize, usize) {
    let mut duplicates = 0;
    let mut lost = 0;
    for i in 0..n {
        match counts.get(&format!("out-m{i}")).copied().unwrap_or(0) {
            0 => lost += 1,
            c => duplicates += c - 1,
        }
    }
    let unexpected = counts
        .keys()
        .filter(|k| {
            k.strip_prefix("out-m")
                .and_then(|i| i.parse::<usize>().ok())
                .map_or(true, |i| i >= n)
        })
        .count();
    (duplicates, lost, unexpected)
}

struct Outcome {
    /// Handler calls beyond one per input: work a kill threw away and that was done
    /// again (shows the kills landed mid-stream).
    rehandled: usize,
    duplicates: usize,
    lost: usize,
    unexpected: usize,
    kills: usize,
}

/// N inputs, KILLS kill -9s of the processor at random points, one last run until
/// every input is committed; then count each input's outputs as read_committed.
async fn kill9_run(mode: &str) -> Outcome {
    let t0 = Instant::now();
    let cfg = common::config(
        &format!("eos-{mode}"),
        &format!("partitions={PARTITIONS}&rdkafka.group.instance.id=eos-test-0"),
    );
    let out = format!("{}.out", cfg.topic);
    let url = cfg.to_string();
    let producer = cfg.producer().await.unwrap();
    let msgs = (0..N)
        .map(|i| Message::new(format!("m{i}")).key(format!("k{}", i % 37)))
        .collect();
    for r in producer.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    producer.close().await.unwrap();

    let mut kills = 0;
    let mut handled = 0;
    for round in 0..KILLS {
        let mut p = Proc::spawn(mode, &url, &out);
        // A random point: after 20-300 handled inputs of this run (mid-batch or in
        // its transaction), then 0-30 ms (into the commit, or the next batch) — or,
        // every other round, right after the next transaction's offsets were sent
        // (its commit not answered yet; the plain mode has no transactions).
        let target = 20 + rand::random::<usize>() % 281;
        let mut reached = p.wait_handled(target, Duration::from_secs(20));
        if round % 2 == 1 && mode == "transactional" {
            reached &= p.wait_offsets_sent(Duration::from_secs(20));
        } else {
            std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 31));
        }
        handled += p.kill9();
        assert!(
            reached,
            "round {round}: the processor stopped making progress before {target} inputs"
        );
        kills += 1;
    }
    let mut p = Proc::spawn(mode, &url, &out);
    wait_all_committed(&cfg, Duration::from_secs(60)).await;
    handled += p.stop();
    let rehandled = handled.saturating_sub(N);

    let counts = read_committed(&common::brokers(), &out);
    let (duplicates, lost, unexpected) = tally(&counts, N);
    eprintln!(
        "{mode}: {N} inputs, {kills} kill -9s at random points and a restart after each: \
         {handled} handler calls ({rehandled} redone after a kill), {} records \
         read_committed from the output, {duplicates} duplicates, {lost} lost, \
         {unexpected} unexpected; {:?}",
        counts.values().sum::<usize>(),
        t0.elapsed()
    );
    let _ = cfg.admin().unwrap().delete().await;
    let _ = cfg.for_topic(&out).unwrap().admin().unwrap().delete().await;
    Outcome {
        rehandled,
        duplicates,
        lost,
        unexpected,
        kills,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_outputs_are_exactly_once_across_kill9() {
    let o = kill9_run("transactional").await;
    assert_eq!(o.kills, KILLS);
    assert_eq!(o.unexpected, 0, "records that are no input's output");
    assert_eq!(o.lost, 0, "inputs without an output");
    assert_eq!(o.duplicates, 0, "outputs read_committed more than once");
    assert!(
        o.rehandled > 0,
        "no input was handled twice: no kill landed before a commit, so nothing was tested"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_produce_then_ack_duplicates_across_the_same_kill9() {
    let o = kill9_run("plain").await;
    assert_eq!(o.kills, KILLS);
    assert_eq!(o.unexpected, 0);
    assert_eq!(o.lost, 0, "at-least-once lost inputs");
    assert!(
        o.duplicates > 0,
        "no duplicates without transactions: the kills did not land mid-stream, so the \
         exactly-once test proves nothing"
    );
}

/// Two instances share the partitions; one is killed mid-stream (right after its
/// transaction's offsets were sent) and never comes back. Its partitions move to
/// the survivor once its session times out (6 s); the survivor's committed-offset
/// fetch asks for stable offsets (read_committed), so if the dead instance's
/// transaction was still open it waits until the broker aborted it (3 s
/// `transaction_timeout`) and then processes those inputs again. Every input's
/// output is read_committed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_instance_s_partitions_move_to_the_survivor_exactly_once() {
    const INPUTS: usize = 3000;
    let t0 = Instant::now();
    let cfg = common::config(
        "eos-takeover",
        &format!("partitions={PARTITIONS_TAKEOVER}&rdkafka.session.timeout.ms=6000"),
    );
    let out = format!("{}.out", cfg.topic);
    let url = cfg.to_string();
    let producer = cfg.producer().await.unwrap();
    let msgs = (0..INPUTS)
        .map(|i| Message::new(format!("m{i}")).key(format!("k{}", i % 37)))
        .collect();
    for r in producer.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    producer.close().await.unwrap();
    // A is slow (20 ms a handler), so it has work left on its partitions when it
    // dies; B is quick.
    let env = |instance, handler_ms| {
        [
            ("EOS_INSTANCE", instance),
            ("EOS_TXN_TIMEOUT_MS", "3000"),
            ("EOS_HANDLER_MS", handler_ms),
        ]
    };
    let mut a = Proc::spawn_with("transactional", &url, &out, &env("eos-a", "20"));
    assert!(
        a.wait_handled(100, Duration::from_secs(20)),
        "A made no progress"
    );
    // B joins: the rebalance moves some of A's partitions to it.
    let mut b = Proc::spawn_with("transactional", &url, &out, &env("eos-b", "1"));
    assert!(
        b.wait_handled(10, Duration::from_secs(20)),
        "B made no progress"
    );
    let b_before = b.assigned.clone();
    assert!(
        !b_before.is_empty() && b_before.len() < PARTITIONS_TAKEOVER,
        "B should share the partitions with A, has {b_before:?}"
    );
    // A dies right after its next transaction's offsets were sent.
    let more = a.seen + 1;
    assert!(
        a.wait_handled(more, Duration::from_secs(20))
            && a.wait_offsets_sent(Duration::from_secs(20)),
        "A made no progress next to B"
    );
    let handled_a = a.kill9();
    let killed_at = t0.elapsed();
    for p in 0..PARTITIONS_TAKEOVER as i32 {
        assert!(
            b.wait_assigned(p, Duration::from_secs(30)),
            "partition {p} never moved to B (B had {b_before:?}, now {:?})",
            b.assigned
        );
    }
    let taken_over_at = t0.elapsed();
    wait_all_committed(&cfg, Duration::from_secs(60)).await;
    let committed_at = t0.elapsed();
    let handled_b = b.stop();
    let b_took: usize = b
        .by_partition
        .iter()
        .filter(|(p, _)| !b_before.contains(p))
        .map(|(_, n)| n)
        .sum();
    let counts = read_committed(&common::brokers(), &out);
    let (duplicates, lost, unexpected) = tally(&counts, INPUTS);
    eprintln!(
        "takeover: {INPUTS} inputs over {PARTITIONS_TAKEOVER} partitions; B had {b_before:?}; \
         A handled {handled_a} and was killed -9 at {killed_at:?}; B got A's partitions at \
         {taken_over_at:?}, everything was committed at {committed_at:?}; B handled \
         {handled_b} ({b_took} of A's partitions), {} redone; read_committed: \
         {duplicates} duplicates, {lost} lost, {unexpected} unexpected",
        (handled_a + handled_b).saturating_sub(INPUTS)
    );
    assert_eq!(unexpected, 0, "records that are no input's output");
    assert_eq!(lost, 0, "inputs without an output");
    assert_eq!(duplicates, 0, "outputs read_committed more than once");
    assert!(
        b_took > 0,
        "A had finished its partitions before its kill: no takeover was tested"
    );
    let _ = cfg.admin().unwrap().delete().await;
    let _ = cfg.for_topic(&out).unwrap().admin().unwrap().delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_inputs_are_dead_lettered_in_the_transaction() {
    let cfg = common::config("eos-dlq", "partitions=2");
    let out = format!("{}.out", cfg.topic);
    let producer = cfg.producer().await.unwrap();
    let msgs = (0..100).map(|i| Message::new(format!("m{i}"))).collect();
    for r in producer.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    let calls = Arc::new(AtomicU32::new(0));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let processor: ExactlyOnce = cfg
        .exactly_once(&out, "dlq-0")
        .unwrap()
        .max_attempts(2)
        .retry_backoff(Duration::from_millis(5))
        .static_membership(false);
    let c = calls.clone();
    let run = tokio::spawn(async move {
        processor
            .run_until(
                move |d: Delivery| {
                    let c = c.clone();
                    async move {
                        c.fetch_add(1, Ordering::Relaxed);
                        let n: usize = String::from_utf8_lossy(d.payload())[1..].parse()?;
                        // Settling is the transaction's job.
                        assert_eq!(
                            d.ack().await.unwrap_err().kind(),
                            ferrymq_core::ErrorKind::Unsupported
                        );
                        if n % 10 == 0 {
                            return Err(
                                format!("input {n} is poison (attempt {})", d.attempt()).into()
                            );
                        }
                        Ok::<_, BoxError>(vec![Message::new(format!("out-m{n}"))])
                    }
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
    });
    wait_all_committed(&cfg, Duration::from_secs(30)).await;
    let _ = stop_tx.send(());
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.inputs, 100);
    assert_eq!(summary.outputs, 90);
    assert_eq!(summary.dead_lettered, 10);
    assert_eq!(
        summary.handler_errors, 20,
        "2 attempts for each of 10 inputs"
    );
    assert_eq!(calls.load(Ordering::Relaxed), 110);

    let outputs = read_committed(&common::brokers(), &out);
    assert_eq!(outputs.len(), 90);
    assert!(outputs.values().all(|n| *n == 1));
    let dead = read_committed(&common::brokers(), &cfg.dlq_topic());
    let mut expected: Vec<String> = (0..100).step_by(10).map(|i| format!("m{i}")).collect();
    let mut got: Vec<String> = dead.keys().cloned().collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    assert!(dead.values().all(|n| *n == 1));
    let _ = cfg.admin().unwrap().delete().await;
    let _ = cfg.for_topic(&out).unwrap().admin().unwrap().delete().await;
}

/// A transaction the broker makes abort (one output over the output topic's
/// `max.message.bytes`): its outputs are discarded, its inputs sought back and
/// processed again, and the next transaction commits them — each input's output
/// still exactly once, none lost. (Without the seek back the consumer would go on
/// after the aborted inputs and the next commit would skip them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_rewinds_its_inputs() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    const INPUTS: usize = 200;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("ferrymq_kafka=info"))
        .with_test_writer()
        .try_init();
    let cfg = common::config("eos-abort", "partitions=2");
    let out = format!("{}.out", cfg.topic);
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .unwrap();
    let topic =
        NewTopic::new(&out, 2, TopicReplication::Fixed(1)).set("max.message.bytes", "10000");
    for r in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let producer = cfg.producer().await.unwrap();
    let msgs = (0..INPUTS).map(|i| Message::new(format!("m{i}"))).collect();
    for r in producer.send_batch(msgs).await.unwrap() {
        r.unwrap();
    }
    let calls = Arc::new(AtomicU32::new(0));
    let spoiled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let processor = cfg
        .exactly_once(&out, "abort-0")
        .unwrap()
        .max_batch(50)
        .static_membership(false);
    let (c, s) = (calls.clone(), spoiled.clone());
    let run = tokio::spawn(async move {
        processor
            .run_until(
                move |d: Delivery| {
                    let (c, s) = (c.clone(), s.clone());
                    async move {
                        c.fetch_add(1, Ordering::Relaxed);
                        let payload = String::from_utf8_lossy(d.payload()).into_owned();
                        let mut outputs = vec![Message::new(format!("out-{payload}"))];
                        if !s.swap(true, Ordering::AcqRel) {
                            // Once: a record the broker refuses (20 kB > 10 kB; the
                            // limit is per record batch, so not too small for the
                            // batches of ordinary outputs).
                            outputs.push(Message::new(vec![b'x'; 20_000]));
                        }
                        Ok::<_, BoxError>(outputs)
                    }
                },
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
    });
    wait_all_committed(&cfg, Duration::from_secs(60)).await;
    let _ = stop_tx.send(());
    let summary = run.await.unwrap().unwrap();
    let counts = read_committed(&common::brokers(), &out);
    let (duplicates, lost, unexpected) = tally(&counts, INPUTS);
    let calls = calls.load(Ordering::Relaxed) as usize;
    eprintln!(
        "abort: {INPUTS} inputs, {calls} handler calls, {} transactions committed, {} aborted; \
         read_committed: {duplicates} duplicates, {lost} lost, {unexpected} unexpected",
        summary.transactions, summary.aborted
    );
    // At least the one the big record failed. (librdkafka 2.12 aborts the next one
    // too — "skipped sequence numbers", or offsets refused in the abortable state —
    // after the epoch bump that follows a refused record; the same seek back
    // covers it.)
    assert!(
        summary.aborted >= 1,
        "the broker should have failed a transaction"
    );
    assert!(
        calls > INPUTS,
        "the aborted transaction's inputs were not processed again"
    );
    assert_eq!(summary.inputs, INPUTS as u64);
    assert_eq!((duplicates, lost, unexpected), (0, 0, 0));
    let _ = cfg.admin().unwrap().delete().await;
    let _ = cfg.for_topic(&out).unwrap().admin().unwrap().delete().await;
}
