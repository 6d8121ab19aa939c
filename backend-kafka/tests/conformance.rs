//! The ferrymq conformance suite against a real Apache Kafka broker, plus the
//! Kafka-specific cases.
//!
//! ```text
//! scripts/kafka.sh start 9101
//! FERRYMQ_TEST_KAFKA_BROKERS=127.0.0.1:9101 cargo test -p ferrymq-kafka --test conformance
//! ```
//!
//! Each case gets fresh topics (the queue, its retry tiers `1s,3s,10s,2m`, and its
//! DLQ), deleted afterwards.
//!
//! Two setups, every case on each (trials `kafka::<case>` and
//! `kafka-ordered::<case>`): the default `retry_mode=tiered` (`PerKeyPipelined`, so
//! the strict per-key cases are not applicable) and `retry_mode=ordered`
//! (`PerKey`: `per_key_order`, `per_key_next_waits_for_head` and
//! `per_key_order_with_concurrency_8_and_retries` apply). The Kafka-specific cases
//! (partitions, commits, revokes, retry copies) run in the tiered setup only: the
//! mode changes nothing of them but the nack, and the ordered nack is covered by the
//! per-key cases.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ferrymq_conformance::{
    backend_case, ensure, require_env, Backend, Case, CaseResult, Context, Setup,
};
use ferrymq_core::admin::Admin;
use ferrymq_core::{Capabilities, Consumer, Delivery, ErrorKind, Message, Producer, Result};
use ferrymq_kafka::{KafkaConfig, KafkaConsumer};

const PARAMS: &str =
    "partitions=2&retry_tiers=1s,3s,10s,2m&revoke_grace=1s&close_timeout=3s&commit_interval=10ms&rdkafka.session.timeout.ms=6000";

struct Kafka {
    brokers: String,
    /// Parameters of the setup (`retry_mode=ordered`), after [`PARAMS`].
    mode: &'static str,
    capabilities: Capabilities,
}

impl Kafka {
    fn config_with(&self, queue: &str, params: &str) -> Result<KafkaConfig> {
        let mut all: Vec<(String, String)> = Vec::new();
        for pair in PARAMS
            .split('&')
            .chain(self.mode.split('&'))
            .chain(params.split('&'))
            .filter(|p| !p.is_empty())
        {
            if let Some((k, v)) = pair.split_once('=') {
                all.retain(|(n, _)| n != k);
                all.push((k.to_string(), v.to_string()));
            }
        }
        let q: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
        KafkaConfig::from_url(&format!("kafka://{}/{queue}?{}", self.brokers, q.join("&")))
    }

    fn config(&self, queue: &str) -> Result<KafkaConfig> {
        self.config_with(queue, "")
    }

    async fn connect(brokers: String, mode: &'static str) -> Result<Self> {
        let mut k = Kafka {
            brokers,
            mode,
            capabilities: Capabilities::minimal("kafka"),
        };
        let probe = k.config(&ferrymq_conformance::unique_queue_name(
            "capabilities-probe",
        ))?;
        let p = probe.producer().await?;
        k.capabilities = p.capabilities().clone();
        probe.admin()?.delete().await?;
        Ok(k)
    }
}

#[async_trait]
impl Backend for Kafka {
    fn name(&self) -> &str {
        "kafka"
    }

    fn describe(&self) -> String {
        format!("Apache Kafka at {}, {PARAMS}&{}", self.brokers, self.mode)
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }

    async fn producer(&self, queue: &str) -> Result<Box<dyn Producer>> {
        Ok(Box::new(self.config(queue)?.producer().await?))
    }

