-- luaLevel (scripts.go): the level of a bucket now, on Redis's clock; prepended to the bucket scripts.
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
