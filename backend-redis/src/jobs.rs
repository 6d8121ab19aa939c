//! [`RedisJobStore`]: job records, counts and lifecycle events of a queue in Redis,
//! shared by every process (ferrymq-core's `jobs` module describes the model).
//!
//! Keys of queue `Q`, all under the queue's hash tag `{Q}`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `ferrymq:{Q}:job:ID` | hash | job `ID`: `s` state, `a` attempts, `r` result (JSON), `f` last failure, `p` progress (JSON), `c` / `st` / `fi` / `u` created, started, finished, updated (ms since the epoch) |
//! | `ferrymq:{Q}:jobstate:STATE` | zset | id → update sequence, one per state: counts (`ZCARD`), newest first, trimming oldest first |
//! | `ferrymq:{Q}:jobexpiry` | zset | id → expiry (server ms) of records kept for an age |
//! | `ferrymq:{Q}:jobseq` | string | the update sequence |
//! | `ferrymq:{Q}:events` | stream | lifecycle events, trimmed to about `events_max_len` (`XADD … MAXLEN ~`) |
//! | `ferrymq:{Q}:flow:P` | hash | pending flow `P`: `q` parent queue, `m` parent message, `pol` failure policy, `c:ID` per child, `r:ID` its result (JSON), `x:ID` its failure, `rel` once released |
//! | `ferrymq:{Q}:flows` | zset | pending flow → creation sequence, capped at `max_per_state` (oldest dropped) |
//!
//! Scripts name the keys of other records (trimming, expiry) from the prefix they
//! are given rather than in `KEYS`: every key shares the queue's hash tag, so they
//! are in the script's slot on Redis Cluster too.
//!
//! Every step is one Lua script — the state change, retention (age expiry of up to
//! 100 records per call, the count policy, the per-state cap) and the `XADD` of the
//! event — so a record and its event never disagree, and two workers cannot both
//! trim or both keep. Scripts check the types of the keys they write before the
//! first write. Expiry runs on the server's clock (`TIME`), so clients with skewed
//! clocks agree; record times are the client's.
//!
//! Flows: a child's completion on a queue of this store's server, with a
//! [`RedisProducer`](crate::RedisProducer) of the parent's queue among the layer's
//! `flows()`, is one script with the child's ack (`ack_child_completed`): result,
//! the last child's parent enqueued with its dedup id, flow forgotten, child acked —
//! so a kill -9 either finds it all undone (the child is redelivered) or all done
//! (nothing to redo). Otherwise (another server, another backend) the jobs layer
//! goes step by step, the ack last.
//!
//! Events are read with `XREAD BLOCK` on a pooled connection of their own, from the
//! stream's last entry at subscribe time: a subscriber sees every event after it
//! subscribed that is still in the stream when it reads (one that falls more than
//! `events_max_len` behind misses the oldest, and is not told: the stream was
//! trimmed). A subscription survives a restarted server: it reconnects and goes on
//! from the last id it saw, yielding an `Err` for each failed read.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use ferrymq_core::jobs::flow::{decode_message, encode_message, release_message};
use ferrymq_core::jobs::{
    ChildAcked, ChildOutcome, FlowChildren, FlowParent, FlowRecord, JobEvent, JobEventKind,
    JobEvents, JobRecord, JobState, JobStore, JobUpdate, Keep, Release, StoredCounts,
    DEFAULT_MAX_PER_STATE,
};
use ferrymq_core::{Delivery, Error, ErrorKind, Result};
use redis::{Script, Value};

use crate::client::Shared;
use crate::config::RedisConfig;
use crate::flow_ack::{Outcome, Step};
use crate::RedisConsumer;

/// Events kept in the stream by default (approximately: `MAXLEN ~`).
pub const DEFAULT_EVENTS_MAX_LEN: u64 = 10_000;

/// Records expired per script call at most, so a backlog of expired records is
/// swept over several calls instead of one long script.
const SWEEP: u32 = 100;

