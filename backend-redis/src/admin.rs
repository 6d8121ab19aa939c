//! Operator tools that work on a whole queue: [`RedisAdmin`] (the [`Admin`] trait)
//! and [`RedisConfig::delete_queue`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::admin::{Admin, Peeked, ProgressFn, QueueInfo, QueueSpec, RedriveProgress};
use ferrymq_core::{Error, ErrorKind, Result};
use redis::{FromRedisValue, Value};

use crate::client::{map_error, ms, Shared, MAX_BATCH};
use crate::codec::{decode_fields, stream_id_ms, system_time};
use crate::config::RedisConfig;
use crate::scripts::scripts;
use crate::settings::Role;

/// Administration of one Redis queue (see [`Admin`]): create, describe, purge, peek,
/// the dead-letter stream and its redrive. Holds its own connection.
///
/// ```no_run
/// use ferrymq_core::admin::{Admin, QueueSpec};
/// use ferrymq_redis::RedisConfig;
///
/// # async fn doc() -> ferrymq_core::Result<()> {
/// let admin = RedisConfig::from_url("redis://127.0.0.1:6379/orders")?.admin().await?;
/// let info = admin.ensure(&QueueSpec::new()).await?;
/// println!("{} waiting; {:?}", info.depth.waiting, info.warnings);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisAdmin {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAdmin")
            .field("queue", &self.shared.queue)
            .finish_non_exhaustive()
    }
}

impl RedisConfig {
    /// Connect the queue's administration. It adopts the settings recorded with
    /// the queue (priority levels, group, visibility, dead-letter bounds), so it
    /// describes the queue as it is, whatever this config says of them.
    pub async fn admin(&self) -> Result<RedisAdmin> {
        Ok(RedisAdmin {
            shared: Shared::connect(self.clone(), Role::Admin).await?,
        })
    }
}

/// Spec fields Redis has no use for are refused rather than silently ignored.
fn check_spec(config: &RedisConfig, spec: &QueueSpec) -> Result<()> {
    let foreign = [
        ("partitions", spec.partitions.is_some()),
        ("replication", spec.replication.is_some()),
        ("fifo", spec.fifo.is_some()),
        ("retention", spec.retention.is_some()),
        ("dead_letter", spec.dead_letter.is_some()),
    ];
    if let Some((name, _)) = foreign.iter().find(|(_, set)| *set) {
        return Err(Error::invalid_config(
            name,
            "redis queues have no such setting (dead-lettering: the max_deliveries URL parameter)",
        ));
    }
    if let Some(levels) = spec.priority_levels {
        if levels != config.priority_levels {
            return Err(Error::invalid_config(
                "priority_levels",
                format!(
                    "the spec asks for {levels} but this config has {} — set priority_levels={levels} \
                     in the URL, so producers and consumers use the same levels",
                    config.priority_levels
                ),
            ));
        }
    }
    if let Some(v) = spec.visibility_timeout {
        if v != config.visibility_timeout {
            return Err(Error::invalid_config(
                "visibility",
                format!(
                    "the spec asks for {v:?} but this config has {:?}; set visibility in the URL",
                    config.visibility_timeout
                ),
            ));
        }
    }
    Ok(())
}

