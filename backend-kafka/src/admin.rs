//! Topic administration, consumer lag and offset resets.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ferrymq_core::admin::{Admin, OffsetReset, PartitionLag, Peeked, QueueInfo, QueueSpec};
use ferrymq_core::depth::Depth;
use ferrymq_core::{Error, ErrorKind, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::capabilities;
use crate::config::KafkaConfig;
use crate::producer::config_error;
use crate::progress::{self, Progress};
use crate::record::{unix_ms, Received};

/// Longest a metadata, offsets or admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request that found a partition without a leader is asked again.
const LEADERLESS_RETRY: Duration = Duration::from_secs(5);

/// Topic sets this process already made sure of (`brokers/topic`), so reconnecting
/// does not ask the broker again.
fn ensured() -> &'static Mutex<HashSet<String>> {
    static ENSURED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    ENSURED.get_or_init(Default::default)
}

fn ensured_key(cfg: &KafkaConfig) -> String {
    format!("{}/{}", cfg.brokers.join(","), cfg.topic)
}

fn admin_client(cfg: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>> {
    let mut c = cfg.base_client_config();
    cfg.apply_overrides(&mut c);
    c.create().map_err(|e| config_error("admin client", e))
}

fn opts() -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT))
}

pub(crate) fn kafka_error(what: &str, e: KafkaError) -> Error {
    let kind = match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::MessageTimedOut,
        ) => ErrorKind::Timeout,
        Some(
            RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::NetworkException,
        ) => ErrorKind::Connection,
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => ErrorKind::NotFound,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication,
        ) => ErrorKind::Auth,
        Some(RDKafkaErrorCode::ThrottlingQuotaExceeded) => ErrorKind::Throttled,
        // No leader or coordinator at the moment (a topic just created, a broker
        // restarting): transient, like a connection that broke.
        _ if leaderless(&e) => ErrorKind::Connection,
        _ => ErrorKind::Backend,
    };
    Error::new(kind, format!("{what}: {e}")).with_source(e)
}

/// The topics of a queue: its own, its retry tiers, and (`with_dlq`) its DLQ.
fn topics_of(cfg: &KafkaConfig, with_dlq: bool) -> Vec<String> {
    let mut t = vec![cfg.topic.clone()];
    t.extend(cfg.tier_topics());
    if with_dlq {
        t.push(cfg.dlq_topic());
    }
    t
}

/// Create `topics` with `partitions`; returns the ones that already existed.
async fn create_topics(
    cfg: &KafkaConfig,
    topics: &[String],
    partitions: u32,
    replication: Option<u16>,
) -> Result<Vec<String>> {
    let admin = admin_client(cfg)?;
    let partitions =
        i32::try_from(partitions).map_err(|_| Error::invalid_config("partitions", "too many"))?;
    let replication = replication.map_or(-1, i32::from);
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let results = admin
        .create_topics(new.iter(), &opts())
        .await
        .map_err(|e| kafka_error("creating topics", e))?;
    let mut existed = Vec::new();
    for r in results {
        match r {
            Ok(_) => {}
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => existed.push(name),
            Err((name, RDKafkaErrorCode::InvalidReplicationFactor)) => {
                return Err(Error::invalid_config(
                    "replication",
                    format!("the broker refused the replication factor of topic {name:?}"),
                ))
            }
            Err((name, RDKafkaErrorCode::InvalidPartitions)) => {
                return Err(Error::invalid_config(
                    "partitions",
                    format!("the broker refused the partition count of topic {name:?}"),
                ))
            }
            Err((name, code)) => {
                return Err(Error::new(
                    match code {
                        RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed => ErrorKind::Auth,
                        RDKafkaErrorCode::RequestTimedOut | RDKafkaErrorCode::OperationTimedOut => {
                            ErrorKind::Timeout
                        }
                        _ => ErrorKind::Backend,
                    },
                    format!("creating topic {name:?}: {code}"),
                ))
            }
        }
    }
    Ok(existed)
}

