//! Settings of a Redis queue: from a URL, from serde (TOML, env), or built in code.

use std::fmt;
use std::time::Duration;

use ferrymq_core::config::{parse_url, QueryParams, Secret};
use ferrymq_core::{Error, Result};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::{RedisConsumer, RedisProducer};

/// Settings of one Redis queue.
///
/// From a URL:
///
/// ```text
/// redis://[user:password@]host[:port][/db]/QUEUE?group=invoicers&visibility=30s
/// rediss://...   (TLS, with the `tls` cargo feature)
/// redis://host:port/QUEUE?cluster=true[&cluster_nodes=h2:port,h3:port]   (Redis Cluster)
/// ```
///
/// Query parameters (all optional): `group`, `consumer`, `visibility`,
/// `max_message_size`, `dedup_window`, `priority_levels`, `max_deliveries`,
/// `dlq_max_len`, `dlq_retention`, `connect_timeout`, `command_timeout`,
/// `ack_linger`, `connections`, `pool_size`, `promote_batch`, `ordered`, `rate_limit`,
/// `cluster`, `cluster_nodes`.
/// An unknown parameter is an error.
///
/// - `cluster=true`: the server is a Redis Cluster; `host:port` (and any of
///   `cluster_nodes`) is a seed node. The client is redis-rs' own cluster client
///   (`redis::cluster_async::ClusterConnection`): it reads the slot map, sends each
///   command to the master of its key's slot and follows `MOVED`/`ASK`. A queue's
///   keys share the `{QUEUE}` hash tag, so a queue is one slot on one master and
///   every feature (ordered queues, dead letters, dedup store, job store, flows,
///   schedules) runs there unchanged; different queues spread over the masters.
///   A cluster has database 0 only (`db` other than 0 is refused).
///
/// - `ordered=true`: per-key order (SQS FIFO group semantics, `Ordering::PerKey`): a
///   key's messages are delivered in send order and none while an earlier one of
///   its key is in flight (also across nacks, nack delays and expired leases).
///   Keys run in parallel. An ordered queue has one priority level (the URL sets
///   `priority_levels=1` unless it says otherwise; more is refused). See the crate
///   docs, "Per-key order".
/// - `rate_limit=N/PERIOD` (`100/1s`, `5/200ms`): at most `N` deliveries in any
///   `PERIOD` across **all** consumers of the queue, enforced by the receive script
///   on the server. tower's `RateLimit` layer is the per-worker limit; this one is
///   the queue's.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_redis::RedisConfig;
///
/// let cfg = RedisConfig::from_url("redis://:hunter2@127.0.0.1:6379/2/orders?group=invoicers&visibility=10s")?;
/// assert_eq!(cfg.queue, "orders");
/// assert_eq!(cfg.db, 2);
/// assert_eq!(cfg.visibility_timeout, Duration::from_secs(10));
/// // The password never prints.
/// assert!(!format!("{cfg:?} {cfg}").contains("hunter2"));
///
/// // From serde:
/// let cfg: RedisConfig = toml::from_str(r#"
///     queue = "orders"
///     port = 6399
///     visibility_timeout = "2s"
/// "#).unwrap();
/// assert_eq!(cfg.port, 6399);
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Queue name: the `{queue}` hash tag of every key. No `{`, `}` or whitespace.
    pub queue: String,
    /// Server host.
    #[serde(default = "defaults::host")]
    pub host: String,
    /// Server port.
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// Logical database.
    #[serde(default)]
    pub db: u32,
    /// ACL user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (never printed).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Connect with TLS (`rediss://`; needs the `tls` cargo feature).
    #[serde(default)]
    pub tls: bool,
    /// Consumer group. Every consumer of a queue must use the same group: acked
    /// messages are deleted from the stream, so a queue is one work queue, not a
    /// fan-out topic.
    #[serde(default = "defaults::group")]
    pub group: String,
    /// Consumer name inside the group; unique per consumer when unset.
    #[serde(default)]
    pub consumer_name: Option<String>,
    /// An un-acked delivery is redelivered after this long.
    #[serde(with = "humantime_serde", default = "defaults::visibility")]
    pub visibility_timeout: Duration,
    /// Largest message (payload + header names and values) accepted.
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: usize,
    /// A second send with the same dedup id within this window is dropped.
    #[serde(with = "humantime_serde", default = "defaults::dedup_window")]
    pub dedup_window: Duration,
    /// Priority levels, one stream each: priority `p` goes to level
    /// `clamp(p, 0, levels - 1)`; higher levels are delivered first.
    #[serde(default = "defaults::priority_levels")]
    pub priority_levels: u8,
    /// Dead-letter a message once it was delivered this many times without an ack
    /// (visibility timeouts and nacks both count). 0 = never.
    #[serde(default)]
    pub max_deliveries: u32,
    /// The dead-letter stream keeps at most about this many messages.
    #[serde(default = "defaults::dlq_max_len")]
    pub dlq_max_len: u64,
    /// ... and drops dead letters older than this (zero: keep by length only).
    #[serde(with = "humantime_serde", default = "defaults::dlq_retention")]
    pub dlq_retention: Duration,
    /// Give up connecting after this long (`Connection` error).
    #[serde(with = "humantime_serde", default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// Give up waiting for an answer after this long (`Timeout` error).
    #[serde(with = "humantime_serde", default = "defaults::command_timeout")]
    pub command_timeout: Duration,
    /// Wait this long to gather more acks into one call. Zero (the default) still
    /// batches: acks arriving while one batch is on the wire go out together in the
    /// next, so a busy worker sends few calls and a lone ack waits for nothing.
    #[serde(with = "humantime_serde", default)]
    pub ack_linger: Duration,
    /// Multiplexed connections shared by every non-blocking command of one
    /// `connect()` (used in turn).
    #[serde(default = "defaults::connections")]
    pub connections: usize,
    /// Connections kept for blocking reads (`XREADGROUP … BLOCK` needs its own).
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// Due delayed messages promoted per receive call, at most.
    #[serde(default = "defaults::promote_batch")]
    pub promote_batch: usize,
    /// Per-key order (`Ordering::PerKey`): one message of a key in flight at a time,
    /// in send order. Needs `priority_levels = 1`. A setting of the queue: recorded
    /// with it, and clients that disagree are refused.
    #[serde(default)]
    pub ordered: bool,
    /// Queue-wide rate limit: at most this many deliveries per period across every
    /// consumer of the queue. A setting of the queue, like `ordered`.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Talk to a Redis Cluster (`cluster=true`): `host:port` is a seed node, the
    /// client learns the slot map from it and follows `MOVED`/`ASK` redirects. Every
    /// key of a queue shares its `{queue}` hash tag, so a queue lives in one slot
    /// (one master) and its scripts run there; queues spread over the masters.
    /// Database 0 only (a cluster has no other).
    #[serde(default)]
    pub cluster: bool,
    /// More seed nodes of the cluster (`host:port` each; `cluster_nodes=h2:7001,h3:7002`
    /// in a URL), tried when `host:port` is down at connect. Needs `cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_nodes: Vec<String>,
}

