//! Settings of an SQS queue: from a URL, from serde (TOML, env), or built in code.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::admin::Admin;
use ferrymq_core::backend::{BackendConfig, Driver};
use ferrymq_core::config::{with_secrets_exposed, QueryParams, Secret};
use ferrymq_core::{Consumer, Error, Producer, Result};
use serde::{Deserialize, Serialize};

use crate::{SqsAdmin, SqsConsumer, SqsProducer};

/// SQS caps a message's visibility at 12 hours from its receive.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);
/// SQS: longest per-message delay on a standard queue.
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);
/// SQS: longest `WaitTimeSeconds` of one receive.
pub const MAX_WAIT: Duration = Duration::from_secs(20);
/// SQS FIFO: deduplication window.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(5 * 60);

/// Settings of one SQS queue.
///
/// From a URL, by name or by queue URL:
///
/// ```text
/// sqs://QUEUE?region=eu-west-1&create=true&visibility=30s
/// sqs://orders.fifo?endpoint=http://127.0.0.1:4566&region=us-east-1&access_key_id=test&secret_access_key=test
/// https://sqs.eu-west-1.amazonaws.com/123456789012/orders?visibility=1m
/// ```
///
/// A name ending in `.fifo` is a FIFO queue. Query parameters (all optional):
///
/// | parameter | meaning |
/// |---|---|
/// | `region` | AWS region (default: the AWS default chain — `AWS_REGION`, the profile; a queue URL names its own) |
/// | `endpoint` | another SQS endpoint, such as LocalStack (`http://127.0.0.1:4566`) |
/// | `account` | the AWS account owning the queue, when it is not the caller's |
/// | `profile` | the AWS profile to read region and credentials from |
/// | `access_key_id`, `secret_access_key`, `session_token` | static credentials (default: the AWS default chain). Never printed |
/// | `create` | create the queue (and its dead-letter queue) when missing (default `false`) |
/// | `visibility` | visibility timeout, sent with every receive (default: the queue's own); whole seconds, rounded up |
/// | `wait` | longest single `ReceiveMessage` long poll, 1–20 s (default 20 s); a longer `receive` wait loops |
/// | `max_receives` | on create: the native `RedrivePolicy` moves a message to the DLQ after this many receives |
/// | `dlq` | on create: the dead-letter queue's name (default `<queue>-dlq`, `<name>-dlq.fifo` for FIFO) |
/// | `connect_timeout` | TCP/TLS connect timeout (default 3 s) |
/// | `request_timeout` | per-attempt timeout of a call, beyond a long poll's wait (default 10 s) |
/// | `max_attempts` | attempts per call, the SDK's standard retry mode (default 3; ferrymq adds none of its own) |
/// | `ack_linger` | how long an ack waits to share a `DeleteMessageBatch` (default 5 ms) |
/// | `fifo_buffer` | FIFO: most messages a consumer keeps leased behind the heads of their groups (default 100) |
///
/// An unknown parameter is an error.
///
/// ```
/// use std::time::Duration;
/// use ferrymq_sqs::SqsConfig;
///
/// let cfg = SqsConfig::from_url(
///     "sqs://orders.fifo?region=us-east-1&endpoint=http://127.0.0.1:4566&visibility=10s\
///      &access_key_id=AKIDEXAMPLE&secret_access_key=hunter2",
/// )?;
/// assert_eq!(cfg.queue, "orders.fifo");
/// assert!(cfg.is_fifo());
/// assert_eq!(cfg.visibility_timeout, Some(Duration::from_secs(10)));
/// // Credentials never print.
/// assert!(!format!("{cfg:?} {cfg}").contains("hunter2"));
///
/// let cfg = SqsConfig::from_url("https://sqs.eu-west-1.amazonaws.com/123456789012/jobs")?;
/// assert_eq!(cfg.region.as_deref(), Some("eu-west-1"));
/// assert_eq!(cfg.queue, "jobs");
///
/// let cfg: SqsConfig = toml::from_str(r#"
///     queue = "jobs"
///     region = "us-east-1"
///     visibility_timeout = "45s"
/// "#).unwrap();
/// assert_eq!(cfg.visibility_timeout, Some(Duration::from_secs(45)));
/// # Ok::<(), ferrymq_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsConfig {
    /// Queue name (1–80 of `A-Z a-z 0-9 - _`, `.fifo` included for FIFO queues).
    pub queue: String,
    /// The queue URL, when it was given as one (then `GetQueueUrl` is skipped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_url: Option<String>,
    /// The account owning the queue, when it is not the caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// AWS region; the default chain's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Another SQS endpoint (LocalStack, a VPC endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// AWS profile for region and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Static access key id (with `secret_access_key`); the default chain when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<Secret>,
    /// Static secret access key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<Secret>,
    /// Static session token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<Secret>,
    /// Create the queue (and its dead-letter queue) when it is missing.
    #[serde(default)]
    pub create: bool,
    /// Visibility timeout sent with every receive; the queue's own when unset.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub visibility_timeout: Option<Duration>,
    /// Longest single long poll (1–20 s).
    #[serde(with = "humantime_serde", default = "defaults::wait")]
    pub wait: Duration,
    /// On create: native dead-lettering after this many receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_receives: Option<u32>,
    /// On create: the dead-letter queue's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq: Option<String>,
    /// Connect timeout.
    #[serde(with = "humantime_serde", default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// Per-attempt timeout of a call, beyond a long poll's wait.
    #[serde(with = "humantime_serde", default = "defaults::request_timeout")]
    pub request_timeout: Duration,
    /// Attempts per call (the SDK's standard retry mode).
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// How long an ack waits to share a `DeleteMessageBatch`.
    #[serde(with = "humantime_serde", default = "defaults::ack_linger")]
    pub ack_linger: Duration,
    /// FIFO: most messages one consumer keeps leased behind their group's head.
    #[serde(default = "defaults::fifo_buffer")]
    pub fifo_buffer: usize,
}