/// Make sure the queue's topic and tier topics exist (created with the config's
/// partitions and replication when missing); once per process and topic.
pub(crate) async fn ensure_topics(cfg: &KafkaConfig) -> Result<()> {
    let key = ensured_key(cfg);
    if ensured().lock().is_ok_and(|s| s.contains(&key)) {
        return Ok(());
    }
    create_topics(cfg, &topics_of(cfg, false), cfg.partitions, cfg.replication).await?;
    if let Ok(mut s) = ensured().lock() {
        s.insert(key);
    }
    Ok(())
}

/// A group-bound client for lag and offsets (never subscribes, never commits by
/// itself). Its calls block, so they run on the blocking pool.
pub(crate) struct LagClient {
    /// Bound to the queue's group.
    consumer: BaseConsumer,
    /// Bound to the group reading the tiers (`GROUP.retry`).
    retry: BaseConsumer,
    topics: Vec<String>,
}

impl std::fmt::Debug for LagClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagClient")
            .field("topics", &self.topics)
            .finish()
    }
}

fn group_client(cfg: &KafkaConfig, group: &str) -> Result<BaseConsumer> {
    let mut c = cfg.base_client_config();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    cfg.apply_overrides(&mut c);
    c.create().map_err(|e| config_error("consumer", e))
}

/// Partitions of `topic`, `NotFound` when it does not exist.
fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| kafka_error(&format!("metadata of {topic:?}"), e))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("topic {topic:?} does not exist"),
        ));
    };
    if let Some(err) = t.error() {
        let code: RDKafkaErrorCode = err.into();
        return Err(Error::new(
            if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                ErrorKind::NotFound
            } else {
                ErrorKind::Backend
            },
            format!("topic {topic:?}: {code}"),
        ));
    }
    let mut ps: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ps.sort_unstable();
    Ok(ps)
}

/// Whether `e` says the partition has no leader at the moment: right after the
/// topic was created, or while a broker restarts. Asking again shortly succeeds.
fn leaderless(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
        )
    )
}

/// Run `f` (a blocking request), asking again while the answer is [`leaderless`],
/// for up to `LEADERLESS_RETRY` in all.
fn retry_leaderless<T>(mut f: impl FnMut() -> KafkaResult<T>) -> KafkaResult<T> {
    let deadline = std::time::Instant::now() + LEADERLESS_RETRY;
    loop {
        match f() {
            Err(e) if leaderless(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Low and high watermark of one partition (asking again while it has no leader).
fn watermarks(consumer: &BaseConsumer, topic: &str, p: i32) -> Result<(i64, i64)> {
    retry_leaderless(|| consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT))
        .map_err(|e| kafka_error(&format!("watermarks of {topic:?}/{p}"), e))
}

/// Lag of every partition of `topic` for the client's group.
fn topic_lag(consumer: &BaseConsumer, topic: &str) -> Result<Vec<PartitionLag>> {
    let parts = partitions_of(consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, REQUEST_TIMEOUT)
        .map_err(|e| kafka_error(&format!("committed offsets of {topic:?}"), e))?;
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let (low, high) = watermarks(consumer, topic, p)?;
        let c = committed
            .find_partition(topic, p)
            .and_then(|e| e.offset().to_raw())
            .filter(|o| *o >= 0);
        let from = c.unwrap_or(low).max(low);
        let lag = u64::try_from(high.saturating_sub(from)).unwrap_or(0);
        out.push(PartitionLag::new(p, c, high, lag));
    }
    Ok(out)
}

impl LagClient {
    pub fn new(cfg: &KafkaConfig) -> Result<Self> {
        Ok(LagClient {
            consumer: group_client(cfg, &cfg.group())?,
            retry: group_client(cfg, &cfg.retry_group())?,
            topics: topics_of(cfg, false),
        })
    }
}

/// A [`LagClient`] made on first use: most producers and consumers never ask for
/// their depth, and each client is a librdkafka instance with threads of its own.
pub(crate) struct LazyLag {
    cfg: Arc<KafkaConfig>,
    cell: Mutex<Option<Arc<LagClient>>>,
}

impl std::fmt::Debug for LazyLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLag")
            .field("topic", &self.cfg.topic)
            .finish()
    }
}

