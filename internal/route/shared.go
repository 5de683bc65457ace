package route

import (
	"context"
	"net/http"
	"time"

	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/shared"
	"github.com/llproxy/llproxy/scheduler"
)

// Replicas: when the limits are shared (package shared), a request
// admitted by its replica's queue is then reserved in the shared buckets,
// one round trip. If another replica spent them first, the admission goes
// back, the queue learns the shared levels, and the request waits again in
// its replica's queue within its deadline. While Redis cannot be reached
// the route follows onRedisDown, and says so in x-llproxy-limits: local.

// sharedHold is a request's reservation in the shared buckets: a handle
// like the admission, each of whose ends takes effect once.
type sharedHold struct {
	b      *shared.Buckets
	client int
	tokens int // what it holds: its cost, then its settled usage
	lease  string
	held   bool
}

// unsend gives the reservation back whole (the request never ran).
func (h *sharedHold) unsend() {
	if h.held {
		h.held = false
		h.b.Adjust(context.Background(), h.client, 1, h.tokens)
	}
	h.release()
}

// release frees the shared slots it holds.
func (h *sharedHold) release() {
	if h.lease != "" {
		h.b.Release(context.Background(), h.client, h.lease)
		h.lease = ""
	}
}

// settle corrects the tokens it holds to what the request used.
func (h *sharedHold) settle(used int) {
	if h.held && used != h.tokens {
		h.b.Adjust(context.Background(), h.client, 0, h.tokens-used)
		h.tokens = used
	}
}

// unsend gives the request's admission back whole, locally and in the
// shared buckets.
func (ex *exchange) unsend(now time.Time) {
	ex.adm.Unsend(now)
	ex.hold.unsend()
}

// degradedBefore answers a request that arrives while Redis is down under
// onRedisDown deny (503), and reports whether it may go on; under allow it
// goes on unscheduled (unlimited).
func (rt *Route) degradedBefore(ex *exchange, ms *models.Model, rec *requestLog) (goOn, unlimited bool) {
	st := rt.opts.Shared
	if st == nil || ms.Shared == nil || !st.Degraded() {
		return true, false
	}
	ex.local = true
	switch st.Mode() {
	case shared.Deny:
		rec.outcome = metrics.OutcomeSharedDown
		ms.Metrics.Outcome(rec.outcome)
		ex.who.Outcome(rec.outcome)
		ex.Header()["Retry-After"] = []string{"1"}
		openai.WriteError(ex, http.StatusServiceUnavailable, "server_error", "limits_unavailable",
			"llproxy cannot reach the shared limits (Redis) and is configured to refuse until it can (onRedisDown: deny).")
		return false, false
	case shared.Allow:
		return true, true
	}
	return true, false
}

// takeShared reserves an admitted request in the shared buckets, waiting
// again in the replica's queue while other replicas spent them first. It
// returns false when the request was answered (rejected) or left.
func (rt *Route) takeShared(ctx context.Context, ex *exchange, ms *models.Model, cost scheduler.Cost, rec *requestLog) bool {
	st, b := rt.opts.Shared, ms.Shared
	if b == nil {
		return true
	}
	backoff := 20 * time.Millisecond
	for {
		if st.Degraded() {
			// onRedisDown split (deny and allow were decided on arrival):
			// the queue enforces this replica's share; what it admits is
			// written to Redis when it answers again.
			ex.local = true
			b.Spent(cost.Client, 1, cost.Tokens)
			return true
		}
		took, err := b.Take(ctx, cost.Client, cost.Tokens)
		now := time.Now()
		if err != nil {
			continue // degraded now
		}
		lv := scheduler.Levels{Requests: took.Levels[0], Tokens: took.Levels[1],
			ClientRequests: took.Levels[2], ClientTokens: took.Levels[3]}
		if took.OK {
			ex.hold = sharedHold{b: b, client: cost.Client, tokens: cost.Tokens, lease: took.Lease, held: true}
			ms.Queue.Sync(now, cost.Client, lv)
			ex.rate = ms.Queue.StateFor(now, cost.Client)
			return true
		}
		// Another replica spent them first: the admission goes back, the
		// queue learns the shared levels, and the request waits again.
		ex.adm.Unsend(now)
		ms.Queue.Sync(now, cost.Client, lv)
		ms.Metrics.Retry("shared_limit")
		if took.Wait < 0 {
			// A shared slot: when one frees is not known; look again soon.
			if now.Add(backoff).After(ex.deadline) {
				rec.outcome = rt.writeAcquireError(ex, ctx, &scheduler.RejectError{Reason: scheduler.ErrWaitTooLong,
					Model: rec.model, Resource: scheduler.Slots, RetryAfter: time.Second,
					State: ms.Queue.StateFor(now, cost.Client)})
				ms.Metrics.Outcome(rec.outcome)
				ex.who.Outcome(rec.outcome)
				return false
			}
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				rec.outcome = metrics.OutcomeCancelled
				return false
			}
			backoff = min(2*backoff, time.Second)
		}
		adm, err := ms.Queue.Requeue(ctx, cost, ex.deadline, ex.adm)
		if err != nil {
			ex.hasRate = false
			rec.outcome = rt.writeAcquireError(ex, ctx, err)
			ms.Metrics.Outcome(rec.outcome)
			ex.who.Outcome(rec.outcome)
			return false
		}
		ex.adm = adm
		rec.wait += adm.Wait
	}
}