/// Shared Lua: key types, the server clock, dropping a record, the age sweep.
/// `KEYS[1..5]` are the state zsets, `KEYS[6]` the expiry zset, `ARGV[1]` the record
/// key prefix.
const PRELUDE: &str = r#"
local STATES = {waiting = KEYS[1], active = KEYS[2], completed = KEYS[3], failed = KEYS[4], dead_lettered = KEYS[5]}
local EXPIRY = KEYS[6]
local PREFIX = ARGV[1]
local function check(key, want)
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= want then
    return redis.error_reply('ferrymq: key ' .. key .. ' holds a ' .. t .. ', not a ' .. want)
  end
  return nil
end
for i = 1, 6 do
  local e = check(KEYS[i], 'zset')
  if e then return e end
end
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function drop(id)
  local key = PREFIX .. id
  local s = redis.call('HGET', key, 's')
  if s and STATES[s] then redis.call('ZREM', STATES[s], id) end
  redis.call('DEL', key)
  redis.call('ZREM', EXPIRY, id)
end
local function sweep()
  local gone = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[2]))
  for _, id in ipairs(gone) do drop(id) end
end
"#;

/// One step. KEYS 7 job hash, 8 sequence, 9 events. ARGV 3 id, 4 state, 5 attempt,
/// 6 at (ms), 7 created (ms), 8 result, 9 failure, 10 retry after (ms), 11 keep
/// (`drop`/`keep`/`count`/`age`), 12 keep value, 13 max per state, 14 events max
/// len, 15 only if new, 16 event name. Returns 1 applied, 0 skipped.
const RECORD: &str = r#"
local JOB, SEQ, EVENTS = KEYS[7], KEYS[8], KEYS[9]
local e = check(JOB, 'hash') or check(SEQ, 'string') or check(EVENTS, 'stream')
if e then return e end
local id, state, attempt, at = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
if not STATES[state] then return redis.error_reply('ferrymq: unknown job state ' .. state) end
sweep()
local old = redis.call('HGET', JOB, 's')
if old then
  local recorded = tonumber(redis.call('HGET', JOB, 'a') or '0') or 0
  if ARGV[15] == '1' or (attempt > 0 and recorded > attempt) then return 0 end
  if STATES[old] then redis.call('ZREM', STATES[old], id) end
end
redis.call('ZREM', EXPIRY, id)
local keep = ARGV[11]
if keep == 'drop' then
  redis.call('DEL', JOB)
else
  if not old then
    redis.call('HSET', JOB, 'c', ARGV[7])
  elseif tonumber(ARGV[7]) < (tonumber(redis.call('HGET', JOB, 'c') or ARGV[7]) or 0) then
    redis.call('HSET', JOB, 'c', ARGV[7])
  end
  redis.call('HSET', JOB, 's', state, 'u', at)
  if attempt > 0 then redis.call('HSET', JOB, 'a', attempt) end
  if state == 'active' then
    redis.call('HSET', JOB, 'st', at)
    redis.call('HDEL', JOB, 'fi')
  elseif state ~= 'waiting' then
    redis.call('HSET', JOB, 'fi', at)
  end
  if ARGV[8] ~= '' then redis.call('HSET', JOB, 'r', ARGV[8]) end
  if ARGV[9] ~= '' then redis.call('HSET', JOB, 'f', ARGV[9]) end
  redis.call('ZADD', STATES[state], redis.call('INCR', SEQ), id)
  if keep == 'age' then redis.call('ZADD', EXPIRY, NOW + tonumber(ARGV[12]), id) end
  local function trim(key, max)
    local over = redis.call('ZCARD', key) - max
    if over > 0 then
      for _, j in ipairs(redis.call('ZRANGE', key, 0, over - 1)) do drop(j) end
    end
  end
  if keep == 'count' then trim(STATES[state], tonumber(ARGV[12])) end
  trim(STATES[state], tonumber(ARGV[13]))
end
local fields = {'e', ARGV[16], 'id', id, 'a', ARGV[5], 't', at}
if ARGV[8] ~= '' then table.insert(fields, 'v'); table.insert(fields, ARGV[8]) end
if ARGV[9] ~= '' then table.insert(fields, 'f'); table.insert(fields, ARGV[9]) end
if ARGV[10] ~= '' then table.insert(fields, 'd'); table.insert(fields, ARGV[10]) end
redis.call('XADD', EVENTS, 'MAXLEN', '~', ARGV[14], '*', unpack(fields))
return 1
"#;

