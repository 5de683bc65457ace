package replicas

import (
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// The scripts run atomically in Redis, on Redis's clock (TIME), so that
// replicas whose clocks disagree still agree on every bucket. A bucket is
// a hash {l: level, t: when, in ms}; it refills continuously at its
// capacity per minute, as the in-process buckets do, and a missing one is
// full. A concurrency count is a sorted set of leases scored by when they
// expire, refreshed by their replica's heartbeat, so that a replica that
// dies gives its slots back. All keys of one call share a hash tag: they
// work on Redis Cluster.

// luaLevel is the level of bucket key of capacity cap at now.
const luaLevel = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, cap)
  if cap <= 0 then return 0 end
  local v = redis.call('HMGET', key, 'l', 't')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if not l then return cap end
  return math.min(cap, l + math.max(0, now - ts) * cap / 60000)
end
local function store(key, cap, l)
  redis.call('HSET', key, 'l', tostring(l), 't', now)
  redis.call('PEXPIRE', key, 180000)
end
`

// A model's bucket also counts, for the upstream's headers, everything
// ever paid from it (p) and everything its observations lowered it by
// (w): a request's mark is both, taken when it paid, so that an
// observation knows what was paid and lowered since (see observeScript).
// A bucket that expired (idle three minutes, so full) starts them over.

// The bucket scripts take ARGV[1] = N, the resources per gate; then
// KEYS 1..N are the model's buckets and N+1..2N the client's, by resource,
// with their capacities in ARGV 2..2N+1 (0: no such bucket). What follows
// is each script's own.

// takeScript reserves the cost ARGV[2N+2..3N+1] (an amount per resource)
// from every bucket that has a capacity and a lease in each concurrency
// set with a maximum (KEYS 2N+1, 2N+2; maxima ARGV 3N+2, 3N+3), leased as
// ARGV[3N+4] until ARGV[3N+5] ms from now; or, if any cannot pay now,
// nothing. With the cost it pays as much of the slice ARGV[3N+6..4N+5]
// (an amount per resource) as every bucket can pay from above half its
// capacity (the same fraction of each resource, rounded down): far from
// the limit a replica borrows its slice, near it nothing, and the take is
// exact. Then ARGV[4N+6..4N+10] are the client's name and weight, how
// long it counts as waiting, how long a fair-share wait is and whether
// it has more requests waiting (see below). ARGV[4N+11] is the replica,
// ARGV[4N+12..5N+11] what its queue has waiting (an amount per resource),
// kept a second in the same hash (b:<replica>) so that each replica's
// queue predicts its waits with the others' backlogs. It returns {ok,
// wait ms (-1: a slot, unknown), what binds (a key's index), the 2N
// levels after, the N marks' paid and N lowered, the N amounts of slice
// granted, and how many other replicas have requests waiting}.
var takeScript = redis.NewScript(luaLevel + `
local n = tonumber(ARGV[1])
local levels = {}
local wait, bind = 0, 0
for i = 1, 2 * n do
  local cap = tonumber(ARGV[1 + i])
  local need = tonumber(ARGV[2 + 2 * n + (i - 1) % n])
  levels[i] = level(KEYS[i], cap)
  if cap > 0 and levels[i] < need - 1e-6 then
    local w = math.ceil((need - levels[i]) * 60000 / cap)
    if w > wait then wait, bind = w, i end
  end
end
for i = 1, 2 do
  local max = tonumber(ARGV[3 * n + 1 + i])
  if max > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * n + i], '-inf', now)
    if redis.call('ZCARD', KEYS[2 * n + i]) >= max then wait, bind = -1, 2 * n + i end
  end
end
-- Fair share across replicas: a start-time fair queue over the clients
-- waiting (within ARGV[4N+8] ms of a refused take, or of a take while
-- more of its requests waited at its replica) in the hash KEYS[2N+3]
-- (f:<client>: its finish tag, tokens / weight; a:<client>: when it
-- stops counting as waiting). While the model's buckets are contended
-- (one would fall below half), a client whose start tag is ahead of
-- another waiting client's by more than its own step waits ARGV[4N+9] ms:
-- clients at different replicas share tokens by weight, not by how fast
-- their replicas ask.
local fk = KEYS[2 * n + 3]
local cname, weight = ARGV[4 * n + 6], tonumber(ARGV[4 * n + 7])
local tags = {}
local all = redis.call('HGETALL', fk)
for j = 1, #all, 2 do tags[all[j]] = all[j + 1] end
local was = (tonumber(tags['a:' .. cname]) or 0) > now
redis.call('PEXPIRE', fk, 180000)
local tok = math.max(1, tonumber(ARGV[3 + 2 * n]))
local contended = false
for i = 1, n do
  local cap = tonumber(ARGV[1 + i])
  if cap > 0 and levels[i] - tonumber(ARGV[1 + 2 * n + i]) < cap / 2 then contended = true end
