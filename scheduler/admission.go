package scheduler

import "time"

// Admission is an admitted request's hold on its queue, returned by Acquire
// and Requeue. Like a rate.Reservation it is the one handle through which
// what the request took is given back: what it paid from each bucket (Unsend,
// Settle) and its concurrency slot (Release, Unsend). Each method takes
// effect at most once and any of them may be called in any order, so a
// caller can defer Release at the point of acquisition and still Unsend or
// Settle on the way. A nil *Admission does nothing.
//
// An Admission's methods are safe for concurrent use; they take the
// queue's lock.
type Admission struct {
	// Wait is how long the request was queued (0 on the fast path), and
	// Predicted how long it was predicted to wait when it arrived.
	Wait, Predicted time.Duration
	// State is the buckets' state right after the request paid.
	State RateState
	// Mark is the buckets' raw state at that moment (see Observe).
	Mark Mark
	// MaxQueueWait is the request's own wait limit: its client's
	// maxQueueWait where it has one, else the model's (for a batch
	// request, the batch ones), lowered by the request's own. Whatever
	// the request waits for after admission (a retry, a requeue after an
	// upstream 429, a slot) ends by its arrival plus this.
	MaxQueueWait time.Duration
	// Class is the request's class; Promoted says a batch request was
	// admitted as interactive, having waited the model's BatchMaxAge.
	Class    Class
	Promoted bool

	q     *Queue
	lane  *lane
	epoch uint64 // the queue's tag epoch it was admitted in
	start time.Time
	cost  Vector
	seq   uint64 // admission order
	// Guarded by q.mu.
	held     Vector // what it holds in the buckets: its cost, then its settled usage
	running  bool   // not yet released
	slot     bool   // holds one of the model's concurrency slots
	laneSlot bool   // holds one of its client's
	unsent   bool   // given back whole
	pending  bool   // not yet confirmed by the shared store (see ConfirmAdmissions)
	settled  bool
	observed bool
}

// Mark is a snapshot of a queue's buckets taken when a request paid, per
// resource: their levels, how much Observe had lowered them and taken as
// others' drain in all, and how much the gateway had paid in all, so far.
// Comparing it with what the upstream reports it had left when it
// received the same request tells what someone else spent in between.
type Mark struct {
	Level, Lowered, Drained, Paid [NumBuckets]float64
}

// Release ends the request's hold once its response has completed
// (streams included): the concurrency slots it holds, the model's and its
// client's, go to whoever waits for them. It does nothing after Unsend or
// the second time.
func (a *Admission) Release(now time.Time) {
	if a == nil || a.q == nil {
		return
	}
	q := a.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if !a.running {
		return
	}
	slots := a.slot || a.laneSlot
	q.stop(a)
	if !slots {
		return
	}
	held := now.Sub(a.start)
	if q.service == 0 {
		q.service = held
	} else {
		q.service = (7*q.service + held) / 8
	}
	q.changed(now)
}

// stop ends a's run: its slots are free. q.mu is held.
func (q *Queue) stop(a *Admission) {
	if !a.running {
		return
	}
	a.running = false
	a.lane.running--
	if a.slot {
		a.slot = false
		q.dropSlot(a)
	}
	if a.laneSlot {
		a.laneSlot = false
		a.lane.dropSlot(a)
	}
}

// Unsend gives the whole admission back: the request was never received by
// the upstream (it could not connect), or was refused before it ran (an
// upstream 429). Its request, the tokens it holds and its concurrency slot
// (if not released already) go back. It does nothing the second time.
func (a *Admission) Unsend(now time.Time) {
	if a == nil || a.q == nil {
		return
	}
	q := a.q
	q.mu.Lock()
	defer q.mu.Unlock()
	q.unsend(now, a)
	q.changed(now)
}

// unsend is Unsend with q.mu held; the caller calls q.changed.
func (q *Queue) unsend(now time.Time, a *Admission) {
	if a.unsent {
		return
	}
	q.settlePending(a)
	a.unsent = true
	q.give(now, &a.held)
	a.lane.give(now, &a.held)
	a.held = Vector{}
	q.stop(a)
	q.refund(a.lane, a.cost.weight(), a.epoch)
}

// Settle corrects the buckets once the request's real usage is known:
// used is what the upstream reports it used, per resource (its request
// included, as it was reserved). What was reserved and not used goes back
// (the head may be admitted sooner); an overrun is charged, possibly
// leaving a bucket in debt that refill repays before anything else is
// admitted. It takes effect once, and not after Unsend.
func (a *Admission) Settle(now time.Time, used Vector) {
	if a == nil || a.q == nil {
		return
	}
	q := a.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if a.unsent || a.settled {
		return
	}
	a.settled = true
	changed := false
	for r, n := range used {
		n = max(0, n)
		d := n - a.held[r]
		if d == 0 {
			continue
		}
		if d < 0 {
			q.b[r].give(now, -d)
			a.lane.b[r].give(now, -d)
		} else {
			q.b[r].charge(now, d)
			a.lane.b[r].charge(now, d)
		}
		a.held[r], changed = n, true
	}
	if changed {
		q.changed(now)
	}
}
