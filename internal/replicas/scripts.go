package replicas

import (
	_ "embed"
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
//
//go:embed lua/level.lua
var luaLevel string

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
// ARGV[4N+12] whether its queue has requests waiting (1), kept a second
// in the same hash (b:<replica>) so that each replica's queue predicts
// its waits with the others'; ARGV[4N+13..4N+14] are deadlines (see
// below). It returns {ok,
// wait ms (-1: a slot, unknown), what binds (a key's index), the 2N
// levels after, the N marks' paid and N lowered, the N amounts of slice
// granted, and how many other replicas have requests waiting}.
var takeScript = redis.NewScript(luaLevel + takeLua)

//go:embed lua/take.lua
var takeLua string

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
var observeScript = redis.NewScript(luaLevel + observeLua)

//go:embed lua/observe.lua
var observeLua string

// adjustScript adds ARGV[2N+2..3N+1] (an amount per resource) to every
// bucket with a capacity: positive gives back (never above capacity),
// negative charges (never below minus capacity: a debt refill repays). It
// returns the 2N levels after.
var adjustScript = redis.NewScript(luaLevel + adjustLua)

//go:embed lua/adjust.lua
var adjustLua string

// releaseScript ends lease ARGV[1] in the concurrency sets KEYS 1-2.
var releaseScript = redis.NewScript(releaseLua)

//go:embed lua/release.lua
var releaseLua string

// refreshScript extends the leases ARGV[2..] of set KEYS[1] to ARGV[1] ms
// from now, adding those the set lost (Redis flushed or restarted without
// its data): a lease a replica holds is re-asserted, so the slots of
// requests in flight are counted again.
var refreshScript = redis.NewScript(refreshLua)

//go:embed lua/refresh.lua
var refreshLua string

// heartbeatScript marks replica ARGV[1] alive for ARGV[2] ms in the set
// KEYS[1], drops the replicas not seen since, and returns how many are
// alive.
var heartbeatScript = redis.NewScript(heartbeatLua)

//go:embed lua/heartbeat.lua
var heartbeatLua string

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
var budgetScript = redis.NewScript(budgetLua)

//go:embed lua/budget.lua
var budgetLua string

// capScript lowers every bucket with a capacity to at most
// ARGV[2N+1+i] for key i (negative: leave it): after an outage the shared
// buckets resume from what the replicas spent meanwhile, not from full.
var capScript = redis.NewScript(luaLevel + capLua)

//go:embed lua/cap.lua
var capLua string