/// Progress. KEYS 7 job hash, 8 events. ARGV 3 id, 4 value (JSON), 5 at, 6 events
/// max len, 7 attempt.
const PROGRESS: &str = r#"
local JOB, EVENTS = KEYS[7], KEYS[8]
local e = check(JOB, 'hash') or check(EVENTS, 'stream')
if e then return e end
sweep()
if redis.call('EXISTS', JOB) == 1 then
  redis.call('HSET', JOB, 'p', ARGV[4], 'u', ARGV[5])
end
redis.call('XADD', EVENTS, 'MAXLEN', '~', ARGV[6], '*', 'e', 'progress', 'id', ARGV[3], 'a', ARGV[7], 't', ARGV[5], 'v', ARGV[4])
return 1
"#;

/// Read: sweep, then the record (ARGV 3 id) or, with ARGV 4 a state, up to ARGV 5
/// records of it newest first; with neither, the five counts.
const READ: &str = r#"
sweep()
if ARGV[3] ~= '' then
  return redis.call('HGETALL', PREFIX .. ARGV[3])
end
if ARGV[4] ~= '' then
  local out = {}
  for _, id in ipairs(redis.call('ZREVRANGE', STATES[ARGV[4]], 0, tonumber(ARGV[5]) - 1)) do
    table.insert(out, id)
    table.insert(out, redis.call('HGETALL', PREFIX .. id))
  end
  return out
end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]), redis.call('ZCARD', KEYS[4]), redis.call('ZCARD', KEYS[5])}
"#;

/// Type checks of the flow scripts: KEYS[1] the flow hash, KEYS[2] the flows zset.
const FLOW_PRELUDE: &str = r#"
local F, FLOWS = KEYS[1], KEYS[2]
for i, want in ipairs({'hash', 'zset'}) do
  local t = redis.call('TYPE', KEYS[i]).ok
  if t ~= 'none' and t ~= want then
    return redis.error_reply('ferrymq: key ' .. KEYS[i] .. ' holds a ' .. t .. ', not a ' .. want)
  end
end
"#;

/// Create a flow unless it exists. KEYS 3 sequence. ARGV 1 parent, 2 parent queue,
/// 3 parent message, 4 policy, 5 max flows, 6 flow key prefix, 7.. children.
const CREATE_FLOW: &str = r#"
if redis.call('EXISTS', F) == 1 then return 0 end
local fields = {'q', ARGV[2], 'm', ARGV[3], 'pol', ARGV[4]}
for i = 7, #ARGV do
  table.insert(fields, 'c:' .. ARGV[i]); table.insert(fields, '1')
end
redis.call('HSET', F, unpack(fields))
redis.call('ZADD', FLOWS, redis.call('INCR', KEYS[3]), ARGV[1])
local over = redis.call('ZCARD', FLOWS) - tonumber(ARGV[5])
if over > 0 then
  for _, p in ipairs(redis.call('ZRANGE', FLOWS, 0, over - 1)) do
    redis.call('DEL', ARGV[6] .. p)
    redis.call('ZREM', FLOWS, p)
  end
  return 2
end
return 1
"#;

/// A child ended. ARGV 1 parent, 2 child, 3 `completed`/`failed`, 4 result (JSON)
/// or reason. Returns {'wait'}, {'failed', reason} or {'send', queue, message,
/// {child, result, ...}, {child, reason, ...}}.
const CHILD_DONE: &str = r#"
local parent, child, kind, value = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('HEXISTS', F, 'c:' .. child) == 0 then return {'wait'} end
local failed_now = false
if kind == 'completed' then
  redis.call('HSET', F, 'r:' .. child, value)
  redis.call('HDEL', F, 'x:' .. child)
elseif redis.call('HEXISTS', F, 'r:' .. child) == 0 then
  redis.call('HSET', F, 'x:' .. child, value)
  failed_now = true
end
local pol = redis.call('HGET', F, 'pol')
if failed_now and pol == 'fail_parent' then
  redis.call('DEL', F)
  redis.call('ZREM', FLOWS, parent)
  return {'failed', 'child ' .. child .. ' failed: ' .. value}
