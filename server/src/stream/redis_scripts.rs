//! Lua scripts of the Redis Streams backend. Each touches only keys that share one hash tag (a stream and
//! its group ledgers), so each runs unchanged on Redis Cluster.
//!
//! A group's consumer group on a stream is only its cursor (last-delivered id): new entries are read
//! with `XRANGE` and leased as runs, so Redis keeps no pending entry list per delivery.
//!
//! Ledger keys of a group on a stream `S` (all `S:<what>:<group>`):
//! - `runs` sorted set: first sequence of each leased run -> itself
//! - `bits` hash: first sequence of a run -> its bitmap (see `lease_runs` below)
//! - `due`  sorted set: sequence, or `r<first>` for a run, -> when its lease ends (ms since the epoch)
//! - `pos`  sorted set: sequence -> sequence, to find the oldest unsettled entry outside runs
//! - `att`  hash: sequence -> attempt of an entry outside runs, the authority for stale-ack checks
//! - `err`  hash: sequence -> the last nack's error
//! - `floor` string: entries at or below it may be missing from the stream and are read from the store
//!
//! Sequences are returned as the strings Redis holds. Run arithmetic uses Lua numbers (doubles), exact
//! for sequences below 2^53.

use std::sync::LazyLock;

use redis::Script;

/// Adds entries `<seq>-0` in order; an id at or below the stream's top was added before and is skipped.
/// KEYS: stream. ARGV: max length; the last sequence the caller added to this stream before, or minus
/// the last sequence the stream must hold (the store's, for a stream the caller has not added to: an
/// empty stream takes the entries, since groups read from the store what comes before a stream's
/// first entry), or 0 (nothing to check); then (sequence, event as the store encodes it, recorded ns)
/// triples. Returns how many were added; or, adding nothing, -1 - the stream's top sequence when the
/// stream ends before that sequence: Redis lost entries it had (restarted from an older snapshot or
/// log), and adding past them would hide the hole from every group. A stream whose last id reached
/// that sequence had entries deleted by an operator (`XDEL`, `XTRIM`), not lost, and takes the
/// entries: going back could never add the deleted ones again (groups that had not passed entries
/// deleted with `XDEL` never get them).
pub(super) static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local expected = tonumber(ARGV[2])
local empty_takes = expected < 0
if empty_takes then
  expected = -expected
end
if expected > 0 then
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  local have = 0
  if #top > 0 then
    have = tonumber(string.match(top[1][1], '^(%d+)'))
  end
  if have < expected and not (empty_takes and have == 0) then
    -- entries deleted (XDEL) leave the stream's last id where it was, and adding again from its top
    -- would skip them forever; a Redis that lost them holds an older last id
    local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
    local generated = 0
    if type(info) == 'table' and not info.err then
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
          generated = tonumber(string.match(info[i + 1], '^(%d+)'))
        end
      end
    end
    if generated < expected then
      return -1 - have
    end
  end
end
local added = 0
for i = 3, #ARGV, 3 do
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

/// Raises the relayed position to ARGV[1] when that is higher, unless Redis lost what it had.
/// KEYS: counter. ARGV: position (0: only the check), what the caller last saw it hold (0: nothing).
/// Returns the counter after the call; or, raising nothing, -1 - the counter when it holds less than
/// the caller saw: Redis came back from an older snapshot or log, and its streams may lack anything
/// past the counter. A missing counter is a Redis that came back empty (groups read the store).
pub(super) static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local wanted = tonumber(ARGV[1])
if current >= 0 and current < tonumber(ARGV[2]) then
  return -1 - current
end
if wanted > current and wanted > 0 then
  redis.call('SET', KEYS[1], ARGV[1])
  return wanted
end
return math.max(current, 0)
",
    )
});

/// Shared Lua: `last_delivered` (the last-delivered sequence, as a string, of a group on a stream, or nil
/// without the group), `chunked` (one command over many arguments), `fields` (an entry's event and time),
/// and the leased runs (below).
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
local function seqstr(n)
  return string.format('%d', n)
