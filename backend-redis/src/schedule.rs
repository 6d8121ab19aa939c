//! A [`ScheduleStore`] in Redis: every scheduler of a queue, in any process, shares
//! its schedules and claims, and each step is one atomic Lua script.
//!
//! Keys of queue `Q` (same `{Q}` hash tag as the queue, so one Cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `ferrymq:{Q}:schedules` | set | the ids of the queue's schedules |
//! | `ferrymq:{Q}:schedule:ID` | hash | `def` (the definition, JSON), `timing` (its canonical timing), `rev`, `anchor`, `cursor`, `last` (ms since the epoch), and while a run is claimed `p_run`, `p_owner`, `p_until` (lease end, server clock), `p_enq` |
//!
//! - **upsert** (script): create, or keep the progress when the timing is the same,
//!   or bump `rev` and start over at the given time when it changed — and add the
//!   id to the set, in one step.
//! - **claim** (script): the compare-and-set on `rev` and `cursor` that lets exactly
//!   one of N schedulers claim a run; a live claim of another owner is `Busy`, one
//!   whose lease ran out (on the *server's* clock, `TIME`, so schedulers with skewed
//!   clocks agree) is taken over as it is.
//! - **complete** (script): only the holder of the claim moves the cursor.
//!
//! Inspect with `redis-cli SMEMBERS 'ferrymq:{orders}:schedules'` and
//! `redis-cli HGETALL 'ferrymq:{orders}:schedule:daily-report'`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use ferrymq_core::schedule::{
    ClaimOutcome, ClaimRequest, PendingRun, ScheduleDef, ScheduleEntry, ScheduleState,
    ScheduleStore, Upserted,
};
use ferrymq_core::{Error, ErrorKind, Result};
use redis::{Script, Value};

use crate::client::{ms, Shared};
use crate::config::RedisConfig;

const PRELUDE: &str = r#"
local function check(key, want)
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then t = t['ok'] end
  if t ~= 'none' and t ~= want then
    return error({err = 'WRONGTYPE key ' .. key .. ' holds a ' .. tostring(t) ..
      ', but ferrymq keeps a ' .. want .. ' there'})
  end
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function clear_claim(key)
  redis.call('HDEL', key, 'p_run', 'p_owner', 'p_until', 'p_enq')
end
"#;

/// KEYS: index, hash. ARGV: id, def, timing, now (ms).
/// Returns {status, HGETALL}.
const UPSERT: &str = r#"
check(KEYS[1], 'set')
check(KEYS[2], 'hash')
local status
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], 'def', ARGV[2], 'timing', ARGV[3], 'rev', '1',
    'anchor', ARGV[4], 'cursor', ARGV[4])
  status = 'created'
else
  local f = redis.call('HMGET', KEYS[2], 'def', 'timing', 'cursor')
  if f[2] == ARGV[3] then
    if f[1] == ARGV[2] then
      status = 'unchanged'
    else
      redis.call('HSET', KEYS[2], 'def', ARGV[2])
      status = 'updated'
    end
  else
    local cursor = ARGV[4]
    if f[3] and tonumber(f[3]) and tonumber(f[3]) > tonumber(ARGV[4]) then cursor = f[3] end
    redis.call('HINCRBY', KEYS[2], 'rev', 1)
    redis.call('HSET', KEYS[2], 'def', ARGV[2], 'timing', ARGV[3], 'anchor', ARGV[4],
      'cursor', cursor)
    clear_claim(KEYS[2])
    status = 'rescheduled'
  end
end
redis.call('SADD', KEYS[1], ARGV[1])
return {status, redis.call('HGETALL', KEYS[2])}
"#;

/// KEYS: hash. ARGV: owner, rev, cursor, run, enqueue (0/1), lease (ms).
/// Returns {'gone'} or {'won'|'busy'|'moved', HGETALL}.
const CLAIM: &str = r#"
check(KEYS[1], 'hash')
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local f = redis.call('HMGET', KEYS[1], 'rev', 'cursor', 'p_owner', 'p_until')
local now = now_ms()
local lease_end = string.format('%.0f', now + tonumber(ARGV[6]))
if f[3] then
  if f[3] ~= ARGV[1] and (tonumber(f[4]) or 0) > now then
    return {'busy', redis.call('HGETALL', KEYS[1])}
  end
  redis.call('HSET', KEYS[1], 'p_owner', ARGV[1], 'p_until', lease_end)
  return {'won', redis.call('HGETALL', KEYS[1])}
end
if f[1] ~= ARGV[2] or f[2] ~= ARGV[3] or tonumber(ARGV[4]) <= tonumber(f[2]) then
  return {'moved', redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'p_run', ARGV[4], 'p_owner', ARGV[1], 'p_until', lease_end,
  'p_enq', ARGV[5])
return {'won', redis.call('HGETALL', KEYS[1])}
"#;

