package scheduler

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// waiter is one queued request. Its fields after seq are guarded by the
// queue's mutex; ready is closed once, when done is set.
type waiter struct {
	cost     Cost
	lane     *lane
	seq      uint64 // arrival order
	enqueued time.Time
	deadline time.Time // rejected if not admitted by then
	ready    chan struct{}
	// predicted is when it was predicted to be admitted as it arrived.
	predicted time.Time
	into      *Admission // what to admit it into; nil: a new one
	promoted  bool       // a batch request moved to its client's interactive lane
	done      bool
	adm       *Admission
	err       error
}

// Queue is the queue of one (route, model) in front of its buckets (a
// resource each; see cost.go). Each client has its own FIFO in it; between clients
// waiting at the same time the buckets are shared in proportion to their
// weights, in tokens (fair.go). A request is admitted only when the
// model's buckets and its client's own can pay for it.
//
// The queue predicts each newcomer's admission time by replaying the
// dispatcher over the backlog (the replay is kept while one client waits,
// so that common case is O(1)); a newcomer that would wait longer than its
// client's MaxQueueWait is rejected at once. Tokens are taken only at
// admission, so a request that leaves the queue costs nothing and the
// requests behind it move up.
//
// Queue is safe for concurrent use. Its state is guarded by one mutex per
// queue; no lock is shared between queues.
type Queue struct {
	model   string
	cfg     Config
	gate            // the model's buckets and slots
	lanes   []*lane // each client's interactive lane
	blanes  []*lane // and its batch lane, by the same index
	clients int     // lanes[:clients] are the clients Cost.Client names; the rest drain (Reconfigure)

	mu         sync.Mutex
	cls        [numClasses]classQ // each class's backlog and tags (class.go)
	depth      int                // requests waiting, in all
	queued     Vector             // what they will pay
	arrivals   uint64
	promoted   uint64 // batch requests admitted as interactive, in all
	timer      *time.Timer
	holdUntil  time.Time           // no admission before this (the upstream said wait)
	lowered    [NumBuckets]float64 // how much Observe has lowered each bucket, in all
	drained    [NumBuckets]float64 // how much of it Observe took for others' drain, in all
	paid       [NumBuckets]float64 // what admissions have paid, in all (see Observe)
	seq        uint64              // admissions so far
	answers    []answer            // ring of recent answers (see Observe)
	answerNext int
	service    time.Duration // how long a request holds its slot, on average (EWMA)
	closed     bool
	retired    atomic.Bool // see Retire; set under mu
	confirm    bool        // admissions wait for the shared store's word (share.go)
	oth        others      // what other gateways sharing the buckets have waiting (share.go)
	othersOff  atomic.Bool // oth is empty
	scan       []*cursor   // scratch for next
	simCurs    []cursor    // scratch for predict
	simHeap    cursors
}

// NewQueue returns an empty queue with full buckets. cfg and each client
// must be valid (see Config.Validate and Client.Validate); with no clients
// the queue has one, of weight 1 and without limits of its own, and
// behaves as one FIFO per class. Cost.Client is an index into clients. It
// runs on the time package's clock: tests run it in a testing/synctest
// bubble, where that clock is exact.
func NewQueue(model string, cfg Config, clients ...Client) *Queue {
	if len(clients) == 0 {
		clients = []Client{cfg.Client("", 1)}
	}
	q := &Queue{model: model, cfg: cfg, gate: newGate(cfg.Limits(), cfg.MaxConcurrent), lanes: make([]*lane, len(clients)),
		blanes: make([]*lane, len(clients)), clients: len(clients)}
	for i, c := range clients {
		q.lanes[i], q.blanes[i] = newClient(c)
	}
	return q
}

// Model returns the model name the queue was made for.
func (q *Queue) Model() string { return q.model }

// Config returns the queue's limits.
func (q *Queue) Config() Config { return q.cfg }

// Acquire admits a request of the given cost, waiting behind its client's
// earlier requests and its share of the others' if it must, and returns
// its Admission, which the caller releases (see Admission). It returns at
// once with a *RejectError when the request cannot be admitted within its
// client's MaxQueueWait, its client's queue is full, or the cost exceeds a
// bucket's capacity; with ErrClosed after Close; and with ctx.Err() if ctx
// ends while the request waits, in which case the request leaves the queue
// having paid nothing. A request still waiting MaxQueueWait after it
// arrived (the wait was predicted from how long requests hold their slots,
// and they held them longer, or another client started waiting) is
// rejected then with ErrWaitTooLong: no request waits longer than
// MaxQueueWait.
func (q *Queue) Acquire(ctx context.Context, cost Cost) (*Admission, error) {
	return q.AcquireInto(ctx, cost, nil)
}

