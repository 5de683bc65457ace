package scheduler

import (
	"math"
	"time"
)

// When several gateways share one key's limits (through a store such as
// Redis), each keeps its own queue and learns the shared buckets' levels
// from the store at each admission (Sync), so that its predictions and
// rate headers are the shared ones; and when the store cannot be reached
// each enforces its share of the limits (Share).

// Levels are a shared store's buckets as it reported them: the model's
// and a client's (the latter ignored where the client has no bucket).
type Levels struct {
	Requests, Tokens             float64
	ClientRequests, ClientTokens float64
}

// Sync sets the buckets of the model and of client number client to what
// the shared store reported at now, and reconsiders whose turn it is.
func (q *Queue) Sync(now time.Time, client int, lv Levels) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.req.set(now, lv.Requests)
	q.tok.set(now, lv.Tokens)
	if client >= 0 && client < len(q.lanes) {
		l := q.lanes[client]
		l.req.set(now, lv.ClientRequests)
		l.tok.set(now, lv.ClientTokens)
	}
	q.changed(now)
}

// Share makes the queue enforce share (0 < share <= 1) of every limit it
// has, the model's and each client's: capacity, refill and concurrency
// slots (at least one). Share(now, 1) restores them.
func (q *Queue) Share(now time.Time, share float64) {
	share = math.Max(1e-6, math.Min(1, share))
	q.mu.Lock()
	defer q.mu.Unlock()
	q.gate.setShare(now, share)
	for _, l := range q.lanes {
		l.gate.setShare(now, share)
	}
	q.changed(now)
}

func (g *gate) setShare(now time.Time, share float64) {
	g.req.setShare(now, share)
	g.tok.setShare(now, share)
	if g.maxConcurrent > 0 || g.fullConcurrent > 0 {
		if g.fullConcurrent == 0 {
			g.fullConcurrent = g.maxConcurrent
		}
		g.maxConcurrent = max(1, int(math.Ceil(float64(g.fullConcurrent)*share)))
	}
}
