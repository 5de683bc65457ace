package scheduler

import (
	"container/heap"
	"math"
	"slices"
	"time"
)

// Classes. Each client waits in two FIFOs of a queue: its interactive
// lane and its batch lane, sharing the client's own gate. Each class has
// its own backlog and its own fair-share tags (fair.go), so weights share
// the model within each class. A batch request is admitted only while no
// interactive request waits, and only if every bucket of the model keeps
// BatchHeadroom of its capacity after it pays: to the model's gate a batch
// request costs its amount plus the headroom (whole requests, whole
// tokens), while it pays only its amount. A batch request that has waited
// BatchMaxAge moves to its client's interactive lane, at its place by
// arrival, and is admitted as if interactive (the starvation bound).
//
// A batch newcomer's predicted wait replays the interactive backlog, then
// the batch one, and assumes no further interactive arrival: it is never
// admitted later than predicted unless an interactive request or a fairer
// share cut in.

// classQ is one class's part of a queue: its backlog of lanes, its
// virtual time and tag epoch, how many of its requests wait, and the
// replay kept while one of its lanes waits alone.
type classQ struct {
	backlog cursors // lanes with waiters, lowest tag first
	vtime   float64 // virtual time: the start tag of the last admission
	epoch   uint64  // tags start over when nobody of the class waits
	depth   int
	tail    replay
}

// newLane returns client c's lane of class cls, whose own limits are g.
func newLane(c Client, g *gate, cls Class) *lane {
	if cls == Batch {
		c = c.batch()
	}
	l := &lane{Client: c, gate: g, cls: cls}
	l.cur = cursor{l: l, at: -1}
	return l
}

// newClient makes client c's two lanes, sharing its own gate.
func newClient(c Client) (interactive, batch *lane) {
	c.Weight = max(1, c.Weight)
	g := newGate(c.Limits(), c.MaxConcurrent)
	interactive, batch = newLane(c, &g, Interactive), newLane(c, &g, Batch)
	interactive.sib, batch.sib = batch, interactive
	return interactive, batch
}

// headroom is what a batch request must leave in each bucket of the
// model: BatchHeadroom of its capacity now, rounded up to whole units.
func (q *Queue) headroom() (v Vector) {
	if q.cfg.BatchHeadroom <= 0 {
		return v
	}
	for _, r := range q.active() {
		v[r] = int(math.Ceil(q.cfg.BatchHeadroom * q.b[r].capacity))
	}
	return v
}

// need is what the model's gate must hold to admit w: its amount, and for
// a batch request the headroom too (reserve), but never more than a full
// bucket (a batch request larger than the capacity less the headroom
// waits for a full bucket).
func (q *Queue) need(w *waiter, reserve *Vector) Vector {
	return q.needOf(&w.cost.Amount, w.lane.cls, reserve)
}

func (q *Queue) needOf(amount *Vector, cls Class, reserve *Vector) Vector {
	v := *amount
	if cls == Batch {
		for _, r := range q.active() {
			v[r] = max(v[r], min(v[r]+reserve[r], int(q.b[r].capacity)))
		}
	}
	return v
}

// promote moves every batch request that has waited BatchMaxAge at now to
// its client's interactive lane, at its place by arrival. q.mu is held.
func (q *Queue) promote(now time.Time) {
	b := &q.cls[Batch]
	if b.depth == 0 {
		return
	}
	age := q.cfg.batchMaxAge()
	var due []*lane
	for _, c := range b.backlog {
		if w := c.head(); !now.Before(w.enqueued.Add(age)) {
			due = append(due, c.l)
		}
	}
	for _, l := range due {
		for len(l.waiting) > 0 && !now.Before(l.waiting[0].enqueued.Add(age)) {
			w := l.waiting[0]
			l.waiting[0] = nil
			l.waiting = l.waiting[1:]
			l.queued.add(&w.cost.Amount, -1)
			b.depth--
			to := l.sib
			i, _ := slices.BinarySearchFunc(to.waiting, w.seq, func(x *waiter, seq uint64) int {
				return cmpUint(x.seq, seq)
			})
			to.waiting = slices.Insert(to.waiting, i, w)
			to.queued.add(&w.cost.Amount, 1)
			q.cls[Interactive].depth++
			w.lane, w.promoted = to, true
			q.promoted++
			if len(to.waiting) == 1 {
				q.join(to)
			} else if i == 0 {
				q.headChanged(to)
			}
		}
		q.headChanged(l)
		if b.depth == 0 {
			b.epoch++
			b.vtime = 0
		}
	}
	if len(due) > 0 {
		q.cls[Interactive].tail.ok, b.tail.ok = false, false
	}
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// untilPromotion is how long until the next batch request reaches
// BatchMaxAge (never: none waits). q.mu is held.
func (q *Queue) untilPromotion(now time.Time) time.Duration {
	d := never
	age := q.cfg.batchMaxAge()
	for _, c := range q.cls[Batch].backlog {
		d = min(d, max(0, c.head().enqueued.Add(age).Sub(now)))
	}
	return d
}

// oldest is how long the longest-waiting request of class cls has waited
// at now (0: none waits). q.mu is held.
func (q *Queue) oldest(now time.Time, cls Class) time.Duration {
	var d time.Duration
	for _, c := range q.cls[cls].backlog {
		d = max(d, now.Sub(c.head().enqueued))
	}
	return d
}

// heapRemove takes lane l out of its class's backlog.
func (q *Queue) heapRemove(l *lane) { heap.Remove(&q.cls[l.cls].backlog, l.cur.at) }