// AcquireInto is Acquire writing the admission into a (nil: a new one), so
// that a caller that pools its requests' state admits without allocating
// on the fast path. a must be zero or an admission the caller is done
// with: released or given back, and called no more.
func (q *Queue) AcquireInto(ctx context.Context, cost Cost, a *Admission) (*Admission, error) {
	q.mu.Lock()
	w, adm, err := q.enqueue(time.Now(), cost, a)
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
	ch := q.probe(now, w.lane, w.cost)
	wait := q.withOthers(now, ch.at.Sub(now))
	if !q.slotFree() || !w.lane.slotFree() {
		// The slots were held longer than predicted; when one frees is
		// anyone's guess, so the client is not asked back at once.
		ch.binding, wait = Slots, max(wait, q.service, time.Second)
		ch.own = q.slotFree()
	}
	w.err = q.reject(now, ErrWaitTooLong, ch, w.lane, w.cost, wait)
	close(w.ready)
}

// enqueue is Acquire's decision, taken under q.mu:
//
//  1. Closed, retired, a negative cost or an unknown client: an error.
//  2. Cost above a bucket's capacity (the model's or the client's):
//     ErrTooLarge; it can never run.
//  3. Nobody waiting and every gate can pay now: admitted (fast path).
//  4. Its client's queue holds its MaxQueueSize (> 0) already: ErrQueueFull.
//  5. Predict the admission time by replaying the queue with it at the
//     end of its client's FIFO.
//  6. Predicted wait above MaxQueueWait, or no queueing allowed:
//     ErrWaitTooLong.
//  7. Otherwise it waits; the dispatcher admits it at its time.
//
// A nil waiter means the answer is final.
func (q *Queue) enqueue(now time.Time, cost Cost, into *Admission) (*waiter, *Admission, error) {
	// (1)
	if q.retired.Load() && !q.closed {
		return nil, nil, ErrRetired
	}
	l, err := q.laneOf(cost)
	if err != nil {
		return nil, nil, err
	}
	// (2)
	if e := q.tooLarge(now, l, &cost.Amount); e != nil {
		return nil, nil, e
	}
	// (3) Fast path.
	if q.admitsNow(now, l, &cost.Amount) {
		return nil, q.pay(now, l, cost, 0, into), nil
	}
	// (4)
	// A queue that may hold nobody (MaxQueueSize 0) is never "full": the
	// request simply cannot be admitted without waiting.
	if n := len(l.waiting); n > 0 && n >= l.MaxQueueSize {
		ch := q.probe(now, l, cost)
		return nil, nil, q.reject(now, ErrQueueFull, ch, l, cost, q.withOthers(now, ch.at.Sub(now)))
	}
	// (5)
	c := &q.cls[l.cls]
	kept := c.tail
	maxWait, _ := l.maxWait(&cost)
	w := q.push(now, l, cost)
	w.into, w.deadline = into, now.Add(maxWait)
	ch := q.predict(now, w)
	wait := q.withOthers(now, ch.at.Sub(now))
	// (6)
	if wait > maxWait || l.MaxQueueSize == 0 {
		q.pop(l)
		c.tail = kept
		return nil, nil, q.reject(now, ErrWaitTooLong, ch, l, cost, wait)
	}
	// (7)
	w.ready = make(chan struct{})
	w.predicted = ch.at
	if len(c.backlog) > 1 || (l.cls == Batch && q.cls[Interactive].depth > 0) {
		c.tail.ok = false // the replay kept is one lane's alone
	}
	if len(l.waiting) == 1 {
		q.dispatch(now) // a new lane may change whose turn it is
	}
	return w, nil, nil
}

// laneOf returns the lane a request of cost waits in, or why it cannot
// be taken at all: the queue is closed, the cost negative or the client
// unknown.
func (q *Queue) laneOf(cost Cost) (*lane, error) {
	switch {
	case q.closed:
		return nil, ErrClosed
	case cost.Amount.negative():
		return nil, ErrInvalidCost
	case cost.Class >= numClasses || (cost.OwnWait && cost.MaxWait < 0):
		return nil, ErrInvalidCost
	case cost.Client >= 0 && cost.Client < q.clients &&
		(cost.Name == "" || q.lanes[cost.Client].Name == "" || q.lanes[cost.Client].Name == cost.Name):
		return q.lane(cost.Client, cost.Class), nil
	case cost.Name != "":
		for i, l := range q.lanes { // renumbered: found by name, draining lanes too
			if l.Name == cost.Name {
				return q.lane(i, cost.Class), nil
			}
		}
	}
	return nil, ErrUnknownClient
}