impl LazyLag {
    pub fn new(cfg: Arc<KafkaConfig>) -> Self {
        LazyLag {
            cfg,
            cell: Mutex::new(None),
        }
    }

    pub fn get(&self) -> Result<Arc<LagClient>> {
        let mut cell = self.cell.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = &*cell {
            return Ok(c.clone());
        }
        let c = Arc::new(LagClient::new(&self.cfg)?);
        *cell = Some(c.clone());
        Ok(c)
    }
}

/// Depth from group lag: the queue's topic is `waiting` (less `in_flight`, the
/// records this consumer holds), the tier topics are `delayed`. Approximate: offsets
/// are committed every `commit_interval`.
pub(crate) async fn lag_depth(lag: &Arc<LagClient>, in_flight: u64) -> Result<Depth> {
    let lag = lag.clone();
    tokio::task::spawn_blocking(move || {
        let mut depth = Depth::default();
        for (i, topic) in lag.topics.iter().enumerate() {
            let client = if i == 0 { &lag.consumer } else { &lag.retry };
            let sum: u64 = topic_lag(client, topic)?.iter().map(|l| l.lag).sum();
            if i == 0 {
                depth.waiting = sum.saturating_sub(in_flight);
                depth.in_flight = in_flight.min(sum);
            } else {
                depth.delayed += sum;
            }
        }
        Ok(depth)
    })
    .await
    .map_err(|e| Error::backend("depth task failed", e))?
}

/// Administration of one queue: its topic, tier topics and DLQ topic, and its
/// group's offsets.
#[derive(Debug)]
pub struct KafkaAdmin {
    cfg: Arc<KafkaConfig>,
    lag: Arc<LagClient>,
}

impl KafkaAdmin {
    pub(crate) fn new(cfg: KafkaConfig) -> Result<Self> {
        cfg.validate()?;
        let lag = Arc::new(LagClient::new(&cfg)?);
        Ok(KafkaAdmin {
            cfg: Arc::new(cfg),
            lag,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LagClient, &KafkaConfig) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let lag = self.lag.clone();
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || f(&lag, &cfg))
            .await
            .map_err(|e| Error::backend("admin task failed", e))?
    }

    /// Committed offsets of `group` for the queue's topic, moved to `to`.
    fn target_offsets(
        consumer: &BaseConsumer,
        topic: &str,
        to: &OffsetReset,
    ) -> Result<TopicPartitionList> {
        let parts = partitions_of(consumer, topic)?;
        let mut tpl = TopicPartitionList::new();
        match to {
            OffsetReset::Timestamp(t) => {
                let mut q = TopicPartitionList::new();
                for p in &parts {
                    q.add_partition_offset(topic, *p, Offset::Offset(unix_ms(*t)))
                        .map_err(|e| kafka_error("offsets", e))?;
                }
                let found = consumer
                    .offsets_for_times(q, REQUEST_TIMEOUT)
                    .map_err(|e| kafka_error("offsets for the timestamp", e))?;
                for p in &parts {
                    let (_, high) = watermarks(consumer, topic, *p)?;
                    // No record at or after the time: the end.
                    let o = found
                        .find_partition(topic, *p)
                        .and_then(|e| e.offset().to_raw())
                        .filter(|o| *o >= 0)
                        .unwrap_or(high);
                    tpl.add_partition_offset(topic, *p, Offset::Offset(o))
                        .map_err(|e| kafka_error("offsets", e))?;
                }
            }
            OffsetReset::Earliest | OffsetReset::Latest => {
                for p in &parts {
                    let (low, high) = watermarks(consumer, topic, *p)?;
                    let o = if matches!(to, OffsetReset::Earliest) {
                        low
                    } else {
                        high
                    };
                    tpl.add_partition_offset(topic, *p, Offset::Offset(o))
                        .map_err(|e| kafka_error("offsets", e))?;
                }
            }
            _ => {
                return Err(Error::unsupported(
                    "this offset reset is not known to kafka",
                ))
            }
        }
        Ok(tpl)
    }

