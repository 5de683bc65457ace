// Package ticket is an admitted request's one handle on everything its
// admission holds: its client's budget (clients.Spend), its place in its
// model's buckets and slots (scheduler.Admission), its reservation in the
// buckets replicas share (package replicas), and the deadline by which
// whatever it waits for after admission ends (a retry, a requeue after an
// upstream 429, a shared slot, a fleet backend).
//
// It exists so that the request path holds one handle, released by one
// defer, and reads as its stages: the choreography of the four holds, and
// of Redis being away, is written here once. Admission goes down and back
// once: Admit reserves the budget, checks degraded mode, waits in the
// queue, reserves the shared buckets (waiting again while other replicas
// spent them first), and returns the ticket.
package ticket

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/replicas"
	"github.com/llproxy/llproxy/scheduler"
)

// ErrLimitsUnavailable is Admit's answer while Redis cannot be reached
// and the gateway is configured to refuse until it can (onRedisDown:
// deny). The limits in force are none: the answer says so.
var ErrLimitsUnavailable = errors.New("ticket: the shared limits cannot be reached (onRedisDown: deny)")

// Lessor is where a request's sends go (package fleet): each send leases
// its backend, waiting no longer than the ticket's deadline.
type Lessor interface {
	Lease(ctx context.Context, req *fleet.Request) (*fleet.Lease, error)
}

// Gate is how one route admits its requests. Its fields are set once,
// before use.
type Gate struct {
	// Models are the route's models: a queue retired between lookup and
	// admission is looked up again.
	Models *models.Registry
	// Shared, when set, is where the limits of every replica live.
	Shared *replicas.State
	// SettleActual makes a request's buckets settle to the usage its
	// answer reports; otherwise the reservation stands.
	SettleActual bool
	// Lessor is where sends go.
	Lessor Lessor
	// Logger, if set, logs the shared store's answers at debug level.
	Logger *slog.Logger
}

// Ask is what a request asks of Admit.
type Ask struct {
	Client *clients.Client
	Model  *models.Model
	Name   string // the model's name, as the request gave it
	Cost   scheduler.Vector
	// Money is the most the request can cost: what its client's budgets
	// in money hold for it until it settles.
	Money price.Micro
	// Class is the request's class.
	Class scheduler.Class
	// MaxWait, with OwnWait, is the request's own limit on its wait: it
	// lowers its client's (or the model's), never raises it.
	MaxWait time.Duration
	OwnWait bool
	// KeepAlive, if set, is the request's keep_alive for a managed server.
	KeepAlive *time.Duration
}

// Ticket is an admitted request's hold: what Admit took, and what the
// request's sends wait for. Like a rate.Reservation, it is the one handle
// through which all of it is given back: Release (deferred where Admit
// returns it) ends every hold once, whatever happened before, a panic
// with http.ErrAbortHandler included; Unsend and Settle each take effect
// once for the admission in force (Requeue makes a new one). A nil
// *Ticket does nothing.
//
// A Ticket may live in its owner's pooled state (AdmitInto): it is then
// reused once Release has returned, so nothing may keep a pointer to it,
// or to its Admission, past that.
//
// A Ticket is used by its request's goroutine only.
type Ticket struct {
	// Model is the model's queue and settings (the successor of a queue
	// that was retired while the request was looked up).
	Model *models.Model
	// Wait is how long the request has waited in all (its queue, the
	// shared store, requeues), Predicted what its first wait was predicted
	// to be.
	Wait, Predicted time.Duration

	g         *Gate
	name      string
	cost      scheduler.Cost
	deadline  time.Time
	adm       *scheduler.Admission // the admission in force
	admission scheduler.Admission  // what adm points to
	spend     clients.Spend
	hold      sharedHold
	local     bool // the limits in force are this replica's alone (Redis down)
	hasRate   bool
	rate      scheduler.RateState
	lease     fleet.Request
}

// Admit admits a request (see AdmitInto) into a new Ticket.
func (g *Gate) Admit(ctx context.Context, ask Ask) (*Ticket, error) {
	return g.AdmitInto(ctx, ask, new(Ticket))
}

