//! Settings of a Kafka queue (a topic read by one consumer group): from a URL, from
//! serde, or built in code.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::admin::Admin;
use ferrymq_core::backend::{BackendConfig, Driver};
use ferrymq_core::config::{is_secret_param, parse_duration};
use ferrymq_core::{Consumer, Error, Producer, Result};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::{KafkaAdmin, KafkaConsumer, KafkaProducer};

/// Longest Kafka topic name (the broker's limit is 249; the retry tier and dead-letter
/// topics add a suffix, so the queue's own name must leave room for it).
pub const MAX_TOPIC_LEN: usize = 200;

/// Settings of one Kafka queue: a topic, its retry tiers and dead-letter topic, and
/// the consumer group that reads it.
///
/// From a URL:
///
/// ```text
/// kafka://host:port[,host:port…]/TOPIC?group=invoicers&partitions=6&create=true
///        &retry_tiers=1s,5s,30s,2m,10m,1h&rdkafka.security.protocol=SASL_SSL
///        &rdkafka.sasl.password=…
/// ```
///
/// Query parameters (all optional): `group`, `partitions`, `replication`, `create`,
/// `retry_tiers`, `retry_mode` (`tiered` or `ordered`), `commit_interval`, `revoke_grace`, `close_timeout`, `buffer`,
/// `join_timeout`, `send_timeout`, `max_message_size`, `max_record_bytes`,
/// `client_id`, and any librdkafka property prefixed with `rdkafka.` (passed through
/// as is, after ferrymq's own settings, so it can override them). An unknown
/// parameter is an error. Secrets (`rdkafka.sasl.password`, `rdkafka.ssl.key.password`
/// …, by name pattern) never print.
///
/// ```
/// use ferrymq_kafka::KafkaConfig;
/// let cfg = KafkaConfig::from_url(
///     "kafka://h1:9092,h2:9092/orders?group=invoicers&rdkafka.sasl.password=hunter2",
/// )?;
/// assert_eq!(cfg.brokers, ["h1:9092", "h2:9092"]);
/// assert_eq!(cfg.topic, "orders");
/// assert!(!format!("{cfg} {cfg:?}").contains("hunter2"));
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` each.
    #[serde(default = "defaults::brokers")]
    pub brokers: Vec<String>,
    /// The topic (the queue). Letters, digits, `.`, `_`, `-`; at most
    /// [`MAX_TOPIC_LEN`] bytes.
    #[serde(alias = "queue")]
    pub topic: String,
    /// Consumer group: consumers of one group share the partitions (a work queue);
    /// another group reads every message again. Unset: `ferrymq.TOPIC`, one group
    /// per queue, so a rebalance of one queue never stalls another.
    #[serde(default)]
    pub group: Option<String>,
    /// Partitions of the topics ferrymq creates (the topic, its tiers, its DLQ).
    #[serde(default = "defaults::partitions")]
    pub partitions: u32,
    /// Replication factor of the topics ferrymq creates; the broker's default when
    /// unset.
    #[serde(default)]
    pub replication: Option<u16>,
    /// Create the topics when a producer, consumer or admin `ensure` finds them
    /// missing.
    #[serde(default = "defaults::create")]
    pub create: bool,
    /// Delays of the retry tier topics (`TOPIC.retry-5s` …), ascending. A nack with
    /// delay `d` (and a send with delay `d`) goes to the smallest tier `>= d`; the
    /// largest is the longest delay. Empty: no delays, and a nack fails.
    #[serde(with = "tiers_serde", default = "defaults::retry_tiers")]
    pub retry_tiers: Vec<Duration>,
    /// What a nack does: [`RetryMode::Tiered`] (the default: a copy on a retry tier
    /// topic, nothing blocked, order not kept) or [`RetryMode::Ordered`] (the record
    /// is redelivered in place after the delay and its key waits for it).
    #[serde(default)]
    pub retry_mode: RetryMode,
    /// Offsets acked are committed this often (the stored watermarks, by the poll
    /// thread), and synchronously on revoke and close.
    #[serde(with = "humantime_serde", default = "defaults::commit_interval")]
    pub commit_interval: Duration,
    /// On revoke, handed-out deliveries of the revoked partitions get this long to
    /// be settled before the watermark is committed and their handles go stale.
    #[serde(with = "humantime_serde", default = "defaults::revoke_grace")]
    pub revoke_grace: Duration,
    /// `close` keeps the group membership this long for handed-out deliveries to be
    /// settled.
    #[serde(with = "humantime_serde", default = "defaults::close_timeout")]
    pub close_timeout: Duration,
    /// Records buffered per partition, polled and not handed out yet (default
    /// 5000). Behind it librdkafka prefetches up to 4 × `buffer` records (at most
    /// 8 MiB) for each partition of the queue's topic, so memory is up to
    /// 5 × `buffer` × record size per assigned partition.
    ///
    /// A full buffer stops the reading of its partition's librdkafka queue (each
    /// partition of the queue's topic has one of its own) until receivers take
    /// from it. The retry tiers share one queue instead, and a full buffer pauses
    /// its partition: that makes librdkafka drop what it had prefetched for it and
    /// fetch it again on resume, so there a buffer that fills every few
    /// milliseconds costs most of the throughput (measured with the bench, e2e at
    /// concurrency 1, when the queue's topic was read that way too: 17k records/s
    /// with 1000, 62k with 5000).
    #[serde(default = "defaults::buffer")]
    pub buffer: usize,
    /// `consumer()` waits this long for the group to assign partitions.
    #[serde(with = "humantime_serde", default = "defaults::join_timeout")]
    pub join_timeout: Duration,
    /// A send not confirmed by the broker within this long fails
    /// (`message.timeout.ms`; the outcome is unknown then).
    #[serde(with = "humantime_serde", default = "defaults::send_timeout")]
    pub send_timeout: Duration,
    /// Largest message accepted, counted as payload + header names and values
    /// (`Message::encoded_len`, the contract's measure).
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: usize,
    /// Largest record on the wire (key, value, headers and record-batch overhead):
    /// the broker's `message.max.bytes` (default 1048588). A record over it is
    /// refused with `TooLarge` before anything is produced.
    #[serde(default = "defaults::max_record_bytes")]
    pub max_record_bytes: usize,
    /// `client.id`; `ferrymq` when unset.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Raw librdkafka properties, applied after ferrymq's own (so they override
    /// them). Values of secret-looking names are redacted whenever printed.
    #[serde(default)]
    pub rdkafka: BTreeMap<String, String>,
}

/// How a nacked record is retried. See the crate docs, "Retry modes".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    /// Non-blocking: a nack produces a copy to the smallest retry tier topic that
    /// holds the delay (attempt + 1), and the original is done once the broker
    /// confirmed the copy. Later records of the key are not held back, so a retry
    /// loses its place (`Ordering::PerKeyPipelined`).
    #[default]
    Tiered,
    /// Blocking, in order (what pause + seek gives a plain Kafka consumer): a nacked
    /// record stays where it is (not done, so never committed past), is delivered
    /// again after the delay, and every later record of its key waits for it — one
    /// record per key in flight at a time (`Ordering::PerKey`). Other keys of the
    /// partition keep flowing until the partition's buffer is full, then the
    /// partition pauses. The attempt is counted in memory: a replay after a crash or
    /// a rebalance starts again at 1.
    Ordered,
}

impl RetryMode {
    fn as_str(self) -> &'static str {
        match self {
            RetryMode::Tiered => "tiered",
            RetryMode::Ordered => "ordered",
        }
    }
}

mod defaults {
    use std::time::Duration;
    pub fn brokers() -> Vec<String> {
        vec!["127.0.0.1:9092".into()]
    }
    pub fn partitions() -> u32 {
        3
    }
    pub fn create() -> bool {
        true
    }
    pub fn retry_tiers() -> Vec<Duration> {
        [1, 5, 30, 120, 600, 3600]
            .into_iter()
            .map(Duration::from_secs)
            .collect()
    }
    pub fn commit_interval() -> Duration {
        Duration::from_millis(500)
    }
    pub fn revoke_grace() -> Duration {
        Duration::from_secs(5)
    }
    pub fn close_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn buffer() -> usize {
        5000
    }
    pub fn join_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn send_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_message_size() -> usize {
        1_000_000
    }
    pub fn max_record_bytes() -> usize {
        1_048_588
    }
}

mod tiers_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(tiers: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::tiers_to_string(tiers))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        let text = match Form::deserialize(d)? {
            Form::One(s) => s,
            Form::Many(v) => v.join(","),
        };
        super::parse_tiers(&text).map_err(serde::de::Error::custom)
    }
}

fn tiers_to_string(tiers: &[Duration]) -> String {
    tiers
        .iter()
        .map(|d| tier_label(*d))
        .collect::<Vec<_>>()
        .join(",")
}

/// `1s`, `500ms`, `2m`, `1h`: the suffix of a tier topic's name.
pub(crate) fn tier_label(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn parse_tiers(text: &str) -> Result<Vec<Duration>> {
    let mut tiers = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let d = parse_duration("retry_tiers", part)?;
        if d.is_zero() || d.as_millis() == 0 {
            return Err(Error::invalid_config(
                "retry_tiers",
                format!("{part:?}: a tier must be at least 1ms"),
            ));
        }
        if d.subsec_nanos() % 1_000_000 != 0 {
            return Err(Error::invalid_config(
                "retry_tiers",
                format!("{part:?}: tiers are whole milliseconds"),
            ));
        }
        tiers.push(d);
    }
    let mut sorted = tiers.clone();
    sorted.sort();
    sorted.dedup();
    if sorted != tiers {
        return Err(Error::invalid_config(
            "retry_tiers",
            "tiers must be given in ascending order, each once (like 1s,5s,30s)",
        ));
    }
    Ok(tiers)
}

fn valid_topic(param: &str, topic: &str) -> Result<()> {
    if topic.is_empty() || topic == "." || topic == ".." {
        return Err(Error::invalid_config(param, "a topic name is required"));
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(Error::invalid_config(
            param,
            format!(
                "{} bytes is longer than {MAX_TOPIC_LEN} (room is left for the retry-tier suffixes)",
                topic.len()
            ),
        ));
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(Error::invalid_config(
            param,
            format!("{topic:?}: only ASCII letters, digits, '.', '_' and '-' are allowed"),
        ));
    }
    Ok(())
}

fn valid_broker(broker: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid_config(
            "brokers",
            format!("{broker:?}: {why}"),
        ))
    };
    let Some((host, port)) = broker.rsplit_once(':') else {
        return bad("expected host:port");
    };
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ', ',']) || !host.is_ascii() {
        return bad("not a host name or address");
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return bad("the port must be 1-65535");
    }
    Ok(())
}

impl KafkaConfig {
    /// Settings for `topic` on `brokers` (`host:port`), everything else default.
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers
                .into()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            topic: topic.into(),
            group: None,
            partitions: defaults::partitions(),
            replication: None,
            create: defaults::create(),
            retry_tiers: defaults::retry_tiers(),
            retry_mode: RetryMode::default(),
            commit_interval: defaults::commit_interval(),
            revoke_grace: defaults::revoke_grace(),
            close_timeout: defaults::close_timeout(),
            buffer: defaults::buffer(),
            join_timeout: defaults::join_timeout(),
            send_timeout: defaults::send_timeout(),
            max_message_size: defaults::max_message_size(),
            max_record_bytes: defaults::max_record_bytes(),
            client_id: None,
            rdkafka: BTreeMap::new(),
        }
    }

    /// Read `kafka://host:port[,host:port…]/TOPIC?…` (see the type's docs).
    pub fn from_url(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("kafka://").ok_or_else(|| {
            Error::invalid_config("url", "expected kafka://host:port[,host:port…]/TOPIC")
        })?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        if before_query.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err(Error::invalid_config(
                "url",
                "a fragment (#…) is not allowed",
            ));
        }
        let (hosts, topic) = before_query.split_once('/').ok_or_else(|| {
            Error::invalid_config("topic", "missing: expected kafka://host:port/TOPIC")
        })?;
        if hosts.contains('@') {
            return Err(Error::invalid_config(
                "url",
                "credentials go in rdkafka.sasl.username / rdkafka.sasl.password, not before the host",
            ));
        }
        let topic = percent_decode(topic);
        let mut cfg = KafkaConfig::new(hosts, topic);
        if cfg.brokers.is_empty() {
            return Err(Error::invalid_config(
                "brokers",
                "at least one host:port is required",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let (k, v) = (k.into_owned(), v.into_owned());
            if !seen.insert(k.clone()) {
                return Err(Error::invalid_config(&k, "given more than once"));
            }
            cfg.set_param(&k, &v)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn set_param(&mut self, k: &str, v: &str) -> Result<()> {
        let num = |v: &str| -> Result<u64> {
            v.parse::<u64>()
                .map_err(|e| Error::invalid_config(k, format!("{v:?}: {e}")))
        };
        let boolean = |v: &str| -> Result<bool> {
            match v {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                other => Err(Error::invalid_config(
                    k,
                    format!("{other:?} is not a boolean (true/false)"),
                )),
            }
        };
        match k {
            "group" => self.group = Some(v.to_string()),
            "partitions" => {
                self.partitions =
                    u32::try_from(num(v)?).map_err(|_| Error::invalid_config(k, "too large"))?
            }
            "replication" => {
                self.replication = Some(
                    u16::try_from(num(v)?).map_err(|_| Error::invalid_config(k, "too large"))?,
                )
            }
            "create" => self.create = boolean(v)?,
            "retry_tiers" => self.retry_tiers = parse_tiers(v)?,
            "retry_mode" => {
                self.retry_mode = match v {
                    "tiered" => RetryMode::Tiered,
                    "ordered" => RetryMode::Ordered,
                    other => {
                        return Err(Error::invalid_config(
                            k,
                            format!("{other:?}: expected tiered or ordered"),
                        ))
                    }
                }
            }
            "commit_interval" => self.commit_interval = parse_duration(k, v)?,
            "revoke_grace" => self.revoke_grace = parse_duration(k, v)?,
            "close_timeout" => self.close_timeout = parse_duration(k, v)?,
            "buffer" => {
                self.buffer =
                    usize::try_from(num(v)?).map_err(|_| Error::invalid_config(k, "too large"))?
            }
            "join_timeout" => self.join_timeout = parse_duration(k, v)?,
            "send_timeout" => self.send_timeout = parse_duration(k, v)?,
            "max_message_size" => {
                self.max_message_size =
                    usize::try_from(num(v)?).map_err(|_| Error::invalid_config(k, "too large"))?
            }
            "max_record_bytes" => {
                self.max_record_bytes =
                    usize::try_from(num(v)?).map_err(|_| Error::invalid_config(k, "too large"))?
            }
            "client_id" => self.client_id = Some(v.to_string()),
            _ => match k.strip_prefix("rdkafka.") {
                Some(prop) if !prop.is_empty() => {
                    self.rdkafka.insert(prop.to_string(), v.to_string());
                }
                _ => return Err(Error::invalid_config(k, "unknown parameter")),
            },
        }
        Ok(())
    }

    /// Check every field; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        valid_topic("topic", &self.topic)?;
        if self.brokers.is_empty() {
            return Err(Error::invalid_config(
                "brokers",
                "at least one host:port is required",
            ));
        }
        for b in &self.brokers {
            valid_broker(b)?;
        }
        if self.group().is_empty() || self.group().len() > 249 {
            return Err(Error::invalid_config("group", "1-249 bytes"));
        }
        if self.partitions == 0 || self.partitions > 10_000 {
            return Err(Error::invalid_config("partitions", "must be 1-10000"));
        }
        if self.replication == Some(0) {
            return Err(Error::invalid_config("replication", "must be at least 1"));
        }
        if self.buffer == 0 {
            return Err(Error::invalid_config("buffer", "must be at least 1"));
        }
        let ms = |param: &str, d: Duration, min: u128, max: u128| -> Result<()> {
            let v = d.as_millis();
            if v < min || v > max {
                return Err(Error::invalid_config(
                    param,
                    format!("{d:?} is outside {min}ms..={max}ms"),
                ));
            }
            Ok(())
        };
        ms("commit_interval", self.commit_interval, 10, 3_600_000)?;
        ms("send_timeout", self.send_timeout, 100, 24 * 3_600_000)?;
        ms("revoke_grace", self.revoke_grace, 0, 3_600_000)?;
        ms("close_timeout", self.close_timeout, 0, 24 * 3_600_000)?;
        ms("join_timeout", self.join_timeout, 100, 24 * 3_600_000)?;
        if self.max_message_size == 0 {
            return Err(Error::invalid_config(
                "max_message_size",
                "must be at least 1",
            ));
        }
        if self.max_record_bytes < 1000 || self.max_record_bytes > 1_000_000_000 {
            return Err(Error::invalid_config(
                "max_record_bytes",
                "must be 1000..=1000000000 (librdkafka's message.max.bytes range)",
            ));
        }
        if let Some(t) = self.retry_tiers.last() {
            if *t > Duration::from_secs(7 * 24 * 3600) {
                return Err(Error::invalid_config(
                    "retry_tiers",
                    "the longest tier is 7 days (records must outlive it on the tier topic)",
                ));
            }
        }
        for k in self.rdkafka.keys() {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::invalid_config(
                    &format!("rdkafka.{k}"),
                    "not a librdkafka property name",
                ));
            }
        }
        Ok(())
    }

    /// The consumer group: [`group`](Self::group) or `ferrymq.TOPIC`.
    pub fn group(&self) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("ferrymq.{}", self.topic))
    }

    /// The group that reads the retry tier topics: `GROUP.retry`.
    pub fn retry_group(&self) -> String {
        format!("{}.retry", self.group())
    }

    /// The retry tier topic for delay `tier` (one of [`retry_tiers`](Self::retry_tiers)).
    pub fn tier_topic(&self, tier: Duration) -> String {
        format!("{}.retry-{}", self.topic, tier_label(tier))
    }

    /// Every retry tier topic, shortest delay first.
    pub fn tier_topics(&self) -> Vec<String> {
        self.retry_tiers
            .iter()
            .map(|t| self.tier_topic(*t))
            .collect()
    }

    /// The dead-letter topic the admin creates with the queue: `TOPIC.dlq` (use it
    /// with `with_queue` as the RetryToDlq middleware's producer).
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic)
    }

    /// The smallest tier that holds a delay of `d`, if any does.
    pub(crate) fn tier_for(&self, d: Duration) -> Option<Duration> {
        self.retry_tiers.iter().copied().find(|t| *t >= d)
    }

    /// The longest delay the tiers give.
    pub fn max_delay(&self) -> Option<Duration> {
        self.retry_tiers.last().copied()
    }

    /// The same settings for another topic (a dead-letter topic, a pipeline stage).
    pub fn for_topic(&self, topic: &str) -> Result<Self> {
        valid_topic("queue", topic)?;
        let mut c = self.clone();
        c.topic = topic.to_string();
        Ok(c)
    }

    /// The librdkafka settings every client of this config shares: brokers,
    /// client id, and the passthrough properties.
    pub(crate) fn base_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.join(","));
        c.set(
            "client.id",
            self.client_id.clone().unwrap_or_else(|| "ferrymq".into()),
        );
        c
    }

    /// Apply the passthrough properties last.
    pub(crate) fn apply_overrides(&self, c: &mut ClientConfig) {
        for (k, v) in &self.rdkafka {
            c.set(k, v);
        }
    }

    /// Connect a producer.
    pub async fn producer(&self) -> Result<KafkaProducer> {
        KafkaProducer::connect(self.clone()).await
    }

    /// Connect a consumer: returns once the member has joined the group and been
    /// assigned its partitions.
    pub async fn consumer(&self) -> Result<KafkaConsumer> {
        KafkaConsumer::connect(self.clone()).await
    }

    /// The admin of this queue.
    pub fn admin(&self) -> Result<KafkaAdmin> {
        KafkaAdmin::new(self.clone())
    }

    /// The config as a URL, secrets shown (`***` otherwise).
    fn to_url(&self, expose: bool) -> String {
        let mut s = format!("kafka://{}/{}", self.brokers.join(","), self.topic);
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(g) = &self.group {
            q.append_pair("group", g);
        }
        let d = KafkaConfig::new("x:1", "x");
        if self.partitions != d.partitions {
            q.append_pair("partitions", &self.partitions.to_string());
        }
        if let Some(r) = self.replication {
            q.append_pair("replication", &r.to_string());
        }
        if self.create != d.create {
            q.append_pair("create", &self.create.to_string());
        }
        if self.retry_tiers != d.retry_tiers {
            q.append_pair("retry_tiers", &tiers_to_string(&self.retry_tiers));
        }
        if self.retry_mode != d.retry_mode {
            q.append_pair("retry_mode", self.retry_mode.as_str());
        }
        let durations = [
            ("commit_interval", self.commit_interval, d.commit_interval),
            ("revoke_grace", self.revoke_grace, d.revoke_grace),
            ("close_timeout", self.close_timeout, d.close_timeout),
            ("join_timeout", self.join_timeout, d.join_timeout),
            ("send_timeout", self.send_timeout, d.send_timeout),
        ];
        for (name, v, default) in durations {
            if v != default {
                q.append_pair(name, &humantime::format_duration(v).to_string());
            }
        }
        let numbers = [
            ("buffer", self.buffer, d.buffer),
            (
                "max_message_size",
                self.max_message_size,
                d.max_message_size,
            ),
            (
                "max_record_bytes",
                self.max_record_bytes,
                d.max_record_bytes,
            ),
        ];
        for (name, v, default) in numbers {
            if v != default {
                q.append_pair(name, &v.to_string());
            }
        }
        if let Some(id) = &self.client_id {
            q.append_pair("client_id", id);
        }
        for (k, v) in &self.rdkafka {
            let shown = if is_secret_param(k) && !expose {
                "***"
            } else {
                v
            };
            q.append_pair(&format!("rdkafka.{k}"), shown);
        }
        let q = q.finish();
        if !q.is_empty() {
            s.push('?');
            s.push_str(&q);
        }
        s
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("url", &self.to_url(false))
            .finish_non_exhaustive()
    }
}

