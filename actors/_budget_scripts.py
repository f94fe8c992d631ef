"""The Lua scripts of the Redis budget ledger (``actors.budget_redis.RedisBudgetBook``): each runs whole inside
Redis, so a reservation or settlement batch has no check-then-increment window. Kept apart from the book that
calls them, which builds their arguments and reads their replies."""

from __future__ import annotations

__all__ = ["BOOK_SEQ", "CHARGE", "PROBE", "RESERVE", "SETTLE", "SLOT_STILL", "SWEEP_ONLY", "UPGRADE", "on_cluster"]

# On a Redis Cluster, run first by every script of the ledger that writes (``on_cluster``): while the ledger's slot
# moves to another node (``redis-cli --cluster reshard`` or ``rebalance``: CLUSTER SETSLOT IMPORTING and MIGRATING,
# MIGRATE key by key, SETSLOT NODE), on the node it leaves or the one it goes to, the script writes nothing and
# answers TRYAGAIN, which the cluster client sends again for a while (about half a second) and then raises: an outage
# (claims answered budget_unavailable, settlements and charges kept in the outbox until it answers, each counted
# once). A script names one or two keys and reaches the others unnamed, which Redis checks only as each is touched:
# on the node the slot leaves, a key moved already (or never there: a new claim's record, a settlement's marker)
# stopped the script midway, after its writes, and sent again it counted them twice (stop 78's hunt: a $1.50
# settlement counted $3.00, its $2 reservation released twice); on the node it goes to (reached by ASK once the
# named keys had moved) a key not moved yet read as absent: a $4 claim granted under a $10 limit with $7 spent or
# held, its window written there, and the reshard's MIGRATE of that window then refused (BUSYKEY). The check is
# Redis's own, made on each key a script touches: two keys of the slot that never exist, read together, are refused
# on the node the slot leaves (ASK: not there) and on the one it goes to (TRYAGAIN: keys missing mid-move), and read
# as 0 on a slot at rest; it needs no CLUSTER command. A slot's state cannot change while a script runs, so one that
# passes this runs whole on a node holding every key of the ledger. Any error here is taken for a move (an outage
# that names it), never let through. Before (a review), the check read CLUSTER NODES in each script: 22 us of the
# node's one thread a call on 3 nodes, up to 300 us on 100, 620 us with fragmented slots (this: 0.3 to 2.5 us;
# benchmarks/bench_ledger_slot_guard.py), and a node refusing CLUSTER to scripts (an ACL, a managed service) ran the
# scripts unguarded.
SLOT_STILL = """
if redis.replicate_commands then redis.replicate_commands() end
do
  local still = redis.pcall('EXISTS', KEYS[1] .. ':slot-still:a', KEYS[1] .. ':slot-still:b')
  if type(still) == 'table' and still.err then
    return redis.error_reply("TRYAGAIN the budget ledger's slot is moving between nodes? (" .. still.err .. ')')
  end
end
"""


def on_cluster(script: str) -> str:
    """``script`` as a ledger on a Redis Cluster runs it: refused (TRYAGAIN) while its slot moves (``SLOT_STILL``).
    Only there: a single Redis's keys never move (the guard reads no ``CLUSTER`` command since stop 78's review)."""
    return SLOT_STILL + script


# Run first by every script that writes for a book (``RESERVE``, ``SETTLE``, ``CHARGE``, and the replay's
# ``_REOPEN``): the book's own sequence, KEYS[2] (``{prefix}:seq:<book>``, in the ledger's slot), bumped once per
# script and returned with its answer. The book sends the highest it has seen (the last ARGV; -1: none; -2: a
# put-back's script, which neither checks nor bumps it: the put-back bumps it once when all of it went) and the
# key's life (the one before). Lower here than the book has seen, this Redis lacks writes it acknowledged (a replica
# promoted without them, with no failed call, its old master demoted alive; a restart from an older snapshot within
# the watch's second, or one that kept its run_id): the script writes nothing and answers {'lost', value}, so the
# book puts back what it lost before anything is decided (``ServerWatch._put_back``). Only that book bumps it, so
# another engine's writes on the promoted replica cannot hide the loss, as one counter for the ledger would.
BOOK_SEQ = """
local function book_seq()
  local want = tonumber(ARGV[#ARGV])
  local have = tonumber(redis.call('GET', KEYS[2]) or '0')
  if want == -2 then return have end
  if have < want then return false, have end
  local seq = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[#ARGV - 1]))
  return seq
end
"""

# Run first by every script: release the reservations of claims past their expiry.
SWEEP = """
if redis.replicate_commands then redis.replicate_commands() end
local function sweep(prefix, limit)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local exp = prefix .. ':exp'
  local due = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, limit)
  for _, rid in ipairs(due) do
    local claim = prefix .. ':c:' .. rid
    if redis.call('HEXISTS', claim, '_swept') == 0 then
      local kv = redis.call('HGETALL', claim)
      for j = 1, #kv, 2 do
        local h = prefix .. ':w:' .. kv[j]
        if kv[j] ~= '_who' and redis.call('EXISTS', h) == 1 then
          redis.call('HINCRBYFLOAT', h, 'reserved', -tonumber(kv[j + 1]))
        end
      end
      if #kv > 0 then
        redis.call('HSET', claim, '_swept', '1')
        redis.call('EXPIRE', claim, 86400)  -- a day for a late settlement to count its spend
      end
    end
    redis.call('ZREM', exp, rid)
  end
  return now, #due
end
"""

