package replicas

import "github.com/redis/go-redis/v9"

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

// takeScript reserves one request and ARGV[5] tokens from every bucket
// that has a capacity (KEYS 1-4: model requests, model tokens, client
// requests, client tokens; ARGV 1-4 their capacities, 0 for none) and a
// lease in each concurrency set with a maximum (KEYS 5-6, ARGV 6-7),
// leased as ARGV[8] until ARGV[9] ms from now; or, if any cannot pay now,
// nothing. It returns {ok, wait ms (-1: a slot, unknown), the bucket that
// binds (1-6), the four levels after}.
var takeScript = redis.NewScript(luaLevel + `
local tokens = tonumber(ARGV[5])
local caps = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local need = {1, tokens, 1, tokens}
local levels = {}
local wait, bind = 0, 0
for i = 1, 4 do
  levels[i] = level(KEYS[i], caps[i])
  if caps[i] > 0 and levels[i] < need[i] - 1e-6 then
    local w = math.ceil((need[i] - levels[i]) * 60000 / caps[i])
    if w > wait then wait, bind = w, i end
  end
end
for i = 1, 2 do
  local max = tonumber(ARGV[5 + i])
  if max > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[4 + i], '-inf', now)
    if redis.call('ZCARD', KEYS[4 + i]) >= max then wait, bind = -1, 4 + i end
  end
end
if wait ~= 0 then
  return {0, wait, bind, tostring(levels[1]), tostring(levels[2]), tostring(levels[3]), tostring(levels[4])}
end
for i = 1, 4 do
  if caps[i] > 0 then
    levels[i] = levels[i] - need[i]
    store(KEYS[i], caps[i], levels[i])
  end
end
for i = 1, 2 do
  if tonumber(ARGV[5 + i]) > 0 then
    redis.call('ZADD', KEYS[4 + i], now + tonumber(ARGV[9]), ARGV[8])
    redis.call('PEXPIRE', KEYS[4 + i], tonumber(ARGV[9]) * 2)
  end
end
return {1, 0, 0, tostring(levels[1]), tostring(levels[2]), tostring(levels[3]), tostring(levels[4])}
`)

// adjustScript adds ARGV[5] requests and ARGV[6] tokens to every bucket
// with a capacity (KEYS 1-4, ARGV 1-4 as takeScript): positive gives back
// (never above capacity), negative charges (never below minus capacity:
// a debt refill repays). It returns the four levels after.
var adjustScript = redis.NewScript(luaLevel + `
local caps = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])}
local delta = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local levels = {}
for i = 1, 4 do
  levels[i] = level(KEYS[i], caps[i])
  if caps[i] > 0 and delta[i] ~= 0 then
    levels[i] = math.max(-caps[i], math.min(caps[i], levels[i] + delta[i]))
    store(KEYS[i], caps[i], levels[i])
  end
end
return {tostring(levels[1]), tostring(levels[2]), tostring(levels[3]), tostring(levels[4])}
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

// budgetScript adds ARGV[1] tokens to the day's use KEYS[1], kept two
// days, and returns the total.
var budgetScript = redis.NewScript(`
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 172800)
return n
`)

// capScript lowers every bucket with a capacity (KEYS 1-4, ARGV 1-4 as
// takeScript) to at most ARGV[5..8] (negative: leave it): after an outage
// the shared buckets resume from what the replicas spent meanwhile, not
// from full.
var capScript = redis.NewScript(luaLevel + `
for i = 1, 4 do
  local cap, ceil = tonumber(ARGV[i]), tonumber(ARGV[4 + i])
  if cap > 0 and ceil >= 0 then
    local l = level(KEYS[i], cap)
    if ceil < l then store(KEYS[i], cap, ceil) end
  end
end
return 1
`)
