package route

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/replicas"
	"github.com/llproxy/llproxy/scheduler"
)

// Replicas: when the limits are shared (package replicas), a request
// admitted by its replica's queue is then reserved in the shared buckets,
// one round trip. If another replica spent them first, the admission goes
// back, the queue learns the shared levels, and the request waits again in
// its replica's queue within its deadline. While Redis cannot be reached
// the route follows onRedisDown, and says so in x-llproxy-limits: local.

// sharedHold is a request's reservation in the shared buckets: a handle
// like the admission, each of whose ends takes effect once.
type sharedHold struct {
	b      *replicas.Buckets
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
	case replicas.Deny:
		rec.outcome = metrics.OutcomeSharedDown
		ex.Header()["Retry-After"] = []string{"1"}
		openai.WriteError(ex, http.StatusServiceUnavailable, "server_error", "limits_unavailable",
			"llproxy cannot reach the shared limits (Redis) and is configured to refuse until it can (onRedisDown: deny).")
		return false, false
	case replicas.Allow:
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
			// Redis went down while the request waited. Split: the queue
			// enforces this replica's share (what is left of it is written
			// to Redis when it answers again); allow: it goes; deny: 503.
			ex.local = true
			if st.Mode() == replicas.Deny {
				ex.adm.Unsend(time.Now())
				_, _ = rt.degradedBefore(ex, ms, rec)
				return false
			}
			ex.adm.Confirm(time.Now(), nil)
			return true
		}
		took, err := b.Take(ctx, cost.Client, cost.Tokens)
		now := time.Now()
		if err != nil {
			// Redis is down (degraded now). The queue admitted this request
			// counting on the shared buckets: it decides again, with this
			// replica's share of the limits.
			ex.adm.Unsend(now)
			if !rt.requeueShared(ctx, ex, ms, cost, rec) {
				return false
			}
			continue
		}
		if rt.debugging(ctx) {
			rt.debug(ctx, "shared take", slog.Bool("ok", took.OK), slog.Duration("wait", took.Wait),
				slog.Float64("requests_left", took.Levels.Requests))
		}
		lv := took.Levels
		if took.OK {
			ex.hold = sharedHold{b: b, client: cost.Client, tokens: cost.Tokens, lease: took.Lease, held: true}
			ex.adm.Confirm(now, &lv)
			ex.rate = ms.Queue.StateFor(now, cost.Client)
			return true
		}
		// Another replica spent them first: the admission goes back, the
		// queue learns the shared levels, and the request waits again.
		ex.adm.Refused(now, lv)
		ms.Metrics.Retry("shared_limit")
		if took.Wait < 0 {
			// A shared slot: when one frees is not known; look again soon.
			if now.Add(backoff).After(ex.deadline) {
				rec.outcome = rt.writeAcquireError(ex, ctx, &scheduler.RejectError{Reason: scheduler.ErrWaitTooLong,
					Model: rec.model, Resource: scheduler.Slots, RetryAfter: time.Second,
					State: ms.Queue.StateFor(now, cost.Client)})
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
		if !rt.requeueShared(ctx, ex, ms, cost, rec) {
			return false
		}
	}
}

// requeueShared puts a request whose admission went back at the head of
// its client's FIFO again, within its deadline; false: it was answered.
func (rt *Route) requeueShared(ctx context.Context, ex *exchange, ms *models.Model, cost scheduler.Cost, rec *requestLog) bool {
	adm, err := ms.Queue.Requeue(ctx, cost, ex.deadline, ex.adm)
	if err != nil {
		ex.hasRate = false
		rec.outcome = rt.writeAcquireError(ex, ctx, err)
		return false
	}
	ex.adm = adm
	ex.rate = adm.State
	rec.wait += adm.Wait
	return true
}

// RecoverShared lowers the shared buckets of every model of the route to
// what this replica's queues hold of them, after an outage: a floor of
// what is left (each replica holds its share of it), so the buckets
// resume from what was spent, never from more.
func (rt *Route) RecoverShared(ctx context.Context) error {
	now := time.Now()
	var err error
	rt.models.Range(func(ms *models.Model) {
		if ms.Shared == nil || err != nil {
			return
		}
		for client := range rt.clients {
			lv := ms.Queue.Estimate(now, client)
			if err = ms.Shared.Cap(ctx, client, lv); err != nil {
				return
			}
		}
	})
	return err
}
