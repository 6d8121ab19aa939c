//! A [`DedupStore`] in Redis, for the `Dedup` middleware: every consumer of a queue,
//! in any process, sees the same claims.
//!
//! A key `K` of queue `Q` is the string `ferrymq:{Q}:handled:K`:
//!
//! - absent: nobody handled it;
//! - `claimed:<store id>:<claim id>`: a handler is handling it; expires after the
//!   claim TTL, so a crashed consumer does not block the key for good;
//! - `done`: handled; expires after the store's retention (the dedup window).
//!
//! `claim` is one atomic `SET key claimed:… NX PX ttl GET` (Redis ≥ 7.0): the old
//! value says who was there. Every claim gets a token of its own — not one per
//! process — and `release` deletes the key only if it still holds that token (a
//! script), so it never drops a `done` mark, nor a claim another handler took after
//! ours expired, in another process *or in this one*.
//!
//! The [`DedupStore`] trait names a claim by its key only, so the store remembers
//! which token it handed out to which task: `release` from the task that claimed
//! finds its own token. A release from another task (the Dedup middleware releases
//! a claim abandoned by a dropped handler from a task of its own) finds the token
//! only when this store holds exactly one claim on the key; otherwise it cannot
//! tell whose claim it would drop, and leaves it to expire after its TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::middleware::dedup::{Claim, DedupStore};
use ferrymq_core::{Error, ErrorKind, Result};
use redis::{Script, Value};
use tokio::task::Id as TaskId;
use tokio::time::Instant;

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
    /// `claimed:<store id>:`; each claim appends a number of its own.
    claim_prefix: Arc<str>,
    retention: Duration,
    held: Arc<Mutex<Held>>,
}

/// The claims this store took and has not released or completed: key → claims.
#[derive(Default)]
struct Held {
    claims: HashMap<String, Vec<OwnClaim>>,
    next: u64,
}

struct OwnClaim {
    /// The task that claimed (the handler's), when claimed inside a task.
    task: Option<TaskId>,
    token: String,
    /// When the claim runs out on the server.
    expires: Instant,
}

/// A claim this store no longer hears of (its handler vanished) is forgotten this
/// long after it expired: long enough that a release of an expired claim still
/// sees it (and does not mistake another handler's live claim for it), short
/// enough to bound memory.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

impl Held {
    fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget_stale(&mut self, now: Instant) {
        self.claims.retain(|_, claims| {
            claims.retain(|c| ferrymq_core::time::deadline_after(c.expires, FORGET_AFTER) > now);
            !claims.is_empty()
        });
    }

    /// Take the token of the claim a release or complete of `key` refers to: the
    /// one the calling task made, or — from another task — the only one there is.
    fn take(&mut self, key: &str) -> Option<String> {
        let claims = self.claims.get_mut(key)?;
        let me = tokio::task::try_id();
        let mine: Vec<usize> = claims
            .iter()
            .enumerate()
            .filter(|(_, c)| me.is_some() && c.task == me)
            .map(|(i, _)| i)
            .collect();
        let at = match mine.as_slice() {
            [i] => Some(*i),
            [] if claims.len() == 1 => Some(0),
            // Ambiguous: several claims of this task, or several of others.
            _ => None,
        }?;
        let taken = claims.swap_remove(at);
        if claims.is_empty() {
            self.claims.remove(key);
        }
        Some(taken.token)
    }
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
            claim_prefix: format!("claimed:{:016x}:", rand::random::<u64>()).into(),
            shared,
            retention,
            held: Arc::default(),
        }
    }

    /// A store for the queue of `config`, on its own connection, remembering handled
    /// keys for `retention`.
    pub async fn connect(config: &RedisConfig, retention: Duration) -> Result<Self> {
        let shared = Shared::connect(config.clone(), crate::settings::Role::Other).await?;
        Ok(RedisDedupStore::new(shared, retention))
    }

    fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + key.len());
        k.push_str(&self.prefix);
        k.push_str(key);
        k
    }
}

/// Milliseconds for `PX`, at least 1 and at most 40 years: Redis refuses an
/// expiry past its clock's range, so a claim TTL or retention of `Duration::MAX`
/// ("keep it") is capped rather than failing every call.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.min(crate::config::MAX_DLQ_RETENTION).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[async_trait]
impl DedupStore for RedisDedupStore {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        let token = {
            let mut held = Held::lock(&self.held);
            held.next += 1;
            format!("{}{}", self.claim_prefix, held.next)
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .arg("GET");
        // Counted from before the request: the local expiry errs early.
        let asked = Instant::now();
        match self.shared.query::<Value>(&cmd, "dedup claim").await? {
            Value::Nil => {
                let mut held = Held::lock(&self.held);
                held.forget_stale(asked);
                held.claims
                    .entry(key.to_string())
                    .or_default()
                    .push(OwnClaim {
                        task: tokio::task::try_id(),
                        token,
                        expires: ferrymq_core::time::deadline_after(asked, ttl),
                    });
                Ok(Claim::Claimed)
            }
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
        self.shared.query::<()>(&cmd, "dedup complete").await?;
        // Done is done, whoever holds a claim: none of ours is worth releasing.
        Held::lock(&self.held).claims.remove(key);
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<()> {
        static SCRIPT: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let Some(token) = Held::lock(&self.held).take(key) else {
            // Not ours, or not known to be ours: it expires after its TTL.
            return Ok(());
        };
        let script = SCRIPT.get_or_init(|| Script::new(RELEASE));
        let mut invocation = script.key(self.key(key));
        invocation.arg(&token);
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