// AdmitInto admits a request: its client's budget first (over it: a
// *clients.Exhausted or *clients.Reserved, and nothing is queued), then,
// unless Redis is away and onRedisDown says otherwise
// (ErrLimitsUnavailable, or admitted unscheduled), its model's queue (a
// *scheduler.RejectError, scheduler.ErrClosed or ctx's error), then the
// shared buckets, waiting again in the queue while other replicas spent
// them first. It returns t, admitted, holding all of it; on an error it
// holds nothing. t must be zero or a ticket released and no longer used.
func (g *Gate) AdmitInto(ctx context.Context, ask Ask, t *Ticket) (*Ticket, error) {
	t.reset()
	arrived := time.Now()
	t.g, t.Model, t.name = g, ask.Model, ask.Name
	t.cost = scheduler.Cost{Amount: ask.Cost, Client: ask.Client.ID, Name: ask.Client.Name, Class: ask.Class,
		MaxWait: ask.MaxWait, OwnWait: ask.OwnWait}
	spend, err := ask.Client.Reserve(arrived, ask.Name, ask.Cost[scheduler.Tokens], ask.Money)
	if err != nil {
		return nil, err
	}
	t.spend = spend
	unlimited := false
	if g.degraded(t.Model) {
		t.local = true
		switch g.Shared.Mode() {
		case replicas.Deny:
			t.spend.Release()
			return nil, ErrLimitsUnavailable
		case replicas.Allow:
			unlimited = true
		}
	}
	maxWait := t.Model.MaxQueueWait
	if ask.OwnWait {
		maxWait = min(maxWait, ask.MaxWait)
	}
	if unlimited {
		t.adm = &t.admission // the zero admission: nothing held, nothing to give back
	} else {
		if t.adm, err = t.acquire(ctx); err != nil {
			t.spend.Release()
			return nil, err
		}
		t.Wait, t.Predicted = t.adm.Wait, t.adm.Predicted
		t.rate, t.hasRate = t.adm.State, true
		maxWait = t.adm.MaxQueueWait
	}
	// The ticket's deadline is its client's maxQueueWait (the model's
	// where the client has none): retries, requeues, shared slots and
	// fleet backends are waited for until then, and no longer.
	t.deadline = arrived.Add(maxWait)
	if !unlimited {
		if err := t.takeShared(ctx); err != nil {
			t.Release(time.Now())
			return nil, err
		}
	}
	t.lease.Reset(ask.Name, ask.KeepAlive, t.deadline)
	return t, nil
}

// acquire waits in the model's queue; a queue retired for being idle
// between lookup and admission is looked up again (a new queue with full
// buckets, exactly what the idle one held).
func (t *Ticket) acquire(ctx context.Context) (*scheduler.Admission, error) {
	adm, err := t.Model.Queue.AcquireInto(ctx, t.cost, &t.admission)
	if errors.Is(err, scheduler.ErrRetired) {
		var ms *models.Model
		if ms, err = t.g.Models.For(t.name); err == nil {
			t.Model = ms
			adm, err = ms.Queue.AcquireInto(ctx, t.cost, &t.admission)
		}
	}
	return adm, err
}

// reset makes t a new request's, keeping its buffers.
func (t *Ticket) reset() {
	lr := t.lease
	lr.Reset("", nil, time.Time{})
	*t = Ticket{lease: lr}
}

// Reset empties a pooled ticket that was released.
func (t *Ticket) Reset() { t.reset() }

// Deadline is when the request's waits end: its arrival plus its
// maxQueueWait.
func (t *Ticket) Deadline() time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.deadline
}

// Rate is the buckets' state as the request's headers report it, and
// whether there is one (none for a request admitted unscheduled, or one
// whose requeue was refused: its rejection carries its own).
func (t *Ticket) Rate() (*scheduler.RateState, bool) {
	if t == nil {
		return nil, false
	}
	return &t.rate, t.hasRate
}

// Class is the class the request was admitted as: its own, or
// interactive for a batch request promoted for its age.
func (t *Ticket) Class() scheduler.Class {
	if t == nil || t.adm == nil || t.adm.Promoted {
		return scheduler.Interactive
	}
	return t.cost.Class
}

// Local reports whether the limits in force are this replica's alone
// (Redis is away).
func (t *Ticket) Local() bool { return t != nil && t.local }

