package replicas

import (
	"context"
	"errors"
	"strings"

	"github.com/redis/go-redis/v9"
)

// A key of the wrong type (someone ran SET on a bucket's key, an old
// version wrote it otherwise) is that key's problem, not Redis being away:
// the call that met it replaces the key (deletes it: a missing bucket is
// full, a missing count empty), logs it, and runs again; nothing turns
// degraded, so every other model stays shared, and this one is shared
// again at once.

// The types the scripts keep their keys in.
const (
	typeBucket = "hash"
	typeLeases = "zset"
	typeCount  = "string"
)

// bucketTypes are the types of a Buckets call's keys (see keys).
var bucketTypes = func() (t keyTypes) {
	for i := range t {
		t[i] = typeBucket
		if i == modelSlots || i == clientSlots {
			t[i] = typeLeases
		}
	}
	return t
}()

// keyTrouble reports whether err is Redis's answer about a key's data (a
// key holding the wrong kind of value), as opposed to Redis not answering.
func keyTrouble(err error) bool {
	var re redis.Error
	return err != nil && errors.As(err, &re) && strings.Contains(err.Error(), "WRONGTYPE")
}

// eval runs script on keys (whose types should be types), and once more
// after replacing those of another type if Redis said one was.
func (s *State) eval(ctx context.Context, script *redis.Script, keys, types []string, args ...any) *redis.Cmd {
	cmd := script.Run(ctx, s.rdb, keys, args...)
	if keyTrouble(cmd.Err()) && s.repair(ctx, keys, types) {
		cmd = script.Run(ctx, s.rdb, keys, args...)
	}
	return cmd
}

// repair deletes the keys whose type is not the one the scripts keep them
// in, logging each; it reports whether it replaced any.
func (s *State) repair(ctx context.Context, keys, types []string) bool {
	replaced := false
	for i, k := range keys {
		got, err := s.rdb.Type(ctx, k).Result()
		if err != nil || got == "none" || got == types[i] {
			continue
		}
		if err := s.rdb.Del(ctx, k).Err(); err != nil {
			continue
		}
		s.log.Warn("shared limits: a Redis key of the wrong type was replaced", "key", k, "type", got, "want", types[i])
		s.repaired.Inc()
		replaced = true
	}
	return replaced
}
