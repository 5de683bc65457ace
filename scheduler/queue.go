package scheduler

import (
	"context"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Cost is what one request pays: one request and Tokens tokens.
type Cost struct {
	Tokens int
}

// RateState is a snapshot of a queue's two buckets as a newcomer sees them:
// what is left after the requests already queued are paid for, and how long
// until each bucket is full again. It is what x-ratelimit-* headers report.
type RateState struct {
	LimitRequests, RemainingRequests int
	ResetRequests                    time.Duration
	LimitTokens, RemainingTokens     int
	ResetTokens                      time.Duration
}

// Stats is a queue's state for metrics.
type Stats struct {
	Depth             int
	QueuedTokens      int
	RemainingRequests float64
	RemainingTokens   float64
	// InFlight is how many admitted requests hold a concurrency slot
	// (counted only when the queue has MaxConcurrent).
	InFlight int
	// RefillRequests and RefillTokens are the buckets' refill rates per
	// minute now: the configured limits less what others are estimated to
	// spend of the upstream's (see Observe).
	RefillRequests, RefillTokens float64
}

// waiter is one queued request. Its fields after cost are guarded by the
// queue's mutex; ready is closed once, when done is set.
type waiter struct {
	cost     Cost
	enqueued time.Time
	deadline time.Time // rejected if not admitted by then
	ready    chan struct{}
	done     bool
	adm      *Admission
	err      error
}

// sim is a predicted bucket state: the levels right after a request is
// admitted at time at.
type sim struct {
	at       time.Time
	req, tok float64
	// slots are the predicted times the concurrency slots free up,
	// ascending; nil unless the queue has MaxConcurrent.
	slots []time.Time
}

// Queue is the strict FIFO queue of one (route, model) in front of its
// request and token buckets. A request is admitted only when both buckets
// can pay for it and every request ahead of it has been admitted.
//
// The queue predicts each newcomer's admission time by replaying the buckets
// over the costs queued ahead of it (the tail of that replay is kept, so the
// common case is O(1)); a newcomer that would wait longer than MaxQueueWait
// is rejected at once. Tokens are taken only at admission, so a request that
// leaves the queue costs nothing and the requests behind it move up.
//
// Queue is safe for concurrent use. Its state is guarded by one mutex per
// queue; no lock is shared between queues.
type Queue struct {
	model    string
	cfg      Config
	req, tok bucket

	mu           sync.Mutex
	waiting      []*waiter // FIFO; waiting[0] is the head
	queuedTokens int
	tail         sim  // prediction after the last waiter is admitted
	tailOK       bool // false after a cancellation: recompute from the head
	timer        *time.Timer
	holdUntil    time.Time // no admission before this (the upstream said wait)
	loweredReq   float64   // how much Observe has lowered each bucket, in all
	loweredTok   float64
	inflight     []*Admission // admissions holding a slot (MaxConcurrent only)
	paidReq      float64      // what admissions have paid, in all (see Observe)
	paidTok      float64
	seq          uint64   // admissions so far
	answers      []answer // ring of recent answers (see Observe)
	answerNext   int
	service      time.Duration // how long a request holds its slot, on average (EWMA)
	closed       bool
	retired      atomic.Bool // see Retire; set under mu
}

// NewQueue returns an empty queue with full buckets. cfg must be valid (see
// Config.Validate). It runs on the time package's clock: tests run it in a
// testing/synctest bubble, where that clock is exact.
func NewQueue(model string, cfg Config) *Queue {
	return &Queue{model: model, cfg: cfg, req: newBucket(cfg.RPM), tok: newBucket(cfg.TPM)}
}

// Model returns the model name the queue was made for.
func (q *Queue) Model() string { return q.model }

// Config returns the queue's limits.
func (q *Queue) Config() Config { return q.cfg }

// Acquire admits a request of the given cost, waiting in FIFO order if it
// must, and returns its Admission, which the caller releases (see
// Admission). It returns at once with a *RejectError when the request
// cannot be admitted within MaxQueueWait, the queue is full, or the cost
// exceeds a bucket's capacity; with ErrClosed after Close; and with
// ctx.Err() if ctx ends while the request waits, in which case the request
// leaves the queue having paid nothing. A request still waiting
// MaxQueueWait after it arrived (the wait was predicted from how long
// requests hold their slots, and they held them longer) is rejected then
// with ErrWaitTooLong: no request waits longer than MaxQueueWait.
func (q *Queue) Acquire(ctx context.Context, cost Cost) (*Admission, error) {
	q.mu.Lock()
	w, adm, err := q.enqueue(time.Now(), cost)
	q.mu.Unlock()
	if w == nil {
		return adm, err
	}
	return q.wait(ctx, w)
}

// wait blocks until w is admitted or rejected, the queue closes or ctx
// ends; in the last case w leaves the queue having paid nothing, even if
// it was admitted in the same instant.
func (q *Queue) wait(ctx context.Context, w *waiter) (*Admission, error) {
	expire := time.AfterFunc(w.deadline.Sub(time.Now()), func() { q.expire(w) })
	defer expire.Stop()
	select {
	case <-w.ready:
		if ctx.Err() == nil || w.adm == nil {
			return w.adm, w.err
		}
	case <-ctx.Done():
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	now := time.Now()
	if !q.cancel(now, w) && w.adm != nil {
		// Admitted as the client left: it will never be sent, so it gives
		// back what it paid, its slot included.
		q.unsend(now, w.adm)
		q.changed(now)
	}
	return nil, ctx.Err()
}

// expire rejects w if it is still waiting at its deadline, after admitting
// whoever can be admitted now.
func (q *Queue) expire(w *waiter) {
	q.mu.Lock()
	defer q.mu.Unlock()
	now := time.Now()
	if !q.closed {
		q.dispatch(now)
	}
	if w.done {
		return
	}
	q.cancel(now, w)
	next, binding := q.step(q.tailAt(now), w.cost)
	wait := next.at.Sub(now)
	if !q.slotFree() {
		// The slots were held longer than predicted; when one frees is
		// anyone's guess, so the client is not asked back at once.
		binding, wait = Slots, max(wait, q.service, time.Second)
	}
	w.err = q.reject(now, ErrWaitTooLong, binding, w.cost, wait)
	close(w.ready)
}

// enqueue is Acquire's decision, taken under q.mu:
//
//  1. Closed: ErrClosed.
//  2. Cost above a bucket's capacity: ErrTooLarge; it can never run.
//  3. Nobody waiting and both buckets can pay now: admitted (fast path).
//  4. Predict the admission time by replaying the buckets over the queue.
//  5. Queue holds MaxQueueSize (> 0) already: ErrQueueFull.
//  6. Predicted wait above MaxQueueWait, or no queueing allowed: ErrWaitTooLong.
//  7. Otherwise queue it; the head's timer admits it at its time.
//
// A nil waiter means the answer is final.
func (q *Queue) enqueue(now time.Time, cost Cost) (*waiter, *Admission, error) {
	// (1)
	if q.closed {
		return nil, nil, ErrClosed
	}
	if q.retired.Load() {
		return nil, nil, ErrRetired
	}
	if cost.Tokens < 0 {
		return nil, nil, ErrInvalidCost
	}
	// (2)
	if cost.Tokens > q.cfg.TPM {
		st := q.state(now)
		return nil, nil, &RejectError{Reason: ErrTooLarge, Model: q.model, Resource: Tokens,
			Limit: q.cfg.TPM, Requested: cost.Tokens, QueueLen: len(q.waiting), State: st}
	}
	// (3) Fast path.
	if len(q.waiting) == 0 && q.canPay(now, cost) {
		return nil, q.pay(now, cost, 0), nil
	}
	// (4)
	from := q.tailAt(now)
	next, binding := q.step(from, cost)
	wait := next.at.Sub(now)
	// (5), (6)
	// A queue that may hold nobody (MaxQueueSize 0) is never "full": the
	// request simply cannot be admitted without waiting.
	var reason error
	switch {
	case len(q.waiting) > 0 && len(q.waiting) >= q.cfg.MaxQueueSize:
		reason = ErrQueueFull
	case wait > time.Duration(q.cfg.MaxQueueWait), q.cfg.MaxQueueSize == 0:
		reason = ErrWaitTooLong
	}
	if reason != nil {
		return nil, nil, q.reject(now, reason, binding, cost, wait)
	}
	// (7)
	w := &waiter{cost: cost, enqueued: now, deadline: now.Add(time.Duration(q.cfg.MaxQueueWait)), ready: make(chan struct{})}
	q.waiting = append(q.waiting, w)
	q.queuedTokens += cost.Tokens
	q.tail, q.tailOK = next, true
	if len(q.waiting) == 1 {
		q.dispatch(now)
	}
	return w, nil, nil
}

// pay takes a request's cost from both buckets and describes its
// admission. q.mu is held and the request is no longer queued.
func (q *Queue) pay(now time.Time, cost Cost, wait time.Duration) *Admission {
	q.req.take(now, 1)
	q.tok.take(now, cost.Tokens)
	q.paidReq++
	q.paidTok += float64(cost.Tokens)
	q.seq++
	a := &Admission{Wait: wait, q: q, start: now, seq: q.seq, cost: cost.Tokens, tokens: cost.Tokens, State: q.state(now), Mark: Mark{
		Requests: q.req.level(now), Tokens: q.tok.level(now),
		LoweredRequests: q.loweredReq, LoweredTokens: q.loweredTok,
		PaidRequests: q.paidReq, PaidTokens: q.paidTok,
	}}
	if q.cfg.MaxConcurrent > 0 {
		a.slot = true
		q.inflight = append(q.inflight, a)
	}
	return a
}

// canPay reports whether a request of cost could be admitted at now if it
// were at the head.
func (q *Queue) canPay(now time.Time, cost Cost) bool {
	return q.slotFree() && !now.Before(q.holdUntil) && q.req.level(now) >= 1-epsilon && q.tok.level(now) >= float64(cost.Tokens)-epsilon
}

func (q *Queue) reject(now time.Time, reason error, binding Resource, cost Cost, wait time.Duration) *RejectError {
	e := &RejectError{Reason: reason, Model: q.model, Resource: binding, RetryAfter: wait,
		QueueLen: len(q.waiting), State: q.state(now)}
	switch binding {
	case Slots:
		e.Limit, e.Requested = q.cfg.MaxConcurrent, 1
		e.Used = len(q.inflight) + len(q.waiting)
	case Tokens:
		avail := q.tok.level(now) - float64(q.queuedTokens)
		e.Limit, e.Requested = q.cfg.TPM, cost.Tokens
		e.Used = max(0, q.cfg.TPM-int(math.Floor(avail)))
	default:
		avail := q.req.level(now) - float64(len(q.waiting))
		e.Limit, e.Requested = q.cfg.RPM, 1
		e.Used = max(0, q.cfg.RPM-int(math.Floor(avail)))
	}
	return e
}

// tailAt returns the predicted bucket state once every waiting request has
// been admitted, or the state at now when none waits.
func (q *Queue) tailAt(now time.Time) sim {
	if len(q.waiting) == 0 || !q.tailOK {
		s := q.headAt(now)
		for _, w := range q.waiting {
			s, _ = q.step(s, w.cost)
		}
		q.tail, q.tailOK = s, true
		return s
	}
	s := q.tail
	if d := now.Sub(s.at); d > 0 {
		// The last admission is overdue (timer latency): advance to now.
		s = sim{at: now, req: q.req.fill(s.req, d), tok: q.tok.fill(s.tok, d), slots: s.slots}
	}
	return s
}

// headAt is the bucket state the head of the queue starts from: now, or
// the end of a hold.
func (q *Queue) headAt(now time.Time) sim {
	at := now
	if q.holdUntil.After(now) {
		at = q.holdUntil
	}
	return sim{at: at, req: q.req.level(at), tok: q.tok.level(at), slots: q.slotTimes(at)}
}

// step predicts when a request of cost is admitted after state s, and the
// state right after it pays. binding is the bucket it waited longer for.
func (q *Queue) step(s sim, cost Cost) (sim, Resource) {
	dr := q.req.waitFrom(s.req, 1)
	dt := q.tok.waitFrom(s.tok, cost.Tokens)
	d, binding := dr, Requests
	if dt > dr {
		d, binding = dt, Tokens
	}
	var slots []time.Time
	if len(s.slots) > 0 {
		if free := s.slots[0].Sub(s.at); free > d {
			d, binding = free, Slots
		}
		slots = q.takeSlot(s.slots, s.at.Add(d))
	}
	return sim{
		at:    s.at.Add(d),
		req:   q.req.fill(s.req, d) - 1,
		tok:   q.tok.fill(s.tok, d) - float64(cost.Tokens),
		slots: slots,
	}, binding
}

// dispatch admits waiting requests from the head while both buckets can pay,
// then sets the timer for the new head.
func (q *Queue) dispatch(now time.Time) {
	if hold := q.holdUntil.Sub(now); hold > 0 && len(q.waiting) > 0 {
		q.arm(hold)
		return
	}
	for len(q.waiting) > 0 {
		if !q.slotFree() {
			q.disarm() // Release dispatches again when a slot frees
			return
		}
		w := q.waiting[0]
		d := max(q.req.waitFrom(q.req.level(now), 1), q.tok.waitFrom(q.tok.level(now), w.cost.Tokens))
		if d > 0 {
			q.arm(d)
			return
		}
		q.waiting[0] = nil
		q.waiting = q.waiting[1:]
		q.queuedTokens -= w.cost.Tokens
		w.done = true
		w.adm = q.pay(now, w.cost, now.Sub(w.enqueued))
		close(w.ready)
	}
	q.disarm()
}

func (q *Queue) arm(d time.Duration) {
	q.disarm()
	q.timer = time.AfterFunc(d, q.onTimer)
}

func (q *Queue) disarm() {
	if q.timer != nil {
		q.timer.Stop()
		q.timer = nil
	}
}

func (q *Queue) onTimer() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.closed {
		q.dispatch(time.Now())
	}
}

// cancel removes w if it is still waiting and reports whether it did.
func (q *Queue) cancel(now time.Time, w *waiter) bool {
	if w.done {
		return false
	}
	for i, x := range q.waiting {
		if x != w {
			continue
		}
		copy(q.waiting[i:], q.waiting[i+1:])
		q.waiting[len(q.waiting)-1] = nil
		q.waiting = q.waiting[:len(q.waiting)-1]
		q.queuedTokens -= w.cost.Tokens
		q.tailOK = false
		w.done = true
		if i == 0 {
			q.dispatch(now)
		}
		return true
	}
	return false
}

// state reports the buckets as a newcomer sees them at now: their levels
// less what the queued requests will take.
func (q *Queue) state(now time.Time) RateState {
	lr := q.req.level(now) - float64(len(q.waiting))
	lt := q.tok.level(now) - float64(q.queuedTokens)
	return RateState{
		LimitRequests: q.cfg.RPM, RemainingRequests: max(0, int(math.Floor(lr+epsilon))), ResetRequests: q.req.untilFull(lr),
		LimitTokens: q.cfg.TPM, RemainingTokens: max(0, int(math.Floor(lt+epsilon))), ResetTokens: q.tok.untilFull(lt),
	}
}

// State returns the buckets' state at now as a newcomer sees it.
func (q *Queue) State(now time.Time) RateState {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.state(now)
}

// Stats returns the queue's depth and bucket levels at now.
func (q *Queue) Stats(now time.Time) Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return Stats{Depth: len(q.waiting), QueuedTokens: q.queuedTokens,
		RemainingRequests: q.req.level(now), RemainingTokens: q.tok.level(now),
		RefillRequests: perMinute(q.req.perSec), RefillTokens: perMinute(q.tok.perSec), InFlight: len(q.inflight)}
}

// Close rejects every waiting request with ErrClosed, and every later one.
func (q *Queue) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.disarm()
	for _, w := range q.waiting {
		w.done, w.err = true, ErrClosed
		close(w.ready)
	}
	q.waiting, q.queuedTokens = nil, 0
}

// Retire marks the queue retired if it is idle at now (nobody waiting or in
// flight, no hold, both buckets full again: a new queue for its model would
// start exactly where it stands) and reports whether it did. A retired
// queue answers Acquire with ErrRetired.
func (q *Queue) Retire(now time.Time) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	idle := len(q.waiting) == 0 && len(q.inflight) == 0 && !q.holdUntil.After(now) &&
		q.req.level(now) >= q.req.capacity-epsilon && q.tok.level(now) >= q.tok.capacity-epsilon
	if idle && !q.closed {
		q.retired.Store(true)
	}
	return q.retired.Load()
}

// Retired reports whether the queue was retired.
func (q *Queue) Retired() bool { return q.retired.Load() }

// perMinute converts a per-second rate, rounding away float noise.
func perMinute(perSec float64) float64 { return math.Round(perSec*60*1e6) / 1e6 }
