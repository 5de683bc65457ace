package replicas

import (
	"context"
	"sync"
	"time"

	"github.com/llproxy/llproxy/scheduler"
)

// Leased quota: a replica borrows a slice of each shared bucket (the
// model's and its client's, for one client of one queue) with a take, and
// admits that client's next requests from it locally, without a round
// trip, until it runs out or its lease ends. A slice is paid out of the
// shared buckets when it is taken, so the key's limits hold exactly; what
// a lease costs is capacity held idle in a slice for at most leaseLen
// (plus a heartbeat until it goes back). The slice follows this replica's
// own demand: none after a quiet lease, doubling while takes follow each
// other within a lease, at most maxSliceCosts requests' worth and
// maxSliceShare of each bucket. And Redis grants a slice only from above
// half of each bucket (takeScript): near the limit takes are exact, one
// request at a time, as without leases. A request's settlement and its
// unsend go to the slice too, so an admission usually costs no round trip
// at all; the heartbeat returns what a lease left (or pays what it owes).
//
// Queues with a concurrency maximum (the model's or the client's) take
// per request: a slot is a lease of its own.

// Fair share across replicas (see takeScript): how long a client whose
// take was refused counts as waiting, and how long a take that must let
// another client's share go first waits before it asks again.
const (
	fairActive = 300 * time.Millisecond
	fairRetry  = 20 * time.Millisecond
)

// Lease parameters.
const (
	leaseLen      = time.Second
	maxSliceCosts = 63   // a slice is at most this many times the request's cost
	maxSliceShare = 0.05 // and at most this share of each bucket's capacity
)

// quota is one client's slice of one queue's shared buckets at this
// replica.
type quota struct {
	mu     sync.Mutex
	have   scheduler.Vector // paid in Redis and not used: a slice (or a debt, negative)
	until  time.Time        // when the slice goes back
	last   time.Time        // the last round trip
	k      int              // the slice, in requests' costs
	levels scheduler.Levels // the shared buckets at the last round trip
	mark   Mark
	sliced bool // the last round trip granted a slice: settlements go to it
	others int  // other replicas with requests waiting, at the last round trip
}

// leasing reports whether client's takes borrow slices.
func (b *Buckets) leasing(client int) bool {
	return b.model.MaxConcurrent <= 0 && b.clients[client].MaxConcurrent <= 0
}

// take pays cost from the slice, or takes what the slice lacks, and a new
// slice, in one round trip. q.mu is held throughout: concurrent takes of
// the client wait for one round trip and then, most often, for none.
func (q *quota) take(ctx context.Context, b *Buckets, client int, cost scheduler.Vector, ask Ask, now time.Time) (Took, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	model, own := b.model.Limits(), b.clients[client].Limits()
	covered := now.Before(q.until)
	var need, extra scheduler.Vector
	for r := range cost {
		if model[r] <= 0 && own[r] <= 0 {
			continue // no bucket of this resource
		}
		if q.have[r] < cost[r] {
			covered = false
		}
		need[r] = max(0, cost[r]-q.have[r])
	}
	if covered {
		q.have = sub(q.have, cost)
		b.s.local.Inc()
		return q.took(b, client), nil
	}
	// A round trip: its slice follows the demand.
	if !q.last.IsZero() && now.Sub(q.last) < leaseLen {
		q.k = min(2*q.k+1, maxSliceCosts)
	} else {
		q.k = 0
	}
	for r := range cost {
		if model[r] <= 0 && own[r] <= 0 {
			continue
		}
		e := q.k * cost[r]
		for _, c := range [...]int{model[r], own[r]} {
			if c > 0 {
				e = min(e, int(maxSliceShare*float64(c)))
			}
		}
		extra[r] = max(0, e)
	}
	t, granted, err := b.take(ctx, client, need, extra, ask)
	if err != nil || !t.OK {
		return t, err
	}
	q.last = now
	for r := range q.have {
		if model[r] > 0 || own[r] > 0 {
			q.have[r] += need[r] + granted[r] - cost[r]
		}
	}
	q.until, q.levels, q.mark, q.sliced = now.Add(leaseLen), t.Levels, t.Mark, granted != (scheduler.Vector{})
	q.others = t.Others
	lt := q.took(b, client)
	t.Levels, t.Mark = lt.Levels, lt.Mark
	return t, nil
}

// took is a take paid from the slice: the shared buckets as last known,
// with what the slice holds (it is the key's, unspent). Its mark counts
// the rest of the slice as not yet paid: the upstream has not seen those
// requests (Observe counts them as paid since once they are sent).
func (q *quota) took(b *Buckets, client int) Took {
	model, own := b.model.Limits(), b.clients[client].Limits()
	lv, mark := q.levels, q.mark
	for r, h := range q.have {
		if model[r] > 0 {
			lv.Model[r] += float64(h)
			mark.Level[r] += float64(h)
			mark.Paid[r] -= float64(h)
		}
		if own[r] > 0 {
			lv.Client[r] += float64(h)
		}
	}
	return Took{OK: true, Levels: lv, Mark: mark, Others: q.others}
}

// unspent is what the slice holds now.
func (q *quota) unspent() scheduler.Vector {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.have
}

// adjust gives back to (or charges) the slice, and reports whether it
// did: only while a lease that granted a slice lasts (near the limit a
// settlement goes to Redis at once, as without leases).
func (q *quota) adjust(delta scheduler.Vector, now time.Time) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.sliced || !now.Before(q.until) {
		return false
	}
	for r := range q.have {
		q.have[r] += delta[r]
	}
	return true
}

// settle returns what each slice whose lease ended holds (or pays what it
// owes), in Redis; all of them with all true (the replica leaves).
func (b *Buckets) settle(ctx context.Context, now time.Time, all bool) error {
	for client := range b.quota {
		q := &b.quota[client]
		q.mu.Lock()
		d := q.have
		if d == (scheduler.Vector{}) || (!all && now.Before(q.until)) {
			q.mu.Unlock()
			continue
		}
		q.have = scheduler.Vector{}
		q.mu.Unlock()
		if err := b.adjust(ctx, client, d); err != nil {
			q.mu.Lock()
			q.have = add(q.have, d) // kept for the next heartbeat
			q.mu.Unlock()
			return err
		}
	}
	return nil
}

func add(a, b scheduler.Vector) scheduler.Vector {
	for r := range a {
		a[r] += b[r]
	}
	return a
}

func sub(a, b scheduler.Vector) scheduler.Vector {
	for r := range a {
		a[r] -= b[r]
	}
	return a
}