/// A queue-wide rate limit: at most `jobs` deliveries in any window of `per`
/// (a sliding window, counted on the server), across every consumer of the queue.
///
/// Every delivery counts, redeliveries too (a nacked or expired message handed out
/// again uses the budget like a new one). Written `N/PERIOD`: `100/1s`, `5/200ms`.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_redis::RateLimit;
///
/// let limit: RateLimit = "100/1s".parse()?;
/// assert_eq!((limit.jobs, limit.per), (100, Duration::from_secs(1)));
/// assert_eq!(limit.to_string(), "100/1s");
/// assert!("0/1s".parse::<RateLimit>().is_err());
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Deliveries allowed per window.
    pub jobs: u32,
    /// The window.
    pub per: Duration,
}

/// Most deliveries one window may allow: the server keeps one entry per delivery
/// of the window.
pub const MAX_RATE_LIMIT_JOBS: u32 = 100_000;

impl RateLimit {
    /// `jobs` per `per`.
    pub fn new(jobs: u32, per: Duration) -> Self {
        RateLimit { jobs, per }
    }

    fn validate(&self) -> Result<()> {
        if self.jobs == 0 || self.jobs > MAX_RATE_LIMIT_JOBS {
            return Err(Error::invalid_config(
                "rate_limit",
                format!("the job count must be between 1 and {MAX_RATE_LIMIT_JOBS}"),
            ));
        }
        if self.per < Duration::from_millis(1) || self.per > crate::client::MAX_DELAY {
            return Err(Error::invalid_config(
                "rate_limit",
                "the period must be between 1ms and 365 days",
            ));
        }
        Ok(())
    }
}

