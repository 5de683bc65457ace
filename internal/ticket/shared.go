package ticket

import (
	"context"
	"log/slog"
	"time"

	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/replicas"
	"github.com/llproxy/llproxy/scheduler"
)

// Replicas: when the limits are shared (package replicas), a request
// admitted by its replica's queue is then reserved in the shared buckets,
// one round trip. If another replica spent them first, the admission goes
// back, the queue learns the shared levels, and the request waits again in
// its replica's queue within its deadline. While Redis cannot be reached
// the gate follows onRedisDown, and the ticket says so (Local).

// sharedHold is a request's reservation in the shared buckets: a handle
// like the admission, each of whose ends takes effect once.
type sharedHold struct {
	b      *replicas.Buckets
	client int
	held   scheduler.Vector // what it holds: its cost, then its settled usage
	lease  string
	on     bool
	mark   replicas.Mark    // where its payment left the model's buckets
	unsent scheduler.Vector // what it gave back unused: the upstream never counted it
}

// unsend gives the reservation back whole (the request never ran).
func (h *sharedHold) unsend() {
	if h.on {
		h.on = false
		h.unsent = h.held
		h.b.Adjust(context.Background(), h.client, h.held)
	}
	h.release()
}

// observe lowers the key's shared buckets to what the upstream's answer
// to this request says is left, once however many replicas hear the
// same; it reports whether it lowered one.
func (h *sharedHold) observe(u scheduler.Upstream) bool {
	if h.b == nil {
		return false
	}
	lowered, err := h.b.Observe(context.Background(), h.client, h.mark, h.unsent, u)
	return err == nil && lowered > 0
}

// release frees the shared slots it holds.
func (h *sharedHold) release() {
	if h.lease != "" {
		h.b.Release(context.Background(), h.client, h.lease)
		h.lease = ""
	}
}

// settle corrects what it holds to what the request used.
func (h *sharedHold) settle(used scheduler.Vector) {
	if !h.on || used == h.held {
		return
	}
	var delta scheduler.Vector
	for r := range delta {
		delta[r] = h.held[r] - max(0, used[r])
	}
	h.b.Adjust(context.Background(), h.client, delta)
	h.held = used
}

// slotBackoff is the first wait before a shared slot is looked for again;
// it doubles to at most a second.
const slotBackoff = 20 * time.Millisecond

// takeShared reserves the admitted request in the shared buckets, waiting
// again in the replica's queue while other replicas spent them first, all
// within the ticket's deadline. On an error the admission went back.
func (t *Ticket) takeShared(ctx context.Context) error {
	st, b := t.g.Shared, t.Model.Shared
	if b == nil {
		return nil
	}
	backoff := slotBackoff
	for {
		if st.Degraded() {
			// Redis went down while the request waited. Split: the queue
			// enforces this replica's share (what is left of it is written
			// to Redis when it answers again); allow: it goes; deny: 503.
			t.local = true
			if st.Mode() == replicas.Deny {
				t.adm.Unsend(time.Now())
				return ErrLimitsUnavailable
			}
			t.adm.Confirm(time.Now(), nil)
			return nil
		}
		took, err := b.Take(ctx, t.cost.Client, t.cost.Amount,
			replicas.Ask{Deadline: t.deadline, Next: t.Model.Queue.Next(t.cost.Client)})
		now := time.Now()
		if err != nil {
			// Redis is down (degraded now). The queue admitted this request
			// counting on the shared buckets: it decides again, with this
			// replica's share of the limits.
			t.adm.Unsend(now)
			if err := t.requeue(ctx, true); err != nil {
				return err
			}
			continue
		}
		if t.g.Logger != nil && t.g.Logger.Enabled(ctx, slog.LevelDebug) {
			t.g.Logger.LogAttrs(ctx, slog.LevelDebug, "shared take", slog.String("model", t.name),
				slog.Bool("ok", took.OK), slog.Duration("wait", took.Wait),
				slog.Float64("requests_left", took.Levels.Model[scheduler.Requests]))
		}
		lv := took.Levels
		t.Model.Queue.Others(now, took.Others)
		if took.OK {
			t.hold = sharedHold{b: b, client: t.cost.Client, held: t.cost.Amount, lease: took.Lease, on: true, mark: took.Mark}
			t.adm.Confirm(now, &lv)
			t.rate = t.Model.Queue.StateFor(now, t.cost.Client)
			return nil
		}
		// Another replica spent them first: the admission goes back, the
		// queue learns the shared levels, and the request waits again.
		t.adm.Refused(now, lv)
		t.Model.Metrics.Retry("shared_limit")
		if took.Wait < 0 || took.Fair {
			// A shared slot: when one frees is not known; look again soon.
			// Or another replica's client is owed its share first: look
			// again when it has had it.
			pause, resource := backoff, scheduler.Slots
			if took.Fair {
				pause, resource = took.Wait, scheduler.Tokens
			}
			if now.Add(pause).After(t.deadline) {
				t.hasRate = false
				return &scheduler.RejectError{Reason: scheduler.ErrWaitTooLong, Model: t.name,
					Resource: resource, RetryAfter: time.Second, State: t.Model.Queue.StateFor(now, t.cost.Client)}
			}
			timer := time.NewTimer(pause)
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				return ctx.Err()
			}
			if !took.Fair {
				backoff = min(2*backoff, time.Second)
			}
		}
		if err := t.requeue(ctx, true); err != nil {
			return err
		}
	}
}

// Recover lowers the shared buckets of every model of the gate, for each
// of its clients (numbered 0 to clients-1), to what this replica's queues
// hold of them, after an outage: a floor of what is left (each replica
// holds its share of it), so the buckets resume from what was spent,
// never from more.
func (g *Gate) Recover(ctx context.Context, clients int) error {
	now := time.Now()
	var err error
	g.Models.Range(func(ms *models.Model) {
		if ms.Shared == nil || err != nil {
			return
		}
		for client := range clients {
			if err = ms.Shared.Cap(ctx, client, ms.Queue.Estimate(now, client)); err != nil {
				return
			}
		}
	})
	return err
}
