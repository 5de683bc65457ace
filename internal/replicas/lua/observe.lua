-- observeScript: its KEYS and ARGV are described where scripts.go declares it.
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