RESERVE = SWEEP + BOOK_SEQ + """
local seq, have = book_seq()
if not seq then return {'lost', have} end
local prefix = ARGV[1]
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local now = sweep(prefix, tonumber(ARGV[4]))
local i = 5
local out = {}
for c = 1, n do
  local rid, amount, nk = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  local refused = {}
  for j = 0, nk - 1 do
    local h = prefix .. ':w:' .. ARGV[i + 4 * j]
    local limit = tonumber(ARGV[i + 4 * j + 1])
    local allowed = tonumber(ARGV[i + 4 * j + 2])
    local spent = tonumber(redis.call('HGET', h, 'spent') or '0')
    local used = spent + tonumber(redis.call('HGET', h, 'reserved') or '0')
    if used + amount > allowed + 1e-9 then
      local fits = (spent + amount <= allowed + 1e-9) and '1' or '0'
      refused[#refused + 1] = tostring(j + 1) .. ':' .. tostring(limit - used) .. ':' .. fits
    end
  end
  if #refused == 0 then
    -- Written for a claim no budget covers too: its settlement finds whose spend it is (the report's spend per
    -- tenant is the bill's, as the in-process ledger's).
    local claim = prefix .. ':c:' .. rid
    redis.call('HSET', claim, '_who', ARGV[i + 4 * nk])
    for j = 0, nk - 1 do
      local k, ttl = ARGV[i + 4 * j], tonumber(ARGV[i + 4 * j + 3])
      local h = prefix .. ':w:' .. k
      redis.call('HINCRBYFLOAT', h, 'reserved', amount)
      if ttl > 0 then redis.call('EXPIRE', h, ttl) end
      redis.call('HINCRBYFLOAT', claim, k, amount)
    end
    -- No expiry of its own until it is settled or swept: the sweep must find what to release however long after
    -- the claim's expiry the next script runs (a record that outlived it by a day was lost over a long weekend,
    -- and its reservation stayed for good).
    redis.call('ZADD', prefix .. ':exp', now + ttl, rid)
  end
  out[c] = table.concat(refused, ',')
  i = i + 4 * nk + 1
end
return {seq, out}
"""

SETTLE = SWEEP + BOOK_SEQ + """
local seq, have = book_seq()
if not seq then return {'lost', have} end
local prefix = ARGV[1]
local n = tonumber(ARGV[2])
sweep(prefix, tonumber(ARGV[3]))
local marked = tonumber(ARGV[4])
local i = 5
local lost = 0
for c = 1, n do
  local rid, actual, who, nk = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3])
  local claim = prefix .. ':c:' .. rid
  -- A swept claim's reservation was released already: count its spend, release nothing again.
  local swept = redis.call('HEXISTS', claim, '_swept') == 1
  local kv = redis.call('HGETALL', claim)
  local done = prefix .. ':s:' .. rid
  if #kv == 0 and who ~= '' and actual > 0 and redis.call('EXISTS', done) == 0 then
    -- Its record is gone (a Redis restarted without persistence): the spend is counted where the claim was,
    -- as a charge. A settlement replayed after its reply was lost finds the marker left below: counted once.
    lost = lost + 1
    redis.call('HINCRBYFLOAT', prefix .. ':spend', who, actual)
    for j = 0, nk - 1 do
      local h, ttl = prefix .. ':w:' .. ARGV[i + 4 + 2 * j], tonumber(ARGV[i + 5 + 2 * j])
      redis.call('HINCRBYFLOAT', h, 'spent', actual)
      if ttl > 0 then redis.call('EXPIRE', h, ttl) end
    end
  end
  for j = 1, #kv, 2 do
    if kv[j] == '_who' then
      redis.call('HINCRBYFLOAT', prefix .. ':spend', kv[j + 1], actual)
    elseif kv[j] ~= '_swept' then
      local h = prefix .. ':w:' .. kv[j]
      if redis.call('EXISTS', h) == 1 then  -- never recreate an expired window without its TTL
        if not swept then redis.call('HINCRBYFLOAT', h, 'reserved', -tonumber(kv[j + 1])) end
        redis.call('HINCRBYFLOAT', h, 'spent', actual)
      end
    end
  end
  -- As long as the controller may send it again (it keeps who spent it that long): an hour's marker let a
  -- replay after a longer outage, whose first try Redis had run, count the spend twice (a helper's hunt).
  -- Left too by a settlement that counted the record without knowing it (a resume's rescue settling a killed
  -- run's claims): without it, that run's own settlement kept in a file, sent later with the claim's copy,
  -- found no record and no marker and counted its spend again as a record Redis lost (a review).
  if who ~= '' or #kv > 0 then redis.call('SET', done, '1', 'EX', marked) end
  redis.call('DEL', claim)
  redis.call('ZREM', prefix .. ':exp', rid)
  i = i + 4 + 2 * nk
end
return {seq, lost}
"""

