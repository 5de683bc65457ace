-- budgetScript: its KEYS and ARGV are described where scripts.go declares it.
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return n