end
local others = nil
for k, v in pairs(tags) do
  if string.sub(k, 1, 2) == 'a:' and tonumber(v) > now and string.sub(k, 3) ~= cname then
    local fo = tonumber(tags['f:' .. string.sub(k, 3)]) or 0
    if others == nil or fo < others then others = fo end
  end
end
-- A client that was waiting goes on from its own tag; one that comes
-- back starts level with the others (no credit for being away).
local start = tonumber(tags['f:' .. cname]) or 0
if not was and others ~= nil and others > start then start = others end
-- A lead is forgiven beyond two of the client's own steps (what it was
-- served while others were not asking, or from leased slices, is no
-- debt to pay back for long): waiting clients share from there.
if others ~= nil and start > others + 2 * tok / weight then
  start = others + 2 * tok / weight
  redis.call('HSET', fk, 'f:' .. cname, tostring(start))
end
if wait == 0 and others ~= nil and contended and start > others + tok / weight then
  wait, bind = tonumber(ARGV[4 * n + 9]), 2 * n + 3
end
-- While the buckets are not contended everyone who asks is served: no
-- client earns a debt or a credit, the tags stay level.
if not contended and others ~= nil then start = others end
-- A client counts as waiting (its share owed) for a while after a take
-- of its was refused or while it has more requests waiting at its
-- replica (ARGV[4N+10] = 1): one whose takes all go through holds nobody
-- back.
if wait ~= 0 or ARGV[4 * n + 10] == '1' then
  redis.call('HSET', fk, 'a:' .. cname, now + tonumber(ARGV[4 * n + 8]))
end
local out = {0, wait, bind}
local marks = {}
local granted = {}
if wait == 0 then
  out[1] = 1
  local f = 1
  for i = 1, 2 * n do
    local cap = tonumber(ARGV[1 + i])
    local extra = tonumber(ARGV[3 * n + 5 + 1 + (i - 1) % n]) or 0
    if cap > 0 and extra > 0 then
      local above = levels[i] - tonumber(ARGV[2 + 2 * n + (i - 1) % n]) - cap / 2
      f = math.min(f, math.max(0, above / extra))
    end
  end
  for r = 1, n do granted[r] = math.floor(f * (tonumber(ARGV[3 * n + 5 + r]) or 0)) end
  for i = 1, 2 * n do
    local cap = tonumber(ARGV[1 + i])
    if cap > 0 then
      local need = tonumber(ARGV[2 + 2 * n + (i - 1) % n]) + granted[1 + (i - 1) % n]
      levels[i] = levels[i] - need
      store(KEYS[i], cap, levels[i])
      if i <= n then
        local pw = redis.call('HMGET', KEYS[i], 'p', 'w')
        marks[i] = tostring((tonumber(pw[1]) or 0) + need)
        marks[n + i] = tostring(tonumber(pw[2]) or 0)
        redis.call('HSET', KEYS[i], 'p', marks[i])
      end
    end
  end
  for i = 1, 2 do
    if tonumber(ARGV[3 * n + 1 + i]) > 0 then
      redis.call('ZADD', KEYS[2 * n + i], now + tonumber(ARGV[3 * n + 5]), ARGV[3 * n + 4])
      redis.call('PEXPIRE', KEYS[2 * n + i], tonumber(ARGV[3 * n + 5]) * 2)
    end
  end
end
for i = 1, 2 * n do out[3 + i] = tostring(levels[i]) end
if wait == 0 then
  redis.call('HSET', fk, 'f:' .. cname, tostring(start + tok / weight))
end
for i = 1, 2 * n do out[3 + 2 * n + i] = marks[i] or '0' end
for r = 1, n do out[3 + 4 * n + r] = granted[r] or 0 end
-- The replicas' backlogs: this one's written (or, empty, removed); the
-- others still fresh counted, the stale removed.
local me = 'b:' .. ARGV[4 * n + 11]
local mine, any = tostring(now + 1000), false
for r = 1, n do
  local v = tonumber(ARGV[4 * n + 11 + r]) or 0
  if v > 0 then any = true end
  mine = mine .. ',' .. tostring(v)