    async fn consumer(&self, queue: &str) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(self.config(queue)?.consumer().await?))
    }

    async fn admin(&self, queue: &str) -> Result<Box<dyn Admin>> {
        Ok(Box::new(self.config(queue)?.admin()?))
    }

    async fn cleanup(&self, queue: &str) -> Result<()> {
        self.config(queue)?.admin()?.delete().await.map(|_| ())
    }

    fn timer_slack(&self) -> Duration {
        // A tier partition is resumed by the poll thread (every 20 ms) once its head
        // is due; fetch and hand-out add a few hundred ms on a loaded machine.
        Duration::from_millis(1000)
    }

    fn approximate_depth_lag(&self) -> Duration {
        // Offsets are committed every 10 ms here.
        Duration::from_secs(5)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn extra_cases(&self) -> Vec<Case> {
        if !self.mode.is_empty() {
            return Vec::new();
        }
        vec![
            backend_case!(kafka_same_key_same_partition_as_java_murmur2),
            backend_case!(kafka_two_members_split_partitions_each_message_once),
            backend_case!(kafka_committed_offsets_survive_restart),
            backend_case!(kafka_out_of_order_acks_never_commit_past_a_gap),
            backend_case!(kafka_restart_replays_only_undone_records),
            backend_case!(kafka_ack_after_revoke_is_lease_expired),
            backend_case!(kafka_retry_copy_keeps_id_enqueue_time_and_counts_attempt),
        ]
    }
}

fn kafka(ctx: &Context) -> &Kafka {
    ctx.backend_as::<Kafka>().expect("the kafka factory")
}

/// Receive until `n` deliveries (bounded by `within`).
async fn take(c: &dyn Consumer, n: usize, within: Duration) -> CaseResult<Vec<Delivery>> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} deliveries within {within:?}",
            got.len()
        );
        got.extend(c.receive(n - got.len(), Duration::from_millis(300)).await?);
    }
    Ok(got)
}

/// Java's `Utils.murmur2`.
fn java_murmur2(data: &[u8]) -> i32 {
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for b in chunks {
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m) ^ k;
    }
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

fn partition_of(id: &str) -> CaseResult<i32> {
    id.split('/')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            ferrymq_conformance::Failure::new(format!("receipt id {id:?} is not partition/offset"))
        })
}

async fn kafka_same_key_same_partition_as_java_murmur2(ctx: &Context) -> CaseResult {
    let q = ctx.queue();
    let cfg = kafka(ctx).config_with(&q, "partitions=5")?;
    let p = cfg.producer().await?;
    for i in 0..30 {
        let key = format!("customer-{i}");
        let a = partition_of(p.send(Message::new("1").key(key.clone())).await?.id())?;
        let b = partition_of(p.send(Message::new("2").key(key.clone())).await?.id())?;
        let java = (java_murmur2(key.as_bytes()) & 0x7fff_ffff) % 5;
        ensure!(a == b, "{key}: partitions {a} and {b}");
        ensure!(
            a == java,
            "{key}: partition {a}, a Java client would use {java}"
        );
    }
    Ok(())
}

fn main_partitions(c: &KafkaConsumer) -> HashSet<i32> {
    c.assignment()
        .into_iter()
        .filter(|(t, _)| !t.contains(".retry-"))
        .map(|(_, p)| p)
        .collect()
}