# Spend no claim covers (``Charge``): counted once per charge id, whose marker lives two days past its last sending.
# A book sends a charge again at each put-back of its last two hours (``ServerWatch._put_back``), which keeps it two
# hours more: a marker left to expire two days after the first, put-backs within two hours of each other over two
# days sent it again past it, and it counted twice (a review).
CHARGE = BOOK_SEQ + """
local seq, have = book_seq()
if not seq then return {'lost', have} end
local prefix = ARGV[1]
local n = tonumber(ARGV[2])
local i = 3
for c = 1, n do
  local cid, usd, who, nk = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3])
  i = i + 4
  local x = prefix .. ':x:' .. cid
  if not redis.call('SET', x, '1', 'NX', 'EX', 172800) then
    redis.call('EXPIRE', x, 172800)
  else
    redis.call('HINCRBYFLOAT', prefix .. ':spend', who, usd)
    for j = 0, nk - 1 do
      local h, ttl = prefix .. ':w:' .. ARGV[i + 2 * j], tonumber(ARGV[i + 2 * j + 1])
      redis.call('HINCRBYFLOAT', h, 'spent', usd)
      if ttl > 0 then redis.call('EXPIRE', h, ttl) end
    end
  end
  i = i + 2 * nk
end
return {seq, n}
"""

SWEEP_ONLY = SWEEP + """
local now, swept = sweep(ARGV[1], tonumber(ARGV[2]))
return swept
"""

# A write every ledger script may make: a Redis that answers reads but refuses writes (a read-only replica, a full
# one under noeviction) refuses this, where a sweep with nothing due writes nothing and passes (a helper's hunt).
PROBE = """
redis.call('SET', ARGV[1] .. ':probe', '1', 'PX', 60000)
return 1
"""

# Budgets' windows under the keys the version before stop 74 gave them (their names unquoted: ``legacy_key``) are
# moved to today's keys once, with the open claims that hold room in them (they release and settle on the new
# keys): left there, a tenant such as "alice@example.com" began its window (a never-resetting budget: its life) at
# $0. ARGV: prefix, n, then n times (old key, new key, TTL). Every budget a call moves goes in one script, which
# reads each open claim's record once: one script per budget read them all each time (budgets x claims reads, a
# review: 100 budgets and 100,000 open claims held the first reservation 13 s, Redis blocked ~150 ms per budget).
# Everything is read and checked before the first write: a script stopped by an error keeps what it wrote, and one
# that met a claim id's key of another type (written by another program) after moving a window's spend, before
# deleting it, moved that spend again at every call after ($0.5 counted $1.5 after three; a review). A key that is
# not the ledger's hash, or a value that is not a number, is left as it is.
UPGRADE = """
local prefix, n = ARGV[1], tonumber(ARGV[2])
local function hash(key)
  local t = redis.call('TYPE', key)['ok']
  return t == 'hash' or t == 'none'
end
local function number(key, f)
  local v = redis.pcall('HGET', key, f)
  return v == false or tonumber(v) ~= nil
end
local moved, windows = {}, {}
for k = 0, n - 1 do
  local old, new, ttl = ARGV[3 + 3 * k], ARGV[4 + 3 * k], tonumber(ARGV[5 + 3 * k])
  local ho, hn = prefix .. ':w:' .. old, prefix .. ':w:' .. new
  if moved[old] == nil and redis.call('EXISTS', ho) == 1 and hash(ho) and hash(hn)
      and number(ho, 'spent') and number(ho, 'reserved') and number(hn, 'spent') and number(hn, 'reserved') then
    moved[old] = new
    windows[#windows + 1] = {ho, hn, ttl}
  end
end
if #windows == 0 then return 0 end
local claims = {}
for _, rid in ipairs(redis.call('ZRANGE', prefix .. ':exp', 0, -1)) do
  local claim = prefix .. ':c:' .. rid
  if hash(claim) then
    local kv = redis.call('HGETALL', claim)
    for j = 1, #kv, 2 do
      local new = moved[kv[j]]
      if new and tonumber(kv[j + 1]) then
        claims[#claims + 1] = {claim, kv[j], new, kv[j + 1]}
      end
    end
  end
end
for _, w in ipairs(windows) do
  for _, f in ipairs({'spent', 'reserved'}) do
    redis.call('HINCRBYFLOAT', w[2], f, tonumber(redis.call('HGET', w[1], f) or '0'))
  end
  if w[3] > 0 then redis.call('EXPIRE', w[2], w[3]) end
  redis.call('DEL', w[1])
end
for _, c in ipairs(claims) do
  redis.call('HDEL', c[1], c[2])
  redis.call('HINCRBYFLOAT', c[1], c[3], c[4])
end
return #claims
"""