fn as_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn step(moved: u64, total: u64) -> RedriveProgress {
    let mut p = RedriveProgress::default();
    p.moved = moved;
    p.total = Some(total);
    p
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl RedisAdmin {
    fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    /// Forget the settings recorded with the queue (`ferrymq:{Q}:meta`), so the
    /// next client records its own: the way to change `priority_levels`,
    /// `visibility` or the group of a queue. Stop every producer and consumer of
    /// the queue first — clients still running keep their old settings — and
    /// drain it before lowering `priority_levels` (levels above the new count are
    /// no longer read). Returns whether settings were recorded.
    pub async fn forget_settings(&self) -> Result<bool> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(&self.shared.keys.meta);
        let n: u64 = self.shared.query(&cmd, "DEL").await?;
        Ok(n > 0)
    }

    /// Whether any key of the queue exists.
    async fn exists(&self) -> Result<bool> {
        let keys = &self.shared.keys;
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(&keys.ready)
            .arg(&keys.delayed)
            .arg(&keys.dead)
            .arg(&keys.jobs)
            .arg(&keys.meta);
        let n: u64 = self.shared.query(&cmd, "EXISTS").await?;
        Ok(n > 0)
    }

    async fn eviction_policy(&self) -> Option<String> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let items: Vec<String> = self.shared.query(&cmd, "CONFIG GET").await.ok()?;
        items.get(1).cloned()
    }

    async fn info(&self) -> Result<QueueInfo> {
        if !self.exists().await? {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "redis queue {:?} does not exist (no key ferrymq:{{{}}}:*)",
                    self.shared.queue, self.shared.queue
                ),
            ));
        }
        let depth = crate::producer::depth(&self.shared).await?;
        let c = self.config();
        let mut info = QueueInfo::new(c.queue.clone(), depth, (*self.shared.capabilities).clone())
            .setting("priority_levels", c.priority_levels)
            .setting("visibility_timeout", human(c.visibility_timeout))
            .setting("max_deliveries", c.max_deliveries)
            .setting("dlq_max_len", c.dlq_max_len)
            .setting("dlq_retention", human(c.dlq_retention))
            .setting("dedup_window", human(c.dedup_window))
            .setting("group", &c.group)
            .setting("ordered", c.ordered)
            .setting(
                "rate_limit",
                c.rate_limit
                    .map_or_else(|| "none".to_string(), |l| l.to_string()),
            );
        if let Some(policy) = self.eviction_policy().await {
            if policy.starts_with("allkeys-") {
                info = info.warning(format!(
                    "maxmemory-policy is {policy}: under memory pressure Redis may evict this \
                     queue's keys and lose messages; use noeviction"
                ));
            }
        }
        if c.max_deliveries > 0 || depth.dead_lettered > 0 {
            info = info.warning(format!(
                "the dead-letter stream is trimmed: it keeps about {} entries (dlq_max_len) and \
                 drops entries older than {} (dlq_retention{}); trimmed dead letters are gone",
                c.dlq_max_len,
                human(c.dlq_retention),
                if c.dlq_retention.is_zero() {
                    ": 0 = by length only"
                } else {
                    ""
                }
            ));
        }
        if depth.dead_lettered >= c.dlq_max_len {
            info = info.warning(format!(
                "the dead-letter stream holds {} entries, at its dlq_max_len of {}: each new dead \
                 letter deletes the oldest — redrive or raise dlq_max_len",
                depth.dead_lettered, c.dlq_max_len
            ));
        }
        Ok(info)
    }

    /// Purge of an ordered queue: also its held entries and queued heads, and the
    /// keys they blocked are handed on (ORDERED_PURGE).
    async fn purge_ordered(&self) -> Result<u64> {
        let shared = &self.shared;
        let keys = &shared.keys;
        let lua = &scripts().ordered_purge;
        let mut total = 0u64;
        loop {
            let mut cmd = lua.call(9);
            cmd.arg(&keys.delayed)
                .arg(&keys.jobs)
                .arg(&keys.leases)
                .arg(&keys.locks)
                .arg(&keys.held)
                .arg(&keys.unblocked)
                .arg(&keys.parked)
                .arg(&keys.ready[0])
                .arg(&keys.revoked)
                .arg(&shared.config.group)
                .arg(ms(shared.config.visibility_timeout))
                .arg(MAX_BATCH);
            let n: u64 = redis::from_redis_value(shared.eval(lua, &cmd).await?).map_err(|e| {
                Error::new(ErrorKind::Backend, format!("unexpected purge reply: {e}"))
            })?;
            total += n;
            if n < MAX_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Entries of a stream reply as peeked messages.
    fn peeked(&self, entries: Vec<Value>, dead: bool) -> Vec<Peeked> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(mut e) = entry else { continue };
            if e.len() != 2 {
                continue;
            }
            let fields = e.pop().unwrap_or_default();
            let Some(id) = e.pop().and_then(as_string) else {
                continue;
            };
            let decoded = decode_fields(fields);
            let at = if dead {
                stream_id_ms(&id)
            } else {
                decoded.enqueued_ms.unwrap_or_else(|| stream_id_ms(&id))
            };
            out.push(Peeked::new(id, Some(system_time(at)), decoded.message));
        }
        out
    }
}

#[async_trait]
impl Admin for RedisAdmin {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn queue(&self) -> &str {
        &self.shared.queue
    }

    async fn create(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        check_spec(self.config(), spec)?;
        if self.exists().await? {
            return Err(Error::invalid_config(
                "queue",
                format!("redis queue {:?} already exists", self.shared.queue),
            ));
        }
        self.ensure(spec).await
    }

    async fn ensure(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        check_spec(self.config(), spec)?;
        // Declares the queue: settings not yet recorded are recorded from this
        // config, so later clients must agree with them.
        self.shared.record_settings(Role::Admin).await?;
        self.shared.ensure_group().await?;
        self.info().await
    }

    async fn delete(&self) -> Result<bool> {
        Ok(self.config().delete_queue().await? > 0)
    }

    async fn describe(&self) -> Result<QueueInfo> {
        self.info().await
    }