// lane is client number i's lane of class cls.
func (q *Queue) lane(i int, cls Class) *lane {
	if cls == Batch {
		return q.blanes[i]
	}
	return q.lanes[i]
}

// admitsNow reports whether a request of cost v from lane l is admitted
// at once: nobody of its class (for a batch request: nobody at all) waits,
// no hold, and every gate can pay (the model's with a batch request's
// headroom).
func (q *Queue) admitsNow(now time.Time, l *lane, v *Vector) bool {
	if q.cls[l.cls].depth > 0 || (l.cls == Batch && q.depth > 0) || now.Before(q.holdUntil) || !l.canPay(now, v) {
		return false
	}
	if l.cls == Batch {
		reserve := q.headroom()
		n := q.needOf(v, Batch, &reserve)
		return q.canPay(now, &n)
	}
	return q.canPay(now, v)
}

// maxWait is how long a request of cost may wait in lane l, and whose
// limit that is: the lane's (its client's own, or the model's), lowered by
// the request's own.
func (l *lane) maxWait(cost *Cost) (time.Duration, WaitLimit) {
	d, whose := l.MaxQueueWait, WaitModel
	if l.OwnWait {
		whose = WaitClient
	}
	if cost.OwnWait && cost.MaxWait < d {
		d, whose = max(0, cost.MaxWait), WaitRequest
	}
	return d, whose
}

// tooLarge is the rejection of a request of cost v from lane l that a
// bucket, the model's or its client's, can never hold; nil if it fits.
func (q *Queue) tooLarge(now time.Time, l *lane, v *Vector) *RejectError {
	for r, n := range v {
		// A bucket's full is its configured limit, whatever share of it
		// is in force.
		limit, client := q.b[r].full, ""
		if !q.b[r].on || float64(n) <= limit {
			if limit, client = l.b[r].full, l.Name; !l.b[r].on || float64(n) <= limit {
				continue
			}
		}
		return &RejectError{Reason: ErrTooLarge, Model: q.model, Resource: Resource(r), Requested: n,
			Limit: int(limit), Client: client, QueueLen: len(l.waiting), State: q.state(now, l)}
	}
	return nil
}

// push appends a waiter of cost to lane l.
func (q *Queue) push(now time.Time, l *lane, cost Cost) *waiter {
	q.arrivals++
	maxWait, _ := l.maxWait(&cost)
	w := &waiter{cost: cost, lane: l, seq: q.arrivals, enqueued: now, deadline: now.Add(maxWait)}
	l.waiting = append(l.waiting, w)
	l.queued.add(&cost.Amount, 1)
	q.depth++
	q.cls[l.cls].depth++
	q.queued.add(&cost.Amount, 1)
	if len(l.waiting) == 1 {
		q.join(l)
	}
	return w
}

// pop takes back the waiter push just appended to lane l.
func (q *Queue) pop(l *lane) {
	w := l.waiting[len(l.waiting)-1]
	l.waiting[len(l.waiting)-1] = nil
	l.waiting = l.waiting[:len(l.waiting)-1]
	q.left(l, w)
	if len(l.waiting) == 0 {
		q.heapRemove(l)
	}
}

// left accounts for w leaving lane l's FIFO.
func (q *Queue) left(l *lane, w *waiter) {
	l.queued.add(&w.cost.Amount, -1)
	q.depth--
	q.queued.add(&w.cost.Amount, -1)
	c := &q.cls[l.cls]
	if c.depth--; c.depth == 0 {
		c.epoch++ // nobody of the class waits: its tags start over
		c.vtime = 0
	}
}

// probe predicts when a request of cost from lane l, arriving now at the
// end of its FIFO, would be admitted. It leaves the queue as it was.
func (q *Queue) probe(now time.Time, l *lane, cost Cost) choice {
	return q.probeUntil(now, l, cost, bound{})
}

// probeUntil is probe whose replay stops at lim: past it, the choice it
// returns is some admission after lim, not necessarily the request's own.
func (q *Queue) probeUntil(now time.Time, l *lane, cost Cost, lim bound) choice {
	c := &q.cls[l.cls]
	kept := c.tail
	q.push(now, l, cost)
	ch := q.predictUntil(now, l.waiting[len(l.waiting)-1], lim)
	q.pop(l)
	q.arrivals--
	c.tail = kept
	return ch
}