mod defaults {
    use std::time::Duration;
    pub fn wait() -> Duration {
        super::MAX_WAIT
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(3)
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn ack_linger() -> Duration {
        Duration::from_millis(5)
    }
    pub fn fifo_buffer() -> usize {
        100
    }
}

/// `d` in whole seconds, rounded up (SQS takes seconds; never round a delay or a
/// lease down), saturating at `i32::MAX`.
pub(crate) fn whole_seconds(d: Duration) -> i32 {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    i32::try_from(secs).unwrap_or(i32::MAX)
}

/// The region of `https://sqs.<region>.amazonaws.com[.cn]/…`, if `host` is one.
fn region_of_sqs_host(host: &str) -> Option<&str> {
    let rest = host.strip_prefix("sqs.")?;
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))?;
    (!region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    .then_some(region)
}

/// Whether `url` is an AWS SQS queue URL (`https://sqs.<region>.amazonaws.com/…`).
pub(crate) fn is_queue_url(url: &str) -> bool {
    url.strip_prefix("https://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .is_some_and(|host| region_of_sqs_host(host).is_some())
}

/// Check an SQS queue name.
pub(crate) fn validate_queue_name(name: &str) -> Result<()> {
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    if name.is_empty() || name.len() > 80 {
        return Err(Error::invalid_config(
            "queue",
            format!("{name:?}: an SQS queue name has 1 to 80 characters (`.fifo` included)"),
        ));
    }
    if base.is_empty()
        || !base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Error::invalid_config(
            "queue",
            format!(
                "{name:?}: an SQS queue name has only ASCII letters, digits, `-` and `_` (and \
                 the `.fifo` suffix of a FIFO queue)"
            ),
        ));
    }
    Ok(())
}