    /// `describe` right after a create: the broker answers CreateTopics once the
    /// controller accepted the topic, but its metadata reaches the broker that answers
    /// the describe a moment later (`UnknownTopicOrPartition` meanwhile). Wait for it,
    /// bounded by the request timeout.
    async fn describe_created(&self) -> Result<QueueInfo> {
        let until = ferrymq_core::time::deadline_in(std::time::Duration::from_secs(10));
        loop {
            match self.blocking(Self::describe_blocking).await {
                Err(e)
                    if e.kind() == ErrorKind::NotFound && tokio::time::Instant::now() < until =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    fn describe_blocking(lag: &LagClient, cfg: &KafkaConfig) -> Result<QueueInfo> {
        let consumer = &lag.consumer;
        let parts = partitions_of(consumer, &cfg.topic)?;
        let mut depth = Depth::default();
        for (i, topic) in topics_of(cfg, false).iter().enumerate() {
            let client = if i == 0 { &lag.consumer } else { &lag.retry };
            let lag: u64 = match topic_lag(client, topic) {
                Ok(l) => l.iter().map(|l| l.lag).sum(),
                Err(e) if e.kind() == ErrorKind::NotFound && i > 0 => 0,
                Err(e) => return Err(e),
            };
            if i == 0 {
                depth.waiting = lag;
            } else {
                depth.delayed += lag;
            }
        }
        let mut info = QueueInfo::new(cfg.topic.clone(), depth, capabilities(cfg))
            .setting("partitions", parts.len())
            .setting("group", cfg.group())
            .setting("retry_group", cfg.retry_group())
            .setting("retry_tiers", cfg.tier_topics().join(", "))
            .setting("dead_letter_topic", cfg.dlq_topic());
        for t in cfg.tier_topics() {
            if partitions_of(consumer, &t).is_err() {
                info = info.warning(format!(
                    "retry tier topic {t:?} is missing: nacks and delayed sends to it fail"
                ));
            }
        }
        Ok(info)
    }
}

#[async_trait]
impl Admin for KafkaAdmin {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    fn queue(&self) -> &str {
        &self.cfg.topic
    }

    /// Creates the topic, its retry tier topics and its DLQ topic. `InvalidConfig`
    /// when the topic exists with another partition count.
    async fn create(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let partitions = spec.partitions.unwrap_or(self.cfg.partitions);
        let existed = create_topics(
            &self.cfg,
            &topics_of(&self.cfg, true),
            partitions,
            spec.replication.or(self.cfg.replication),
        )
        .await?;
        let info = self.describe_created().await?;
        if existed.contains(&self.cfg.topic) {
            let have = info
                .settings
                .iter()
                .find(|(k, _)| k == "partitions")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            if have != partitions.to_string() {
                return Err(Error::invalid_config(
                    "partitions",
                    format!(
                        "topic {:?} exists with {have} partitions, not {partitions}",
                        self.cfg.topic
                    ),
                ));
            }
        }
        Ok(info)
    }

    async fn ensure(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let partitions = spec.partitions.unwrap_or(self.cfg.partitions);
        create_topics(
            &self.cfg,
            &topics_of(&self.cfg, true),
            partitions,
            spec.replication.or(self.cfg.replication),
        )
        .await?;
        self.describe_created().await
    }

    /// Deletes the topic, its tiers and its DLQ; whether the topic existed.
    async fn delete(&self) -> Result<bool> {
        let admin = admin_client(&self.cfg)?;
        let topics = topics_of(&self.cfg, true);
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let results = admin
            .delete_topics(&names, &opts())
            .await
            .map_err(|e| kafka_error("deleting topics", e))?;
        if let Ok(mut s) = ensured().lock() {
            s.remove(&ensured_key(&self.cfg));
        }
        let mut existed = false;
        for r in results {
            match r {
                Ok(name) if name == self.cfg.topic => existed = true,
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((name, code)) => {
                    return Err(Error::new(
                        ErrorKind::Backend,
                        format!("deleting topic {name:?}: {code}"),
                    ))
                }
            }
        }
        Ok(existed)
    }

    async fn describe(&self) -> Result<QueueInfo> {
        self.blocking(Self::describe_blocking).await
    }

    /// Unsupported: Kafka deletes records by position (`DeleteRecords` up to an
    /// offset), in-flight ones included, while a purge must keep what is in flight.
    /// To skip everything waiting, stop the consumers and
    /// [`reset_offsets`](Admin::reset_offsets) the group to `Latest`.
    async fn purge(&self) -> Result<u64> {
        Err(Error::unsupported(
            "kafka cannot purge without removing in-flight records (DeleteRecords is by \
             offset); stop the consumers and reset the group's offsets to latest instead",
        ))
    }

    /// The oldest uncommitted records of the group, read by a client that joins no
    /// group and commits nothing.
    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        let cfg = self.cfg.clone();
        let lag = self.lag.clone();
        tokio::task::spawn_blocking(move || peek_blocking(&cfg, &lag.consumer, max))
            .await
            .map_err(|e| Error::backend("peek task failed", e))?
    }

    async fn lag(&self, group: Option<&str>) -> Result<Vec<PartitionLag>> {
        let group = group.map(str::to_string);
        let cfg = self.cfg.clone();
        let lag = self.lag.clone();
        tokio::task::spawn_blocking(move || match group {
            Some(g) if g != cfg.group() => topic_lag(&group_client(&cfg, &g)?, &cfg.topic),
            _ => topic_lag(&lag.consumer, &cfg.topic),
        })
        .await
        .map_err(|e| Error::backend("lag task failed", e))?
    }

    /// Commits `group`'s offsets of the topic at `to`. Refused (`InvalidConfig`)
    /// while the group has members: their next commit would undo it.
    async fn reset_offsets(&self, group: &str, to: OffsetReset) -> Result<()> {
        let group = group.to_string();
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || {
            let consumer = group_client(&cfg, &group)?;
            let groups = consumer
                .fetch_group_list(Some(&group), REQUEST_TIMEOUT)
                .map_err(|e| kafka_error("describing the group", e))?;
            if let Some(g) = groups.groups().iter().find(|g| g.name() == group) {
                if !g.members().is_empty() {
                    return Err(Error::invalid_config(
                        "group",
                        format!(
                            "group {group:?} has {} active member(s); stop its consumers before \
                             resetting offsets",
                            g.members().len()
                        ),
                    ));
                }
            }
            let tpl = Self::target_offsets(&consumer, &cfg.topic, &to)?;
            consumer
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| match e.rdkafka_error_code() {
                    Some(
                        RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::RebalanceInProgress,
                    ) => Error::invalid_config(
                        "group",
                        format!("group {group:?} has active members; stop them first"),
                    ),
                    _ => kafka_error("committing the reset offsets", e),
                })
        })
        .await
        .map_err(|e| Error::backend("reset task failed", e))?
    }
}

