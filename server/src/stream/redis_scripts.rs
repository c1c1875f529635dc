//! Lua scripts of the Redis Streams backend. Each touches only keys that share one hash tag (a stream and
//! its group ledgers), so each runs unchanged on Redis Cluster.
//!
//! Ledger keys of a group on a stream `S` (all `S:<what>:<group>`):
//! - `due`  sorted set: sequence -> when its lease ends (ms since the epoch)
//! - `pos`  sorted set: sequence -> sequence, to find the oldest unsettled one for checkpoints
//! - `att`  hash: sequence -> attempt, the authority for stale-ack checks
//! - `err`  hash: sequence -> the last nack's error
//! - `floor` string: entries at or below it may be missing from the stream and are read from the store
//!
//! Sequences are returned as the strings Redis holds, never through Lua numbers (doubles).

use std::sync::LazyLock;

use redis::Script;

/// Adds entries `<seq>-0` in order; an id at or below the stream's top was added before and is skipped.
/// KEYS: stream. ARGV: max length, then (sequence, event as the store encodes it, recorded ns) triples. Returns how many were added.
pub(super) static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local added = 0
for i = 2, #ARGV, 3 do
  local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[i] .. '-0', 'e', ARGV[i + 1], 'r', ARGV[i + 2])
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'equal or smaller', 1, true) then
      return redis.error_reply(r.err)
    end
  else
    added = added + 1
  end
end
return added
",
    )
});

/// Raises a counter to ARGV[1] when that is higher. KEYS: counter.
pub(super) static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GET', KEYS[1])
if not current or tonumber(ARGV[1]) > tonumber(current) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
",
    )
});

/// Shared Lua: `last_delivered` (the last-delivered sequence, as a string, of a group on a stream, or nil
/// without the group), `chunked` (one command over many arguments) and `fields` (an entry's event and time).
const HELPERS: &str = r"
local function last_delivered(stream, group)
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and groups.err then
    return nil
  end
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    if name == group then
      return string.match(last, '^(%d+)')
    end
  end
  return nil
end
-- Calls `command key args...` in chunks of at most 2,000 arguments (an even number, so pairs stay
-- together): one call per chunk, never more than Lua's unpack can take.
local function chunked(command, key, args)
  for start = 1, #args, 2000 do
    redis.call(command, key, unpack(args, start, math.min(#args, start + 1999)))
  end
end
local function fields(entry)
  local e, r = '', '0'
  for i = 1, #entry, 2 do
    if entry[i] == 'e' then e = entry[i + 1] elseif entry[i] == 'r' then r = entry[i + 1] end
  end
  return e, r
end
";

fn with_helpers(body: &str) -> Script {
    Script::new(&format!("{HELPERS}\n{body}"))
}

/// Hands out new entries to a consumer.
/// KEYS: stream, due, att, pos, floor. ARGV: group, consumer, count, lease ms.
/// Returns `{'NOGROUP'}`, `{'GAP', last, floor}` (entries after `last` up to `floor` must come from the
/// store, because the stream no longer begins before them), or `{'OK', seq, event, recorded, ...}`.
pub(super) static CLAIM_NEW: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local last = last_delivered(KEYS[1], ARGV[1])
if not last then
  return {'NOGROUP'}
end
-- everything below the first entry may have been trimmed (or lost with a Redis restart)
local floor = redis.call('GET', KEYS[5]) or '0'
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if first[1] then
  local before = string.format('%d', tonumber(string.match(first[1][1], '^(%d+)')) - 1)
  if tonumber(before) > tonumber(floor) then floor = before end
end
if tonumber(last) < tonumber(floor) then
  return {'GAP', last, floor}
end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
local out = {'OK'}
if read then
  -- the ledgers are written with one call per chunk of entries, not three calls per entry
  local due, pos, att = {}, {}, {}
  for _, entry in ipairs(read[1][2]) do
    local seq = string.match(entry[1], '^(%d+)')
    due[#due + 1] = ARGV[4]
    due[#due + 1] = seq
    pos[#pos + 1] = seq
    pos[#pos + 1] = seq
    att[#att + 1] = seq
    att[#att + 1] = 1
    local e, r = fields(entry[2])
    table.insert(out, seq)
    table.insert(out, e)
    table.insert(out, r)
  end
  chunked('ZADD', KEYS[2], due)
  chunked('ZADD', KEYS[4], pos)
  chunked('HSET', KEYS[3], att)
end
return out
",
    )
});

/// Records entries read from the store for a gap and moves the group past them, if nobody did meanwhile.
/// KEYS: stream, due, att, pos. ARGV: group, expected last, new last, lease ms, sequences...
/// Returns 1 when recorded, 0 when another consumer moved the group first.
pub(super) static CLAIM_GAP: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
if last_delivered(KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[3] .. '-0')
for i = 5, #ARGV do
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[i])
  redis.call('ZADD', KEYS[4], ARGV[i], ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], 1)
end
return 1
",
    )
});

/// Creates the consumer group at a position and marks what the stream may be missing after it.
/// KEYS: stream, floor. ARGV: group, start sequence, relayed sequence (used when the stream is empty).
/// Returns 1 when created, 0 when it existed.
pub(super) static CREATE_GROUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ok = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], ARGV[2] .. '-0', 'MKSTREAM')
if type(ok) == 'table' and ok.err then
  if string.find(ok.err, 'BUSYGROUP', 1, true) then return 0 end
  return redis.error_reply(ok.err)
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local bound = ARGV[3]
if first[1] then
  bound = string.format('%d', tonumber(string.match(first[1][1], '^(%d+)')) - 1)