end
local all = redis.call('HGETALL', F)
local children, results, failed, rmap, xmap = {}, {}, {}, {}, {}
local queue, message
for i = 1, #all, 2 do
  local k, v = all[i], all[i + 1]
  local p, rest = string.sub(k, 1, 2), string.sub(k, 3)
  if p == 'c:' then table.insert(children, rest)
  elseif p == 'r:' then rmap[rest] = v; table.insert(results, rest); table.insert(results, v)
  elseif p == 'x:' then xmap[rest] = v; table.insert(failed, rest); table.insert(failed, v)
  elseif k == 'q' then queue = v
  elseif k == 'm' then message = v end
end
local done = true
for _, c in ipairs(children) do
  if not rmap[c] and not (pol ~= 'fail_parent' and xmap[c]) then done = false end
end
if done or (failed_now and pol == 'continue') then
  redis.call('HSET', F, 'rel', '1')
  return {'send', queue, message, results, failed}
end
return {'wait'}
"#;

/// The parent was sent: forget the flow. ARGV 1 parent.
const PARENT_SENT: &str = r#"
redis.call('DEL', F)
redis.call('ZREM', FLOWS, ARGV[1])
return 1
"#;

struct Scripts {
    record: Script,
    progress: Script,
    read: Script,
    create_flow: Script,
    child_done: Script,
    parent_sent: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        record: Script::new(&format!("{PRELUDE}{RECORD}")),
        progress: Script::new(&format!("{PRELUDE}{PROGRESS}")),
        read: Script::new(&format!("{PRELUDE}{READ}")),
        create_flow: Script::new(&format!("{FLOW_PRELUDE}{CREATE_FLOW}")),
        child_done: Script::new(&format!("{FLOW_PRELUDE}{CHILD_DONE}")),
        parent_sent: Script::new(&format!("{FLOW_PRELUDE}{PARENT_SENT}")),
    })
}

/// Job records, counts and events of one queue in Redis. Cheap to clone.
///
/// ```no_run
/// use ferrymq_core::jobs::{JobStore, Keep, TrackJobsLayer};
/// use ferrymq_redis::{RedisConfig, RedisJobStore};
///
/// # async fn doc() -> ferrymq_core::Result<()> {
/// let config = RedisConfig::from_url("redis://127.0.0.1:6379/orders")?;
/// let store = RedisJobStore::connect(&config).await?;
/// let layer = TrackJobsLayer::new(store.clone()).keep_completed(Keep::Count(1000));
/// println!("{:?}", store.counts().await?);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisJobStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// `ferrymq:{Q}:job:`
    prefix: String,
    /// The state zsets in `JobState::ALL` order, then the expiry zset.
    zsets: [String; 6],
    seq: String,
    events: String,
    /// `ferrymq:{Q}:flow:` and the zset of pending flows.
    flow_prefix: String,
    flows: String,
    max_per_state: u64,
    events_max_len: u64,
}

impl std::fmt::Debug for RedisJobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisJobStore")
            .field("queue", &self.inner.shared.queue)
            .field("max_per_state", &self.inner.max_per_state)
            .field("events_max_len", &self.inner.events_max_len)
            .finish_non_exhaustive()
    }
}