impl SqsConfig {
    /// Defaults for queue `name`: the AWS default chain for region and credentials,
    /// the queue's own visibility timeout, 20 s long polls.
    pub fn new(name: impl Into<String>) -> Self {
        SqsConfig {
            queue: name.into(),
            queue_url: None,
            account: None,
            region: None,
            endpoint: None,
            profile: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            create: false,
            visibility_timeout: None,
            wait: defaults::wait(),
            max_receives: None,
            dlq: None,
            connect_timeout: defaults::connect_timeout(),
            request_timeout: defaults::request_timeout(),
            max_attempts: defaults::max_attempts(),
            ack_linger: defaults::ack_linger(),
            fifo_buffer: defaults::fifo_buffer(),
        }
    }

    /// Parse `sqs://NAME?…` or `https://sqs.<region>.amazonaws.com/<account>/<name>?…`.
    pub fn from_url(raw: &str) -> Result<Self> {
        let (location, query) = match raw.split_once('?') {
            Some((l, q)) => (l, Some(q)),
            None => (raw, None),
        };
        let mut cfg = if let Some(name) = location.strip_prefix("sqs://") {
            if name.contains('/') {
                return Err(Error::invalid_config(
                    "queue",
                    "write sqs://NAME (the queue name, no path; use `account=` for another \
                     account's queue, or give the full https:// queue URL)",
                ));
            }
            SqsConfig::new(name)
        } else if let Some(rest) = location.strip_prefix("https://") {
            let mut parts = rest.split('/');
            let host = parts.next().unwrap_or_default();
            let region = region_of_sqs_host(host).ok_or_else(|| {
                Error::invalid_config(
                    "url",
                    "expected sqs://NAME or https://sqs.<region>.amazonaws.com/<account>/<name>",
                )
            })?;
            let (account, name) = match (parts.next(), parts.next(), parts.next()) {
                (Some(account), Some(name), None) if !account.is_empty() => (account, name),
                _ => {
                    return Err(Error::invalid_config(
                        "url",
                        "a queue URL is https://sqs.<region>.amazonaws.com/<account>/<name>",
                    ))
                }
            };
            let mut cfg = SqsConfig::new(name);
            cfg.queue_url = Some(location.to_string());
            cfg.account = Some(account.to_string());
            cfg.region = Some(region.to_string());
            cfg
        } else {
            return Err(Error::invalid_config(
                "scheme",
                "expected sqs://NAME or https://sqs.<region>.amazonaws.com/<account>/<name>",
            ));
        };
        if let Some(query) = query {
            // Parsed as the query of a placeholder URL: the location part is not a URL
            // the url crate would keep case-sensitive.
            let url = url::Url::parse(&format!("sqs://q/?{query}"))
                .map_err(|e| Error::invalid_config("url", format!("bad query: {e}")))?;
            let mut q = QueryParams::from_url(&url)?;
            if let Some(region) = q.take_str("region") {
                if let Some(from_url) = cfg.queue_url.as_ref().and(cfg.region.as_ref()) {
                    if *from_url != region {
                        return Err(Error::invalid_config(
                            "region",
                            format!("{region:?} differs from the queue URL's region {from_url:?}"),
                        ));
                    }
                }
                cfg.region = Some(region);
            }
            if let Some(v) = q.take_str("endpoint") {
                cfg.endpoint = Some(v);
            }
            if let Some(v) = q.take_str("account") {
                if cfg.queue_url.is_some() {
                    return Err(Error::invalid_config(
                        "account",
                        "the queue URL names the account already",
                    ));
                }
                cfg.account = Some(v);
            }
            if let Some(v) = q.take_str("profile") {
                cfg.profile = Some(v);
            }
            if let Some(v) = q.take_str("access_key_id") {
                cfg.access_key_id = Some(Secret::new(v));
            }
            if let Some(v) = q.take_str("secret_access_key") {
                cfg.secret_access_key = Some(Secret::new(v));
            }
            if let Some(v) = q.take_str("session_token") {
                cfg.session_token = Some(Secret::new(v));
            }
            if let Some(v) = q.take_bool("create")? {
                cfg.create = v;
            }
            if let Some(v) = q.take_duration("visibility")? {
                cfg.visibility_timeout = Some(v);
            }
            if let Some(v) = q.take_duration("wait")? {
                cfg.wait = v;
            }
            if let Some(v) = q.take("max_receives")? {
                cfg.max_receives = Some(v);
            }
            if let Some(v) = q.take_str("dlq") {
                cfg.dlq = Some(v);
            }
            if let Some(v) = q.take_duration("connect_timeout")? {
                cfg.connect_timeout = v;
            }
            if let Some(v) = q.take_duration("request_timeout")? {
                cfg.request_timeout = v;
            }
            if let Some(v) = q.take("max_attempts")? {
                cfg.max_attempts = v;
            }
            if let Some(v) = q.take_duration("ack_linger")? {
                cfg.ack_linger = v;
            }
            if let Some(v) = q.take("fifo_buffer")? {
                cfg.fifo_buffer = v;
            }
            q.finish()?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the queue is FIFO (its name ends in `.fifo`).
    pub fn is_fifo(&self) -> bool {
        self.queue.ends_with(".fifo")
    }

    /// Set the region.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Use another endpoint (LocalStack, a VPC endpoint).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Use static credentials instead of the default chain.
    pub fn credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.access_key_id = Some(Secret::new(access_key_id));
        self.secret_access_key = Some(Secret::new(secret_access_key));
        self
    }

    /// Create the queue when missing.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Set the visibility timeout sent with every receive.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = Some(d);
        self
    }

