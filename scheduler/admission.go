package scheduler

import "time"

// Admission is an admitted request's hold on its queue, returned by Acquire
// and Requeue. Like a rate.Reservation it is the one handle through which
// what the request took is given back: its request and tokens (Unsend,
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
	// maxQueueWait where it has one, else the model's. Whatever the
	// request waits for after admission (a retry, a requeue after an
	// upstream 429, a slot) ends by its arrival plus this.
	MaxQueueWait time.Duration

	q     *Queue
	lane  *lane
	epoch uint64 // the queue's tag epoch it was admitted in
	start time.Time
	cost  int
	seq   uint64 // admission order
	// Guarded by q.mu.
	tokens   int  // tokens it holds in the buckets: its cost, then its settled usage
	running  bool // not yet released
	slot     bool // holds one of the model's concurrency slots
	laneSlot bool // holds one of its client's
	unsent   bool // given back whole
	pending  bool // not yet confirmed by the shared store (see ConfirmAdmissions)
	settled  bool
	observed bool
}

// Mark is a snapshot of a queue's buckets taken when a request paid: their
// levels, how much Observe had lowered them in all, and how much the
// gateway had paid in all, so far. Comparing it with what the upstream
// reports it had left when it received the same request tells what someone
// else spent in between.
type Mark struct {
	Requests, Tokens               float64
	LoweredRequests, LoweredTokens float64
	DrainedRequests, DrainedTokens float64
	PaidRequests, PaidTokens       float64
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
	q.req.give(now, 1)
	q.tok.give(now, a.tokens)
	a.lane.req.give(now, 1)
	a.lane.tok.give(now, a.tokens)
	a.tokens = 0
	q.stop(a)
	q.refund(a.lane, a.cost, a.epoch)
}

// Settle corrects the token bucket once the request's real usage is known:
// actual is what the upstream reports it used. Tokens reserved and not used
// go back (the head may be admitted sooner); an overrun is charged,
// possibly leaving the bucket in debt that refill repays before anything
// else is admitted. It takes effect once, and not after Unsend.
func (a *Admission) Settle(now time.Time, actual int) {
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
	actual = max(0, actual)
	if actual == a.tokens {
		return
	}
	if actual < a.tokens {
		q.tok.give(now, a.tokens-actual)
		a.lane.tok.give(now, a.tokens-actual)
	} else {
		q.tok.charge(now, actual-a.tokens)
		a.lane.tok.charge(now, actual-a.tokens)
	}
	a.tokens = actual
	q.changed(now)
}