impl std::str::FromStr for RateLimit {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid_config(
                "rate_limit",
                format!("{s:?} is not N/PERIOD (for example 100/1s)"),
            )
        };
        let (jobs, per) = s.split_once('/').ok_or_else(bad)?;
        let jobs: u32 = jobs.trim().parse().map_err(|_| bad())?;
        let per = humantime::parse_duration(per.trim()).map_err(|_| bad())?;
        let limit = RateLimit { jobs, per };
        limit.validate()?;
        Ok(limit)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.jobs, humantime::format_duration(self.per))
    }
}

impl Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

mod defaults {
    use std::time::Duration;
    pub fn host() -> String {
        "127.0.0.1".into()
    }
    pub fn port() -> u16 {
        6379
    }
    pub fn group() -> String {
        "ferrymq".into()
    }
    pub fn visibility() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_message_size() -> usize {
        1024 * 1024
    }
    pub fn dedup_window() -> Duration {
        Duration::from_secs(300)
    }
    pub fn priority_levels() -> u8 {
        4
    }
    pub fn dlq_max_len() -> u64 {
        10_000
    }
    pub fn dlq_retention() -> Duration {
        Duration::from_secs(7 * 24 * 3600)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn command_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn connections() -> usize {
        2
    }
    pub fn pool_size() -> usize {
        16
    }
    pub fn promote_batch() -> usize {
        1000
    }
}

/// Longest `dlq_retention`: 40 years (of 365.25 days). Dead letters are trimmed by
/// stream id `now - retention`, which must stay after the epoch.
pub const MAX_DLQ_RETENTION: Duration = Duration::from_secs(40 * 31_557_600);

/// Largest priority level count (each level is a stream read on every receive).
pub const MAX_PRIORITY_LEVELS: u8 = 16;

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.to_string())
            .field("visibility_timeout", &self.visibility_timeout)
            .field("max_message_size", &self.max_message_size)
            .field("dedup_window", &self.dedup_window)
            .field("priority_levels", &self.priority_levels)
            .field("max_deliveries", &self.max_deliveries)
            .field("dlq_max_len", &self.dlq_max_len)
            .field("dlq_retention", &self.dlq_retention)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("ack_linger", &self.ack_linger)
            .field("connections", &self.connections)
            .field("pool_size", &self.pool_size)
            .field("promote_batch", &self.promote_batch)
            .field("ordered", &self.ordered)
            .field("rate_limit", &self.rate_limit)
            .field("cluster", &self.cluster)
            .field("cluster_nodes", &self.cluster_nodes)
            .finish()
    }
}

/// `redis://user:***@host:port/db/queue?group=…`, password redacted.
impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(f, "{scheme}://")?;
        match (&self.username, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (Some(u), None) => write!(f, "{u}@")?,
            (None, Some(_)) => write!(f, ":***@")?,
            (None, None) => {}
        }
        write!(
            f,
            "{}:{}/{}/{}?group={}",
            self.host, self.port, self.db, self.queue, self.group
        )?;
        if self.cluster {
            f.write_str("&cluster=true")?;
        }
        if !self.cluster_nodes.is_empty() {
            write!(f, "&cluster_nodes={}", self.cluster_nodes.join(","))?;
        }
        Ok(())
    }
}