end
if tonumber(bound) > tonumber(ARGV[2]) then
  local marked = redis.call('GET', KEYS[2])
  if not marked or tonumber(bound) > tonumber(marked) then
    redis.call('SET', KEYS[2], bound)
  end
end
return 1
",
    )
});

/// Hands out entries whose lease ended, counting the attempt.
/// KEYS: stream, due, att, err. ARGV: group, consumer, now ms, lease ms, count.
/// Returns (seq, attempt, event or '', recorded, last error or '') quintuples; an empty event means the
/// stream no longer holds it.
pub(super) static CLAIM_DUE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local seqs = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[3], 'BYSCORE', 'LIMIT', 0, ARGV[5])
local out = {}
for _, seq in ipairs(seqs) do
  local attempt = redis.call('HINCRBY', KEYS[3], seq, 1)
  redis.call('ZADD', KEYS[2], ARGV[4], seq)
  local id = seq .. '-0'
  local e, r = '', '0'
  local claimed = redis.pcall('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
  if type(claimed) == 'table' and not claimed.err and claimed[1] then
    e, r = fields(claimed[1][2])
  else
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    if entry[1] then e, r = fields(entry[1][2]) end
  end
  table.insert(out, seq)
  table.insert(out, tostring(attempt))
  table.insert(out, e)
  table.insert(out, r)
  table.insert(out, redis.call('HGET', KEYS[4], seq) or '')
end
return out
",
    )
});

/// Settles deliveries whose attempt is current. KEYS: stream, due, att, err, pos.
/// ARGV: group, then (sequence, attempt) pairs. Returns 1 or 0 per pair.
pub(super) static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- one call per command per chunk of 1,000 deliveries, not six calls per delivery
local out = {}
local done = {}
for start = 2, #ARGV, 2000 do
  local seqs = {}
  for i = start, math.min(#ARGV, start + 1999), 2 do
    seqs[#seqs + 1] = ARGV[i]
  end
  local attempts = redis.call('HMGET', KEYS[3], unpack(seqs))
  local settled, ids = {}, {}
  for j, seq in ipairs(seqs) do
    -- an ack repeated in the same call counts once
    if attempts[j] == ARGV[start + 2 * j - 1] and not done[seq] then
      done[seq] = true
      settled[#settled + 1] = seq
      ids[#ids + 1] = seq .. '-0'
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  if #settled > 0 then
    redis.pcall('XACK', KEYS[1], ARGV[1], unpack(ids))
    redis.call('ZREM', KEYS[2], unpack(settled))
    redis.call('ZREM', KEYS[5], unpack(settled))
    redis.call('HDEL', KEYS[3], unpack(settled))
    redis.call('HDEL', KEYS[4], unpack(settled))
  end
end
return out
",
    )
});

/// Removes pending entries whatever their attempt. KEYS: stream, due, att, err, pos. ARGV: group, sequences...
pub(super) static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for start = 2, #ARGV, 1000 do
  local seqs, ids = {}, {}
  for i = start, math.min(#ARGV, start + 999) do
    seqs[#seqs + 1] = ARGV[i]
    ids[#ids + 1] = ARGV[i] .. '-0'
  end
  redis.pcall('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('ZREM', KEYS[2], unpack(seqs))
  redis.call('ZREM', KEYS[5], unpack(seqs))
  redis.call('HDEL', KEYS[3], unpack(seqs))
  redis.call('HDEL', KEYS[4], unpack(seqs))
end
return 1
",
    )
});

/// Moves the lease ends of deliveries whose attempt is current. KEYS: due, att, err.
/// ARGV: visible ms, error or '', then sequence, attempt pairs. Returns 1 per pair that moved, else 0.
pub(super) static SET_VISIBLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for i = 3, #ARGV, 2 do
  local seq = ARGV[i]
  if redis.call('HGET', KEYS[2], seq) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], seq)
    if ARGV[2] ~= '' then
      redis.call('HSET', KEYS[3], seq, ARGV[2])
    end
    table.insert(out, 1)
  else
    table.insert(out, 0)
  end
end
return out
",
    )
});

/// Puts sequences back as due now with no attempts (redrive). KEYS: due, att, pos. ARGV: now ms, sequences...
/// Returns how many were not pending already.
pub(super) static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local added = 0
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], 0)
    redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i])
    added = added + 1
  end
end
return added
",
    )
});

/// The state of a group on a stream. KEYS: stream, due, pos. ARGV: group.
/// Returns {last delivered or '', oldest unsettled or '', pending count as a string}.
pub(super) static GROUP_STATE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local last = last_delivered(KEYS[1], ARGV[1]) or ''
local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1] or ''
return {last, oldest, tostring(redis.call('ZCARD', KEYS[2]))}
",
    )
});