end
if any then redis.call('HSET', fk, me, mine) elseif tags[me] then redis.call('HDEL', fk, me) end
local count = 0
for k, v in pairs(tags) do
  if string.sub(k, 1, 2) == 'b:' and k ~= me then
    if (tonumber(string.match(v, '^[^,]+')) or 0) <= now then
      redis.call('HDEL', fk, k)
    else
      count = count + 1
    end
  end
end
out[4 + 5 * n] = count
return out
`)

// observeScript lowers the model's buckets KEYS 1..N (capacities ARGV
// 2..N+1) to what the upstream said it had left, once for every replica:
// per resource i, ARGV gives the request's mark (the bucket's level after
// it paid, plus its cost if the upstream refused it; what was paid and
// lowered in all until then), the upstream's remaining and half its
// rounding (negative remaining: not reported). The discrepancy is the
// mark's level less the remaining; what was paid since (any replica's
// requests, which the upstream may have counted first) and what other
// observations lowered since (the same discrepancy, seen by another
// replica) are not lowered again. It returns what each bucket was lowered
// by, and its level after.
var observeScript = redis.NewScript(luaLevel + `
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local cap = tonumber(ARGV[1 + i])
  local base = 1 + n + 5 * (i - 1)
  local mark, paid0, lowered0 = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local remaining, slack = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local lower = 0
  local l = level(KEYS[i], cap)
  if cap > 0 and remaining >= 0 then
    local pw = redis.call('HMGET', KEYS[i], 'p', 'w')
    local paid, lowered = tonumber(pw[1]) or 0, tonumber(pw[2]) or 0
    if paid >= paid0 and lowered >= lowered0 then
      lower = (mark - remaining) - (paid - paid0) - (lowered - lowered0) - slack
      if lower > 0 then
        l = math.max(-cap, l - lower)
        store(KEYS[i], cap, l)
        redis.call('HSET', KEYS[i], 'w', tostring(lowered + lower))
      else
        lower = 0
      end
    end
  end
  out[i], out[n + i] = tostring(lower), tostring(l)
end
return out
`)

// adjustScript adds ARGV[2N+2..3N+1] (an amount per resource) to every
// bucket with a capacity: positive gives back (never above capacity),
// negative charges (never below minus capacity: a debt refill repays). It
// returns the 2N levels after.
var adjustScript = redis.NewScript(luaLevel + `
local n = tonumber(ARGV[1])
local levels = {}
for i = 1, 2 * n do
  local cap = tonumber(ARGV[1 + i])
  local delta = tonumber(ARGV[2 + 2 * n + (i - 1) % n])
  levels[i] = level(KEYS[i], cap)
  if cap > 0 and delta ~= 0 then
    levels[i] = math.max(-cap, math.min(cap, levels[i] + delta))
    store(KEYS[i], cap, levels[i])
  end
  levels[i] = tostring(levels[i])
end
return levels
`)

// releaseScript ends lease ARGV[1] in the concurrency sets KEYS 1-2.
var releaseScript = redis.NewScript(`
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
`)

// refreshScript extends the leases ARGV[2..] of set KEYS[1] to ARGV[1] ms
// from now, adding those the set lost (Redis flushed or restarted without
// its data): a lease a replica holds is re-asserted, so the slots of
// requests in flight are counted again.
var refreshScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], until_, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
`)

// heartbeatScript marks replica ARGV[1] alive for ARGV[2] ms in the set
// KEYS[1], drops the replicas not seen since, and returns how many are
// alive.
var heartbeatScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZCARD', KEYS[1])
`)

// budgetTTL is how long a budget's key is kept after its last write:
// two days, or, for a month's (a budget whose name ends in "/month"),
// 33 days.
func budgetTTL(model string) time.Duration {
	if strings.HasSuffix(model, "/month") {
		return 33 * 24 * time.Hour
	}
	return 48 * time.Hour
}

// budgetScript adds ARGV[1] tokens to the period's use KEYS[1], kept
// ARGV[2] seconds, and returns the total.
var budgetScript = redis.NewScript(`
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return n
`)

// capScript lowers every bucket with a capacity to at most
// ARGV[2N+1+i] for key i (negative: leave it): after an outage the shared
// buckets resume from what the replicas spent meanwhile, not from full.
var capScript = redis.NewScript(luaLevel + `
local n = tonumber(ARGV[1])
for i = 1, 2 * n do
  local cap, ceil = tonumber(ARGV[1 + i]), tonumber(ARGV[1 + 2 * n + i])
  if cap > 0 and ceil >= 0 then
    local l = level(KEYS[i], cap)
    if ceil < l then store(KEYS[i], cap, ceil) end
  end
end
return 1
`)