impl RedisConfig {
    /// Defaults for queue `name` on `127.0.0.1:6379`, db 0, group `ferrymq`, 30 s
    /// visibility, 1 MiB messages, 5 min dedup window, 4 priority levels.
    pub fn new(queue: impl Into<String>) -> Self {
        RedisConfig {
            queue: queue.into(),
            host: defaults::host(),
            port: defaults::port(),
            db: 0,
            username: None,
            password: None,
            tls: false,
            group: defaults::group(),
            consumer_name: None,
            visibility_timeout: defaults::visibility(),
            max_message_size: defaults::max_message_size(),
            dedup_window: defaults::dedup_window(),
            priority_levels: defaults::priority_levels(),
            max_deliveries: 0,
            dlq_max_len: defaults::dlq_max_len(),
            dlq_retention: defaults::dlq_retention(),
            connect_timeout: defaults::connect_timeout(),
            command_timeout: defaults::command_timeout(),
            ack_linger: Duration::ZERO,
            connections: defaults::connections(),
            pool_size: defaults::pool_size(),
            promote_batch: defaults::promote_batch(),
            ordered: false,
            rate_limit: None,
            cluster: false,
            cluster_nodes: Vec::new(),
        }
    }

    /// Parse `redis://[user:pass@]host[:port][/db]/QUEUE?…` (or `rediss://`).
    pub fn from_url(raw: &str) -> Result<Self> {
        let url = parse_url(raw)?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(Error::invalid_config(
                    "scheme",
                    format!("expected redis:// or rediss://, got {other}://"),
                ))
            }
        };
        let segments: Vec<&str> = url
            .path()
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (db, queue) = match segments.as_slice() {
            [queue] => (0, *queue),
            [db, queue] => {
                let db = db.parse::<u32>().map_err(|_| {
                    Error::invalid_config("db", format!("{db:?} is not a database number"))
                })?;
                (db, *queue)
            }
            _ => {
                return Err(Error::invalid_config(
                    "queue",
                    "write redis://host:port/QUEUE or redis://host:port/DB/QUEUE",
                ))
            }
        };
        let mut cfg = RedisConfig::new(percent_decode("queue", queue)?);
        cfg.tls = tls;
        cfg.db = db;
        if let Some(host) = url.host_str() {
            cfg.host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
        }
        if let Some(port) = url.port() {
            cfg.port = port;
        }
        if !url.username().is_empty() {
            cfg.username = Some(percent_decode("username", url.username())?);
        }
        if let Some(pw) = url.password() {
            cfg.password = Some(Secret::new(percent_decode("password", pw)?));
        }
        let mut q = QueryParams::from_url(&url)?;
        if let Some(v) = q.take_str("group") {
            cfg.group = v;
        }
        if let Some(v) = q.take_str("consumer") {
            cfg.consumer_name = Some(v);
        }
        if let Some(v) = q.take_duration("visibility")? {
            cfg.visibility_timeout = v;
        }
        if let Some(v) = q.take("max_message_size")? {
            cfg.max_message_size = v;
        }
        if let Some(v) = q.take_duration("dedup_window")? {
            cfg.dedup_window = v;
        }
        let levels: Option<u8> = q.take("priority_levels")?;
        if let Some(v) = levels {
            cfg.priority_levels = v;
        }
        if let Some(v) = q.take("max_deliveries")? {
            cfg.max_deliveries = v;
        }
        if let Some(v) = q.take("dlq_max_len")? {
            cfg.dlq_max_len = v;
        }
        if let Some(v) = q.take_duration("dlq_retention")? {
            cfg.dlq_retention = v;
        }
        if let Some(v) = q.take_duration("connect_timeout")? {
            cfg.connect_timeout = v;
        }
        if let Some(v) = q.take_duration("command_timeout")? {
            cfg.command_timeout = v;
        }
        if let Some(v) = q.take_duration("ack_linger")? {
            cfg.ack_linger = v;
        }
        if let Some(v) = q.take("connections")? {
            cfg.connections = v;
        }
        if let Some(v) = q.take("pool_size")? {
            cfg.pool_size = v;
        }
        if let Some(v) = q.take("promote_batch")? {
            cfg.promote_batch = v;
        }
        if let Some(v) = q.take_bool("ordered")? {
            cfg.ordered = v;
            // An ordered queue has one level; say so unless the URL names its own
            // (more than one is then refused by `validate`, naming the setting).
            if v && levels.is_none() {
                cfg.priority_levels = 1;
            }
        }
        if let Some(v) = q.take_str("rate_limit") {
            cfg.rate_limit = Some(v.parse()?);
        }
        if let Some(v) = q.take_bool("cluster")? {
            cfg.cluster = v;
        }
        if let Some(v) = q.take_str("cluster_nodes") {
            cfg.cluster_nodes = v
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect();
        }
        q.finish()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Set host and port.
    pub fn server(mut self, host: impl Into<String>, port: u16) -> Self {
        self.host = host.into();
        self.port = port;
        self
    }

    /// Set the logical database.
    pub fn db(mut self, db: u32) -> Self {
        self.db = db;
        self
    }

    /// Set the credentials.
    pub fn credentials(mut self, username: Option<String>, password: Option<Secret>) -> Self {
        self.username = username;
        self.password = password;
        self
    }

    /// Use TLS.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Set the consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// Set the consumer name.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = Some(name.into());
        self
    }

    /// Set the visibility timeout.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }

    /// Set the maximum message size.
    pub fn max_message_size(mut self, n: usize) -> Self {
        self.max_message_size = n;
        self
    }

    /// Set the dedup window.
    pub fn dedup_window(mut self, d: Duration) -> Self {
        self.dedup_window = d;
        self
    }

    /// Set the number of priority levels (1 disables priority).
    pub fn priority_levels(mut self, n: u8) -> Self {
        self.priority_levels = n;
        self
    }

    /// Dead-letter after this many deliveries (0 = never).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n;
        self
    }

    /// Bound the dead-letter stream by length and age.
    pub fn dlq_retention(mut self, max_len: u64, max_age: Duration) -> Self {
        self.dlq_max_len = max_len;
        self.dlq_retention = max_age;
        self
    }

    /// Set the connect timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Set the command timeout.
    pub fn command_timeout(mut self, d: Duration) -> Self {
        self.command_timeout = d;
        self
    }

    /// Set the ack linger.
    pub fn ack_linger(mut self, d: Duration) -> Self {
        self.ack_linger = d;
        self
    }

    /// Set the number of shared multiplexed connections.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    /// Set the blocking-read pool size.
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// Per-key order (`Ordering::PerKey`); also sets one priority level, which an
    /// ordered queue has.
    pub fn ordered(mut self, on: bool) -> Self {
        self.ordered = on;
        if on {
            self.priority_levels = 1;
        }
        self
    }

    /// A queue-wide rate limit: at most `jobs` deliveries per `per` across every
    /// consumer (`None`: unlimited).
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Whether receives go through the RECEIVE script (ordered or rate limited)
    /// instead of the plain `XREADGROUP` pipeline.
    pub(crate) fn scripted_receive(&self) -> bool {
        self.ordered || self.rate_limit.is_some()
    }

    /// Check every setting; the error names the parameter.
    pub fn validate(&self) -> Result<()> {
        if self.queue.is_empty() {
            return Err(Error::invalid_config("queue", "missing queue name"));
        }
        if self.queue.len() > 200
            || self
                .queue
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid_config(
                "queue",
                "at most 200 characters, without '{', '}', whitespace or control characters",
            ));
        }
        if self.group.is_empty()
            || self
                .group
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Error::invalid_config(
                "group",
                "must be non-empty, without whitespace",
            ));
        }
        if self.visibility_timeout < Duration::from_millis(10) {
            return Err(Error::invalid_config("visibility", "must be at least 10ms"));
        }
        // Durations become milliseconds in script arguments and `PX`/`IDLE`: past
        // these bounds they would be refused by the server on every call.
        if self.visibility_timeout > crate::client::MAX_DELAY {
            return Err(Error::invalid_config(
                "visibility",
                "must be at most 365 days",
            ));
        }
        if self.max_message_size == 0 || self.max_message_size > 512 * 1024 * 1024 {
            return Err(Error::invalid_config(
                "max_message_size",
                "must be between 1 and 536870912 bytes (Redis' bulk string limit)",
            ));
        }
        if self.dedup_window < Duration::from_millis(1) {
            return Err(Error::invalid_config(
                "dedup_window",
                "must be at least 1ms",
            ));
        }
        if self.dedup_window > MAX_DLQ_RETENTION {
            return Err(Error::invalid_config(
                "dedup_window",
                format!(
                    "must be at most {}",
                    humantime::format_duration(MAX_DLQ_RETENTION)
                ),
            ));
        }
        if self.priority_levels == 0 || self.priority_levels > MAX_PRIORITY_LEVELS {
            return Err(Error::invalid_config(
                "priority_levels",
                format!("must be between 1 and {MAX_PRIORITY_LEVELS}"),
            ));
        }
        // A dead letter's age limit is a stream id `now - retention`: past the epoch
        // (about 55 years back) that is no id at all, and every trim would fail.
        if self.dlq_retention > MAX_DLQ_RETENTION {
            return Err(Error::invalid_config(
                "dlq_retention",
                format!(
                    "at most {} (use 0 to bound the dead-letter stream by length only)",
                    humantime::format_duration(MAX_DLQ_RETENTION)
                ),
            ));
        }
        if self.dlq_max_len == 0 {
            return Err(Error::invalid_config("dlq_max_len", "must be at least 1"));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::invalid_config(
                "connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.command_timeout.is_zero() {
            return Err(Error::invalid_config(
                "command_timeout",
                "must be greater than zero",
            ));
        }
        if self.connections == 0 || self.connections > 64 {
            return Err(Error::invalid_config(
                "connections",
                "must be between 1 and 64",
            ));
        }
        if self.pool_size == 0 {
            return Err(Error::invalid_config("pool_size", "must be at least 1"));
        }
        if self.promote_batch == 0 || self.promote_batch > 5000 {
            return Err(Error::invalid_config(
                "promote_batch",
                "must be between 1 and 5000",
            ));
        }
        if self.ordered && self.priority_levels != 1 {
            return Err(Error::invalid_config(
                "priority_levels",
                format!(
                    "an ordered queue has one priority level (a key's order is its send order),                      this config has {}; set priority_levels=1 or leave it out of the URL",
                    self.priority_levels
                ),
            ));
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate()?;
        }
        if !self.cluster_nodes.is_empty() && !self.cluster {
            return Err(Error::invalid_config(
                "cluster_nodes",
                "seed nodes are for a Redis Cluster: add cluster=true",
            ));
        }
        if self.cluster && self.db != 0 {
            return Err(Error::invalid_config(
                "db",
                format!(
                    "a Redis Cluster has database 0 only, this config names {}",
                    self.db
                ),
            ));
        }
        for node in &self.cluster_nodes {
            valid_node(node)?;
        }
        Ok(())
    }

    /// The URLs of the seed nodes of a cluster (`host:port` first, then
    /// `cluster_nodes`), each with the credentials. Hold the password: never log them.
    pub(crate) fn cluster_urls(&self) -> Result<Vec<String>> {
        let mut urls = vec![self.client_url()?];
        for node in &self.cluster_nodes {
            let (host, port) = split_node(node)?;
            let mut seed = self.clone();
            seed.host = host.to_string();
            seed.port = port;
            urls.push(seed.client_url()?);
        }
        Ok(urls)
    }

    /// The URL handed to the redis client. Holds the password: never log it.
    pub(crate) fn client_url(&self) -> Result<String> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut url = Url::parse(&format!("{scheme}://{host}:{}/{}", self.port, self.db))
            .map_err(|e| Error::invalid_config("host", format!("{:?}: {e}", self.host)))?;
        let bad = |param: &str| Error::invalid_config(param, "cannot be put in a redis URL");
        if let Some(user) = &self.username {
            url.set_username(user).map_err(|_| bad("username"))?;
        }
        if let Some(pw) = &self.password {
            url.set_password(Some(pw.expose()))
                .map_err(|_| bad("password"))?;
        }
        Ok(url.to_string())
    }

    /// What identifies the queue on its server, however the URL was spelled:
    /// `redis:<host, lower-cased>:<port>/<db>/<queue>`. No credentials.
    pub fn identity(&self) -> String {
        format!(
            "redis:{}:{}/{}/{}",
            self.host.to_ascii_lowercase(),
            self.port,
            self.db,
            self.queue
        )
    }

    /// `host:port/db`, for error messages.
    pub(crate) fn endpoint(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.db)
    }

    /// Connect and return a producer and a consumer sharing one connection.
    ///
    /// Checks at startup: the server answers within `connect_timeout`
    /// (`Connection`), accepts the credentials (`Auth`), every key of the queue has
    /// the type this backend uses (`Backend`); warns (tracing) when the server's
    /// `maxmemory-policy` may evict queue keys; the settings recorded with the
    /// queue agree with this config (`InvalidConfig` naming the setting; recorded
    /// by the first client, see the crate docs). Creates the consumer group.
    pub async fn connect(&self) -> Result<(RedisProducer, RedisConsumer)> {
        let shared =
            crate::client::Shared::connect(self.clone(), crate::settings::Role::Consumer).await?;
        let consumer = RedisConsumer::new(shared.clone()).await?;
        Ok((RedisProducer::new(shared), consumer))
    }

    /// A producer only.
    pub async fn producer(&self) -> Result<RedisProducer> {
        let shared =
            crate::client::Shared::connect(self.clone(), crate::settings::Role::Producer).await?;
        Ok(RedisProducer::new(shared))
    }

    /// A consumer only.
    pub async fn consumer(&self) -> Result<RedisConsumer> {
        let shared =
            crate::client::Shared::connect(self.clone(), crate::settings::Role::Consumer).await?;
        RedisConsumer::new(shared).await
    }
}