    /// On create, dead-letter natively after `max_receives` receives, into `dlq`
    /// (default `<queue>-dlq`).
    pub fn dead_letter(mut self, max_receives: u32, dlq: Option<&str>) -> Self {
        self.max_receives = Some(max_receives);
        self.dlq = dlq.map(str::to_string);
        self
    }

    /// The dead-letter queue's name created with `max_receives`.
    pub fn dlq_name(&self) -> String {
        match &self.dlq {
            Some(name) => name.clone(),
            None => match self.queue.strip_suffix(".fifo") {
                Some(base) => format!("{base}-dlq.fifo"),
                None => format!("{}-dlq", self.queue),
            },
        }
    }

    /// Check the settings (what `from_url` and serde loading do).
    pub fn validate(&self) -> Result<()> {
        validate_queue_name(&self.queue)?;
        if let Some(v) = self.visibility_timeout {
            if v > MAX_VISIBILITY {
                return Err(Error::invalid_config(
                    "visibility",
                    format!("{v:?} is longer than SQS allows (12 h)"),
                ));
            }
        }
        if self.wait.is_zero() || self.wait > MAX_WAIT {
            return Err(Error::invalid_config(
                "wait",
                "one long poll waits 1 to 20 s (SQS's WaitTimeSeconds)",
            ));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(Error::invalid_config(
                "access_key_id",
                "static credentials need both access_key_id and secret_access_key",
            ));
        }
        if self.session_token.is_some() && self.access_key_id.is_none() {
            return Err(Error::invalid_config(
                "session_token",
                "a session token needs access_key_id and secret_access_key",
            ));
        }
        if let Some(n) = self.max_receives {
            if !(1..=1000).contains(&n) {
                return Err(Error::invalid_config(
                    "max_receives",
                    "SQS's maxReceiveCount is 1 to 1000",
                ));
            }
        }
        if self.dlq.is_some() && self.max_receives.is_none() {
            return Err(Error::invalid_config(
                "dlq",
                "a dead-letter queue needs max_receives (after how many receives to move a message)",
            ));
        }
        if self.max_receives.is_some() {
            let dlq = self.dlq_name();
            validate_queue_name(&dlq).map_err(|_| {
                Error::invalid_config("dlq", format!("{dlq:?} is not a valid SQS queue name"))
            })?;
            if dlq.ends_with(".fifo") != self.is_fifo() {
                return Err(Error::invalid_config(
                    "dlq",
                    "the dead-letter queue of a FIFO queue is FIFO (`.fifo`), of a standard \
                     queue standard",
                ));
            }
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(Error::invalid_config(
                    "endpoint",
                    "expected http://host:port or https://host",
                ));
            }
        }
        if self.max_attempts == 0 {
            return Err(Error::invalid_config("max_attempts", "must be at least 1"));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::invalid_config(
                "request_timeout",
                "timeouts must be greater than zero",
            ));
        }
        if self.fifo_buffer == 0 {
            return Err(Error::invalid_config("fifo_buffer", "must be at least 1"));
        }
        Ok(())
    }

    /// A producer on the queue (creating it first when `create` is set).
    pub async fn producer(&self) -> Result<SqsProducer> {
        let queue = crate::client::open(self).await?;
        Ok(SqsProducer::new(queue))
    }

    /// A consumer on the queue (creating it first when `create` is set).
    pub async fn consumer(&self) -> Result<SqsConsumer> {
        let queue = crate::client::open(self).await?;
        Ok(SqsConsumer::new(queue))
    }

    /// A producer and a consumer sharing one client.
    pub async fn connect(&self) -> Result<(SqsProducer, SqsConsumer)> {
        let queue = crate::client::open(self).await?;
        Ok((SqsProducer::new(queue.clone()), SqsConsumer::new(queue)))
    }

    /// The SDK client these settings build (region, endpoint, credentials,
    /// timeouts, retries): for what ferrymq does not wrap.
    pub async fn sdk_client(&self) -> Result<aws_sdk_sqs::Client> {
        self.validate()?;
        crate::client::sdk_client(self).await
    }

    /// The queue's administration. Does not need the queue to exist.
    pub async fn admin(&self) -> Result<SqsAdmin> {
        SqsAdmin::connect(self).await
    }

    /// The endpoint requests go to, for identity and display.
    fn shown_endpoint(&self) -> String {
        match (&self.endpoint, &self.region) {
            (Some(e), _) => e.trim_end_matches('/').to_string(),
            (None, Some(r)) => format!("https://sqs.{r}.amazonaws.com"),
            (None, None) => "aws-default-region".to_string(),
        }
    }
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `Secret` prints as `***`; listed field by field so nothing new slips in.
        f.debug_struct("SqsConfig")
            .field("queue", &self.queue)
            .field("queue_url", &self.queue_url)
            .field("account", &self.account)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("profile", &self.profile)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("create", &self.create)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("wait", &self.wait)
            .field("max_receives", &self.max_receives)
            .field("dlq", &self.dlq)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("ack_linger", &self.ack_linger)
            .field("fifo_buffer", &self.fifo_buffer)
            .finish()
    }
}

