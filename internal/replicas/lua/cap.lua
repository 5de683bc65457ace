-- capScript: its KEYS and ARGV are described where scripts.go declares it.
local n = tonumber(ARGV[1])
for i = 1, 2 * n do
  local cap, ceil = tonumber(ARGV[1 + i]), tonumber(ARGV[1 + 2 * n + i])
  if cap > 0 and ceil >= 0 then
    local l = level(KEYS[i], cap)
    if ceil < l then store(KEYS[i], cap, ceil) end
  end
end
return 1