fn peek_blocking(cfg: &KafkaConfig, lag: &BaseConsumer, max: usize) -> Result<Vec<Peeked>> {
    let mut out = Vec::new();
    if max == 0 {
        return Ok(out);
    }
    let topic = &cfg.topic;
    let lags = topic_lag(lag, topic)?;
    let mut c = cfg.base_client_config();
    // A group id is required by librdkafka's consumer; this one never joins (assign,
    // not subscribe) and never commits.
    c.set("group.id", format!("{}.peek", cfg.group()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    cfg.apply_overrides(&mut c);
    let reader: BaseConsumer = c.create().map_err(|e| config_error("peek consumer", e))?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0usize;
    for l in &lags {
        if l.lag == 0 {
            continue;
        }
        let start = l.end - i64::try_from(l.lag).unwrap_or(i64::MAX);
        tpl.add_partition_offset(topic, l.partition, Offset::Offset(start))
            .map_err(|e| kafka_error("offsets", e))?;
        remaining += usize::try_from(l.lag).unwrap_or(usize::MAX);
    }
    if remaining == 0 {
        return Ok(out);
    }
    reader.assign(&tpl).map_err(|e| kafka_error("assign", e))?;
    let want = max.min(remaining);
    // What the group's commit metadata says is done above the watermark (ferrymq
    // consumers skip those on restart): not waiting, so not shown.
    let mut done: std::collections::HashMap<i32, Progress> = Default::default();
    if let Ok(committed) = lag.committed_offsets(tpl.clone(), REQUEST_TIMEOUT) {
        for e in committed.elements() {
            let meta =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.metadata().to_string()))
                    .unwrap_or_default();
            if let Some(pos) = e.offset().to_raw() {
                if let Some(p) = progress::decode(pos, &meta) {
                    done.insert(e.partition(), p);
                }
            }
        }
    }
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
    let mut got: Vec<(SystemTime, Peeked)> = Vec::new();
    // Read every partition's first `want` waiting records (up to its end offset at
    // the start), then keep the oldest `want`.
    let mut open: std::collections::HashMap<i32, (i64, usize)> = lags
        .iter()
        .filter(|l| l.lag > 0)
        .map(|l| (l.partition, (l.end, 0usize)))
        .collect();
    while !open.is_empty() && std::time::Instant::now() < deadline {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let (p, o) = (
                    rdkafka::Message::partition(&m),
                    rdkafka::Message::offset(&m),
                );
                let Some((end, taken)) = open.get_mut(&p) else {
                    continue;
                };
                let skip = done.get(&p).is_some_and(|d| d.is_done(o));
                if !skip && *taken < want {
                    *taken += 1;
                    let r = Received::parse(&m, 0);
                    got.push((
                        r.enqueued_at,
                        Peeked::new(r.id(&cfg.topic), Some(r.enqueued_at), r.message()),
                    ));
                }
                if o + 1 >= *end || *taken >= want {
                    open.remove(&p);
                }
            }
            Some(Err(e)) => return Err(kafka_error("peeking", e)),
            None => {}
        }
    }
    got.sort_by_key(|(t, _)| *t);
    out.extend(got.into_iter().take(want).map(|(_, p)| p));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_leader() -> KafkaError {
        KafkaError::MetadataFetch(RDKafkaErrorCode::NotLeaderForPartition)
    }

    #[test]
    fn a_partition_without_leader_is_a_transient_error() {
        // Seen in the suite: depth right after the tier topics were created.
        let e = kafka_error("watermarks", not_leader());
        assert_eq!(e.kind(), ErrorKind::Connection, "{e}");
        assert!(e.kind().is_transient());
        let e = kafka_error(
            "x",
            KafkaError::MetadataFetch(RDKafkaErrorCode::InvalidPartitions),
        );
        assert_eq!(e.kind(), ErrorKind::Backend);
    }

    #[test]
    fn leaderless_answers_are_asked_again() {
        let mut calls = 0;
        let r = retry_leaderless(|| {
            calls += 1;
            if calls < 3 {
                Err(not_leader())
            } else {
                Ok(7)
            }
        });
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls, 3);
        // Anything else is answered at once.
        let mut calls = 0;
        let r: KafkaResult<()> = retry_leaderless(|| {
            calls += 1;
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::InvalidPartitions,
            ))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