end
-- The least and greatest of the sequences ARGV[from], ARGV[from + step], ... (nil without any).
local function bounds(from, step)
  local lo, hi
  for i = from, #ARGV, step do
    local n = tonumber(ARGV[i])
    if not lo or n < lo then lo = n end
    if not hi or n > hi then hi = n end
  end
  return lo, hi
end
-- Leased runs: the new entries one claim hands out, leased together, so a claim writes a record per run
-- and an ack sets a bit, not a ledger entry per delivery. A run is keyed by its first sequence: a
-- `runs` member scored by it, a `bits` field and a `due` member 'r<first>' scored by its lease end.
-- Its bitmap holds a bit per sequence from the first on (at most RUN_SPAN of them), set where that
-- sequence is not an open entry of the run: another stream's, or an entry settled or gone to a lease
-- of its own (nack, extension, expiry). Every entry a run holds has attempt 1.
local RUN_SPAN = 16384
-- The (lo, hi) ranges of sequences in ARGV[from], ARGV[from + 1], ... ARGV[to], as {lo, hi} numbers.
local function ranges(from, to)
  local list = {}
  for i = from, to - 1, 2 do
    list[#list + 1] = {tonumber(ARGV[i]), tonumber(ARGV[i + 1])}
  end
  return list
end
-- Clears the bits of offsets o1..o2 in bitmap `b` (a table of bytes), a byte at a time where it can.
local function clear_bits(b, o1, o2)
  local o = o1
  while o <= o2 do
    local at = math.floor(o / 8) + 1
    if o % 8 == 0 and o + 7 <= o2 then
      b[at] = 0
      o = o + 8
    else
      b[at] = bit.band(b[at], bit.bnot(bit.lshift(1, 7 - o % 8)))
      o = o + 1
    end
  end
end
-- Leases the sequences of ascending, disjoint ranges `list` ({lo, hi} numbers) until `lease` as runs.
local function lease_runs(due, runs, bits, list, lease)
  local k, lo = 1, list[1] and list[1][1]
  while k <= #list do
    local first = lo
    local limit = first + RUN_SPAN - 1
    -- the parts of the ranges this run holds
    local parts = {}
    while k <= #list and lo <= limit do
      local hi = math.min(list[k][2], limit)
      parts[#parts + 1] = {lo, hi}
      if hi == list[k][2] then
        k = k + 1
        lo = list[k] and list[k][1]
      else
        lo = hi + 1
      end
    end
    local b = {}
    for i = 1, math.floor((parts[#parts][2] - first) / 8) + 1 do b[i] = 255 end
    for _, p in ipairs(parts) do clear_bits(b, p[1] - first, p[2] - first) end
    local id = seqstr(first)
    -- at most RUN_SPAN / 8 bytes: within what unpack can take
    redis.call('HSET', bits, id, string.char(unpack(b)))
    redis.call('ZADD', runs, id, id)
    redis.call('ZADD', due, lease, 'r' .. id)
  end
end
-- The runs that may hold sequences lo..hi (numbers), ascending; bitmaps are read when first needed.
local function load_runs(runs, lo, hi)
  local list = {}
  if not lo then return list end
  local ids = redis.call('ZRANGE', runs, seqstr(lo), '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1)
  for _, id in ipairs(redis.call('ZRANGE', runs, '(' .. seqstr(lo), seqstr(hi), 'BYSCORE')) do
    ids[#ids + 1] = id
  end
  for k, id in ipairs(ids) do
    list[k] = {first = tonumber(id), id = id}
  end
  return list
end
-- The index in `list` of the last run starting at or before sequence n (nil when none does).
local function run_index(list, n)
  local lo, hi, idx = 1, #list, nil
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    if list[mid].first <= n then idx = mid; lo = mid + 1 else hi = mid - 1 end
  end
  return idx
end
-- Reads a run's bitmap into `run.b` (a table of bytes) the first time it is needed.
local function load_bitmap(bits, run)
  if not run.b then
    local map = redis.call('HGET', bits, run.id)
    run.b = map and {string.byte(map, 1, -1)} or {}
  end
end
-- Whether sequence n is an open entry of its run in `list`; with `take`, it leaves the run.
local function in_run(bits, list, n, take)
  local idx = run_index(list, n)
  if not idx then return false end
  local run = list[idx]
  load_bitmap(bits, run)
  local o = n - run.first
  local at = math.floor(o / 8) + 1
  local mask = bit.lshift(1, 7 - o % 8)
  if at > #run.b or bit.band(run.b[at], mask) ~= 0 then return false end
  if take then
    run.b[at] = bit.bor(run.b[at], mask)
    run.changed = true
  end
  return true
end
-- Takes sequences lo..hi (numbers) out of their runs in `list` where they are open entries; appends the
-- others to `missed`. Works a byte of the bitmap at a time where it can.
local function take_range(bits, list, lo, hi, missed)
  local n = lo
  while n <= hi do
    local idx = run_index(list, n)
    -- n..stop lie in one run's span at most: the next run starts after stop
    local stop = hi
    local nxt = list[(idx or 0) + 1]
    if nxt then stop = math.min(stop, nxt.first - 1) end
    local run, e = idx and list[idx], n - 1
    if run then
      load_bitmap(bits, run)
      e = math.min(stop, run.first + #run.b * 8 - 1)
      local o, oe = n - run.first, e - run.first
      while o <= oe do
        local at = math.floor(o / 8) + 1
        if o % 8 == 0 and o + 7 <= oe and run.b[at] == 0 then
          run.b[at] = 255
          run.changed = true
          o = o + 8
        else
          local mask = bit.lshift(1, 7 - o % 8)
          if bit.band(run.b[at], mask) == 0 then
            run.b[at] = bit.bor(run.b[at], mask)
            run.changed = true
          else
            missed[#missed + 1] = run.first + o
          end
          o = o + 1
        end
      end
    end
    for m = math.max(n, e + 1), stop do missed[#missed + 1] = m end
    n = stop + 1
  end
end
-- Writes back the runs entries left; a run left with no open entries is deleted.
local function save_runs(due, runs, bits, list)
  for _, run in ipairs(list) do
    if run.changed then
      local open = false
      for k = 1, #run.b do
        if run.b[k] ~= 255 then open = true; break end
      end
      if open then
        redis.call('HSET', bits, run.id, string.char(unpack(run.b)))
      else
        redis.call('HDEL', bits, run.id)
        redis.call('ZREM', runs, run.id)
        redis.call('ZREM', due, 'r' .. run.id)
      end
    end
  end
end
-- The open entries (sequence strings, ascending) of the run starting at `first` with bitmap `map`.
local function open_entries(first, map)
  local out = {}
  for k = 1, #map do
    local byte = string.byte(map, k)
    if byte ~= 255 then
      for o = 0, 7 do
        if bit.band(byte, bit.lshift(1, 7 - o)) == 0 then
          out[#out + 1] = seqstr(first + (k - 1) * 8 + o)
        end
      end
    end
  end
  return out
end
";

fn with_helpers(body: &str) -> Script {
    Script::new(&format!("{HELPERS}\n{body}"))
}

/// Whether a claim of new entries could find anything in a stream, without changing anything: 1 when the
/// group has no consumer group there yet, when entries after its cursor must come from the store (as
/// `CLAIM_NEW` tells a gap), or when an entry follows its cursor; else 0. KEYS: stream, floor. ARGV:
/// group. A group over many types asks this of all its streams in one pipeline, then claims only from
/// those that answer 1.
pub(super) static HAS_NEW: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local last = last_delivered(KEYS[1], ARGV[1])
if not last then
  return 1
end
local floor = tonumber(redis.call('GET', KEYS[2]) or '0')
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if first[1] then
  local before = tonumber(string.match(first[1][1], '^(%d+)')) - 1
  if before > floor then floor = before end
end
if tonumber(last) < floor then
  return 1
end
if redis.call('XRANGE', KEYS[1], '(' .. last .. '-0', '+', 'COUNT', 1)[1] then
  return 1
end
return 0
",
    )
});

/// Leases new entries as runs and moves the group's cursor past what was read. The caller reads them
/// with a plain `XRANGE` after the cursor first: entries read inside a script are copied into Lua and
/// back, which cost more than everything else a claim does. KEYS: stream, due, floor, runs, bits.
/// ARGV: group, lease ms, the cursor the entries were read after ('' when not known), the last
/// sequence read ('' when not known), then the sequences to lease (those the group's selection
/// matches; the others are passed over) as ascending, disjoint (first, last) ranges... Returns
/// `{'NOGROUP'}`, `{'GAP', last, floor}` (entries after `last` up to `floor` must come from the store,
/// because the stream no longer begins before them), `{'AT', last}` (nothing read is still free: read
/// after `last` and call again) or `{'OK', last}` (the entries to lease after `last` are the
/// caller's).
pub(super) static CLAIM_NEW: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local last = last_delivered(KEYS[1], ARGV[1])
if not last then
  return {'NOGROUP'}
end
-- everything below the first entry may have been trimmed (or lost with a Redis restart)
local floor = redis.call('GET', KEYS[3]) or '0'
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if first[1] then
  local before = string.format('%d', tonumber(string.match(first[1][1], '^(%d+)')) - 1)
  if tonumber(before) > tonumber(floor) then floor = before end
end
if tonumber(last) < tonumber(floor) then
  return {'GAP', last, floor}
end
if ARGV[3] == '' or tonumber(last) < tonumber(ARGV[3]) then
  return {'AT', last}
end
-- another consumer may have moved the cursor into what was read: the entries after it are still
-- free, and are all there is up to the last one read
local after = tonumber(last)
if after >= tonumber(ARGV[4]) then
  return {'AT', last}
end
local list = {}
for _, r in ipairs(ranges(5, #ARGV)) do
  if r[2] > after then list[#list + 1] = {math.max(r[1], after + 1), r[2]} end
end
-- the group is only a cursor: leases live in the runs, not in a pending entry list per delivery
if #list > 0 then
  lease_runs(KEYS[2], KEYS[4], KEYS[5], list, ARGV[2])
end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[4] .. '-0')
return {'OK', last}
",
    )
});

/// Leases entries read from the store for a gap as runs and moves the group past them, if nobody did
/// meanwhile. KEYS: stream, due, runs, bits. ARGV: group, expected last, new last, lease ms, then the
/// sequences as ascending, disjoint (first, last) ranges... Returns 1 when recorded, 0 when another
/// consumer moved the group first.
pub(super) static CLAIM_GAP: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
if last_delivered(KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], ARGV[3] .. '-0')
lease_runs(KEYS[2], KEYS[3], KEYS[4], ranges(5, #ARGV), ARGV[4])
return 1
",
    )
});

/// Removes a group from one stream: its consumer group (when the stream exists) and its ledgers.
/// KEYS: stream, ledgers... ARGV: group.
pub(super) static DESTROY_GROUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
end
for i = 2, #KEYS do
  redis.call('DEL', KEYS[i])
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

/// Hands out entries whose lease ended, counting the attempt. Runs whose lease ended first give each
/// open entry a lease of its own. KEYS: stream, due, att, err, pos, runs, bits. ARGV: now ms, lease ms,
/// count. Returns (seq, attempt, event or '', recorded, last error or '') quintuples; an empty event
/// means the stream no longer holds it.
pub(super) static CLAIM_DUE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
-- each round ends at least one run, so this ends
while true do
  local page = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3], 'WITHSCORES')
  local ended = false
  for k = 1, #page, 2 do
    if string.sub(page[k], 1, 1) == 'r' then
      local id = string.sub(page[k], 2)
      local map = redis.call('HGET', KEYS[7], id)
      if map then
        local due, pos, att = {}, {}, {}
        for _, seq in ipairs(open_entries(tonumber(id), map)) do
          due[#due + 1] = page[k + 1]
          due[#due + 1] = seq
          pos[#pos + 1] = seq
          pos[#pos + 1] = seq
          att[#att + 1] = seq
          att[#att + 1] = 1
        end
        chunked('ZADD', KEYS[2], due)
        chunked('ZADD', KEYS[5], pos)
        chunked('HSET', KEYS[3], att)
      end
      redis.call('HDEL', KEYS[7], id)
      redis.call('ZREM', KEYS[6], id)
      redis.call('ZREM', KEYS[2], page[k])
      ended = true
    end
  end
  if not ended then break end
end
local seqs = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
local out = {}
for _, seq in ipairs(seqs) do
  local attempt = redis.call('HINCRBY', KEYS[3], seq, 1)
  redis.call('ZADD', KEYS[2], ARGV[2], seq)
  local e, r = '', '0'
  local entry = redis.call('XRANGE', KEYS[1], seq .. '-0', seq .. '-0')
  if entry[1] then e, r = fields(entry[1][2]) end
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

/// Settles deliveries whose attempt is current. KEYS: stream, due, att, err, pos, runs, bits.
/// ARGV: group, the number N of range arguments, N arguments that are the first deliveries' sequences as
/// ascending, disjoint (first, last) ranges, then (sequence, attempt) pairs of later attempts. Returns
/// {first deliveries not settled (sequences), 1 or 0 per pair}.
pub(super) static ACK: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local n = tonumber(ARGV[2])
local firsts = ranges(3, 2 + n)
local list = load_runs(KEYS[6], firsts[1] and firsts[1][1], firsts[#firsts] and firsts[#firsts][2])
-- a first delivery still in its run is settled in the run's bitmap
local missed = {}
for _, r in ipairs(firsts) do
  take_range(KEYS[7], list, r[1], r[2], missed)
end
save_runs(KEYS[2], KEYS[6], KEYS[7], list)
-- the others by their own ledger entries: {sequence, attempt, index of the pair or nil}
local rest, flags, unsettled = {}, {}, {}
for _, seq in ipairs(missed) do
  rest[#rest + 1] = {seqstr(seq), '1'}
end
for i = 3 + n, #ARGV, 2 do
  local pair = (i - 1 - n) / 2
  flags[pair] = 0
  rest[#rest + 1] = {ARGV[i], ARGV[i + 1], pair}
end
-- one call per command per chunk of 1,000; an ack repeated in the same call counts once
local done = {}
for start = 1, #rest, 1000 do
  local seqs = {}
  for k = start, math.min(#rest, start + 999) do
    seqs[#seqs + 1] = rest[k][1]
  end
  local attempts = redis.call('HMGET', KEYS[3], unpack(seqs))
  local settled, ids = {}, {}
  for j, seq in ipairs(seqs) do
    local r = rest[start + j - 1]
    local ok = attempts[j] == r[2] and not done[seq]
    if ok then
      done[seq] = true
      settled[#settled + 1] = seq
      ids[#ids + 1] = seq .. '-0'
    end
    if r[3] then
      if ok then flags[r[3]] = 1 end
    elseif not ok then
      unsettled[#unsettled + 1] = seq
    end
  end
  if #settled > 0 then
    -- entries claimed before leased runs are in the group's pending entry list
    redis.pcall('XACK', KEYS[1], ARGV[1], unpack(ids))
    redis.call('ZREM', KEYS[2], unpack(settled))
    redis.call('ZREM', KEYS[5], unpack(settled))
    redis.call('HDEL', KEYS[3], unpack(settled))
    redis.call('HDEL', KEYS[4], unpack(settled))
  end
end
return {unsettled, flags}
",
    )
});

/// Moves the lease ends of deliveries whose attempt is current; one still in its run leaves it for a
/// lease of its own. With ARGV[3] '0' the attempt does not count (it was never sent) and is taken back.
/// KEYS: due, att, err, pos, runs, bits. ARGV: visible ms, error or '', '1' or '0' (the attempt counts),
/// then sequence, attempt pairs. Returns 1 per pair that moved, else 0.
pub(super) static SET_VISIBLE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local list = load_runs(KEYS[5], bounds(4, 2))
local taken_back = ARGV[3] == '0' and 1 or 0
local out = {}
for i = 4, #ARGV, 2 do
  local seq = ARGV[i]
  local moved = false
  if ARGV[i + 1] == '1' and in_run(KEYS[6], list, tonumber(seq), true) then
    redis.call('HSET', KEYS[2], seq, 1 - taken_back)
    redis.call('ZADD', KEYS[4], seq, seq)
    redis.call('ZADD', KEYS[1], ARGV[1], seq)
    moved = true
  elseif redis.call('HGET', KEYS[2], seq) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], seq)
    if taken_back == 1 then redis.call('HINCRBY', KEYS[2], seq, -1) end
    moved = true
  end
  if moved and ARGV[2] ~= '' then
    redis.call('HSET', KEYS[3], seq, ARGV[2])
  end
  table.insert(out, moved and 1 or 0)
end
save_runs(KEYS[1], KEYS[5], KEYS[6], list)
return out
",
    )
});

/// Puts sequences back as due now with no attempts (redrive). KEYS: due, att, pos, runs, bits.
/// ARGV: now ms, sequences... Returns those that were not pending already.
pub(super) static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local list = load_runs(KEYS[4], bounds(2, 1))
local added = {}
for i = 2, #ARGV do
  if not in_run(KEYS[5], list, tonumber(ARGV[i]), false)
    and redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], 0)
    redis.call('ZADD', KEYS[3], ARGV[i], ARGV[i])
    added[#added + 1] = ARGV[i]
  end
end
return added
",
    )
});

/// The state of a group on a stream. KEYS: stream, due, pos, runs, bits. ARGV: group.
/// Returns {last delivered or '', oldest unsettled or '', pending count as a string}.
pub(super) static GROUP_STATE: LazyLock<Script> = LazyLock::new(|| {
    with_helpers(
        r"
local last = last_delivered(KEYS[1], ARGV[1]) or ''
local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
-- a run is one `due` member, counted as its open entries
local pending = redis.call('ZCARD', KEYS[2])
for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  pending = pending - 1
  local map = redis.call('HGET', KEYS[5], id)
  if map then
    local open = open_entries(tonumber(id), map)
    pending = pending + #open
    if open[1] and (not oldest or tonumber(open[1]) < tonumber(oldest)) then
      oldest = open[1]
    end
  end
end
return {last, oldest or '', tostring(pending)}
",
    )
});

/// What an inbox's record becomes once a reply took it: `taken:<reply's sequence>`, a line feed, then
/// the record as it was. It is still the inbox (a later reply is stored, and told it was not
/// delivered); an older replica fails to parse it, and takes it for no inbox.
pub(super) const TAKEN: &str = "taken:";

/// A record [`TAKEN`] by a reply: that reply's sequence (as written) and the record as it was; None
/// for a record no reply took.
pub(super) fn taken_by(value: &str) -> Option<(&str, &str)> {
    value.strip_prefix(TAKEN)?.split_once('\n')
}

/// Takes a request's inbox for a reply: marks its record [`TAKEN`] by the reply's sequence, keeping
/// its expiry, unless a reply took it already. KEYS: the inbox's record. ARGV: the reply's sequence,
/// [`TAKEN`].
/// Returns {the record as it is now (marked), 1 when this call marked it, else 0}, or nil when there
/// is none (closed, or lost by Redis). The mark, not a delete, lets a retry of the same reply find
/// the inbox its own.
pub(super) static TAKE_INBOX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local record = redis.call('GET', KEYS[1])
if not record then
  return false
end
if string.sub(record, 1, #ARGV[2]) == ARGV[2] then
  return {record, 0}
end
local ttl = redis.call('PTTL', KEYS[1])
record = ARGV[2] .. ARGV[1] .. '\n' .. record
if ttl > 0 then
  redis.call('SET', KEYS[1], record, 'PX', ttl)
elseif ttl == -1 then
  redis.call('SET', KEYS[1], record)
else
  -- expiring this millisecond: gone
  return false
end
return {record, 1}
",
    )
});

/// Gives back a take whose reply reached nobody ([`TAKE_INBOX`]), so another reply may still reach
/// the requester: puts the record back as it was, keeping its expiry, while it is still this take's.
/// KEYS: the inbox's record. ARGV: the record as marked, the record as it was.
pub(super) static UNTAKE_INBOX: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
elseif ttl == -1 then
  redis.call('SET', KEYS[1], ARGV[2])
else
  return 0
end
return 1
",
    )
});