impl RedisJobStore {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self::with_limits(shared, DEFAULT_MAX_PER_STATE, DEFAULT_EVENTS_MAX_LEN)
    }

    fn with_limits(shared: Arc<Shared>, max_per_state: u64, events_max_len: u64) -> Self {
        let base = format!("ferrymq:{{{}}}", shared.queue);
        let zset = |s: JobState| format!("{base}:jobstate:{}", s.as_str());
        RedisJobStore {
            inner: Arc::new(Inner {
                prefix: format!("{base}:job:"),
                zsets: [
                    zset(JobState::Waiting),
                    zset(JobState::Active),
                    zset(JobState::Completed),
                    zset(JobState::Failed),
                    zset(JobState::DeadLettered),
                    format!("{base}:jobexpiry"),
                ],
                seq: format!("{base}:jobseq"),
                events: format!("{base}:events"),
                flow_prefix: format!("{base}:flow:"),
                flows: format!("{base}:flows"),
                max_per_state: max_per_state.max(1),
                events_max_len: events_max_len.max(1),
                shared,
            }),
        }
    }

    /// A store for the queue of `config`, on connections of its own.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let shared = Shared::connect(config.clone(), crate::settings::Role::Other).await?;
        Ok(RedisJobStore::new(shared))
    }

    /// The same store keeping at most `max` records per state (at least 1; default
    /// [`DEFAULT_MAX_PER_STATE`]). Every client of a queue should use the same cap:
    /// each trims to its own on its writes.
    pub fn max_per_state(&self, max: u64) -> Self {
        Self::with_limits(self.inner.shared.clone(), max, self.inner.events_max_len)
    }

    /// The same store trimming the event stream to about `max` entries (at least 1;
    /// default [`DEFAULT_EVENTS_MAX_LEN`]).
    pub fn events_max_len(&self, max: u64) -> Self {
        Self::with_limits(self.inner.shared.clone(), self.inner.max_per_state, max)
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The hash of pending flow `parent`.
    pub(crate) fn flow_key(&self, parent: &str) -> String {
        format!("{}{parent}", self.inner.flow_prefix)
    }

    /// The zset of pending flows.
    pub(crate) fn flows_key(&self) -> &str {
        &self.inner.flows
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}{id}", self.inner.prefix)
    }

    fn invocation<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for key in &self.inner.zsets {
            inv.key(key);
        }
        inv.arg(&self.inner.prefix).arg(SWEEP);
        inv
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.inner.shared.conn();
        self.inner
            .shared
            .with_timeout(what, inv.invoke_async::<T>(&mut conn))
            .await
    }

    fn flow_invocation<'a>(&self, script: &'a Script, parent: &str) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(format!("{}{parent}", self.inner.flow_prefix))
            .key(&self.inner.flows);
        inv
    }

    async fn read(&self, id: &str, state: Option<JobState>, max: usize) -> Result<Value> {
        let mut inv = self.invocation(&scripts().read);
        inv.arg(id)
            .arg(state.map_or("", |s| s.as_str()))
            .arg(max.max(1));
        self.run("job read", &inv).await
    }
}

impl RedisJobStore {
    /// The flow step of a child acked already: best effort, logged.
    async fn finish_after_ack(
        &self,
        parent: &str,
        child: &str,
        result: Option<serde_json::Value>,
        parents: &[FlowParent],
    ) {
        let done = async {
            if let Release::Send { queue, message } = self
                .child_done(parent, child, ChildOutcome::Completed(result))
                .await?
            {
                let producer = parents.iter().find(|p| p.queue() == queue).ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidConfig,
                        format!(
                            "flow {parent:?}: no flows() producer for its parent queue {queue:?}"
                        ),
                    )
                })?;
                producer.producer().send(message).await?;
                self.parent_sent(parent).await?;
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = done.await {
            tracing::error!(queue = self.queue(), flow = parent, job = child, error = %e, "completing a flow after its child's ack failed");
        }
    }
}

fn ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn time(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(std::time::UNIX_EPOCH)
}