/// KEYS: hash. ARGV: owner, run. Returns {'gone'}, {'lost'} or {'done', HGETALL}.
const COMPLETE: &str = r#"
check(KEYS[1], 'hash')
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local f = redis.call('HMGET', KEYS[1], 'p_owner', 'p_run', 'p_enq', 'cursor')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] then return {'lost'} end
if tonumber(f[2]) > tonumber(f[4]) then redis.call('HSET', KEYS[1], 'cursor', f[2]) end
if f[3] == '1' then redis.call('HSET', KEYS[1], 'last', f[2]) end
clear_claim(KEYS[1])
return {'done', redis.call('HGETALL', KEYS[1])}
"#;

/// KEYS: hash. ARGV: owner, run. Returns 1 when the claim was dropped.
const ABANDON: &str = r#"
check(KEYS[1], 'hash')
local f = redis.call('HMGET', KEYS[1], 'p_owner', 'p_run')
if f[1] == ARGV[1] and f[2] == ARGV[2] then
  clear_claim(KEYS[1])
  return 1
end
return 0
"#;

/// KEYS: index, hash. ARGV: id. Returns 1 when it existed.
const REMOVE: &str = r#"
check(KEYS[1], 'set')
check(KEYS[2], 'hash')
local n = redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[1])
return n
"#;

struct Scripts {
    upsert: Script,
    claim: Script,
    complete: Script,
    abandon: Script,
    remove: Script,
}

fn scripts() -> &'static Scripts {
    static S: OnceLock<Scripts> = OnceLock::new();
    S.get_or_init(|| {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            upsert: s(UPSERT),
            claim: s(CLAIM),
            complete: s(COMPLETE),
            abandon: s(ABANDON),
            remove: s(REMOVE),
        }
    })
}

/// The schedules of one queue, in Redis. Cheap to clone.
///
/// ```no_run
/// use ferrymq_core::schedule::{Every, ScheduleDef, Scheduler};
/// use ferrymq_redis::{RedisConfig, RedisScheduleStore};
///
/// # async fn doc() -> ferrymq_core::Result<()> {
/// let config = RedisConfig::from_url("redis://127.0.0.1:6379/reports")?;
/// let store = RedisScheduleStore::connect(&config).await?;
/// let scheduler = Scheduler::new(config.producer().await?, store);
/// scheduler
///     .upsert(ScheduleDef::new("nightly", Every::cron_in("0 2 * * *", "Europe/Berlin")?))
///     .await?;
/// scheduler.run_until(std::future::pending()).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisScheduleStore {
    shared: Arc<Shared>,
    index: Arc<str>,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisScheduleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisScheduleStore")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

fn millis(t: DateTime<Utc>) -> String {
    t.timestamp_millis().to_string()
}

fn corrupt(key: &str, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("schedule {key}: {what} (not written by ferrymq?)"),
    )
}

impl RedisScheduleStore {
    fn new(shared: Arc<Shared>) -> Self {
        RedisScheduleStore {
            index: format!("ferrymq:{{{}}}:schedules", shared.queue).into(),
            prefix: format!("ferrymq:{{{}}}:schedule:", shared.queue).into(),
            shared,
        }
    }

    /// The schedules of the queue of `config`, on a connection of their own.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let shared = Shared::connect(config.clone(), crate::settings::Role::Other).await?;
        Ok(RedisScheduleStore::new(shared))
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    async fn run(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
        what: &str,
    ) -> Result<Value> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        let mut conn = self.shared.conn();
        self.shared
            .with_timeout(what, invocation.invoke_async::<Value>(&mut conn))
            .await
    }

    /// `{status, fields}` or `{status}`.
    fn split(&self, v: Value, what: &str) -> Result<(String, Option<HashMap<String, String>>)> {
        let parsed: std::result::Result<Vec<Value>, _> = redis::from_redis_value(v);
        let mut items = parsed.map_err(|e| corrupt(what, e))?.into_iter();
        let status: String = items
            .next()
            .map(redis::from_redis_value)
            .transpose()
            .map_err(|e| corrupt(what, e))?
            .unwrap_or_default();
        let fields = items
            .next()
            .map(redis::from_redis_value::<HashMap<String, String>>)
            .transpose()
            .map_err(|e| corrupt(what, e))?;
        Ok((status, fields))
    }

    fn entry(&self, id: &str, f: &HashMap<String, String>) -> Result<ScheduleEntry> {
        let key = self.key(id);
        let time = |name: &str| -> Result<Option<DateTime<Utc>>> {
            match f.get(name) {
                None => Ok(None),
                Some(v) => v
                    .parse::<i64>()
                    .ok()
                    .and_then(DateTime::from_timestamp_millis)
                    .map(Some)
                    .ok_or_else(|| corrupt(&key, format!("field {name} is {v:?}"))),
            }
        };
        let need = |name: &str| -> Result<DateTime<Utc>> {
            time(name)?.ok_or_else(|| corrupt(&key, format!("field {name} is missing")))
        };
        let def = ScheduleDef::from_json(
            f.get("def")
                .ok_or_else(|| corrupt(&key, "field def is missing"))?,
        )?;
        let revision = f
            .get("rev")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| corrupt(&key, "field rev is not a number"))?;
        let pending = match (f.get("p_owner"), time("p_run")?) {
            (Some(owner), Some(run)) => Some(PendingRun {
                run,
                owner: owner.clone(),
                until: time("p_until")?.unwrap_or(DateTime::<Utc>::MIN_UTC),
                enqueue: f.get("p_enq").map(String::as_str) == Some("1"),
            }),
            _ => None,
        };
        Ok(ScheduleEntry {
            def,
            state: ScheduleState {
                revision,
                anchor: need("anchor")?,
                cursor: need("cursor")?,
                last_enqueued: time("last")?,
                pending,
            },
        })
    }

    fn entry_of(&self, id: &str, fields: Option<HashMap<String, String>>) -> Result<ScheduleEntry> {
        let fields = fields.ok_or_else(|| corrupt(&self.key(id), "no fields in the reply"))?;
        self.entry(id, &fields)
    }
}