    async fn purge(&self) -> Result<u64> {
        let shared = &self.shared;
        let keys = &shared.keys;
        if shared.config.ordered {
            return self.purge_ordered().await;
        }
        let lua = &scripts().purge;
        let mut total = 0u64;
        // In steps of MAX_BATCH, so no single script blocks the server for long.
        loop {
            let mut cmd = lua.call(4 + keys.ready.len());
            cmd.arg(&keys.delayed)
                .arg(&keys.jobs)
                .arg(&keys.leases)
                .arg(&keys.revoked);
            for k in &keys.ready {
                cmd.arg(k);
            }
            cmd.arg(&shared.config.group)
                .arg(ms(shared.config.visibility_timeout))
                .arg(MAX_BATCH);
            let n: u64 = redis::from_redis_value(shared.eval(lua, &cmd).await?).map_err(|e| {
                Error::new(ErrorKind::Backend, format!("unexpected purge reply: {e}"))
            })?;
            total += n;
            if n < MAX_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    async fn peek(&self, max: usize) -> Result<Vec<Peeked>> {
        let shared = &self.shared;
        let keys = &shared.keys;
        let ordered = shared.config.ordered;
        let lua = if ordered {
            &scripts().ordered_peek
        } else {
            &scripts().peek
        };
        let mut cmd = if ordered {
            let mut cmd = lua.call(3);
            cmd.arg(&keys.unblocked).arg(&keys.held).arg(&keys.ready[0]);
            cmd
        } else {
            let mut cmd = lua.call(keys.ready.len());
            for k in &keys.ready {
                cmd.arg(k);
            }
            cmd
        };
        cmd.arg(&shared.config.group).arg(max.clamp(1, MAX_BATCH));
        let Value::Array(items) = shared.eval(lua, &cmd).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut items = items.into_iter();
        while let (Some(level), Some(id), Some(fields)) = (items.next(), items.next(), items.next())
        {
            let (Value::Int(level), Some(stream_id)) = (level, as_string(id)) else {
                continue;
            };
            let level = usize::try_from(level)
                .unwrap_or(0)
                .min(keys.ready.len() - 1);
            let decoded = decode_fields(fields);
            let enqueued = decoded
                .enqueued_ms
                .unwrap_or_else(|| stream_id_ms(&stream_id));
            // The same id a receive would report.
            let id = decoded
                .stable_id
                .unwrap_or_else(|| format!("{stream_id}{}", keys.suffixes[level]));
            out.push(Peeked::new(
                id,
                Some(system_time(enqueued)),
                decoded.message,
            ));
        }
        Ok(out)
    }

    async fn peek_dead_letters(&self, max: usize) -> Result<Vec<Peeked>> {
        let shared = &self.shared;
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&shared.keys.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(max.clamp(1, MAX_BATCH));
        let entries: Vec<Value> = shared.query(&cmd, "XRANGE").await?;
        Ok(self.peeked(entries, true))
    }

    async fn redrive_dead_letters(
        &self,
        limit: Option<u64>,
        progress: ProgressFn<'_>,
    ) -> Result<u64> {
        let shared = &self.shared;
        let keys = &shared.keys;
        // The snapshot: how many there are now, and the newest of them. A message
        // that fails again while this runs lands after that id and is not taken.
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&keys.dead);
        pipe.cmd("XREVRANGE")
            .arg(&keys.dead)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let (len, newest): (u64, Vec<Value>) = shared
            .with_timeout("redrive snapshot", pipe.query_async(&mut shared.conn()))
            .await?;
        let last_id = newest.into_iter().next().and_then(|e| match e {
            Value::Array(mut parts) if !parts.is_empty() => as_string(parts.swap_remove(0)),
            _ => None,
        });
        let total = limit.map_or(len, |l| l.min(len));
        let mut moved = 0u64;
        progress(step(moved, total));
        let Some(last_id) = last_id else {
            return Ok(0);
        };
        let lua = &scripts().redrive;
        while moved < total {
            let chunk = (total - moved).min(MAX_BATCH as u64);
            let mut cmd = lua.call(1 + keys.ready.len());
            cmd.arg(&keys.dead);
            for k in &keys.ready {
                cmd.arg(k);
            }
            cmd.arg(chunk).arg(&last_id);
            let n = u64::from_redis_value(shared.eval(lua, &cmd).await?).map_err(|e| {
                Error::new(ErrorKind::Backend, format!("unexpected redrive reply: {e}"))
            })?;
            moved += n;
            progress(step(moved, total));
            if n < chunk {
                // Fewer left than the snapshot said (trimmed, or redriven by
                // someone else meanwhile).
                break;
            }
        }
        Ok(moved)
    }
}

/// Escape glob metacharacters so a queue name matches itself in `SCAN … MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisConfig {
    /// Delete every key of this queue — ready, in-flight, delayed and dead-lettered
    /// messages, dedup claims — and return how many keys went. For tests and
    /// tooling; consumers still connected recreate their group on their next receive.
    pub async fn delete_queue(&self) -> Result<u64> {
        self.validate()?;
        let endpoint = self.endpoint();
        let map = |e| map_error(e, "delete queue", &endpoint, &self.queue);
        let mut conn = crate::client::connect_once(self).await?;
        // On a cluster, SCAN goes to the master holding the queue's slot.
        let slot_key = crate::keys::Keys::new(&self.queue, 1).meta;
        let pattern = format!("ferrymq:{{{}}}:*", glob_escape(&self.queue));
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<String>) =
                crate::client::query_on_slot(&mut conn, scan, &slot_key)
                    .await
                    .map_err(map)?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(map)?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "delete queue: SCAN did not finish within 60 s",
                ));
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob_escape_escapes_metacharacters() {
        assert_eq!(super::glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