/// The URL form, with credentials shown as `***` (and reading back as `***`).
impl fmt::Display for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let defaults = SqsConfig::new(self.queue.clone());
        let mut params: Vec<(String, String)> = Vec::new();
        let mut add = |k: &str, v: String| params.push((k.to_string(), v));
        if self.queue_url.is_none() {
            if let Some(v) = &self.region {
                add("region", v.clone());
            }
            if let Some(v) = &self.account {
                add("account", v.clone());
            }
        }
        if let Some(v) = &self.endpoint {
            add("endpoint", v.clone());
        }
        if let Some(v) = &self.profile {
            add("profile", v.clone());
        }
        if self.access_key_id.is_some() {
            add("access_key_id", "***".into());
        }
        if self.secret_access_key.is_some() {
            add("secret_access_key", "***".into());
        }
        if self.session_token.is_some() {
            add("session_token", "***".into());
        }
        if self.create {
            add("create", "true".into());
        }
        if let Some(v) = self.visibility_timeout {
            add("visibility", humantime::format_duration(v).to_string());
        }
        if self.wait != defaults.wait {
            add("wait", humantime::format_duration(self.wait).to_string());
        }
        if let Some(v) = self.max_receives {
            add("max_receives", v.to_string());
        }
        if let Some(v) = &self.dlq {
            add("dlq", v.clone());
        }
        if self.connect_timeout != defaults.connect_timeout {
            add(
                "connect_timeout",
                humantime::format_duration(self.connect_timeout).to_string(),
            );
        }
        if self.request_timeout != defaults.request_timeout {
            add(
                "request_timeout",
                humantime::format_duration(self.request_timeout).to_string(),
            );
        }
        if self.max_attempts != defaults.max_attempts {
            add("max_attempts", self.max_attempts.to_string());
        }
        if self.ack_linger != defaults.ack_linger {
            add(
                "ack_linger",
                humantime::format_duration(self.ack_linger).to_string(),
            );
        }
        if self.fifo_buffer != defaults.fifo_buffer {
            add("fifo_buffer", self.fifo_buffer.to_string());
        }
        match &self.queue_url {
            Some(url) => f.write_str(url)?,
            None => write!(f, "sqs://{}", self.queue)?,
        }
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &params {
            query.append_pair(k, v);
        }
        let query = query.finish();
        if !query.is_empty() {
            write!(f, "?{query}")?;
        }
        Ok(())
    }
}