async fn kafka_two_members_split_partitions_each_message_once(ctx: &Context) -> CaseResult {
    let q = ctx.queue();
    let cfg = kafka(ctx).config_with(&q, "partitions=4")?;
    let p = cfg.producer().await?;
    let a = cfg.consumer().await?;
    let b = cfg.consumer().await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (pa, pb) = (main_partitions(&a), main_partitions(&b));
        if !pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == 4 {
            ensure!(pa.is_disjoint(&pb), "overlapping assignments {pa:?} {pb:?}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no split of 4 partitions: {pa:?} {pb:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = 200;
    let batch = (0..n)
        .map(|i| Message::new(format!("{i}")).key(format!("k{i}")))
        .collect();
    for r in p.send_batch(batch).await? {
        r?;
    }
    let mut seen = Vec::new();
    let mut by = [0usize; 2];
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < n && Instant::now() < deadline {
        for (i, c) in [&a, &b].into_iter().enumerate() {
            for d in c.receive(50, Duration::from_millis(100)).await? {
                seen.push(d.payload().clone());
                by[i] += 1;
                d.ack().await?;
            }
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    ensure!(
        seen.len() == n && unique.len() == n,
        "{} deliveries, {} distinct, of {n}",
        seen.len(),
        unique.len()
    );
    ensure!(
        by[0] > 0 && by[1] > 0,
        "one member did all the work: {by:?}"
    );
    a.close().await?;
    b.close().await?;
    Ok(())
}

async fn kafka_committed_offsets_survive_restart(ctx: &Context) -> CaseResult {
    let q = ctx.queue();
    let cfg = kafka(ctx).config(&q)?;
    let p = cfg.producer().await?;
    for i in 0..10 {
        p.send(Message::new(format!("{i}"))).await?;
    }
    let c = cfg.consumer().await?;
    for d in take(&c, 10, Duration::from_secs(10)).await? {
        d.ack().await?;
    }
    c.close().await?;
    drop(c);
    let c = cfg.consumer().await?;
    let replay = c.receive(10, Duration::from_secs(2)).await?;
    ensure!(
        replay.is_empty(),
        "{} acked records replayed after a restart",
        replay.len()
    );
    p.send(Message::new("after")).await?;
    let d = take(&c, 1, Duration::from_secs(10)).await?.remove(0);
    ensure!(d.payload().as_ref() == b"after", "got {:?}", d.payload());
    d.ack().await?;
    c.close().await?;
    Ok(())
}

async fn kafka_out_of_order_acks_never_commit_past_a_gap(ctx: &Context) -> CaseResult {
    let q = ctx.queue();
    let cfg = kafka(ctx).config_with(&q, "partitions=1")?;
    let p = cfg.producer().await?;
    for i in 0..6 {
        p.send(Message::new(format!("m{i}"))).await?;
    }
    let c = cfg.consumer().await?;
    let got = take(&c, 6, Duration::from_secs(10)).await?;
    for i in [5usize, 0, 3, 1, 4] {
        got[i].ack().await?;
    }
    let admin = cfg.admin()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lag = admin.lag(None).await?;
    ensure!(
        lag[0].committed == Some(2),
        "committed {:?}, the gap is at offset 2",
        lag[0].committed
    );
    // Restart with the gap unsettled: the watermark is the gap, and the commit
    // metadata says what above it is done, so only the gap is replayed.
    let gap = got[2].clone();
    drop(got);
    c.close().await?;
    c.closed().await?;
    ensure!(
        gap.ack().await.map_err(|e| e.kind()) == Err(ErrorKind::LeaseExpired),
        "a settle after close_timeout must be LeaseExpired"
    );
    drop(c);
    let c = cfg.consumer().await?;
    let again = take(&c, 1, Duration::from_secs(10)).await?;
    ensure!(
        again[0].payload().as_ref() == b"m2",
        "replayed {:?} first",
        again[0].payload()
    );
    let more = c.receive(10, Duration::from_secs(1)).await?;
    ensure!(
        more.is_empty(),
        "records acked above the gap were replayed: {} of them",
        more.len()
    );
    ensure!(
        c.skipped() == 3,
        "skipped {} records, expected m3, m4, m5",
        c.skipped()
    );
    again[0].ack().await?;
    c.close().await?;
    Ok(())
}

/// Scattered acks (every third record left undone) over 60 records: a restart
/// replays exactly the undone ones, the done ones above the watermark are skipped.
async fn kafka_restart_replays_only_undone_records(ctx: &Context) -> CaseResult {
    let q = ctx.queue();
    let cfg = kafka(ctx).config_with(&q, "partitions=1")?;
    let p = cfg.producer().await?;
    let n = 60;
    let batch = (0..n).map(|i| Message::new(format!("m{i}"))).collect();
    for r in p.send_batch(batch).await? {
        r?;
    }
    let c = cfg.consumer().await?;
    let got = take(&c, n, Duration::from_secs(10)).await?;
    let mut undone = Vec::new();
    for (i, d) in got.iter().enumerate() {
        if i % 3 == 1 {
            undone.push(String::from_utf8_lossy(d.payload()).into_owned());
        } else {
            d.ack().await?;
        }
    }
    c.close().await?;
    // Give the undone ones back: uncommitted, for the next session.
    for d in got.iter().filter(|d| !d.acker().is_acked()) {
        d.release(None).await?;
    }
    c.closed().await?;
    drop(c);
    let c = cfg.consumer().await?;
    let again = take(&c, undone.len(), Duration::from_secs(10)).await?;
    let bodies: Vec<String> = again
        .iter()
        .map(|d| String::from_utf8_lossy(d.payload()).into_owned())
        .collect();
    ensure!(
        bodies == undone,
        "replayed {bodies:?}, the undone were {undone:?}"
    );
    let extra = c.receive(10, Duration::from_secs(1)).await?;
    ensure!(extra.is_empty(), "{} done records replayed", extra.len());
    // Without the metadata the replay would start at m1 and run to m59: 59 records.
    let saved = c.skipped();
    ensure!(saved == (n - 1 - undone.len()) as u64, "skipped {saved}");
    for d in &again {
        d.ack().await?;
    }
    c.close().await?;
    Ok(())
}

async fn kafka_ack_after_revoke_is_lease_expired(ctx: &Context) -> CaseResult {
    let q = ctx.queue();
    let cfg = kafka(ctx).config_with(&q, "revoke_grace=500ms")?;
    let p = cfg.producer().await?;
    let a = cfg.consumer().await?;
    for i in 0..16 {
        p.send(Message::new(format!("{i}")).key(format!("k{i}")))
            .await?;
    }
    let held = take(&a, 16, Duration::from_secs(10)).await?;
    let b = cfg.consumer().await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while held.iter().all(Delivery::is_live) {
        ensure!(Instant::now() < deadline, "no partition moved from a to b");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stale, live): (Vec<_>, Vec<_>) = held.into_iter().partition(|d| !d.is_live());
    for d in &stale {
        let r = d.ack().await;
        ensure!(
            r.as_ref().map_err(|e| e.kind()) == Err(ErrorKind::LeaseExpired),
            "ack after revoke: {r:?}"
        );
    }
    for d in &live {
        d.ack().await?;
    }
    let again = take(&b, stale.len(), Duration::from_secs(10)).await?;
    let want: HashSet<&str> = stale.iter().map(Delivery::id).collect();
    let got: HashSet<&str> = again.iter().map(Delivery::id).collect();
    ensure!(
        want == got,
        "the new owner got {got:?}, the revoked ones were {want:?}"
    );
    for d in &again {
        d.ack().await?;
    }
    a.close().await?;
    b.close().await?;
    Ok(())
}

async fn kafka_retry_copy_keeps_id_enqueue_time_and_counts_attempt(ctx: &Context) -> CaseResult {
    let (_, p, c) = ctx.fresh().await?;
    p.send(Message::new("job").key("k").header("trace", "t1"))
        .await?;
    let d1 = take(&*c, 1, Duration::from_secs(10)).await?.remove(0);
    d1.nack(Some(Duration::from_secs(1))).await?;
    let d2 = take(&*c, 1, Duration::from_secs(10)).await?.remove(0);
    ensure!(d2.id() == d1.id(), "id {} became {}", d1.id(), d2.id());
    ensure!(
        d2.meta().enqueued_at == d1.meta().enqueued_at,
        "enqueue time changed"
    );
    ensure!(
        d2.attempt() == d1.attempt() + 1,
        "attempt {} after {}",
        d2.attempt(),
        d1.attempt()
    );
    ensure!(
        d2.key() == Some("k") && d2.headers().get("trace") == Some("t1"),
        "key/headers lost"
    );
    ensure!(
        d2.headers().len() == 1,
        "internal headers leaked: {:?}",
        d2.headers()
    );
    d2.ack().await?;
    Ok(())
}

fn brokers() -> std::result::Result<String, ferrymq_core::BoxError> {
    require_env(
        "FERRYMQ_TEST_KAFKA_BROKERS",
        "Start Apache Kafka with `scripts/kafka.sh start 9101` (or `scripts/test.sh`) and set \
         FERRYMQ_TEST_KAFKA_BROKERS=127.0.0.1:9101",
    )
}

/// Cases at a time: they mostly wait on the broker (joins, rebalances, tier
/// delays), so 8 at once take about a third of the time the default (one per CPU)
/// takes on a 2-CPU machine.
const THREADS: usize = 8;

fn main() -> ExitCode {
    ferrymq_conformance::run_setups_concurrently(
        THREADS,
        vec![
            Setup::new("kafka", || async {
                Ok(Kafka::connect(brokers()?, "").await?)
            }),
            Setup::new("kafka-ordered", || async {
                Ok(Kafka::connect(brokers()?, "retry_mode=ordered").await?)
            }),
        ],
    )
}