// Lease leases where the request's next send goes: for a fleet, a backend
// serving the model with a free slot, waited for until the ticket's
// deadline.
func (t *Ticket) Lease(ctx context.Context) (*fleet.Lease, error) {
	return t.g.Lessor.Lease(ctx, &t.lease)
}

// Unsend gives the admission in force back whole (the upstream never
// received the request, or refused it before it ran): its request and
// tokens, locally and in the shared buckets, and its slots. It takes
// effect once per admission.
func (t *Ticket) Unsend(now time.Time) {
	if t == nil || t.adm == nil {
		return
	}
	t.adm.Unsend(now)
	t.hold.unsend()
	t.Model.Metrics.Unsent(t.cost.Amount[scheduler.Tokens])
}

// Refused is an upstream's refusal before it ran the request (a retryable
// 429): the admission goes back whole, the refusal's rate headers are
// compared with the buckets as they were before it paid, and the whole
// queue is held until until, as the upstream asked.
// It reports whether the refusal lowered a bucket.
func (t *Ticket) Refused(now time.Time, refusal scheduler.Upstream, until time.Time) (lowered bool) {
	if t == nil || t.adm == nil {
		return false
	}
	t.Unsend(now)
	lowered = t.Observe(now, refusal)
	t.Model.Queue.Hold(now, until)
	return lowered
}

// Requeue waits again at the head of its client's FIFO, after Refused,
// and until the ticket's deadline (wait false: only if it can be admitted
// at once), then reserves the shared buckets again. Its error is a
// rejection (a *scheduler.RejectError whose headers are its own), or the
// context's. Wait grows by the time it waited.
func (t *Ticket) Requeue(ctx context.Context, wait bool) error {
	if t == nil || t.adm == nil {
		return scheduler.ErrClosed
	}
	if err := t.requeue(ctx, wait); err != nil {
		return err
	}
	return t.takeShared(ctx)
}

// requeue is Requeue in the replica's queue only.
func (t *Ticket) requeue(ctx context.Context, wait bool) error {
	deadline := t.deadline
	if !wait {
		deadline = time.Now()
	}
	adm, err := t.Model.Queue.Requeue(ctx, t.cost, deadline, t.adm) // given back whole: reused
	if err != nil {
		t.hasRate = false
		return err
	}
	t.adm, t.rate, t.hasRate = adm, adm.State, true
	t.Wait += adm.Wait
	return nil
}

// Observe lowers the model's buckets to what the upstream reports it has
// left (see scheduler.Admission.Observe) and reports whether it did. With
// shared limits, while Redis answers, it is the key's shared buckets that
// are lowered, once for every replica that hears the same (see
// replicas.Buckets.Observe); the replica's queue learns them at its next
// take.
func (t *Ticket) Observe(now time.Time, u scheduler.Upstream) bool {
	if t == nil || t.adm == nil {
		return false
	}
	if t.Model.Shared != nil && !t.g.Shared.Degraded() {
		return t.hold.observe(u)
	}
	return t.adm.Observe(now, u)
}

// Settle ends the request's holds with what it used, per resource, and
// what that cost: its client's budgets are charged used's tokens and
// cost; where the gate settles on actual usage and the upstream reported
// it (known), the buckets, local and shared, are corrected to used, and
// the difference from the reservation counted. Without known usage (a
// stream cut short) the buckets keep the reservation. It takes effect
// once.
func (t *Ticket) Settle(now time.Time, used scheduler.Vector, cost price.Micro, known bool) {
	if t == nil || t.adm == nil {
		return
	}
	t.spend.Settle(now, used[scheduler.Tokens], cost)
	if known && t.g.SettleActual {
		t.adm.Settle(now, used)
		t.hold.settle(used)
		t.Model.Metrics.Settled(t.cost.Amount[scheduler.Tokens] - used[scheduler.Tokens])
	}
}

// Release ends every hold the ticket has: the admission's slots, the
// shared slots, and the budget reservation not settled. It is safe to
// call more than once and after anything else; defer it where Admit
// returns.
func (t *Ticket) Release(now time.Time) {
	if t == nil {
		return
	}
	t.adm.Release(now)
	t.hold.release()
	t.spend.Release()
}

// degraded reports whether Redis is away for a model whose limits are
// shared.
func (g *Gate) degraded(ms *models.Model) bool {
	return g.Shared != nil && ms.Shared != nil && g.Shared.Degraded()
}