#[async_trait]
impl BackendConfig for SqsConfig {
    fn backend(&self) -> &'static str {
        "sqs"
    }

    fn queue(&self) -> &str {
        &self.queue
    }

    fn with_queue(&self, queue: &str) -> Result<Box<dyn BackendConfig>> {
        validate_queue_name(queue)?;
        let mut config = self.clone();
        config.queue = queue.to_string();
        config.queue_url = self
            .queue_url
            .as_ref()
            .map(|url| match url.rsplit_once('/') {
                Some((base, _)) => format!("{base}/{queue}"),
                None => url.clone(),
            });
        // The dead-letter settings name another queue's DLQ; not inherited.
        config.max_receives = None;
        config.dlq = None;
        config.validate()?;
        Ok(Box::new(config))
    }

    fn identity(&self) -> String {
        format!(
            "sqs:{}/{}/{}/{}",
            self.shown_endpoint(),
            self.region.as_deref().unwrap_or("-"),
            self.account.as_deref().unwrap_or("-"),
            self.queue
        )
    }

    fn to_value(&self, expose_secrets: bool) -> serde_json::Value {
        let value = if expose_secrets {
            with_secrets_exposed(|| serde_json::to_value(self))
        } else {
            serde_json::to_value(self)
        };
        value.unwrap_or(serde_json::Value::Null)
    }

    fn clone_box(&self) -> Box<dyn BackendConfig> {
        Box::new(self.clone())
    }

    async fn producer(&self) -> Result<Box<dyn Producer>> {
        Ok(Box::new(SqsConfig::producer(self).await?))
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(SqsConfig::consumer(self).await?))
    }

    async fn connect(&self) -> Result<(Box<dyn Producer>, Box<dyn Consumer>)> {
        let (p, c) = SqsConfig::connect(self).await?;
        Ok((Box::new(p), Box::new(c)))
    }

    async fn admin(&self) -> Result<Box<dyn Admin>> {
        Ok(Box::new(SqsConfig::admin(self).await?))
    }
}

/// The SQS backend's registration: `sqs://NAME?…` and
/// `https://sqs.<region>.amazonaws.com/<account>/<name>`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SqsDriver;

