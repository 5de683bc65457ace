-- takeScript: its KEYS and ARGV are described where scripts.go declares it.
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
-- Earliest deadline first among one client's requests at different
-- replicas: while the buckets are contended, a take whose request can
-- wait longer (by more than a retry) than the client's most urgent request
-- waiting at another replica lets that one go first, so each replica's
-- queue keeps the turns it predicted. Each replica keeps, while the client
-- has requests waiting there, the nearest of their deadlines in
-- e:<replica>:<client> ("deadline,fresh until", in ms), fresh for
-- ARGV[4N+8] ms after its last take. ARGV[4N+13] is the ms until this
-- request's deadline, ARGV[4N+14] until that of the client's next request
-- waiting at this replica (-1: none).
local retry = tonumber(ARGV[4 * n + 9])
local mine_d, next_d = tonumber(ARGV[4 * n + 13]), tonumber(ARGV[4 * n + 14])
local me_id = ARGV[4 * n + 11]
local ek = 'e:' .. me_id .. ':' .. cname
for k, v in pairs(tags) do
  local rid, name = string.match(k, '^e:([^:]+):(.*)$')
  if rid and name == cname and rid ~= me_id then
    local d, fresh = string.match(v, '^([^,]+),([^,]+)$')
    d, fresh = tonumber(d), tonumber(fresh)
    if not d or not fresh or fresh <= now or d <= now then
      redis.call('HDEL', fk, k)
    elseif wait == 0 and contended and mine_d >= 0 and d + retry < now + mine_d then
      wait, bind = retry, 2 * n + 3
    end
  end
end
local keep = -1
if wait ~= 0 and mine_d >= 0 then keep = now + mine_d end
if next_d >= 0 and (keep < 0 or now + next_d < keep) then keep = now + next_d end
if keep >= 0 then
  redis.call('HSET', fk, ek, tostring(keep) .. ',' .. tostring(now + tonumber(ARGV[4 * n + 8])))
elseif tags[ek] then
  redis.call('HDEL', fk, ek)
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
-- The replicas with requests waiting: this one's mark (b:<replica>, until
-- a second from now) written, or, its queue empty, removed; the others'
-- still fresh counted, the stale removed.
local me = 'b:' .. ARGV[4 * n + 11]
if ARGV[4 * n + 12] == '1' then
  redis.call('HSET', fk, me, tostring(now + 1000))
elseif tags[me] then
  redis.call('HDEL', fk, me)
end
local count = 0
for k, v in pairs(tags) do
  if string.sub(k, 1, 2) == 'b:' and k ~= me then
    if (tonumber(v) or 0) <= now then
      redis.call('HDEL', fk, k)
    else
      count = count + 1
    end
  end
end
out[4 + 5 * n] = count
return out