/// `host:port` of a seed node (`[v6]:port` for an IPv6 address).
fn split_node(node: &str) -> Result<(&str, u16)> {
    let bad = |why: &str| Error::invalid_config("cluster_nodes", format!("{node:?}: {why}"));
    let (host, port) = node
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ', ',', '[', ']']) {
        return Err(bad("not a host name or address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host, p)),
        _ => Err(bad("the port must be 1-65535")),
    }
}

fn valid_node(node: &str) -> Result<()> {
    split_node(node).map(|_| ())
}

fn percent_decode(param: &str, s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::invalid_config(param, "bad percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| Error::invalid_config(param, "not UTF-8 after percent-decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymq_core::ErrorKind;

    #[test]
    fn parses_full_url() {
        let cfg = RedisConfig::from_url(
            "redis://alice:p%40ss%3Aword@10.0.0.1:6380/3/orders?group=g&visibility=2s&priority_levels=2&max_deliveries=5&dlq_max_len=7&dlq_retention=1h&ack_linger=1ms",
        )
        .unwrap();
        assert_eq!(cfg.host, "10.0.0.1");
        assert_eq!(cfg.port, 6380);
        assert_eq!(cfg.db, 3);
        assert_eq!(cfg.queue, "orders");
        assert_eq!(cfg.group, "g");
        assert_eq!(cfg.username.as_deref(), Some("alice"));
        assert_eq!(cfg.password.as_ref().map(Secret::expose), Some("p@ss:word"));
        assert_eq!(cfg.visibility_timeout, Duration::from_secs(2));
        assert_eq!(cfg.priority_levels, 2);
        assert_eq!(cfg.max_deliveries, 5);
        assert_eq!(cfg.dlq_max_len, 7);
        assert_eq!(cfg.ack_linger, Duration::from_millis(1));
        let client = cfg.client_url().unwrap();
        assert!(
            client.starts_with("redis://alice:p%40ss%3Aword@10.0.0.1:6380/3"),
            "{client}"
        );
    }

    #[test]
    fn password_never_prints() {
        let cfg = RedisConfig::from_url("rediss://u:hunter2@h/q").unwrap();
        assert!(cfg.tls);
        for shown in [
            format!("{cfg}"),
            format!("{cfg:?}"),
            toml::to_string(&cfg).unwrap(),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert_eq!(cfg.to_string(), "rediss://u:***@h:6379/0/q?group=ferrymq");
    }

    #[test]
    fn bad_urls_name_the_parameter() {
        for (url, param) in [
            ("http://h/q", "scheme"),
            ("redis://h/", "queue"),
            ("redis://h/x/q", "db"),
            ("redis://h/a/b/c", "queue"),
            ("redis://h/q?visibility=soon", "visibility"),
            ("redis://h/q?priority_levels=0", "priority_levels"),
            ("redis://h/q?nope=1", "nope"),
            ("redis://h/q%7B?", "queue"),
            ("redis://h/q?visibility=400days", "visibility"),
            ("redis://h/q?dedup_window=100y", "dedup_window"),
            ("redis://h/q?dlq_retention=60y", "dlq_retention"),
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(err.to_string().contains(param), "{url}: {err}");
        }
    }

    #[test]
    fn ordered_and_rate_limit_parse() {
        let cfg = RedisConfig::from_url("redis://h/q?ordered=true&rate_limit=100/1s").unwrap();
        assert!(cfg.ordered);
        assert_eq!(cfg.priority_levels, 1, "ordered implies one level");
        assert_eq!(
            cfg.rate_limit,
            Some(RateLimit::new(100, Duration::from_secs(1)))
        );
        let cfg = RedisConfig::from_url("redis://h/q?ordered=true&priority_levels=1").unwrap();
        assert!(cfg.ordered);
        for (url, param) in [
            (
                "redis://h/q?ordered=true&priority_levels=2",
                "priority_levels",
            ),
            ("redis://h/q?ordered=maybe", "ordered"),
            ("redis://h/q?rate_limit=100", "rate_limit"),
            ("redis://h/q?rate_limit=0/1s", "rate_limit"),
            ("redis://h/q?rate_limit=5/0s", "rate_limit"),
            ("redis://h/q?rate_limit=100001/1s", "rate_limit"),
            ("redis://h/q?rate_limit=5/400days", "rate_limit"),
        ] {
            let err = RedisConfig::from_url(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(err.to_string().contains(param), "{url}: {err}");
        }
        // serde: the limit as a string, and ordered needs one level there too.
        let cfg: RedisConfig = toml::from_str(
            "queue = \"q\"\nordered = true\npriority_levels = 1\nrate_limit = \"5/200ms\"",
        )
        .unwrap();
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.rate_limit.unwrap().per, Duration::from_millis(200));
        let back: RedisConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let cfg: RedisConfig = toml::from_str("queue = \"q\"\nordered = true").unwrap();
        assert!(cfg.validate().is_err(), "ordered with the default 4 levels");
    }

    #[test]
    fn serde_defaults() {
        let cfg: RedisConfig = toml::from_str("queue = \"q\"").unwrap();
        assert_eq!(cfg, RedisConfig::new("q"));
    }
}
