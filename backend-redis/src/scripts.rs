//! The Lua scripts that make every multi-key step atomic.
//!
//! Each script is loaded once per server (`SCRIPT LOAD` at connect) and called by
//! SHA (`EVALSHA`). A server that lost its script cache (restart, `SCRIPT FLUSH`)
//! answers `NOSCRIPT`; the caller then loads the script and repeats the call, which
//! is safe because a script that was not found did not run.
//!
//! Every key a script touches is passed in `KEYS` and shares the queue's `{queue}`
//! hash tag, so the scripts also run on Redis Cluster.
//!
//! **Validate and compute first, write last.** Redis does not roll back the writes
//! of a script that fails part-way, so a failure after the first write leaves a
//! half-done step behind (an entry acked but not re-enqueued: a lost message). Every
//! script therefore first checks the type of each key it will write
//! ([`check_types`](PRELUDE): a foreign key is a typed `WRONGTYPE` error before
//! anything changed), reads and decodes what it needs, and only then writes — the
//! message's new home before the removal of its old one. (The hot-path calls, the
//! maintenance with nothing due and the one-level ack batch, skip the check: their
//! first write would fail by itself on a foreign key, before anything changed — see
//! each script.) No script `unpack`s a list
//! whose length grows with the data (Lua's `unpack` fails past ~8 000 values): such
//! lists are walked in chunks.
//!
//! Field names of a stream entry (see the crate docs for the whole layout):
//! `p` payload, `h` headers, `k` key, `d` dedup id, `r` priority, `i` stable message
//! id, `t` first enqueue time (ms), `a` deliveries before this entry existed.

use std::sync::OnceLock;

use redis::{Cmd, Script};

/// Helpers shared by the scripts (prepended to each).
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Fail (before any write) when a key holds another type than ferrymq keeps there.
-- `pairs_` is {key, type, key, type, ...}; a missing key is fine.
local function check_types(pairs_)
  for j = 1, #pairs_, 2 do
    local t = redis.call('TYPE', pairs_[j])
    local got = t
    if type(t) == 'table' then got = t['ok'] end
    if got ~= 'none' and got ~= pairs_[j + 1] then
      return error({err = 'WRONGTYPE key ' .. pairs_[j] .. ' holds a ' .. tostring(got) ..
        ', but ferrymq keeps a ' .. pairs_[j + 1] .. ' there'})
    end
  end
end

