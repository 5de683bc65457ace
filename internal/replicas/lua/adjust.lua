-- adjustScript: its KEYS and ARGV are described where scripts.go declares it.
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
