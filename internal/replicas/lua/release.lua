-- releaseScript: its KEYS and ARGV are described where scripts.go declares it.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