-- Append a header to the length-prefixed `h` field ("<len>:<name><len>:<value>...").
local function add_header(fields, name, value)
  local entry = #name .. ':' .. name .. #value .. ':' .. value
  for j = 1, #fields, 2 do
    if fields[j] == 'h' then
      fields[j + 1] = fields[j + 1] .. entry
      return
    end
  end
  fields[#fields + 1] = 'h'
  fields[#fields + 1] = entry
end

-- The fields of a message leaving its stream entry (nack, dead-letter): keep its
-- stable id `i` and enqueue time `t` (taking them from the entry id when missing)
-- and carry the attempts so far in `a`. Returns fields, attempts, stable id.
local function carry_fields(fields, lvl, stream_id, deliveries)
  local out = {}
  local prior, stable, has_t = 0, nil, false
  for j = 1, #fields, 2 do
    local f = fields[j]
    if f == 'a' then
      prior = tonumber(fields[j + 1]) or 0
    else
      out[#out + 1] = f
      out[#out + 1] = fields[j + 1]
      if f == 'i' then stable = fields[j + 1] elseif f == 't' then has_t = true end
    end
  end
  if not stable then
    stable = stream_id
    if lvl > 0 then stable = stream_id .. '@' .. lvl end
    out[#out + 1] = 'i'
    out[#out + 1] = stable
  end
  if not has_t then
    out[#out + 1] = 't'
    out[#out + 1] = string.match(stream_id, '^(%d+)')
  end
  local attempts = prior + deliveries
  out[#out + 1] = 'a'
  out[#out + 1] = tostring(attempts)
  return out, attempts, stable
end

local function prior_attempts(fields)
  for j = 1, #fields, 2 do
    if fields[j] == 'a' then return tonumber(fields[j + 1]) or 0 end
  end
  return 0
end

-- The dead-letter headers on a message's fields (no write).
local function dead_fields(fields, reason, queue, stable, attempts)
  add_header(fields, 'ferrymq-failure-reason', reason)
  add_header(fields, 'ferrymq-origin-queue', queue)
  add_header(fields, 'ferrymq-attempts', tostring(attempts))
  add_header(fields, 'ferrymq-origin-message-id', stable)
  return fields
end

-- Append to the dead-letter stream, trimmed by length (approximately) and by age.
-- Returns how many older dead letters the trim deleted, so the caller can say so.
-- A retention reaching back before the epoch trims by length only (an MINID below
-- zero is not a stream id).
local function write_dead(dead_key, fields, maxlen, retention, now)
  local before = redis.call('XLEN', dead_key)
  redis.call('XADD', dead_key, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  local trimmed = before + 1 - redis.call('XLEN', dead_key)
  local minid = now - retention
  if retention > 0 and minid > 0 then
    trimmed = trimmed + redis.call('XTRIM', dead_key, 'MINID', '~', string.format('%d', minid))
  end
  return trimmed
end

-- An entry is leaving the group (acked, nacked, dead-lettered, purged): drop its
-- revoked marker `tag`, and the per-delivery tokens `tag/1` .. `tag/upto` an older
-- version of these scripts kept — in chunks of 500, since `unpack` of a longer
-- list fails and a message can be redelivered any number of times.
local function forget_revoked(key, tag, upto)
  redis.call('SREM', key, tag)
  local c = 1
  while c <= upto do
    local t = {}
    local last = math.min(c + 499, upto)
    for j = c, last do t[#t + 1] = tag .. '/' .. j end
    redis.call('SREM', key, unpack(t))
    c = last + 1
  end
end

local function in_lease(key, group, id, deliveries)
  local p = redis.call('XPENDING', key, group, id, id, 1)
  if p[1] and tonumber(p[1][4]) == deliveries then return p[1] end
  return nil
end

-- A decoded delayed message: {level, field, value, ...} of strings and numbers.
local function valid_job(f)
  if type(f) ~= 'table' or #f < 3 or #f > 201 or (#f - 1) % 2 ~= 0 then return false end
  if not tonumber(f[1]) then return false end
  for j = 2, #f do
    local t = type(f[j])
    if t ~= 'string' and t ~= 'number' then return false end
  end
  return true
end
"#;

/// Enqueue one message that needs more than a plain `XADD`: a dedup id (claimed with
/// the message, atomically) and/or a delay (parked in the delayed ZSET).
///
/// KEYS: ready stream of the message's level, delayed, jobs, seq, [dedup key]
/// ARGV: dedup window ms, delay ms, level, id suffix, field/value pairs...
/// Returns {duplicate 0/1, message id}.
const ENQUEUE: &str = r#"
check_types({KEYS[1], 'stream', KEYS[2], 'zset', KEYS[3], 'hash', KEYS[4], 'string'})
if KEYS[5] then
  local seen = redis.call('GET', KEYS[5])
  if seen then return {1, seen} end
end
local id
local delay = tonumber(ARGV[2])
if delay > 0 then
  local now = now_ms()
  local f = {ARGV[3]}
  for j = 5, #ARGV do f[#f + 1] = ARGV[j] end
  id = string.format('d%d-%012d', now, redis.call('INCR', KEYS[4]))
  f[#f + 1] = 'i'
  f[#f + 1] = id
  f[#f + 1] = 't'
  f[#f + 1] = string.format('%d', now)
  redis.call('HSET', KEYS[3], id, cmsgpack.pack(f))
  redis.call('ZADD', KEYS[2], now + delay, id)
else
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5)) .. ARGV[4]
end
if KEYS[5] then redis.call('SET', KEYS[5], id, 'PX', ARGV[1]) end
return {0, id}
"#;

/// Maintenance run before each read: promote due delayed messages and, when asked,
/// reclaim leases past the visibility timeout (`XPENDING … IDLE` to look, `XCLAIM`
/// to take — `XCLAIM` increments the delivery counter, giving attempt + 1) and prune
/// consumers that hold nothing and were idle for long. A reclaimed entry is marked
/// revoked (`level/id` in the revoked set: one member per entry, however often it
/// is reclaimed) so that acks of it check the lease. New entries are read by the
/// caller with a plain `XREADGROUP` pipelined right after this script: reading inside
/// Lua would copy every entry through Lua tables, which costs more than the read.
///
/// Promotion removes each message from the delayed set in the same step that adds it
/// to its stream, and a value that does not decode (not written by ferrymq) goes to
/// the dead-letter stream with a reason — never left to fail every receive.
///
/// KEYS: delayed, jobs, leases, dead, revoked, ready streams (level 0 first)
/// ARGV: group, consumer, max, visibility ms, reclaim 0/1, promote limit,
///       max deliveries (0 = off), dead maxlen, dead retention ms, queue name,
///       prune consumers idle longer than this many ms (0 = do not prune)
/// Returns {ms until the next delayed message is due or -1, dead letters trimmed,
/// consumers pruned, then level, stream id, deliveries, fields for each reclaimed
/// delivery}.
const MAINTAIN: &str = r#"
local group, consumer = ARGV[1], ARGV[2]
local maxn = tonumber(ARGV[3])
local vis = tonumber(ARGV[4])
local maxdel = tonumber(ARGV[7])
local maxlen, retention, queue = ARGV[8], tonumber(ARGV[9]), ARGV[10]
local prune = tonumber(ARGV[11]) or 0
local nlevels = #KEYS - 5
local types = {KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'hash', KEYS[4], 'stream', KEYS[5], 'set'}
for lvl = 0, nlevels - 1 do
  types[#types + 1] = KEYS[6 + lvl]
  types[#types + 1] = 'stream'
end
local now = now_ms()
local trimmed, pruned = 0, 0

-- A read of a foreign key fails by itself, before any write; the type check is
-- for the writes, so it runs only when this call will write (something is due,
-- a reclaim or prune pass): a busy queue's frequent calls with nothing due
-- cost no TYPE round of every key.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))
if #due > 0 or ARGV[5] == '1' or prune > 0 then check_types(types) end
for _, id in ipairs(due) do
  local packed = redis.call('HGET', KEYS[2], id)
  if packed then
    local ok, f = pcall(cmsgpack.unpack, packed)
    if ok and valid_job(f) then
      local lvl = tonumber(f[1]) or 0
      if lvl >= nlevels then lvl = nlevels - 1 end
      if lvl < 0 then lvl = 0 end
      redis.call('XADD', KEYS[6 + lvl], '*', unpack(f, 2))
    else
      local fields = dead_fields({'p', packed, 'i', id}, 'undecodable delayed message (not written by ferrymq?); moved aside at promotion', queue, id, 0)
      trimmed = trimmed + write_dead(KEYS[4], fields, maxlen, retention, now)
    end
  end
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end

local out = {-1, 0, 0}
local n = 0
if ARGV[5] == '1' then
  for lvl = nlevels - 1, 0, -1 do
    if n >= maxn then break end
    local key = KEYS[6 + lvl]
    local pend = redis.call('XPENDING', key, group, 'IDLE', vis, '-', '+', maxn - n)
    for _, p in ipairs(pend) do
      local id, owner, count = p[1], p[2], tonumber(p[4])
      local tag = lvl .. '/' .. id
      local lease = tonumber(redis.call('HGET', KEYS[3], tag))
      if lease and lease > now then
        -- Extended past the visibility timeout: due again only at its deadline.
        local idle = 0
        if lease - now <= vis then
          idle = vis - (lease - now)
          redis.call('HDEL', KEYS[3], tag)
        end
        redis.call('XCLAIM', key, group, owner, 0, id, 'IDLE', idle, 'JUSTID')
      else
        if lease then redis.call('HDEL', KEYS[3], tag) end
        local claimed = redis.call('XCLAIM', key, group, consumer, vis, id)
        local e = claimed[1]
        if type(e) ~= 'table' or type(e[2]) ~= 'table' then
          redis.call('XACK', key, group, id)
          forget_revoked(KEYS[5], tag, count)
        elseif maxdel > 0 and prior_attempts(e[2]) + count + 1 > maxdel then
          local fields, attempts, stable = carry_fields(e[2], lvl, id, count)
          fields = dead_fields(fields,
            'not acked within the visibility timeout ' .. attempts .. ' times (max_deliveries ' .. maxdel .. ')',
            queue, stable, attempts)
          trimmed = trimmed + write_dead(KEYS[4], fields, maxlen, retention, now)
          redis.call('XACK', key, group, id)
          redis.call('XDEL', key, id)
          forget_revoked(KEYS[5], tag, count)
        else
          redis.call('SADD', KEYS[5], tag)
          out[#out + 1] = lvl
          out[#out + 1] = id
          out[#out + 1] = count + 1
          out[#out + 1] = e[2]
          n = n + 1
        end
      end
    end
  end
end

if prune > 0 then
  -- A consumer holding nothing can go at any time (a live one is recreated by its
  -- next read); one holding entries never does — that would drop its leases.
  for lvl = 0, nlevels - 1 do
    local key = KEYS[6 + lvl]
    local cs = redis.pcall('XINFO', 'CONSUMERS', key, group)
    if type(cs) == 'table' and not cs.err then
      for _, c in ipairs(cs) do
        local name, pending, idle
        for j = 1, #c, 2 do
          if c[j] == 'name' then name = c[j + 1]
          elseif c[j] == 'pending' then pending = tonumber(c[j + 1])
          elseif c[j] == 'idle' then idle = tonumber(c[j + 1]) end
        end
        if name and name ~= consumer and pending == 0 and idle and idle > prune then
          redis.call('XGROUP', 'DELCONSUMER', key, group, name)
          pruned = pruned + 1
        end
      end
    end
  end
end

local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then
  local wait = tonumber(first[2]) - now
  if wait < 0 then wait = 0 end
  out[1] = wait
end
out[2] = trimmed
out[3] = pruned
return out
"#;

/// Acknowledge a batch: `XACK` + `XDEL` per level for the whole batch.
///
/// Fast path (no entry was ever reclaimed while held and no lease extended past
/// the visibility timeout, every entry still pending): the ids go from `ARGV` to
/// `XACK` and `XDEL` without a per-id step, and the reply is the count. Otherwise
/// the rest goes entry by entry. Where reclaims happened (the revoked set exists),
/// each entry's lease is checked (`XPENDING` of that id: still pending with the
/// delivery counter of this handle), so a stale handle gets `LeaseExpired` and
/// never acks the redelivery. Without reclaims no stale handle can exist, and
/// `XACK`/`XDEL` themselves tell which entries were settled elsewhere already. An
/// entry of a fast-path chunk that `XACK` took but whose `XDEL` had not run yet is
/// recognised by being still in the stream.
///
/// KEYS: leases, revoked, ready streams (level 0 first)
/// ARGV: group, n, the n delivery counters in one argument (decimal, each followed
/// by a comma), then per level: level, k, k stream ids (ids in the same order as the
/// counters). The counters are one argument because only the slow path reads them:
/// each argument costs the server ~0.1 µs to hand to Lua, as much as an `XACK`'s
/// work per id.
/// Returns n when all were acked, else 1 (acked) or 0 (lease gone) per entry.
const ACK: &str = r#"
local group = ARGV[1]
local n = tonumber(ARGV[2])
local segs = {}
local i, idx = 4, 0
while i <= #ARGV do
  local k = tonumber(ARGV[i + 1])
  segs[#segs + 1] = {tonumber(ARGV[i]), i + 2, idx, k}
  idx = idx + k
  i = i + 2 + k
end

-- Types are checked only where a foreign key could fail a write after another
-- write: a missing leases/revoked key is never foreign, and a batch of one level
-- writes first to that stream, whose XACK fails by itself (nothing written yet)
-- on a foreign key. The common batch (one level, no reclaims) checks nothing.
local has_leases, has_revoked = false, false
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  has_leases = redis.call('EXISTS', KEYS[1]) == 1
  has_revoked = redis.call('EXISTS', KEYS[2]) == 1
end
if has_leases or has_revoked or #segs > 1 then
  local types = {KEYS[1], 'hash', KEYS[2], 'set'}
  for j = 3, #KEYS do
    types[#types + 1] = KEYS[j]
    types[#types + 1] = 'stream'
  end
  check_types(types)
end

-- done_upto[si]: ARGV index up to which segment si was acked and deleted;
-- broken: {si, from, to} of a chunk XACKed but not XDELeted.
local done_upto = {}
local broken = nil
if not has_leases and not has_revoked then
  local all = true
  for si, seg in ipairs(segs) do
    local key, s, k = KEYS[3 + seg[1]], seg[2], seg[4]
    done_upto[si] = s - 1
    for c = s, s + k - 1, 1000 do
      local e = math.min(c + 999, s + k - 1)
      if redis.call('XACK', key, group, unpack(ARGV, c, e)) ~= e - c + 1 then
        all = false
        broken = {si, c, e}
        break
      end
      redis.call('XDEL', key, unpack(ARGV, c, e))
      done_upto[si] = e
    end
    if not all then break end
  end
  if all then return n end
end

-- Slow path, entry by entry (entries the fast path finished count as acked).
local counts = {}
for c in string.gmatch(ARGV[3], '(%d+),') do counts[#counts + 1] = tonumber(c) end
local res = {}
for si, seg in ipairs(segs) do
  local lvl, key = seg[1], KEYS[3 + seg[1]]
  for j = 0, seg[4] - 1 do
    local at = seg[3] + j + 1
    local argi = seg[2] + j
    local id = ARGV[argi]
    local count = counts[at]
    if done_upto[si] and argi <= done_upto[si] then
      res[at] = 1
    elseif broken and broken[1] == si and argi >= broken[2] and argi <= broken[3] then
      -- XACKed by the fast path: still in the stream means it was ours.
      res[at] = redis.call('XDEL', key, id)
    elseif has_revoked and not in_lease(key, group, id, count) then
      res[at] = 0
    else
      local acked = redis.call('XACK', key, group, id)
      local deleted = redis.call('XDEL', key, id)
      if acked == 1 or deleted == 1 then res[at] = 1 else res[at] = 0 end
      if res[at] == 1 then
        local tag = lvl .. '/' .. id
        if has_leases then redis.call('HDEL', KEYS[1], tag) end
        if has_revoked then forget_revoked(KEYS[2], tag, count - 1) end
      end
    end
  end
end
return res
"#;

/// Negative-acknowledge: re-enqueue the message with its attempts carried, now
/// (stream tail) or after a delay (delayed ZSET), or dead-letter it when max
/// deliveries is reached — then remove the old entry. The new home is written
/// before the old one is removed, after every key was type-checked.
///
/// KEYS: delayed, jobs, leases, dead, revoked, ready stream of the message's level
/// ARGV: group, level, stream id, deliveries, delay ms, max deliveries, dead maxlen,
///       dead retention ms, queue name, release 0/1
///
/// A release (`1`) gives the message back without counting this delivery: the new
/// entry carries one delivery less than a nack's would, and it is never
/// dead-lettered (no attempt was spent).
/// Returns {0 (lease gone) | 1 (re-enqueued) | 2 (dead-lettered), dead letters
/// trimmed}.
const NACK: &str = r#"
local key, group, lvl, id = KEYS[6], ARGV[1], tonumber(ARGV[2]), ARGV[3]
check_types({KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'hash', KEYS[4], 'stream', KEYS[5], 'set', key, 'stream'})
local count = tonumber(ARGV[4])
if not in_lease(key, group, id, count) then return {0, 0} end
local tag = lvl .. '/' .. id
local e = redis.call('XRANGE', key, id, id)
if not e[1] then
  -- Pending but deleted from the stream (by hand): nothing left to re-enqueue.
  redis.call('XACK', key, group, id)
  redis.call('HDEL', KEYS[3], tag)
  forget_revoked(KEYS[5], tag, count - 1)
  return {0, 0}
end
local release = ARGV[10] == '1'
local counted = count
if release then counted = count - 1 end
local fields, attempts, stable = carry_fields(e[1][2], lvl, id, counted)
local maxdel = tonumber(ARGV[6])
local delay = tonumber(ARGV[5])
local now = now_ms()
local code, trimmed = 1, 0
if not release and maxdel > 0 and attempts >= maxdel then
  fields = dead_fields(fields,
    'nacked after ' .. attempts .. ' deliveries (max_deliveries ' .. maxdel .. ')',
    ARGV[9], stable, attempts)
  trimmed = write_dead(KEYS[4], fields, ARGV[7], tonumber(ARGV[8]), now)
  code = 2
elseif delay > 0 then
  local job = {tostring(lvl)}
  for j = 1, #fields do job[#job + 1] = fields[j] end
  redis.call('HSET', KEYS[2], stable, cmsgpack.pack(job))
  redis.call('ZADD', KEYS[1], now + delay, stable)
else
  redis.call('XADD', key, '*', unpack(fields))
end
redis.call('XACK', key, group, id)
redis.call('XDEL', key, id)
redis.call('HDEL', KEYS[3], tag)
forget_revoked(KEYS[5], tag, count - 1)
return {code, trimmed}
"#;

/// Extend a lease: reset the entry's idle clock with `XCLAIM … IDLE … JUSTID` to its
/// current owner. `JUSTID` is the form that does not increment the delivery counter,
/// so the attempt number is unchanged. Deadlines past the visibility timeout are kept
/// in the leases hash and honoured by the reclaim step of MAINTAIN.
///
/// KEYS: leases, ready stream of the message's level
/// ARGV: group, level, stream id, deliveries, by ms, visibility ms
/// Returns 1, or 0 when the lease is gone.
const EXTEND: &str = r#"
check_types({KEYS[1], 'hash', KEYS[2], 'stream'})
local p = in_lease(KEYS[2], ARGV[1], ARGV[3], tonumber(ARGV[4]))
if not p then return 0 end
local by, vis = tonumber(ARGV[5]), tonumber(ARGV[6])
local tag = ARGV[2] .. '/' .. ARGV[3]
local idle = 0
if by > vis then
  redis.call('HSET', KEYS[1], tag, now_ms() + by)
else
  idle = vis - by
  redis.call('HDEL', KEYS[1], tag)
end
redis.call('XCLAIM', KEYS[2], ARGV[1], p[2], 0, ARGV[3], 'IDLE', idle, 'JUSTID')
return 1
"#;

/// Depth counts in one step. A pending entry whose lease has run out counts as
/// waiting (the next receive reclaims it), unless its lease was extended past the
/// visibility timeout. Expired leases are counted up to 10 000 per level.
///
/// KEYS: delayed, dead, leases, ready streams; ARGV: group, visibility ms
/// Returns {waiting, in flight, delayed, dead-lettered}.
const DEPTH: &str = r#"
local len, pending, expired = 0, 0, 0
local now = now_ms()
local has_leases = redis.call('EXISTS', KEYS[3]) == 1
for i = 4, #KEYS do
  len = len + redis.call('XLEN', KEYS[i])
  local s = redis.pcall('XPENDING', KEYS[i], ARGV[1])
  if type(s) == 'table' and s[1] and tonumber(s[1]) > 0 then
    pending = pending + tonumber(s[1])
    local idle = redis.call('XPENDING', KEYS[i], ARGV[1], 'IDLE', ARGV[2], '-', '+', 10000)
    for _, p in ipairs(idle) do
      local lease = has_leases and tonumber(redis.call('HGET', KEYS[3], (i - 4) .. '/' .. p[1]))
      if not lease or lease <= now then expired = expired + 1 end
    end
  end
end
local waiting = len - pending + expired
if waiting < 0 then waiting = 0 end
return {waiting, pending - expired, redis.call('ZCARD', KEYS[1]), redis.call('XLEN', KEYS[2])}
"#;

/// Forget a consumer of the group, only when it holds no pending entry (deleting a
/// consumer drops its pending entries, which would lose them).
///
/// KEYS: ready streams; ARGV: group, consumer. Returns 1 when removed.
const RELEASE: &str = r#"
for i = 1, #KEYS do
  local p = redis.pcall('XPENDING', KEYS[i], ARGV[1], '-', '+', 1, ARGV[2])
  if type(p) == 'table' and p[1] then return 0 end
end
for i = 1, #KEYS do
  redis.pcall('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], ARGV[2])
end
return 1
"#;

/// Move up to N of the oldest dead letters, none newer than a given id (the last
/// entry when the redrive started), back to their ready stream, with the attempt
/// count reset.
///
/// KEYS: dead, ready streams; ARGV: count, last id. Returns how many moved.
const REDRIVE: &str = r#"
local nlevels = #KEYS - 1
local types = {}
for j = 1, #KEYS do
  types[#types + 1] = KEYS[j]
  types[#types + 1] = 'stream'
end
check_types(types)
local entries = redis.call('XRANGE', KEYS[1], '-', ARGV[2], 'COUNT', tonumber(ARGV[1]))
for _, e in ipairs(entries) do
  local out = {}
  local lvl = 0
  local fields = e[2]
  for j = 1, #fields, 2 do
    local f = fields[j]
    if f ~= 'a' then
      out[#out + 1] = f
      out[#out + 1] = fields[j + 1]
      if f == 'r' then lvl = tonumber(fields[j + 1]) or 0 end
    end
  end
  if lvl < 0 then lvl = 0 end
  if lvl >= nlevels then lvl = nlevels - 1 end
  redis.call('XADD', KEYS[2 + lvl], '*', unpack(out))
  redis.call('XDEL', KEYS[1], e[1])
end
return #entries
"#;

/// The last id the group delivered on a stream (`0-0` when it delivered nothing, nil
/// when the stream or the group does not exist): entries after it are waiting.
const LAST_DELIVERED: &str = r#"
local function last_delivered(key, group)
  if redis.call('EXISTS', key) == 0 then return nil end
  local groups = redis.call('XINFO', 'GROUPS', key)
  for _, g in ipairs(groups) do
    local name, last
    for j = 1, #g, 2 do
      if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
    end
    if name == group then return last end
  end
  return nil
end
"#;

/// Up to `max` waiting entries (never delivered to the group), highest level first,
/// stream order within a level. Reads only: no lease, no delivery counted.
///
/// KEYS: ready streams (level 0 first); ARGV: group, max.
/// Returns {level, stream id, fields, ...}.
const PEEK: &str = r#"
local group, maxn = ARGV[1], tonumber(ARGV[2])
local out = {}
local n = 0
for lvl = #KEYS - 1, 0, -1 do
  if n >= maxn then break end
  local key = KEYS[lvl + 1]
  if redis.call('EXISTS', key) == 1 then
    local last = last_delivered(key, group)
    local start = '-'
    if last then start = '(' .. last end
    local entries = redis.call('XRANGE', key, start, '+', 'COUNT', maxn - n)
    for _, e in ipairs(entries) do
      out[#out + 1] = lvl
      out[#out + 1] = e[1]
      out[#out + 1] = e[2]
      n = n + 1
    end
  end
end
return out
"#;

/// Remove up to `limit` messages that are not in flight: delayed ones, waiting ones
/// (never delivered), and pending ones whose lease ran out (not extended). Their
/// stale handles then get `LeaseExpired` (the entry is no longer pending).
///
/// KEYS: delayed, jobs, leases, revoked, ready streams; ARGV: group, visibility ms,
/// limit. Returns how many went (less than `limit`: nothing more to purge).
const PURGE: &str = r#"
local group, vis, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local types = {KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'hash', KEYS[4], 'set'}
for j = 5, #KEYS do
  types[#types + 1] = KEYS[j]
  types[#types + 1] = 'stream'
end
check_types(types)
local now = now_ms()
local n = 0
local ids = redis.call('ZRANGE', KEYS[1], 0, limit - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  n = n + 1
end
for lvl = 0, #KEYS - 5 do
  if n >= limit then break end
  local key = KEYS[5 + lvl]
  if redis.call('EXISTS', key) == 1 then
    local last = last_delivered(key, group)
    local start = '-'
    if last then start = '(' .. last end
    local entries = redis.call('XRANGE', key, start, '+', 'COUNT', limit - n)
    for _, e in ipairs(entries) do
      redis.call('XDEL', key, e[1])
      n = n + 1
    end
    if last and n < limit then
      local pend = redis.call('XPENDING', key, group, 'IDLE', vis, '-', '+', limit - n)
      for _, p in ipairs(pend) do
        local id, count = p[1], tonumber(p[4])
        local tag = lvl .. '/' .. id
        local lease = tonumber(redis.call('HGET', KEYS[3], tag))
        if not lease or lease <= now then
          redis.call('XACK', key, group, id)
          redis.call('XDEL', key, id)
          redis.call('HDEL', KEYS[3], tag)
          forget_revoked(KEYS[4], tag, count)
          n = n + 1
        end
      end
    end
  end
end
return n
"#;

/// Helpers of ordered queues (per-key order) and of the scripted receive.
///
/// An ordered queue keeps its messages in its one stream, as any queue. What is
/// added is a gate: each key has at most one *head* — its oldest unsettled message,
/// recorded in the locks hash — and only a head is ever handed out. Entries read
/// from the stream while their key's head is unsettled are *held*: they stay
/// pending in the group, owned by the `~held` consumer (nobody's lease: the reclaim
/// skips it), and are listed in the held zset in stream order per key. When a head
/// leaves (ack, dead letter, purge), the key's next held entry becomes its head
/// and is queued in the unblocked list for the next receive. A nacked head stays
/// the head: it is parked with `~held` and queued again (at once, or from the
/// parked zset when its delay is due), so nothing of its key overtakes it.
const ORDERED_HELPERS: &str = r#"
local HELD = '~held'

-- A field of the locks hash that no message key can be (a lone 0xFF byte is not
-- UTF-8), with a value longer than `hash-max-listpack-value` (64 by default): it
-- keeps the hash in Redis's hashtable encoding whatever its size. A small hash is
-- otherwise a listpack, where every lookup is a scan of the whole hash — with a
-- few hundred keys in flight, most of an ordered receive's and ack's time.
local LOCKS_PIN = '\255'
local LOCKS_PIN_VALUE = string.rep('-', 256)

-- The `k` field (message key) of an entry's fields, or nil.
local function key_of(fields)
  for j = 1, #fields, 2 do
    if fields[j] == 'k' then return fields[j + 1] end
  end
  return nil
end

local function pad(s, n) return string.rep('0', n - #s) .. s end
local function unpad(s) return (string.gsub(s, '^0+(%d)', '%1')) end

-- Members of the held zset: the key, length-prefixed (so no key's members are a
-- prefix range of another's), then the stream id padded so that lexicographic
-- order is stream order.
local function held_prefix(key) return #key .. ':' .. key end
local function held_member(key, id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return held_prefix(key) .. pad(ms, 20) .. '-' .. pad(seq, 20)
end
local function held_id(member, prefix)
  local ms, seq = string.match(string.sub(member, #prefix + 1), '^(%d+)-(%d+)$')
  return unpad(ms) .. '-' .. unpad(seq)
end
-- The prefix of a held member read back (purge).
local function member_prefix(member)
  local len = string.match(member, '^(%d+):')
  return string.sub(member, 1, #len + 1 + tonumber(len))
end

-- Members of the unblocked list and the parked zset: `stream-id|deliveries|key`
-- (no key: `stream-id|deliveries`; ids and counts have no `|`). `deliveries` is
-- what the entry was parked with: its hand-out (an XCLAIM) makes it one more.
local function head_member(id, deliveries, key)
  local m = id .. '|' .. deliveries
  if key then m = m .. '|' .. key end
  return m
end
local function split_member(m)
  local a = string.find(m, '|', 1, true)
  if not a then return m, 0, nil end
  local id = string.sub(m, 1, a - 1)
  local b = string.find(m, '|', a + 1, true)
  if not b then return id, tonumber(string.sub(m, a + 1)) or 0, nil end
  return id, tonumber(string.sub(m, a + 1, b - 1)) or 0, string.sub(m, b + 1)
end

-- redis.call(before..., items..., after...), in chunks of 500 items (unpack of
-- long lists fails). Returns the sum of the integer replies.
local function chunked(before, items, after)
  local c, total = 1, 0
  while c <= #items do
    local last = math.min(c + 499, #items)
    local args = {}
    for _, a in ipairs(before) do args[#args + 1] = a end
    for j = c, last do args[#args + 1] = items[j] end
    for _, a in ipairs(after) do args[#args + 1] = a end
    local r = redis.call(unpack(args))
    if type(r) == 'number' then total = total + r end
    c = last + 1
  end
  return total
end

-- Park a pending entry with `~held`: nobody's lease, and its next hand-out
-- (an XCLAIM, which adds one) counts from `deliveries`.
local function park(ready, group, id, deliveries)
  redis.call('XCLAIM', ready, group, HELD, 0, id, 'IDLE', 0, 'RETRYCOUNT', deliveries, 'JUSTID')
end

-- A locks value: `<head stream id>:<entries held behind it>` (the count spares
-- the held zset a lookup when a key has nothing waiting — the common case).
local function lock_parts(v)
  -- Stream ids have no ':', so the first one is the separator (a plain find: a
  -- pattern costs more, and this runs per ack).
  local c = string.find(v, ':', 1, true)
  if not c then return v, 1 end
  local n = tonumber(string.sub(v, c + 1))
  if not n then return v, 1 end
  return string.sub(v, 1, c - 1), n
end

-- HMGET of `fields` (in chunks of 500): the values in order, false for none.
local function hmget(key, fields)
  local out = {}
  local c = 1
  while c <= #fields do
    local last = math.min(c + 499, #fields)
    local vs = redis.call('HMGET', key, unpack(fields, c, last))
    for j = 1, #vs do out[#out + 1] = vs[j] end
    c = last + 1
  end
  return out
end

-- `n` more entries of `key` are held behind its head.
local function add_held(locks, key, n)
  local v = redis.call('HGET', locks, key)
  if v then
    local id, m = lock_parts(v)
    redis.call('HSET', locks, key, id .. ':' .. (m + n))
  end
end

-- Hold an entry read while its key's head is unsettled.
local function hold(ready, group, held, locks, key, id, deliveries)
  park(ready, group, id, deliveries)
  redis.call('ZADD', held, 0, held_member(key, id))
  add_held(locks, key, 1)
end

-- The head `id` of `key` left the queue: the key's next held entry becomes its
-- head and is queued for hand-out; without one the key is free.
local function advance(locks, held, unblocked, key, id)
  if not key then return false end
  local v = redis.call('HGET', locks, key)
  if not v then return false end
  local head, n = lock_parts(v)
  if head ~= id then return false end
  if n > 0 then
    local prefix = held_prefix(key)
    local nxt = redis.call('ZRANGE', held, '[' .. prefix, '[' .. prefix .. '\255', 'BYLEX', 'LIMIT', 0, 1)
    if nxt[1] then
      redis.call('ZREM', held, nxt[1])
      local nid = held_id(nxt[1], prefix)
      redis.call('HSET', locks, key, nid .. ':' .. (n - 1))
      redis.call('RPUSH', unblocked, head_member(nid, 0, key))
      return true
    end
  end
  redis.call('HDEL', locks, key)
  return false
end

-- Wake consumers waiting in `XREAD BLOCK` (they wait on the wake stream too):
-- a head was queued for hand-out.
local function wake(stream)
  redis.call('XADD', stream, 'MAXLEN', 1, '*', 'w', '1')
end

-- Whether an entry of `key` may be handed out now: it is the key's head, or the
-- key has none (then it becomes the head).
local function gate(locks, key, id)
  if not key then return true end
  local cur = redis.call('HGET', locks, key)
  if not cur then
    redis.call('HSET', locks, key, id .. ':0')
    return true
  end
  return lock_parts(cur) == id
end
"#;

/// The receive of ordered or rate-limited queues, in one script: promote due
/// delayed messages, queue due parked heads, reclaim expired leases (when asked),
/// then hand out unblocked heads and read new entries with `XREADGROUP` — through
/// the per-key gate when the queue is ordered, and no more than the rate limit
/// allows when it has one. Reading inside Lua copies each entry through Lua
/// tables (the plain receive avoids that), which is the price of deciding per
/// entry, atomically, whether it may go out.
///
/// Read-ahead: once entries of busy keys were met, the read stops — each entry
/// read behind a busy key costs a hold and a hand-out, while left unread it is
/// read directly once its key is free.
///
/// Rate limit: a sliding window of one zset member per delivery (score: its time):
/// at most `jobs` deliveries in any window of `period`, across every consumer.
///
/// KEYS: delayed, jobs, leases, dead, revoked, locks, held, unblocked, parked,
///       limiter, seq, wake, ready streams (level 0 first)
/// ARGV: group, consumer, max, visibility ms, reclaim 0/1, promote limit,
///       max deliveries, dead maxlen, dead retention ms, queue name, prune ms,
///       ordered 0/1, limit jobs (0 = none), limit period ms, read budget
/// Returns {ms until something is due or -1, dead letters trimmed, consumers
/// pruned, {last delivered id per level, highest first, then (ordered) the wake
/// stream's last id — only when nothing was handed out and a blocking wait on
/// new entries is the right wait; a level's id is empty when what is unread there
/// waits behind busy keys, so only the wake stream is worth waiting on}, then level,
/// stream id, deliveries, fields per delivery}.
const RECEIVE: &str = r#"
local group, consumer = ARGV[1], ARGV[2]
local maxn = tonumber(ARGV[3])
local vis = tonumber(ARGV[4])
local maxdel = tonumber(ARGV[7])
local maxlen, retention, queue = ARGV[8], tonumber(ARGV[9]), ARGV[10]
local prune = tonumber(ARGV[11]) or 0
local ordered = ARGV[12] == '1'
local limit_n, limit_per = tonumber(ARGV[13]), tonumber(ARGV[14])
local budget = tonumber(ARGV[15])
local K_DELAYED, K_JOBS, K_LEASES, K_DEAD, K_REVOKED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local K_LOCKS, K_HELD, K_UNBLOCKED, K_PARKED = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_LIMITER, K_SEQ, K_WAKE = KEYS[10], KEYS[11], KEYS[12]
local nlevels = #KEYS - 12
local function ready(lvl) return KEYS[13 + lvl] end
local types = {K_DELAYED, 'zset', K_JOBS, 'hash', K_LEASES, 'hash', K_DEAD, 'stream', K_REVOKED, 'set',
  K_LOCKS, 'hash', K_HELD, 'zset', K_UNBLOCKED, 'list', K_PARKED, 'zset', K_LIMITER, 'zset', K_SEQ, 'string',
  K_WAKE, 'stream'}
for lvl = 0, nlevels - 1 do
  types[#types + 1] = ready(lvl)
  types[#types + 1] = 'stream'
end
check_types(types)
-- The group must exist on every level (FLUSHDB, a stream deleted by hand): the
-- caller creates it again on NOGROUP. Checked before the first write.
local last_ids = {}
for lvl = nlevels - 1, 0, -1 do
  local last = last_delivered(ready(lvl), group)
  if not last then
    return redis.error_reply('NOGROUP no consumer group ' .. group .. ' on ' .. ready(lvl))
  end
  last_ids[#last_ids + 1] = last
end
local now = now_ms()
local trimmed, pruned = 0, 0

local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))
for _, id in ipairs(due) do
  local packed = redis.call('HGET', K_JOBS, id)
  if packed then
    local ok, f = pcall(cmsgpack.unpack, packed)
    if ok and valid_job(f) then
      local lvl = tonumber(f[1]) or 0
      if lvl >= nlevels then lvl = nlevels - 1 end
      if lvl < 0 then lvl = 0 end
      redis.call('XADD', ready(lvl), '*', unpack(f, 2))
    else
      local fields = dead_fields({'p', packed, 'i', id}, 'undecodable delayed message (not written by ferrymq?); moved aside at promotion', queue, id, 0)
      trimmed = trimmed + write_dead(K_DEAD, fields, maxlen, retention, now)
    end
  end
  redis.call('ZREM', K_DELAYED, id)
  redis.call('HDEL', K_JOBS, id)
end
if ordered then
  local back = redis.call('ZRANGEBYSCORE', K_PARKED, '-inf', now, 'LIMIT', 0, tonumber(ARGV[6]))
  for _, m in ipairs(back) do
    redis.call('LPUSH', K_UNBLOCKED, m)
    redis.call('ZREM', K_PARKED, m)
  end
end

local out = {-1, 0, 0, {}}
local n = 0
local limited_for = nil
if limit_n > 0 then
  redis.call('ZREMRANGEBYSCORE', K_LIMITER, '-inf', now - limit_per)
  local allow = limit_n - redis.call('ZCARD', K_LIMITER)
  if allow < maxn then
    if allow < 0 then allow = 0 end
    maxn = allow
  end
  if maxn == 0 then
    local oldest = redis.call('ZRANGE', K_LIMITER, 0, 0, 'WITHSCORES')
    limited_for = 1
    if oldest[2] then limited_for = math.max(1, tonumber(oldest[2]) + limit_per - now) end
  end
end

local function deliver(lvl, id, count, fields)
  out[#out + 1] = lvl
  out[#out + 1] = id
  out[#out + 1] = count
  out[#out + 1] = fields
  n = n + 1
end

if maxn > 0 and ARGV[5] == '1' then
  -- Expired leases, oldest first: gathered consumer by consumer (so the held
  -- entries' `~held` is skipped however many there are), then in stream order.
  for lvl = nlevels - 1, 0, -1 do
    if n >= maxn then break end
    local key = ready(lvl)
    local cs = redis.pcall('XINFO', 'CONSUMERS', key, group)
    if type(cs) == 'table' and not cs.err then
      local pend = {}
      for _, c in ipairs(cs) do
        local name, pending
        for j = 1, #c, 2 do
          if c[j] == 'name' then name = c[j + 1] elseif c[j] == 'pending' then pending = tonumber(c[j + 1]) end
        end
        if name and name ~= HELD and pending and pending > 0 then
          for _, p in ipairs(redis.call('XPENDING', key, group, 'IDLE', vis, '-', '+', maxn - n, name)) do
            local ms_, seq_ = string.match(p[1], '^(%d+)-(%d+)$')
            p[5], p[6] = tonumber(ms_) or 0, tonumber(seq_) or 0
            pend[#pend + 1] = p
          end
        end
      end
      table.sort(pend, function(x, y)
        if x[5] ~= y[5] then return x[5] < y[5] end
        return x[6] < y[6]
      end)
      do
          for _, p in ipairs(pend) do
            if n >= maxn then break end
            local id, owner, count = p[1], p[2], tonumber(p[4])
            local tag = lvl .. '/' .. id
            local lease = tonumber(redis.call('HGET', K_LEASES, tag))
            if lease and lease > now then
              local idle = 0
              if lease - now <= vis then
                idle = vis - (lease - now)
                redis.call('HDEL', K_LEASES, tag)
              end
              redis.call('XCLAIM', key, group, owner, 0, id, 'IDLE', idle, 'JUSTID')
            else
              if lease then redis.call('HDEL', K_LEASES, tag) end
              local claimed = redis.call('XCLAIM', key, group, consumer, vis, id)
              local e = claimed[1]
              if type(e) ~= 'table' or type(e[2]) ~= 'table' then
                redis.call('XACK', key, group, id)
                forget_revoked(K_REVOKED, tag, count)
              elseif maxdel > 0 and prior_attempts(e[2]) + count + 1 > maxdel then
                local k = key_of(e[2])
                local fields, attempts, stable = carry_fields(e[2], lvl, id, count)
                fields = dead_fields(fields,
                  'not acked within the visibility timeout ' .. attempts .. ' times (max_deliveries ' .. maxdel .. ')',
                  queue, stable, attempts)
                trimmed = trimmed + write_dead(K_DEAD, fields, maxlen, retention, now)
                redis.call('XACK', key, group, id)
                redis.call('XDEL', key, id)
                forget_revoked(K_REVOKED, tag, count)
                if ordered then advance(K_LOCKS, K_HELD, K_UNBLOCKED, k, id) end
              elseif ordered then
                local k = key_of(e[2])
                if gate(K_LOCKS, k, id) then
                  redis.call('SADD', K_REVOKED, tag)
                  deliver(lvl, id, count + 1, e[2])
                else
                  -- Not its key's head (a queue switched to ordered with entries in
                  -- flight): wait behind the head, counted afresh.
                  hold(key, group, K_HELD, K_LOCKS, k, id, 0)
                end
              else
                redis.call('SADD', K_REVOKED, tag)
                deliver(lvl, id, count + 1, e[2])
              end
            end
          end
      end
    end
  end
end

if prune > 0 then
  for lvl = 0, nlevels - 1 do
    local key = ready(lvl)
    local cs = redis.pcall('XINFO', 'CONSUMERS', key, group)
    if type(cs) == 'table' and not cs.err then
      for _, c in ipairs(cs) do
        local name, pending, idle
        for j = 1, #c, 2 do
          if c[j] == 'name' then name = c[j + 1]
          elseif c[j] == 'pending' then pending = tonumber(c[j + 1])
          elseif c[j] == 'idle' then idle = tonumber(c[j + 1]) end
        end
        if name and name ~= consumer and name ~= HELD and pending == 0 and idle and idle > prune then
          redis.call('XGROUP', 'DELCONSUMER', key, group, name)
          pruned = pruned + 1
        end
      end
    end
  end
end

if ordered then
  -- Heads whose turn came (the entry before them was acked, or they were nacked).
  local key = ready(0)
  while n < maxn do
    local ms = redis.call('LPOP', K_UNBLOCKED, maxn - n)
    if not ms or #ms == 0 then break end
    local ids, info = {}, {}
    for _, m in ipairs(ms) do
      local id, cnt, k = split_member(m)
      ids[#ids + 1] = id
      info[id] = {cnt, k}
    end
    local claimed = redis.call('XCLAIM', key, group, consumer, 0, unpack(ids))
    for _, e in ipairs(claimed) do
      if type(e) == 'table' and type(e[2]) == 'table' and info[e[1]] and not info[e[1]][3] then
        deliver(0, e[1], info[e[1]][1] + 1, e[2])
        info[e[1]][3] = true
      end
    end
    for _, id in ipairs(ids) do
      if not info[id][3] then
        -- Gone (deleted by hand): let its key go on.
        info[id][3] = true
        redis.call('XACK', key, group, id)
        advance(K_LOCKS, K_HELD, K_UNBLOCKED, info[id][2], id)
      end
    end
  end
end

local read, exhausted = 0, true
local holds, held_members, held_keys = {}, {}, {}
local behind_busy = false
for lvl = nlevels - 1, 0, -1 do
  local key = ready(lvl)
  while n < maxn do
    if read >= budget then
      exhausted = false
      break
    end
    local want = math.min(maxn - n, budget - read)
    local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want, 'STREAMS', key, '>')
    if not r or not r[1] then break end
    local entries = r[1][2]
    if ordered then
      -- A new entry is never its key's head yet: it becomes the head when the key
      -- has none (the first of the key in this read), else it is held. The keys'
      -- heads are looked up with one HMGET and set with one HSET per read, not a
      -- call per entry.
      local ks, with_key = {}, {}
      for j, e in ipairs(entries) do
        local k = key_of(e[2])
        ks[j] = k
        if k then with_key[#with_key + 1] = k end
      end
      local busy = {}
      if #with_key > 0 then
        local cur = hmget(K_LOCKS, with_key)
        for j, k in ipairs(with_key) do
          if cur[j] then busy[k] = true end
        end
      end
      local heads = {}
      for j, e in ipairs(entries) do
        read = read + 1
        local id, k = e[1], ks[j]
        if not k then
          deliver(lvl, id, 1, e[2])
        elseif not busy[k] then
          busy[k] = true
          heads[#heads + 1] = k
          heads[#heads + 1] = id .. ':0'
          deliver(lvl, id, 1, e[2])
        else
          holds[#holds + 1] = id
          held_members[#held_members + 1] = '0'
          held_members[#held_members + 1] = held_member(k, id)
          held_keys[k] = (held_keys[k] or 0) + 1
        end
      end
      if #heads > 0 then chunked({'HSET', K_LOCKS, LOCKS_PIN, LOCKS_PIN_VALUE}, heads, {}) end
    else
      for _, e in ipairs(entries) do
        read = read + 1
        deliver(lvl, e[1], 1, e[2])
      end
    end
    if #entries < want then break end
    -- Entries of busy keys were met: read no further ahead. Each entry read
    -- behind a busy key costs a hold and a hand-out; left unread, it is read
    -- directly once its key is free (the keys' heads go out meanwhile).
    if #holds > 0 then
      behind_busy = true
      break
    end
  end
  if not exhausted or behind_busy then break end
end
if #holds > 0 then
  chunked({'XCLAIM', ready(0), group, HELD, 0}, holds, {'IDLE', 0, 'RETRYCOUNT', 0, 'JUSTID'})
  chunked({'ZADD', K_HELD}, held_members, {})
  for k, c in pairs(held_keys) do add_held(K_LOCKS, k, c) end
end

if n > 0 and limit_n > 0 then
  local base = redis.call('INCRBY', K_SEQ, n) - n
  local args = {}
  for j = 1, n do
    args[#args + 1] = now
    args[#args + 1] = now .. '-' .. (base + j)
  end
  redis.call('ZADD', K_LIMITER, unpack(args))
  redis.call('PEXPIRE', K_LIMITER, limit_per + 1000)
end

local wait = -1
local first = redis.call('ZRANGE', K_DELAYED, 0, 0, 'WITHSCORES')
if first[2] then wait = math.max(0, tonumber(first[2]) - now) end
if ordered then
  local p = redis.call('ZRANGE', K_PARKED, 0, 0, 'WITHSCORES')
  if p[2] then
    local w = math.max(0, tonumber(p[2]) - now)
    if wait < 0 or w < wait then wait = w end
  end
end
if limited_for then
  if wait < 0 or limited_for < wait then wait = limited_for end
elseif not exhausted then
  wait = 0
elseif n == 0 then
  if ordered then
    if behind_busy then
      -- What is unread waits behind busy keys: wait for a key to go on (the
      -- wake stream), not for new entries (an empty id: not waited on).
      for j = 1, #last_ids do last_ids[j] = '' end
    end
    local w = redis.call('XREVRANGE', K_WAKE, '+', '-', 'COUNT', 1)
    if w[1] then last_ids[#last_ids + 1] = w[1][1] else last_ids[#last_ids + 1] = '0-0' end
  end
  out[4] = last_ids
end
out[1] = wait
out[2] = trimmed
out[3] = pruned
return out
"#;

/// Acknowledge deliveries of an ordered queue: per entry `XACK`, and hand the key
/// on to its next held entry; then one `XDEL` for the batch. Without reclaims (no
/// revoked set) no stale handle can exist — a parked entry's handle was settled —
/// so `XACK`'s own answer tells whether the entry was still ours; where reclaims
/// happened each lease is checked first (pending with this handle's delivery
/// counter, and not parked), as the plain ACK does.
///
/// KEYS: leases, locks, held, unblocked, ready stream, wake, revoked
/// ARGV: group, then per entry: stream id, deliveries, `-` (no key) or `+key`.
/// Returns 1 (acked) or 0 (lease gone) per entry.
const ORDERED_ACK: &str = r#"
check_types({KEYS[1], 'hash', KEYS[2], 'hash', KEYS[3], 'zset', KEYS[4], 'list', KEYS[5], 'stream',
  KEYS[6], 'stream', KEYS[7], 'set'})
local group = ARGV[1]
local has_leases = redis.call('EXISTS', KEYS[1]) == 1
local has_revoked = redis.call('EXISTS', KEYS[7]) == 1
local res = {}
local queued = false
local ids, keys_, counts = {}, {}, {}
for i = 2, #ARGV, 3 do
  ids[#ids + 1] = ARGV[i]
  counts[#counts + 1] = tonumber(ARGV[i + 1])
  local kf = ARGV[i + 2]
  if string.sub(kf, 1, 1) == '+' then keys_[#ids] = string.sub(kf, 2) end
end
local deleted = false
if has_revoked then
  for j, id in ipairs(ids) do
    local p = in_lease(KEYS[5], group, id, counts[j])
    if p and p[2] ~= HELD and redis.call('XACK', KEYS[5], group, id) == 1 then res[j] = 1 else res[j] = 0 end
  end
else
  -- One XACK for all; when it took fewer than all, an entry still in the stream
  -- was ours (the rest were purged or deleted).
  if chunked({'XACK', KEYS[5], group}, ids, {}) == #ids then
    for j = 1, #ids do res[j] = 1 end
  else
    for j, id in ipairs(ids) do res[j] = redis.call('XDEL', KEYS[5], id) end
    deleted = true
  end
end
-- Keys whose head was acked with nothing held behind it (the common case) are
-- freed with one HMGET and one HDEL for the batch; the others (and a key met
-- twice in the batch) go on one by one.
local seen = {}
for j = 1, #ids do
  local k = keys_[j]
  if k and res[j] == 1 then seen[k] = (seen[k] or 0) + 1 end
end
local quick_k, quick_j = {}, {}
for j = 1, #ids do
  local k = keys_[j]
  if k and res[j] == 1 and seen[k] == 1 then
    quick_k[#quick_k + 1] = k
    quick_j[#quick_j + 1] = j
  end
end
local freed, free = {}, {}
if #quick_k > 0 then
  local cur = hmget(KEYS[2], quick_k)
  for i, k in ipairs(quick_k) do
    local j = quick_j[i]
    if cur[i] == ids[j] .. ':0' then
      free[#free + 1] = k
      freed[j] = true
    end
  end
  if #free > 0 then chunked({'HDEL', KEYS[2]}, free, {}) end
end
local done = {}
for j, id in ipairs(ids) do
  if res[j] == 1 then
    done[#done + 1] = id
    local tag = '0/' .. id
    if has_leases then redis.call('HDEL', KEYS[1], tag) end
    if has_revoked then forget_revoked(KEYS[7], tag, counts[j] - 1) end
    if not freed[j] and advance(KEYS[2], KEYS[3], KEYS[4], keys_[j], id) then queued = true end
  end
end
if not deleted then chunked({'XDEL', KEYS[5]}, done, {}) end
-- A head left: its key goes on (queued) or is free for what is unread.
if queued or #done > 0 then wake(KEYS[6]) end
return res
"#;

/// A flow child's ack with its flow step, in one script (see `flow_ack.rs`): the
/// lease is checked, the child's result recorded under its flow, and — when it was
/// the last missing result — the parent enqueued on its queue (claiming its dedup
/// id, as ENQUEUE does) and the flow forgotten; then the child is acked (`XACK` +
/// `XDEL`, and on an ordered queue its key handed on). Every check and all the
/// decoding come before the first write, so a refusal changes nothing.
///
/// KEYS: 1 flow hash, 2 pending flows zset (the job store's); the child queue's
///       3 leases, 4 revoked, 5 ready stream of the child's level, 6 locks, 7 held,
///       8 unblocked, 9 wake; then the ready streams of each candidate parent queue
///       (level 0 first), queue after queue
/// ARGV: 1 group, 2 level, 3 stream id, 4 deliveries, 5 ordered 0/1, 6 `-` (no key)
///       or `+key`, 7 parent (flow id), 8 child, 9 result (JSON), 10 the children
///       header's name, 11 candidate parent queues P, then per candidate: queue
///       name, levels, dedup key prefix, dedup window ms
/// Returns {'lease'} (nothing done: the lease is gone), {'decline', queue} (nothing
/// done: the flow's parent goes to a queue not among the candidates), {'none'}
/// (acked; no pending flow has this child), {'wait'} (acked, result recorded), or
/// {'sent', queue, duplicate 0/1} (acked, parent enqueued, flow forgotten).
const FLOW_ACK: &str = r#"
local group, lvl, id = ARGV[1], ARGV[2], ARGV[3]
local count = tonumber(ARGV[4])
local ordered = ARGV[5] == '1'
local mkey = nil
if string.sub(ARGV[6], 1, 1) == '+' then mkey = string.sub(ARGV[6], 2) end
local parent, child, value, header = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local F, FLOWS = KEYS[1], KEYS[2]
local types = {F, 'hash', FLOWS, 'zset', KEYS[3], 'hash', KEYS[4], 'set', KEYS[5], 'stream',
  KEYS[6], 'hash', KEYS[7], 'zset', KEYS[8], 'list', KEYS[9], 'stream'}
for j = 10, #KEYS do
  types[#types + 1] = KEYS[j]
  types[#types + 1] = 'stream'
end
check_types(types)
local p = in_lease(KEYS[5], group, id, count)
if not p or p[2] == HELD then return {'lease'} end

-- The flow step, computed: no write before every check passed.
local step = 'none'
local queue, stream, dedup_key, window, fields = nil, nil, nil, nil, nil
if redis.call('HEXISTS', F, 'c:' .. child) == 1 then
  step = 'wait'
  local all = redis.call('HGETALL', F)
  local children, rmap, xmap = {}, {}, {}
  local pol, message = nil, nil
  for i = 1, #all, 2 do
    local k, v = all[i], all[i + 1]
    local pre, rest = string.sub(k, 1, 2), string.sub(k, 3)
    if pre == 'c:' then children[#children + 1] = rest
    elseif pre == 'r:' then rmap[rest] = v
    elseif pre == 'x:' then xmap[rest] = v
    elseif k == 'q' then queue = v
    elseif k == 'm' then message = v
    elseif k == 'pol' then pol = v end
  end
  rmap[child] = value
  xmap[child] = nil
  local done = true
  for _, c in ipairs(children) do
    if not rmap[c] and not (pol ~= 'fail_parent' and xmap[c]) then done = false end
  end
  if done then
    step = 'sent'
    local at, kat = 12, 10
    for _ = 1, tonumber(ARGV[11]) do
      local name, nlevels = ARGV[at], tonumber(ARGV[at + 1])
      if name == queue then
        local ok, m = pcall(cjson.decode, message or '')
        if not ok or type(m) ~= 'table' or type(m.p) ~= 'string' then
          return redis.error_reply('ferrymq: flow ' .. parent .. ': its stored parent message does not decode')
        end
        local payload = string.gsub(m.p, '%x%x', function(c) return string.char(tonumber(c, 16)) end)
        fields = {'p', payload}
        local h = {}
        if type(m.h) == 'table' then
          for _, pair in ipairs(m.h) do
            local n, v = tostring(pair[1]), tostring(pair[2])
            if n ~= header then h[#h + 1] = #n .. ':' .. n .. #v .. ':' .. v end
          end
        end
        -- The children's outcomes, as FlowChildren serializes them.
        local rs, fs = {}, {}
        for _, c in ipairs(children) do
          if rmap[c] then rs[#rs + 1] = cjson.encode(c) .. ':' .. rmap[c]
          elseif xmap[c] then fs[#fs + 1] = cjson.encode(c) .. ':' .. cjson.encode(xmap[c]) end
        end
        local text = '{"results":{' .. table.concat(rs, ',') .. '}'
        if #fs > 0 then text = text .. ',"failed":{' .. table.concat(fs, ',') .. '}' end
        text = text .. '}'
        h[#h + 1] = #header .. ':' .. header .. #text .. ':' .. text
        fields[#fields + 1] = 'h'
        fields[#fields + 1] = table.concat(h)
        if type(m.k) == 'string' then
          fields[#fields + 1] = 'k'
          fields[#fields + 1] = m.k
        end
        local d = m.d
        if type(d) ~= 'string' then d = 'flow:' .. parent end
        fields[#fields + 1] = 'd'
        fields[#fields + 1] = d
        local plvl = 0
        if type(m.r) == 'number' then
          fields[#fields + 1] = 'r'
          fields[#fields + 1] = string.format('%d', m.r)
          plvl = math.max(0, math.min(nlevels - 1, m.r))
        end
        stream = KEYS[kat + plvl]
        dedup_key = ARGV[at + 2] .. d
        window = ARGV[at + 3]
        break
      end
      at = at + 4
      kat = kat + nlevels
    end
    if not fields then return {'decline', queue or ''} end
  end
end

-- Writes: the flow step, then the ack.
local out = {step}
if step == 'sent' then
  local dup = 0
  if redis.call('EXISTS', dedup_key) == 1 then
    dup = 1
  else
    local pid = redis.call('XADD', stream, '*', unpack(fields))
    redis.call('SET', dedup_key, pid, 'PX', window)
  end
  redis.call('DEL', F)
  redis.call('ZREM', FLOWS, parent)
  out = {step, queue, dup}
elseif step == 'wait' then
  redis.call('HSET', F, 'r:' .. child, value)
  redis.call('HDEL', F, 'x:' .. child)
end
local tag = lvl .. '/' .. id
redis.call('XACK', KEYS[5], group, id)
redis.call('XDEL', KEYS[5], id)
redis.call('HDEL', KEYS[3], tag)
forget_revoked(KEYS[4], tag, count - 1)
if ordered then
  advance(KEYS[6], KEYS[7], KEYS[8], mkey, id)
  wake(KEYS[9])
end
return out
"#;

/// Nack or release a delivery of an ordered queue. The message stays its key's
/// head — nothing of its key can overtake it — and stays in its stream entry: it
/// is parked with `~held` and queued for hand-out again, at once (the unblocked
/// list) or after the delay (the parked zset). Dead-lettering (max deliveries)
/// hands the key on instead.
///
/// KEYS: leases, dead, locks, held, unblocked, parked, ready stream, wake, revoked
/// ARGV: group, stream id, deliveries, delay ms, max deliveries, dead maxlen, dead
///       retention ms, queue name, release 0/1
/// Returns {0 (lease gone) | 1 (queued again) | 2 (dead-lettered), dead letters
/// trimmed}.
const ORDERED_NACK: &str = r#"
check_types({KEYS[1], 'hash', KEYS[2], 'stream', KEYS[3], 'hash', KEYS[4], 'zset', KEYS[5], 'list', KEYS[6], 'zset', KEYS[7], 'stream', KEYS[8], 'stream', KEYS[9], 'set'})
local key, group, id = KEYS[7], ARGV[1], ARGV[2]
local count = tonumber(ARGV[3])
local p = in_lease(key, group, id, count)
if not p or p[2] == HELD then return {0, 0} end
local tag = '0/' .. id
local e = redis.call('XRANGE', key, id, id)
if not e[1] then
  redis.call('XACK', key, group, id)
  redis.call('HDEL', KEYS[1], tag)
  return {0, 0}
end
local fields = e[1][2]
local k = key_of(fields)
local release = ARGV[9] == '1'
local counted = count
if release then counted = count - 1 end
local maxdel = tonumber(ARGV[5])
local now = now_ms()
redis.call('HDEL', KEYS[1], tag)
if not release and maxdel > 0 and prior_attempts(fields) + counted >= maxdel then
  local f, attempts, stable = carry_fields(fields, 0, id, counted)
  f = dead_fields(f, 'nacked after ' .. attempts .. ' deliveries (max_deliveries ' .. maxdel .. ')',
    ARGV[8], stable, attempts)
  local trimmed = write_dead(KEYS[2], f, ARGV[6], tonumber(ARGV[7]), now)
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
  forget_revoked(KEYS[9], tag, count - 1)
  if advance(KEYS[3], KEYS[4], KEYS[5], k, id) then wake(KEYS[8]) end
  return {2, trimmed}
end
park(key, group, id, counted)
local delay = tonumber(ARGV[4])
if delay > 0 then
  redis.call('ZADD', KEYS[6], now + delay, head_member(id, counted, k))
else
  redis.call('LPUSH', KEYS[5], head_member(id, counted, k))
  wake(KEYS[8])
end
return {1, 0}
"#;

/// Depth of an ordered queue: as DEPTH, with held entries (pending with `~held`)
/// counted as waiting — or delayed, for heads parked by a nack with a delay.
///
/// KEYS: delayed, dead, leases, parked, ready stream; ARGV: group, visibility ms
/// Returns {waiting, in flight, delayed, dead-lettered}.
const ORDERED_DEPTH: &str = r#"
local now = now_ms()
local len = redis.call('XLEN', KEYS[5])
local pending, held, expired = 0, 0, 0
local s = redis.pcall('XPENDING', KEYS[5], ARGV[1])
if type(s) == 'table' and s[1] and tonumber(s[1]) > 0 then
  pending = tonumber(s[1])
  local has_leases = redis.call('EXISTS', KEYS[3]) == 1
  for _, c in ipairs(s[4]) do
    local name, cnt = c[1], tonumber(c[2])
    if name == HELD then
      held = cnt
    else
      local idle = redis.call('XPENDING', KEYS[5], ARGV[1], 'IDLE', ARGV[2], '-', '+', 10000, name)
      for _, p in ipairs(idle) do
        local lease = has_leases and tonumber(redis.call('HGET', KEYS[3], '0/' .. p[1]))
        if not lease or lease <= now then expired = expired + 1 end
      end
    end
  end
end
local parked = redis.call('ZCARD', KEYS[4])
local waiting = len - pending + expired + held - parked
if waiting < 0 then waiting = 0 end
local in_flight = pending - held - expired
if in_flight < 0 then in_flight = 0 end
return {waiting, in_flight, redis.call('ZCARD', KEYS[1]) + parked, redis.call('XLEN', KEYS[2])}
"#;

/// Purge of an ordered queue: delayed messages, never-delivered entries, held
/// entries, queued and parked heads, and heads whose lease ran out — never a live
/// lease. Keys whose head went are handed on (or freed), so order holds after.
///
/// KEYS: delayed, jobs, leases, locks, held, unblocked, parked, ready stream, revoked
/// ARGV: group, visibility ms, limit. Returns how many went.
const ORDERED_PURGE: &str = r#"
check_types({KEYS[1], 'zset', KEYS[2], 'hash', KEYS[3], 'hash', KEYS[4], 'hash', KEYS[5], 'zset',
  KEYS[6], 'list', KEYS[7], 'zset', KEYS[8], 'stream', KEYS[9], 'set'})
local group, vis, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local key = KEYS[8]
local now = now_ms()
local n = 0
local ids = redis.call('ZRANGE', KEYS[1], 0, limit - 1)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  n = n + 1
end
if redis.call('EXISTS', key) == 0 then return n end
local last = last_delivered(key, group)
if n < limit then
  local start = '-'
  if last then start = '(' .. last end
  local entries = redis.call('XRANGE', key, start, '+', 'COUNT', limit - n)
  for _, e in ipairs(entries) do
    redis.call('XDEL', key, e[1])
    n = n + 1
  end
end
if not last then return n end
if n < limit then
  local hs = redis.call('ZRANGE', KEYS[5], 0, limit - n - 1)
  for _, m in ipairs(hs) do
    local id = held_id(m, member_prefix(m))
    redis.call('ZREM', KEYS[5], m)
    redis.call('XACK', key, group, id)
    redis.call('XDEL', key, id)
    redis.call('SREM', KEYS[9], '0/' .. id)
    n = n + 1
  end
end
local function drop_head(id, k)
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
  redis.call('HDEL', KEYS[3], '0/' .. id)
  redis.call('SREM', KEYS[9], '0/' .. id)
  advance(KEYS[4], KEYS[5], KEYS[6], k, id)
  n = n + 1
end
while n < limit do
  local m = redis.call('LPOP', KEYS[6])
  if not m then break end
  local id, _, k = split_member(m)
  drop_head(id, k)
end
if n < limit then
  local ps = redis.call('ZRANGE', KEYS[7], 0, limit - n - 1)
  for _, m in ipairs(ps) do
    redis.call('ZREM', KEYS[7], m)
    local id, _, k = split_member(m)
    drop_head(id, k)
  end
end
if n < limit then
  local cs = redis.pcall('XINFO', 'CONSUMERS', key, group)
  if type(cs) == 'table' and not cs.err then
    for _, c in ipairs(cs) do
      if n >= limit then break end
      local name
      for j = 1, #c, 2 do if c[j] == 'name' then name = c[j + 1] end end
      if name and name ~= HELD then
        local pend = redis.call('XPENDING', key, group, 'IDLE', vis, '-', '+', limit - n, name)
        for _, p in ipairs(pend) do
          local id = p[1]
          local lease = tonumber(redis.call('HGET', KEYS[3], '0/' .. id))
          if not lease or lease <= now then
            local e = redis.call('XRANGE', key, id, id)
            local k = nil
            if e[1] then k = key_of(e[1][2]) end
            drop_head(id, k)
          end
        end
      end
    end
  end
end
return n
"#;

/// Peek of an ordered queue: the waiting messages that are already pending in the
/// group — heads queued for hand-out, then held entries (by key) — and then the
/// never-delivered entries. Reads only.
///
/// KEYS: unblocked, held, ready stream; ARGV: group, max.
/// Returns {level, stream id, fields, ...}.
const ORDERED_PEEK: &str = r#"
local group, maxn = ARGV[1], tonumber(ARGV[2])
local key = KEYS[3]
local out, n = {}, 0
if redis.call('EXISTS', key) == 0 then return out end
local function add(id)
  local e = redis.call('XRANGE', key, id, id)
  if e[1] then
    out[#out + 1] = 0
    out[#out + 1] = e[1][1]
    out[#out + 1] = e[1][2]
    n = n + 1
  end
end
for _, m in ipairs(redis.call('LRANGE', KEYS[1], 0, maxn - 1)) do
  if n >= maxn then break end
  local id = split_member(m)
  add(id)
end
if n < maxn then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, maxn - n - 1)) do
    if n >= maxn then break end
    add(held_id(m, member_prefix(m)))
  end
end
if n < maxn then
  local last = last_delivered(key, group)
  local start = '-'
  if last then start = '(' .. last end
  for _, e in ipairs(redis.call('XRANGE', key, start, '+', 'COUNT', maxn - n)) do
    out[#out + 1] = 0
    out[#out + 1] = e[1]
    out[#out + 1] = e[2]
    n = n + 1
  end
end
return out
"#;

/// One script: its source (for `SCRIPT LOAD`) and SHA (for `EVALSHA`).
#[derive(Debug)]
pub(crate) struct Lua {
    pub(crate) name: &'static str,
    code: String,
    pub(crate) script: Script,
}

impl Lua {
    fn new(name: &'static str, body: &str) -> Self {
        let helpers = format!("{PRELUDE}{LAST_DELIVERED}{ORDERED_HELPERS}");
        let code = link(&helpers, body);
        Lua {
            name,
            script: Script::new(&code),
            code,
        }
    }

    /// The source, for `SCRIPT LOAD`.
    pub(crate) fn script_code(&self) -> &str {
        &self.code
    }

    /// `EVALSHA <sha> <numkeys>`: add keys, then arguments.
    pub(crate) fn call(&self, numkeys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash()).arg(numkeys);
        cmd
    }
}

/// The script for `body`: the helper definitions it uses (directly or through
/// other helpers), in their original order, then `body`.
///
/// Why not all of them: Redis runs a script's top-level chunk on every call, so
/// each `local function` of the helpers is a closure created per call, used or
/// not. With every helper prepended (29 functions and a 256-byte `string.rep`)
/// that was ~3.5 µs of server time on each `EVALSHA` (measured on Redis 7.0:
/// 5.3 µs per call of the helpers + `return 1` against 1.7 µs for `return 1`) —
/// more than an `XACK` of a few ids, on every ack batch and every maintenance call.
///
/// `helpers` is a sequence of top-level `local` definitions (a definition starts
/// at a line beginning with `local `; comment lines before it belong to it).
/// A definition is kept when one of the names it defines occurs as a word in the
/// body or in a kept definition. Occurrences in comments count too, which can only
/// keep more than needed; a local's name cannot be built at run time, so nothing
/// the script uses is ever dropped.
pub(crate) fn link(helpers: &str, body: &str) -> String {
    struct Item<'a> {
        text: String,
        names: Vec<&'a str>,
        words: std::collections::HashSet<&'a str>,
    }
    let mut items: Vec<Item<'_>> = Vec::new();
    let mut comments = String::new();
    for line in helpers.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("local ") {
            let names: Vec<&str> = match rest.strip_prefix("function ") {
                Some(f) => words(f).take(1).collect(),
                None => rest
                    .split('=')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|n| words(n).next())
                    .collect(),
            };
            let mut text = std::mem::take(&mut comments);
            text.push_str(line);
            items.push(Item {
                text,
                names,
                words: words(line).collect(),
            });
        } else if line.starts_with("--") || items.is_empty() {
            comments.push_str(line);
        } else if let Some(item) = items.last_mut() {
            item.text.push_str(line);
            item.words.extend(words(line));
        }
    }
    let mut needed: std::collections::HashSet<&str> = words(body).collect();
    let mut kept = vec![false; items.len()];
    loop {
        let mut grew = false;
        for (i, item) in items.iter().enumerate() {
            if !kept[i] && item.names.iter().any(|n| needed.contains(n)) {
                kept[i] = true;
                needed.extend(item.words.iter().copied());
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    let mut code = String::with_capacity(helpers.len() + body.len());
    for (item, kept) in items.iter().zip(kept) {
        if kept {
            code.push_str(&item.text);
        }
    }
    code.push_str(body);
    code
}

/// The identifiers (Lua names, keywords included) in `text`.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            w.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        })
}

/// All scripts, hashed once per process.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) enqueue: Lua,
    pub(crate) maintain: Lua,
    pub(crate) ack: Lua,
    pub(crate) nack: Lua,
    pub(crate) extend: Lua,
    pub(crate) depth: Lua,
    pub(crate) release: Lua,
    pub(crate) redrive: Lua,
    pub(crate) peek: Lua,
    pub(crate) purge: Lua,
    pub(crate) settings: Lua,
    pub(crate) receive: Lua,
    pub(crate) ordered_ack: Lua,
    pub(crate) ordered_nack: Lua,
    pub(crate) ordered_depth: Lua,
    pub(crate) ordered_purge: Lua,
    pub(crate) ordered_peek: Lua,
    pub(crate) flow_ack: Lua,
}

impl Scripts {
    pub(crate) fn all(&self) -> [&Lua; 18] {
        [
            &self.enqueue,
            &self.maintain,
            &self.ack,
            &self.nack,
            &self.extend,
            &self.depth,
            &self.release,
            &self.redrive,
            &self.peek,
            &self.purge,
            &self.settings,
            &self.receive,
            &self.ordered_ack,
            &self.ordered_nack,
            &self.ordered_depth,
            &self.ordered_purge,
            &self.ordered_peek,
            &self.flow_ack,
        ]
    }
}

pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        enqueue: Lua::new("enqueue", ENQUEUE),
        maintain: Lua::new("maintain", MAINTAIN),
        ack: Lua::new("ack", ACK),
        nack: Lua::new("nack", NACK),
        extend: Lua::new("extend", EXTEND),
        depth: Lua::new("depth", DEPTH),
        release: Lua::new("release", RELEASE),
        redrive: Lua::new("redrive", REDRIVE),
        peek: Lua::new("peek", PEEK),
        purge: Lua::new("purge", PURGE),
        settings: Lua::new("settings", crate::settings::SETTINGS),
        receive: Lua::new("receive", RECEIVE),
        ordered_ack: Lua::new("ordered ack", ORDERED_ACK),
        ordered_nack: Lua::new("ordered nack", ORDERED_NACK),
        ordered_depth: Lua::new("ordered depth", ORDERED_DEPTH),
        ordered_purge: Lua::new("ordered purge", ORDERED_PURGE),
        ordered_peek: Lua::new("ordered peek", ORDERED_PEEK),
        flow_ack: Lua::new("flow ack", FLOW_ACK),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_gets_the_helpers_it_uses_and_what_they_use_in_order() {
        let helpers = "\
local A = 'a'
-- b's comment
local function b(x)
  return x .. A
end
local function unused()
  return 1
end
local C, D = 1, 2
local function e() return b(D) end
";
        let code = link(helpers, "return e()\n");
        assert_eq!(
            code,
            "local A = 'a'\n-- b's comment\nlocal function b(x)\n  return x .. A\nend\n\
             local C, D = 1, 2\nlocal function e() return b(D) end\nreturn e()\n"
        );
        assert_eq!(link(helpers, "return 1\n"), "return 1\n");
    }

    /// Checked on the output, independently of how `link` chose: every helper name
    /// that occurs in a linked script is defined in it, before the body.
    #[test]
    fn every_linked_script_defines_each_helper_it_mentions() {
        let helpers = format!("{PRELUDE}{LAST_DELIVERED}{ORDERED_HELPERS}");
        let defined: Vec<(String, String)> = helpers
            .lines()
            .filter_map(|l| l.strip_prefix("local "))
            .flat_map(|rest| {
                let rest = rest.strip_prefix("function ").unwrap_or(rest);
                let head = rest.split(['=', '(']).next().unwrap_or_default();
                head.split(',')
                    .filter_map(|n| words(n).next())
                    .map(|n| (n.to_string(), rest.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(defined.len() > 30, "{defined:?}");
        let mut total = 0;
        for lua in scripts().all() {
            let code = lua.script_code();
            total += code.len();
            let used: std::collections::HashSet<&str> = words(code).collect();
            for (name, def) in &defined {
                if used.contains(name.as_str()) {
                    assert!(
                        code.lines().any(|l| l
                            .strip_prefix("local ")
                            .is_some_and(|r| r.strip_prefix("function ").unwrap_or(r) == def)),
                        "{}: uses {name} but does not define it",
                        lua.name
                    );
                }
            }
        }
        // Pruning does drop what is unused (the ack script has no ordered helpers).
        assert!(!scripts().ack.script_code().contains("LOCKS_PIN_VALUE"));
        assert!(total < 18 * helpers.len());
    }
}