/// The URL, secrets redacted.
impl fmt::Display for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_url(false))
    }
}

/// The `kafka://` backend for the facade's driver list.
#[derive(Debug, Clone, Copy, Default)]
pub struct KafkaDriver;

impl Driver for KafkaDriver {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["kafka"]
    }

    fn parse_url(&self, url: &str) -> Result<Box<dyn BackendConfig>> {
        Ok(Box::new(KafkaConfig::from_url(url)?))
    }

    fn parse_value(&self, value: serde_json::Value) -> Result<Box<dyn BackendConfig>> {
        let cfg: KafkaConfig = serde_json::from_value(value)
            .map_err(|e| Error::invalid_config("kafka", format!("{e}")))?;
        cfg.validate()?;
        Ok(Box::new(cfg))
    }
}

#[async_trait]
impl BackendConfig for KafkaConfig {
    fn backend(&self) -> &'static str {
        "kafka"
    }

    fn queue(&self) -> &str {
        &self.topic
    }

    fn with_queue(&self, queue: &str) -> Result<Box<dyn BackendConfig>> {
        Ok(Box::new(self.for_topic(queue)?))
    }

    /// `kafka://<brokers, sorted, lower-case>/<topic>#<group>`: the group is part of
    /// the identity because a Kafka queue is a topic *as read by one group*.
    fn identity(&self) -> String {
        let mut brokers: Vec<String> = self
            .brokers
            .iter()
            .map(|b| b.to_ascii_lowercase())
            .collect();
        brokers.sort();
        brokers.dedup();
        format!(
            "kafka://{}/{}#{}",
            brokers.join(","),
            self.topic,
            self.group()
        )
    }

    fn to_value(&self, expose_secrets: bool) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(map) = v.get_mut("rdkafka").and_then(|m| m.as_object_mut()) {
            for (k, val) in map.iter_mut() {
                if is_secret_param(k) && !expose_secrets {
                    *val = serde_json::Value::String("***".into());
                }
            }
        }
        if let Some(obj) = v.as_object_mut() {
            obj.insert("backend".into(), serde_json::Value::String("kafka".into()));
        }
        v
    }

    fn clone_box(&self) -> Box<dyn BackendConfig> {
        Box::new(self.clone())
    }

    async fn producer(&self) -> Result<Box<dyn Producer>> {
        Ok(Box::new(KafkaConfig::producer(self).await?))
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(KafkaConfig::consumer(self).await?))
    }

    async fn admin(&self) -> Result<Box<dyn Admin>> {
        Ok(Box::new(KafkaConfig::admin(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymq_core::ErrorKind;

    #[test]
    fn url_with_host_list_and_params() {
        let c = KafkaConfig::from_url(
            "kafka://h1:9092,H2:9093/orders.v1?group=g&partitions=6&retry_tiers=1s,2s,1m&retry_mode=ordered&revoke_grace=500ms&rdkafka.linger.ms=2",
        )
        .unwrap();
        assert_eq!(c.brokers, ["h1:9092", "H2:9093"]);
        assert_eq!(c.topic, "orders.v1");
        assert_eq!(c.group(), "g");
        assert_eq!(KafkaConfig::new("h:1", "t").group(), "ferrymq.t");
        assert_eq!(c.partitions, 6);
        assert_eq!(c.retry_tiers.len(), 3);
        assert_eq!(c.tier_topic(c.retry_tiers[2]), "orders.v1.retry-1m");
        assert_eq!(c.revoke_grace, Duration::from_millis(500));
        assert_eq!(c.retry_mode, RetryMode::Ordered);
        assert_eq!(KafkaConfig::new("h:1", "t").retry_mode, RetryMode::Tiered);
        assert_eq!(c.rdkafka.get("linger.ms").map(String::as_str), Some("2"));
        assert_eq!(c.identity(), "kafka://h1:9092,h2:9093/orders.v1#g");
        // Display round-trips.
        let again = KafkaConfig::from_url(&c.to_string()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn bad_urls_name_the_parameter() {
        for (url, param) in [
            ("kafka://h1:9092", "topic"),
            ("kafka://h1:9092/", "topic"),
            ("kafka://h1/orders", "brokers"),
            ("kafka://h1:0/orders", "brokers"),
            ("kafka://h1:9092/bad topic", "topic"),
            ("kafka://h1:9092/t?partitions=0", "partitions"),
            ("kafka://h1:9092/t?retry_tiers=5s,1s", "retry_tiers"),
            ("kafka://h1:9092/t?bogus=1", "bogus"),
            ("kafka://h1:9092/t?retry_mode=blocking", "retry_mode"),
            ("kafka://h1:9092/t?group=a&group=b", "group"),
            ("kafka://u:pw@h1:9092/t", "url"),
        ] {
            let e = KafkaConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(e.to_string().contains(&format!("`{param}`")), "{url}: {e}");
            assert!(!e.to_string().contains("pw"), "{e}");
        }
    }

    #[test]
    fn secrets_never_print_unless_asked() {
        let c = KafkaConfig::from_url(
            "kafka://h:1/t?rdkafka.sasl.password=hunter2&rdkafka.ssl.key.password=p2&rdkafka.sasl.username=alice",
        )
        .unwrap();
        let shown = format!("{c} {c:?} {}", c.to_value(false));
        assert!(
            !shown.contains("hunter2") && !shown.contains("p2"),
            "{shown}"
        );
        assert!(shown.contains("alice"));
        let exposed = c.to_value(true).to_string();
        assert!(exposed.contains("hunter2"));
        // The serde form reads back.
        let mut v = c.to_value(true);
        v.as_object_mut().unwrap().remove("backend");
        let back = KafkaDriver.parse_value(v).unwrap();
        assert_eq!(back.identity(), c.identity());
    }

    #[test]
    fn tiers_pick_the_smallest_that_holds_the_delay() {
        let c = KafkaConfig::from_url("kafka://h:1/t?retry_tiers=1s,5s,30s").unwrap();
        assert_eq!(c.tier_for(Duration::ZERO), Some(Duration::from_secs(1)));
        assert_eq!(
            c.tier_for(Duration::from_secs(2)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            c.tier_for(Duration::from_secs(30)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(c.tier_for(Duration::from_secs(31)), None);
        assert_eq!(c.max_delay(), Some(Duration::from_secs(30)));
    }
}