fn bulk(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A record from `HGETALL`'s flat field/value reply; `None` when empty.
fn parse_record(id: Option<&str>, v: &Value) -> Result<Option<JobRecord>> {
    let Value::Array(items) = v else {
        return Ok(None);
    };
    if items.is_empty() {
        return Ok(None);
    }
    let mut fields = std::collections::HashMap::new();
    for pair in items.chunks(2) {
        if let [k, v] = pair {
            if let (Some(k), Some(v)) = (bulk(k), bulk(v)) {
                fields.insert(k, v);
            }
        }
    }
    let bad = |what: &str| {
        Error::new(
            ErrorKind::Backend,
            format!("job record {id:?}: field {what} is missing or malformed"),
        )
    };
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    let json = |k: &str| {
        fields
            .get(k)
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
    };
    let state: JobState = fields
        .get("s")
        .ok_or_else(|| bad("s"))?
        .parse()
        .map_err(|_| bad("s"))?;
    let created = num("c").ok_or_else(|| bad("c"))?;
    let mut record = JobRecord::new(id.unwrap_or_default(), state, time(created));
    record.attempts = num("a").and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    record.progress = json("p");
    record.result = json("r");
    record.failure = fields.get("f").cloned();
    record.started_at = num("st").map(time);
    record.finished_at = num("fi").map(time);
    record.updated_at = num("u").map_or(record.created_at, time);
    Ok(Some(record))
}

/// The stored fields of an update's result and failure.
fn json_text(v: &Option<serde_json::Value>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_default()
}

#[async_trait]
impl JobStore for RedisJobStore {
    fn queue(&self) -> &str {
        &self.inner.shared.queue
    }

    async fn record(&self, update: JobUpdate) -> Result<()> {
        let (keep, keep_value) = if !update.state.is_finished() {
            ("keep", 0)
        } else if update.keep.keeps_nothing() {
            ("drop", 0)
        } else {
            match update.keep {
                Keep::Count(n) => ("count", n),
                Keep::Age(age) => (
                    "age",
                    crate::client::ms(age.min(crate::config::MAX_DLQ_RETENTION)),
                ),
                _ => ("drop", 0),
            }
        };
        let event = update.event(self.queue());
        let mut inv = self.invocation(&scripts().record);
        inv.key(self.job_key(&update.id))
            .key(&self.inner.seq)
            .key(&self.inner.events);
        inv.arg(&update.id)
            .arg(update.state.as_str())
            .arg(update.attempt)
            .arg(ms(update.at))
            .arg(ms(update.created_at.unwrap_or(update.at)))
            .arg(json_text(&update.result))
            .arg(update.failure.as_deref().unwrap_or(""))
            .arg(
                update
                    .retry_after
                    .map(|d| crate::client::ms(d).to_string())
                    .unwrap_or_default(),
            )
            .arg(keep)
            .arg(keep_value)
            .arg(self.inner.max_per_state)
            .arg(self.inner.events_max_len)
            .arg(if update.only_if_new { "1" } else { "0" })
            .arg(event.kind.name());
        self.run::<i64>("job record", &inv).await.map(|_| ())
    }

    async fn progress(&self, id: &str, attempt: u32, value: serde_json::Value) -> Result<()> {
        let mut inv = self.invocation(&scripts().progress);
        inv.key(self.job_key(id)).key(&self.inner.events);
        inv.arg(id)
            .arg(value.to_string())
            .arg(ms(std::time::SystemTime::now()))
            .arg(self.inner.events_max_len)
            .arg(attempt);
        self.run::<i64>("job progress", &inv).await.map(|_| ())
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>> {
        if id.is_empty() {
            return Ok(None);
        }
        parse_record(Some(id), &self.read(id, None, 1).await?)
    }

    async fn list(&self, state: JobState, max: usize) -> Result<Vec<JobRecord>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let reply = self.read("", Some(state), max.min(10_000)).await?;
        let Value::Array(items) = reply else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(items.len() / 2);
        for pair in items.chunks(2) {
            if let [id, fields] = pair {
                let id = bulk(id);
                if let Some(rec) = parse_record(id.as_deref(), fields)? {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    async fn counts(&self) -> Result<StoredCounts> {
        let reply = self.read("", None, 1).await?;
        let Value::Array(ns) = reply else {
            return Err(Error::new(
                ErrorKind::Backend,
                format!("unexpected reply to the job counts: {reply:?}"),
            ));
        };
        let mut counts = StoredCounts::default();
        for (state, n) in JobState::ALL.into_iter().zip(ns.iter()) {
            if let Value::Int(n) = n {
                counts.set(state, u64::try_from(*n).unwrap_or(0));
            }
        }
        Ok(counts)
    }

    async fn create_flow(&self, flow: FlowRecord) -> Result<()> {
        let mut inv = self.flow_invocation(&scripts().create_flow, &flow.parent);
        inv.key(&self.inner.seq);
        inv.arg(&flow.parent)
            .arg(&flow.parent_queue)
            .arg(encode_message(&flow.message))
            .arg(flow.on_child_failure.as_str())
            .arg(self.inner.max_per_state)
            .arg(&self.inner.flow_prefix);
        for child in &flow.children {
            inv.arg(child);
        }
        if self.run::<i64>("flow create", &inv).await? == 2 {
            tracing::warn!(
                queue = self.queue(),
                "too many pending flows: dropped the oldest"
            );
        }
        Ok(())
    }

    async fn child_done(
        &self,
        parent: &str,
        child: &str,
        outcome: ChildOutcome,
    ) -> Result<Release> {
        let mut inv = self.flow_invocation(&scripts().child_done, parent);
        inv.arg(parent).arg(child);
        match &outcome {
            ChildOutcome::Completed(result) => inv
                .arg("completed")
                .arg(result.clone().unwrap_or_default().to_string()),
            ChildOutcome::Failed(reason) => inv.arg("failed").arg(reason),
        };
        let reply: Vec<Value> = self.run("flow child done", &inv).await?;
        let text = |i: usize| reply.get(i).and_then(bulk);
        let pairs = |i: usize| -> Vec<(String, String)> {
            match reply.get(i) {
                Some(Value::Array(items)) => items
                    .chunks(2)
                    .filter_map(|p| match p {
                        [k, v] => Some((bulk(k)?, bulk(v)?)),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            }
        };
        match text(0).as_deref() {
            Some("wait") => Ok(Release::Wait),
            Some("failed") => Ok(Release::Failed {
                reason: text(1).unwrap_or_default(),
            }),
            Some("send") => {
                let queue = text(1).unwrap_or_default();
                let message = decode_message(&text(2).unwrap_or_default())?;
                let mut children = FlowChildren::default();
                for (child, result) in pairs(3) {
                    let value = serde_json::from_str(&result).unwrap_or(serde_json::Value::Null);
                    children.results.insert(child, value);
                }
                for (child, reason) in pairs(4) {
                    children.failed.insert(child, reason);
                }
                Ok(Release::Send {
                    queue,
                    message: release_message(message, parent, &children),
                })
            }
            _ => Err(Error::new(
                ErrorKind::Backend,
                format!("unexpected reply to a flow step: {reply:?}"),
            )),
        }
    }

    async fn parent_sent(&self, parent: &str) -> Result<()> {
        let mut inv = self.flow_invocation(&scripts().parent_sent, parent);
        inv.arg(parent);
        self.run::<i64>("flow parent sent", &inv).await.map(|_| ())
    }

    /// With the child's ack, in one script, when the child came from a Redis queue
    /// on this store's server and a parent producer is a [`RedisProducer`] there
    /// (see `flow_ack.rs`); `Ok(None)` otherwise, nothing done.
    async fn ack_child_completed(
        &self,
        delivery: &Delivery,
        parent: &str,
        child: &str,
        result: Option<serde_json::Value>,
        parents: &[FlowParent],
    ) -> Result<Option<ChildAcked>> {
        if delivery.capabilities().map(|c| c.backend) != Some("redis") {
            return Ok(None);
        }
        let Some(step) = Step::new(self.clone(), parent, child, result.clone(), parents) else {
            return Ok(None);
        };
        let step = Arc::new(step);
        let acked = step.offer(delivery.ack()).await;
        match (acked, step.take_outcome()) {
            (Ok(()), Some(Outcome::Done(done))) => Ok(Some(done)),
            (Err(_), Some(Outcome::Declined)) => Ok(None),
            (Err(e), _) => Err(e),
            (Ok(()), _) => {
                // Acked by an ack that did not take the step (a delivery whose
                // handle is not this crate's): the step comes after the ack.
                tracing::warn!(queue = self.queue(), flow = parent, job = child, "a flow child was acked without its flow step; completing the flow after the ack");
                self.finish_after_ack(parent, child, result, parents).await;
                Ok(Some(ChildAcked::Wait))
            }
        }
    }

    async fn subscribe(&self) -> Result<JobEvents> {
        // Start after the last entry now in the stream.
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(&self.inner.events)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let last = match self
            .inner
            .shared
            .query::<Value>(&cmd, "XREVRANGE events")
            .await?
        {
            Value::Array(entries) => entries
                .first()
                .and_then(|e| match e {
                    Value::Array(parts) => parts.first().and_then(bulk),
                    _ => None,
                })
                .unwrap_or_else(|| "0-0".to_string()),
            _ => "0-0".to_string(),
        };
        let state = Tail {
            store: self.clone(),
            last,
            buffer: VecDeque::new(),
            failed: false,
            conn: None,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut tail| async move {
                loop {
                    if let Some(event) = tail.buffer.pop_front() {
                        return Some((Ok(event), tail));
                    }
                    if tail.failed {
                        // Pace the retries of a failing server.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    match tail.read().await {
                        Ok(()) => tail.failed = false,
                        Err(e) => {
                            tail.failed = true;
                            return Some((Err(e), tail));
                        }
                    }
                }
            },
        )))
    }
}

/// A subscription's position in the event stream.
struct Tail {
    store: RedisJobStore,
    last: String,
    buffer: VecDeque<JobEvent>,
    failed: bool,
    /// A connection of the subscription's own, taken out of the blocking pool so
    /// that a subscriber never holds a slot the consumers' blocking reads need.
    conn: Option<crate::client::Conn>,
}

/// How long one blocking read waits before asking again.
const BLOCK: Duration = Duration::from_secs(1);

impl Tail {
    async fn read(&mut self) -> Result<()> {
        let shared = &self.store.inner.shared;
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                match tokio::time::timeout(shared.config.command_timeout, shared.blocking.get())
                    .await
                {
                    Ok(Ok(conn)) => crate::client::BlockingConn::take(conn),
                    Ok(Err(deadpool_redis::PoolError::Backend(e))) => {
                        return Err(shared.map_err(e, "events connection"))
                    }
                    Ok(Err(e)) => {
                        return Err(Error::new(
                            ErrorKind::Connection,
                            format!("no connection to redis for the job events: {e}"),
                        ))
                    }
                    Err(_) => return Err(shared.timeout("events connection")),
                }
            }
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(crate::client::ms(BLOCK))
            .arg("STREAMS")
            .arg(&self.store.inner.events)
            .arg(&self.last);
        let reply = tokio::time::timeout(
            BLOCK.saturating_add(shared.config.command_timeout),
            cmd.query_async::<Value>(&mut conn),
        )
        .await;
        // A failed or timed-out read may still be blocked on the server: its
        // connection is dropped, and the next read opens another.
        let reply = match reply {
            Ok(Ok(v)) => {
                self.conn = Some(conn);
                v
            }
            Ok(Err(e)) => return Err(shared.map_err(e, "XREAD events")),
            Err(_) => return Err(shared.timeout("XREAD events")),
        };
        // [[stream, [[id, [f, v, ...]], ...]]] or nil.
        let Value::Array(streams) = reply else {
            return Ok(());
        };
        for stream in &streams {
            let Value::Array(parts) = stream else {
                continue;
            };
            let Some(Value::Array(entries)) = parts.get(1) else {
                continue;
            };
            for entry in entries {
                let Value::Array(entry) = entry else { continue };
                let (Some(id), Some(Value::Array(fields))) =
                    (entry.first().and_then(bulk), entry.get(1))
                else {
                    continue;
                };
                self.last = id;
                match parse_event(self.store.queue(), fields) {
                    Some(event) => self.buffer.push_back(event),
                    None => {
                        tracing::debug!(queue = self.store.queue(), entry = %self.last, "skipping an event entry that does not parse")
                    }
                }
            }
        }
        Ok(())
    }
}

fn parse_event(queue: &str, fields: &[Value]) -> Option<JobEvent> {
    let mut map = std::collections::HashMap::new();
    for pair in fields.chunks(2) {
        if let [k, v] = pair {
            map.insert(bulk(k)?, bulk(v)?);
        }
    }
    let reason = || map.get("f").cloned().unwrap_or_default();
    let value = || {
        map.get("v")
            .and_then(|v| serde_json::from_str::<serde_json::Value>(v).ok())
    };
    let kind = match map.get("e")?.as_str() {
        "waiting" => JobEventKind::Waiting,
        "active" => JobEventKind::Active,
        "progress" => JobEventKind::Progress {
            value: value().unwrap_or_default(),
        },
        "completed" => JobEventKind::Completed { result: value() },
        "retried" => JobEventKind::Retried {
            reason: reason(),
            after_ms: map.get("d").and_then(|d| d.parse().ok()).unwrap_or(0),
        },
        "failed" => JobEventKind::Failed { reason: reason() },
        "dead_lettered" => JobEventKind::DeadLettered { reason: reason() },
        _ => return None,
    };
    Some(JobEvent::new(
        queue,
        map.get("id")?,
        map.get("a").and_then(|a| a.parse().ok()).unwrap_or(0),
        time(map.get("t").and_then(|t| t.parse().ok()).unwrap_or(0)),
        kind,
    ))
}

impl RedisConsumer {
    /// A [`RedisJobStore`] for this consumer's queue, on its connections.
    pub fn job_store(&self) -> RedisJobStore {
        RedisJobStore::new(self.shared().clone())
    }
}