#[async_trait]
impl ScheduleStore for RedisScheduleStore {
    async fn upsert(
        &self,
        def: &ScheduleDef,
        now: DateTime<Utc>,
    ) -> Result<(Upserted, ScheduleEntry)> {
        let key = self.key(def.id());
        let (json, timing, now) = (def.to_json(), def.every().timing_key(), millis(now));
        let reply = self
            .run(
                &scripts().upsert,
                &[&self.index, &key],
                &[def.id(), &json, &timing, &now],
                "schedule upsert",
            )
            .await?;
        let (status, fields) = self.split(reply, &key)?;
        let outcome = match status.as_str() {
            "created" => Upserted::Created,
            "unchanged" => Upserted::Unchanged,
            "updated" => Upserted::Updated,
            "rescheduled" => Upserted::Rescheduled,
            other => return Err(corrupt(&key, format!("upsert answered {other:?}"))),
        };
        Ok((outcome, self.entry_of(def.id(), fields)?))
    }

    async fn remove(&self, id: &str) -> Result<bool> {
        let key = self.key(id);
        let reply = self
            .run(
                &scripts().remove,
                &[&self.index, &key],
                &[id],
                "schedule remove",
            )
            .await?;
        Ok(matches!(reply, Value::Int(n) if n > 0))
    }

    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.key(id));
        let fields: HashMap<String, String> = self.shared.query(&cmd, "schedule get").await?;
        if fields.is_empty() {
            return Ok(None);
        }
        self.entry(id, &fields).map(Some)
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>> {
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(&*self.index);
        let mut ids: Vec<String> = self.shared.query(&cmd, "schedule list").await?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(self.key(id));
        }
        let all: Vec<HashMap<String, String>> = self
            .shared
            .with_timeout("schedule list", pipe.query_async(&mut self.shared.conn()))
            .await?;
        // A schedule removed between the two reads is simply not listed.
        ids.iter()
            .zip(all)
            .filter(|(_, f)| !f.is_empty())
            .map(|(id, f)| self.entry(id, &f))
            .collect()
    }

    async fn claim(&self, id: &str, request: &ClaimRequest) -> Result<ClaimOutcome> {
        let key = self.key(id);
        let lease = ms(request.lease).max(1).to_string();
        let (rev, cursor, run) = (
            request.revision.to_string(),
            millis(request.cursor),
            millis(request.run),
        );
        let enqueue = if request.enqueue { "1" } else { "0" };
        let reply = self
            .run(
                &scripts().claim,
                &[&key],
                &[&request.owner, &rev, &cursor, &run, enqueue, &lease],
                "schedule claim",
            )
            .await?;
        let (status, fields) = self.split(reply, &key)?;
        if status == "gone" {
            return Ok(ClaimOutcome::Gone);
        }
        let entry = self.entry_of(id, fields)?;
        let pending = || {
            entry
                .state
                .pending
                .clone()
                .ok_or_else(|| corrupt(&key, "a claim answered without the claim"))
        };
        Ok(match status.as_str() {
            "won" => ClaimOutcome::Won(pending()?),
            "busy" => ClaimOutcome::Busy(pending()?),
            "moved" => ClaimOutcome::Moved(Box::new(entry)),
            other => return Err(corrupt(&key, format!("claim answered {other:?}"))),
        })
    }

    async fn complete(
        &self,
        id: &str,
        owner: &str,
        run: DateTime<Utc>,
    ) -> Result<Option<ScheduleEntry>> {
        let key = self.key(id);
        let reply = self
            .run(
                &scripts().complete,
                &[&key],
                &[owner, &millis(run)],
                "schedule complete",
            )
            .await?;
        let (status, fields) = self.split(reply, &key)?;
        match status.as_str() {
            "done" => self.entry_of(id, fields).map(Some),
            "lost" | "gone" => Ok(None),
            other => Err(corrupt(&key, format!("complete answered {other:?}"))),
        }
    }

    async fn abandon(&self, id: &str, owner: &str, run: DateTime<Utc>) -> Result<()> {
        let key = self.key(id);
        self.run(
            &scripts().abandon,
            &[&key],
            &[owner, &millis(run)],
            "schedule abandon",
        )
        .await
        .map(|_| ())
    }
}