impl Driver for SqsDriver {
    fn name(&self) -> &'static str {
        "sqs"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["sqs"]
    }

    fn accepts(&self, url: &str) -> bool {
        url.starts_with("sqs://") || is_queue_url(url)
    }

    fn parse_url(&self, url: &str) -> Result<Box<dyn BackendConfig>> {
        Ok(Box::new(SqsConfig::from_url(url)?))
    }

    fn parse_value(&self, value: serde_json::Value) -> Result<Box<dyn BackendConfig>> {
        let config: SqsConfig = serde_json::from_value(value)
            .map_err(|e| Error::invalid_config("sqs", e.to_string()))?;
        config.validate()?;
        Ok(Box::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrymq_core::ErrorKind;

    #[test]
    fn urls_by_name_and_by_queue_url() {
        let c = SqsConfig::from_url("sqs://Orders_1.fifo?region=us-east-1&create=yes").unwrap();
        assert_eq!(c.queue, "Orders_1.fifo", "case is kept");
        assert!(c.is_fifo() && c.create);
        let c =
            SqsConfig::from_url("https://sqs.eu-west-1.amazonaws.com/123456789012/jobs?wait=5s")
                .unwrap();
        assert_eq!(c.account.as_deref(), Some("123456789012"));
        assert_eq!(c.wait, Duration::from_secs(5));
        assert_eq!(
            c.to_string(),
            "https://sqs.eu-west-1.amazonaws.com/123456789012/jobs?wait=5s"
        );
        assert_eq!(
            SqsConfig::from_url(&c.to_string()).unwrap(),
            c,
            "Display reads back"
        );
        assert!(SqsDriver.accepts("https://sqs.us-east-2.amazonaws.com/1/q"));
        assert!(SqsDriver.accepts("sqs://q"));
        assert!(!SqsDriver.accepts("https://example.com/1/q"));
        assert!(!SqsDriver.accepts("redis://h/q"));
    }

    #[test]
    fn errors_name_the_parameter() {
        for (url, param) in [
            ("sqs://q?visibility=13h", "visibility"),
            ("sqs://q?wait=21s", "wait"),
            ("sqs://q?wait=0s", "wait"),
            ("sqs://q?bogus=1", "bogus"),
            ("sqs://has space", "queue"),
            ("sqs://q.fifo?max_receives=3&dlq=plain", "dlq"),
            ("sqs://q?dlq=d", "dlq"),
            ("sqs://q?max_receives=0", "max_receives"),
            ("sqs://q?access_key_id=a", "access_key_id"),
            ("sqs://q?endpoint=localhost:1", "endpoint"),
            (
                "https://sqs.eu-west-1.amazonaws.com/1/q?region=us-east-1",
                "region",
            ),
            ("sqs://a/b", "queue"),
        ] {
            let e = SqsConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(e.to_string().contains(&format!("`{param}`")), "{url}: {e}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = SqsConfig::from_url(
            "sqs://q?access_key_id=AKIDSECRET1&secret_access_key=hunter2&session_token=tok3",
        )
        .unwrap();
        let shown = format!("{c} {c:?} {}", c.to_value(false));
        for secret in ["AKIDSECRET1", "hunter2", "tok3"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let exposed = c.to_value(true);
        assert_eq!(exposed["secret_access_key"], "hunter2");
        let back = SqsDriver.parse_value(exposed).unwrap();
        assert_eq!(back.to_string(), c.to_string());
        let e = SqsConfig::from_url("sqs://q?secret_access_key=hunter2&bogus=1").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn dlq_names_and_with_queue() {
        let c = SqsConfig::from_url("sqs://jobs.fifo?max_receives=3").unwrap();
        assert_eq!(c.dlq_name(), "jobs-dlq.fifo");
        let c = SqsConfig::from_url("sqs://jobs?max_receives=3&region=r1").unwrap();
        assert_eq!(c.dlq_name(), "jobs-dlq");
        let other = c.with_queue("other").unwrap();
        assert_eq!(other.queue(), "other");
        assert!(!other.to_string().contains("max_receives"));
        assert!(c.with_queue("bad name").is_err());
        assert_eq!(c.identity(), "sqs:https://sqs.r1.amazonaws.com/r1/-/jobs");
    }

    #[test]
    fn whole_seconds_round_up_and_saturate() {
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(2000)), 2);
        assert_eq!(whole_seconds(Duration::MAX), i32::MAX);
    }
}