// pay takes a request's cost from the model's gate and its client's and
// describes its admission. q.mu is held and the request is no longer
// queued.
func (q *Queue) pay(now time.Time, l *lane, cost Cost, wait time.Duration, a *Admission) *Admission {
	v := &cost.Amount
	q.take(now, v)
	l.take(now, v)
	for _, r := range q.active() {
		q.paid[r] += float64(v[r])
	}
	q.seq++
	l.running++
	if a == nil {
		a = new(Admission)
	} else {
		*a = Admission{}
	}
	// Field by field: the admission is large (a vector per resource),
	// and a composite literal would be built and then copied.
	a.Wait, a.q, a.lane, a.epoch, a.start, a.seq = wait, q, l, q.cls[l.cls].epoch, now, q.seq
	a.cost, a.held, a.Class = *v, *v, cost.Class
	a.MaxQueueWait, _ = l.maxWait(&cost)
	q.stateInto(&a.State, now, l)
	a.Mark.Lowered, a.Mark.Drained, a.Mark.Paid = q.lowered, q.drained, q.paid
	for _, r := range q.active() {
		a.Mark.Level[r] = q.b[r].level(now)
	}
	a.running = true
	if q.confirm {
		a.pending = true
		q.pendN++
		q.pend.add(v, 1)
		l.pendN++
		l.pend.add(v, 1)
	}
	if q.maxConcurrent > 0 {
		a.slot = true
		q.inflight = append(q.inflight, a)
	}
	if l.maxConcurrent > 0 {
		a.laneSlot = true
		l.inflight = append(l.inflight, a)
	}
	return a
}

func (q *Queue) reject(now time.Time, reason error, ch choice, l *lane, cost Cost, wait time.Duration) *RejectError {
	e := &RejectError{Reason: reason, Model: q.model, Resource: ch.binding, RetryAfter: wait,
		QueueLen: len(l.waiting), State: q.state(now, l), Class: cost.Class}
	e.MaxWait, e.WaitLimit = l.maxWait(&cost)
	if ch.own {
		e.Client = l.Name
		l.describe(e, now, &cost.Amount, &l.queued, len(l.waiting))
	} else {
		q.describe(e, now, &cost.Amount, &q.queued, q.depth)
	}
	return e
}

// headAt is the model's state the backlog starts from: now, or the end of
// a hold.
func (q *Queue) headAt(now time.Time) sim {
	at := now
	if q.holdUntil.After(now) {
		at = q.holdUntil
	}
	return q.at(at, q.service)
}

// dispatch admits waiting requests while the gates can pay (fair.go says
// whose turn it is), then sets the timer for the next admission.
func (q *Queue) dispatch(now time.Time) {
	if hold := q.holdUntil.Sub(now); hold > 0 && q.depth > 0 {
		q.arm(hold)
		return
	}
	q.promote(now)
	for q.depth > 0 {
		// Interactive requests first; batch ones only while none waits.
		c := &q.cls[Interactive]
		if c.depth == 0 {
			c = &q.cls[Batch]
		}
		ch := q.next(sim{at: now}, &c.backlog, true)
		if ch.c == nil {
			// Release dispatches again when a slot frees; a batch request
			// may reach its age before.
			q.armOrDisarm(q.untilPromotion(now))
			return
		}
		if d := ch.at.Sub(now); d > 0 {
			q.arm(min(d, q.untilPromotion(now)))
			return
		}
		l := ch.c.l
		w := l.waiting[0]
		l.waiting[0] = nil
		l.waiting = l.waiting[1:]
		q.charge(l, w.cost.Amount.weight())
		q.headChanged(l)
		q.left(l, w)
		if l.cls == Batch {
			q.cls[Interactive].tail.ok = false // the buckets moved under its replay
		}
		w.done = true
		w.adm = q.pay(now, l, w.cost, now.Sub(w.enqueued), w.into)
		w.adm.Promoted = w.promoted
		if !w.predicted.IsZero() {
			w.adm.Predicted = w.predicted.Sub(w.enqueued)
		}
		close(w.ready)
	}
	q.disarm()
}

// armOrDisarm arms the timer for d, or stops it when d is never.
func (q *Queue) armOrDisarm(d time.Duration) {
	if d == never {
		q.disarm()
		return
	}
	q.arm(d)
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

// cancel removes w if it is still waiting and reports whether it did. The
// requests behind it, its client's and everyone's, move up at once.
func (q *Queue) cancel(now time.Time, w *waiter) bool {
	if w.done {
		return false
	}
	l := w.lane
	for i, x := range l.waiting {
		if x != w {
			continue
		}
		copy(l.waiting[i:], l.waiting[i+1:])
		l.waiting[len(l.waiting)-1] = nil
		l.waiting = l.waiting[:len(l.waiting)-1]
		if i == 0 {
			q.headChanged(l)
		}
		q.left(l, w)
		q.cls[l.cls].tail.ok = false
		w.done = true
		q.dispatch(now)
		return true
	}
	return false
}
