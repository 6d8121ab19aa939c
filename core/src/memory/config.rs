use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{parse_url, QueryParams};
use crate::error::{Error, Result};

use super::{queue::Queue, MemoryConsumer, MemoryProducer};

/// Settings of an in-memory queue.
///
/// From a URL: `memory://NAME?visibility=30s&capacity=100000&max_message_size=262144&dedup_window=5m`.
/// From serde (TOML, env):
///
/// ```
/// let cfg: ferrymq_core::memory::MemoryConfig = toml::from_str(r#"
///     queue = "orders"
///     visibility_timeout = "10s"
/// "#).unwrap();
/// assert_eq!(cfg.visibility_timeout, std::time::Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Queue name; every connection to the same name in this process shares the queue.
    pub queue: String,
    /// An un-acked delivery is redelivered after this long.
    #[serde(with = "humantime_serde", default = "defaults::visibility")]
    pub visibility_timeout: Duration,
    /// At most this many un-acked messages (waiting + in flight + delayed); past it,
    /// sends fail with `QueueFull`.
    #[serde(default = "defaults::capacity")]
    pub capacity: usize,
    /// Largest message (payload + headers) accepted.
    #[serde(default = "defaults::max_message_size")]
    pub max_message_size: usize,
    /// A second send with the same dedup id within this window is dropped.
    #[serde(with = "humantime_serde", default = "defaults::dedup_window")]
    pub dedup_window: Duration,
}

mod defaults {
    use std::time::Duration;
    pub fn visibility() -> Duration {
        Duration::from_secs(30)
    }
    pub fn capacity() -> usize {
        1_000_000
    }
    pub fn max_message_size() -> usize {
        256 * 1024
    }
    pub fn dedup_window() -> Duration {
        Duration::from_secs(300)
    }
}

impl MemoryConfig {
    /// Defaults for queue `name`: 30 s visibility, 1M capacity, 256 KiB messages,
    /// 5 min dedup window.
    pub fn new(name: impl Into<String>) -> Self {
        MemoryConfig {
            queue: name.into(),
            visibility_timeout: defaults::visibility(),
            capacity: defaults::capacity(),
            max_message_size: defaults::max_message_size(),
            dedup_window: defaults::dedup_window(),
        }
    }

    /// Parse `memory://NAME?...`.
    pub fn from_url(raw: &str) -> Result<Self> {
        let url = parse_url(raw)?;
        if url.scheme() != "memory" {
            return Err(Error::invalid_config(
                "scheme",
                format!("expected memory://, got {}://", url.scheme()),
            ));
        }
        let name = url.host_str().unwrap_or_default().to_string();
        let path = url.path().trim_matches('/');
        if !path.is_empty() {
            return Err(Error::invalid_config(
                "queue",
                "write memory://NAME (the queue name is the host part, no path)",
            ));
        }
        let mut cfg = MemoryConfig::new(name);
        let mut q = QueryParams::from_url(&url)?;
        if let Some(v) = q.take_duration("visibility")? {
            cfg.visibility_timeout = v;
        }
        if let Some(v) = q.take("capacity")? {
            cfg.capacity = v;
        }
        if let Some(v) = q.take("max_message_size")? {
            cfg.max_message_size = v;
        }
        if let Some(v) = q.take_duration("dedup_window")? {
            cfg.dedup_window = v;
        }
        q.finish()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Set the visibility timeout.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }

    /// Set the capacity.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n;
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

    pub(crate) fn validate(&self) -> Result<()> {
        if self.queue.is_empty() {
            return Err(Error::invalid_config(
                "queue",
                "missing queue name (memory://NAME)",
            ));
        }
        if self.visibility_timeout.is_zero() {
            return Err(Error::invalid_config(
                "visibility",
                "must be greater than zero",
            ));
        }
        if self.capacity == 0 {
            return Err(Error::invalid_config("capacity", "must be at least 1"));
        }
        Ok(())
    }

    /// Open (or create) the named queue and return a producer and a consumer on it.
    ///
    /// The first connection to a name decides its settings; connecting again with
    /// different settings is `InvalidConfig` rather than a silent surprise.
    pub fn connect(&self) -> Result<(MemoryProducer, MemoryConsumer)> {
        let queue = self.open()?;
        Ok((
            MemoryProducer::new(queue.clone()),
            MemoryConsumer::new(queue),
        ))
    }

    /// A producer on the named queue.
    pub fn producer(&self) -> Result<MemoryProducer> {
        Ok(MemoryProducer::new(self.open()?))
    }

    /// A consumer on the named queue.
    pub fn consumer(&self) -> Result<MemoryConsumer> {
        Ok(MemoryConsumer::new(self.open()?))
    }

    fn open(&self) -> Result<std::sync::Arc<Queue>> {
        self.validate()?;
        super::registry::open(self)
    }
}
