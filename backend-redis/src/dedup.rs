//! A [`DedupStore`] in Redis, for the `Dedup` middleware: every consumer of a queue,
//! in any process, sees the same claims.
//!
//! A key `K` of queue `Q` is the string `ferrymq:{Q}:handled:K`:
//!
//! - absent: nobody handled it;
//! - `claimed:<store id>`: a consumer is handling it; expires after the claim TTL,
//!   so a crashed consumer does not block the key for good;
//! - `done`: handled; expires after the store's retention (the dedup window).
//!
//! `claim` is one atomic `SET key claimed:<id> NX PX ttl GET` (Redis ≥ 7.0): the old
//! value says who was there. `release` deletes the key only if it still holds this
//! store's own claim (a script), so it never drops a `done` mark or a claim another
//! consumer took after ours expired.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::middleware::dedup::{Claim, DedupStore};
use ferrymq_core::{Error, ErrorKind, Result};
use redis::{Script, Value};

use crate::client::Shared;
use crate::config::RedisConfig;
use crate::RedisConsumer;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Dedup claims shared through Redis. Cheap to clone.
///
/// ```no_run
/// use std::time::Duration;
/// use ferrymq_core::middleware::DedupLayer;
/// use ferrymq_redis::RedisConfig;
///
/// # async fn doc() -> ferrymq_core::Result<()> {
/// let (_producer, consumer) = RedisConfig::from_url("redis://127.0.0.1:6379/orders")?.connect().await?;
/// let dedup = DedupLayer::new(consumer.dedup_store(Duration::from_secs(600)));
/// # let _ = dedup;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisDedupStore {
    shared: Arc<Shared>,
    prefix: Arc<str>,
    claim_value: Arc<str>,
    retention: Duration,
}

impl std::fmt::Debug for RedisDedupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDedupStore")
            .field("prefix", &self.prefix)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl RedisDedupStore {
    pub(crate) fn new(shared: Arc<Shared>, retention: Duration) -> Self {
        RedisDedupStore {
            prefix: format!("ferrymq:{{{}}}:handled:", shared.queue).into(),
            claim_value: format!("claimed:{:016x}", rand::random::<u64>()).into(),
            shared,
            retention,
        }
    }

    /// A store for the queue of `config`, on its own connection, remembering handled
    /// keys for `retention`.
    pub async fn connect(config: &RedisConfig, retention: Duration) -> Result<Self> {
        let shared = Shared::connect(config.clone()).await?;
        Ok(RedisDedupStore::new(shared, retention))
    }

    fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(&*self.claim_value)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .arg("GET");
        match self.shared.query::<Value>(&cmd, "dedup claim").await? {
            Value::Nil => Ok(Claim::Claimed),
            Value::BulkString(v) if v == b"done" => Ok(Claim::Duplicate),
            Value::BulkString(_) | Value::SimpleString(_) => Ok(Claim::InProgress),
            other => Err(Error::new(
                ErrorKind::Backend,
                format!("unexpected reply to a dedup claim: {other:?}"),
            )),
        }
    }

    async fn complete(&self, key: &str) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg("done")
            .arg("PX")
            .arg(millis(self.retention));
        self.shared.query::<()>(&cmd, "dedup complete").await
    }

    async fn release(&self, key: &str) -> Result<()> {
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| Script::new(RELEASE));
        let mut invocation = script.key(self.key(key));
        invocation.arg(&*self.claim_value);
        let mut conn = self.shared.conn();
        self.shared
            .with_timeout("dedup release", invocation.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }
}

impl RedisConsumer {
    /// A [`RedisDedupStore`] for this consumer's queue, on its connection,
    /// remembering handled keys for `retention` (use the dedup window).
    pub fn dedup_store(&self, retention: Duration) -> RedisDedupStore {
        RedisDedupStore::new(self.shared().clone(), retention)
    }
}
