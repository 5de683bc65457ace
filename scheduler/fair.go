package scheduler

import (
	"container/heap"
	"time"
)

// Fair share between the clients of one queue: start-time fair queueing
// (Goyal, Vin and Cheng, 1996) over token cost.
//
// Each client has its own FIFO (a lane). A lane's finish tag is where its
// last admitted request ended in virtual time: a request of c tokens
// admitted from a lane of weight w starts at S = max(V, finish) and moves
// the lane's finish to S + c/w; the queue's virtual time V becomes S. The
// next request admitted is the head of the lane with the lowest finish tag
// among the lanes whose own limits let their head through (ties: the
// earlier arrival). So between clients waiting at the same time the
// buckets are shared in proportion to weight, in tokens, and a client that
// was not waiting starts level with the others (at V), with no credit for
// the time it was away. It is work-conserving: the queue never waits while
// a client could be admitted, and a lane held by its own limits lets the
// others through. When nobody waits, the tags start over.
//
// Start-time fair queueing, rather than deficit round robin, because its
// fairness holds for a server whose rate varies (the buckets follow the
// upstream's own headers and refunds) and because a client's lag is
// bounded by one of its requests, not by a quantum at least as large as
// the largest request.

// lane is one client's FIFO inside a queue, with its own gate. Its fields
// are guarded by the queue's mutex.
type lane struct {
	Client
	*gate   // the client's own limits for the queue's model, shared by its two lanes
	cls     Class
	sib     *lane // the client's lane of the other class
	waiting []*waiter
	queued  Vector // what its waiters will pay
	epoch   uint64 // its class's epoch cur.finish belongs to
	cur     cursor // its place in its class's backlog
	running int    // admitted and not yet released
}

// free reports whether the lane has no limits of its own.
func (l *lane) free() bool { return !l.limited() && l.maxConcurrent == 0 }

// cursor is a lane's place in a backlog heap: the queue's own (i is 0) or
// a prediction's scratch copy.
type cursor struct {
	l      *lane
	i      int     // its next waiter: l.waiting[i]
	finish float64 // the lane's finish tag
	own    sim     // the lane's gate, predicted (predictions only)
	at     int     // index in its heap; -1 when in none
}

func (c *cursor) head() *waiter { return c.l.waiting[c.i] }

// cursors is a heap of lanes with waiters, lowest finish tag first.
type cursors []*cursor

func (h cursors) Len() int { return len(h) }
func (h cursors) Less(i, j int) bool {
	a, b := h[i], h[j]
	if a.finish != b.finish {
		return a.finish < b.finish
	}
	return a.head().seq < b.head().seq
}
func (h cursors) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].at, h[j].at = i, j
}
func (h *cursors) Push(x any) {
	c := x.(*cursor)
	c.at = len(*h)
	*h = append(*h, c)
}
func (h *cursors) Pop() any {
	old := *h
	c := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	c.at = -1
	return c
}

// tagCost is what a request of tokens advances its lane's tag by: at
// least one token, so that free requests are shared too.
func tagCost(tokens, weight int) float64 { return float64(max(tokens, 1)) / float64(weight) }

// choice is the next admission a scan finds: which lane, when, and what
// it waited for longest.
type choice struct {
	c       *cursor
	at      time.Time
	binding Resource
	own     bool // the client's own limit binds
}

// never is a wait that only an event (a release) ends.
const never = time.Duration(1<<63 - 1)

// next finds the next admission from state s (at s.at) among the lanes of
// h: the lane with the lowest tag whose own gate lets its head through is
// chosen, and admitted when the model's gate can pay for it, unless a lane
// with a lower tag is let through by its own gate before that. It scans h
// in tag order only as far as it must. With live set, the gates are read
// as they are now (a slot is free only once released); otherwise they are
// the cursors' and s's predictions. The zero choice means nobody can be
// admitted until a slot is released.
//
// A batch request's need of the model's gate includes the headroom
// (class.go).
func (q *Queue) next(s sim, h *cursors, live bool) choice {
	T := s.at
	reserve := q.headroom()
	if top := (*h)[0]; !live && top.l.free() {
		// The lowest tag has no limits of its own: its turn, whatever the
		// others' own gates say.
		v := q.need(top.head(), &reserve)
		d, binding := q.ready(s, &v)
		return choice{c: top, at: T.Add(d), binding: binding}
	}
	best := choice{}
	bestWait := never
	m := never // the soonest a lane scanned so far is let through by its own gate
	scan := q.scan[:0]
	for h.Len() > 0 {
		c := heap.Pop(h).(*cursor)
		scan = append(scan, c)
		w := c.head()
		v := q.need(w, &reserve)
		var de, dm time.Duration
		var be, bm Resource
		if live {
			de, be = never, Slots
			if c.l.slotFree() {
				de, be = c.l.bucketWait(T, &w.cost.Amount)
			}
			dm, bm = never, Slots
			if q.slotFree() {
				dm, bm = q.bucketWait(T, &v)
			}
		} else {
			c.own = c.l.advance(c.own, T)
			de, be = c.l.ready(c.own, &w.cost.Amount)
			dm, bm = q.ready(s, &v)
		}
		wait, binding, own := dm, bm, false
		if de > dm {
			wait, binding, own = de, be, true
		}
		if wait < m && wait < bestWait {
			best, bestWait = choice{c: c, binding: binding, own: own}, wait
		}
		m = min(m, de)
		if m == 0 {
			break // no lane further on can go before this one
		}
	}
	for _, c := range scan {
		heap.Push(h, c)
	}
	clear(scan)
	q.scan = scan[:0]
	if best.c == nil || bestWait == never {
		return choice{}
	}
	best.at = T.Add(bestWait)
	return best
}

// predict returns when r, a waiter of lane r.lane, would be admitted
// if nobody else arrived, by replaying the dispatcher over the backlog of
// every lane; binding is what it waits for longest. With one lane waiting
// the replay is kept (its class's tail), so a client alone is predicted in
// O(1).
func (q *Queue) predict(now time.Time, r *waiter) choice {
	return q.predictUntil(now, r, bound{})
}

// bound limits a replay: it stops once an admission passes horizon (zero:
// never) or after steps admissions (0: no limit), and what it returns is
// then some admission later than the last it replayed: a lower bound of
// the request's own.
type bound struct {
	horizon time.Time
	steps   int
}

// reached reports whether an admission at at ends a replay bounded by b,
// counting it.
func (b *bound) reached(at time.Time) bool {
	if b.steps > 0 {
		if b.steps--; b.steps == 0 {
			return true
		}
	}
	return !b.horizon.IsZero() && at.After(b.horizon)
}

// predictUntil is predict that stops replaying the backlog once the
// replay passes horizon (zero: never): it then returns that admission,
// later than horizon, so r's own is later still. An interactive request
// waits behind its class only; a batch one behind every interactive
// request waiting and then its own class (class.go).
func (q *Queue) predictUntil(now time.Time, r *waiter, lim bound) choice {
	l := r.lane
	c := &q.cls[l.cls]
	alone := l.cls == Interactive || q.cls[Interactive].depth == 0
	if alone && len(c.backlog) == 1 && l.waiting[len(l.waiting)-1] == r {
		// One lane of its class, r last: FIFO. Extend the kept replay by r.
		t := &c.tail
		n := len(l.waiting)
		reserve := q.headroom()
		if !t.ok || t.lane != l || n < 2 || l.waiting[n-2] != t.last {
			*t = replay{model: q.headAt(now), own: l.at(now, q.service), lane: l}
			for _, w := range l.waiting[:len(l.waiting)-1] {
				t.model, t.own, _ = q.seqStep(l, t.model, t.own, w, &reserve)
			}
		} else {
			t.model = q.advance(t.model, now)
		}
		var ch choice
		t.model, t.own, ch = q.seqStep(l, t.model, t.own, r, &reserve)
		t.ok, t.last = true, r
		return ch
	}
	s := q.headAt(now)
	if l.cls == Batch && q.cls[Interactive].depth > 0 {
		// Every interactive request waiting goes first.
		var ch choice
		if s, ch = q.replay(now, s, &q.cls[Interactive], nil, &lim); ch.c == nil {
			return ch // the bound ended it: r comes later still
		}
	}
	_, ch := q.replay(now, s, c, r, &lim)
	return ch
}

// replay replays the dispatcher over the backlog of class c from model
// state s until it admits r (nil: all of them) or reaches its bound, on
// scratch copies of its cursors; it returns the model's state after and
// the last admission, whose c is nil only when the bound ended it before
// the backlog (r's class and r nil) was done.
func (q *Queue) replay(now time.Time, s sim, c *classQ, r *waiter, lim *bound) (sim, choice) {
	if cap(q.simCurs) < len(c.backlog) {
		q.simCurs = make([]cursor, len(c.backlog))
	}
	curs := q.simCurs[:len(c.backlog)]
	h := q.simHeap[:0]
	for i, x := range c.backlog {
		curs[i] = cursor{l: x.l, finish: x.finish, at: len(h)}
		if !x.l.free() {
			curs[i].own = x.l.at(now, q.service)
		}
		h = append(h, &curs[i])
	}
	heap.Init(&h)
	v := c.vtime
	var ch choice
	for h.Len() > 0 {
		ch = q.next(s, &h, false)
		x := ch.c
		w := x.head()
		s = q.gate.pass(s, &w.cost.Amount, ch.at, q.service)
		if !x.l.free() {
			x.own = x.l.pass(x.own, &w.cost.Amount, ch.at, q.service)
		}
		start := max(v, x.finish)
		x.finish, v = start+tagCost(w.cost.Amount.weight(), x.l.Weight), start
		if w == r {
			break
		}
		if x.i++; x.i < len(x.l.waiting) {
			heap.Fix(&h, x.at)
		} else {
			heap.Remove(&h, x.at)
		}
		if lim.reached(ch.at) {
			if r == nil && h.Len() > 0 {
				ch.c = nil // stopped before the class's backlog was done
			}
			break
		}
	}
	clear(h[:cap(h)])
	q.simHeap = h[:0]
	clear(curs)
	return s, ch
}

// replay is a prediction kept while one lane waits: the model's and the
// lane's gates once its waiters up to last are admitted.
type replay struct {
	model, own sim
	lane       *lane
	last       *waiter
	ok         bool // false after anything that changes it
}

// seqStep admits waiter w of lane l after model state s and lane state
// own, when both gates can pay: one step of a lane alone.
func (q *Queue) seqStep(l *lane, s, own sim, w *waiter, reserve *Vector) (sim, sim, choice) {
	v := &w.cost.Amount
	n := q.need(w, reserve)
	own = l.advance(own, s.at)
	dm, bm := q.ready(s, &n)
	de, be := l.ready(own, v)
	ch := choice{binding: bm}
	if de > dm {
		dm, ch.binding, ch.own = de, be, true
	}
	ch.at = s.at.Add(dm)
	return q.gate.pass(s, v, ch.at, q.service), l.pass(own, v, ch.at, q.service), ch
}

// join puts lane l, which has just got its first waiter, in its class's
// backlog.
func (q *Queue) join(l *lane) {
	c := &q.cls[l.cls]
	if l.epoch != c.epoch {
		l.epoch, l.cur.finish = c.epoch, 0
	}
	heap.Push(&c.backlog, &l.cur)
}

// headChanged repositions lane l in its backlog after its head changed,
// or takes it out when it has no waiter left.
func (q *Queue) headChanged(l *lane) {
	switch {
	case len(l.waiting) == 0 && l.cur.at >= 0:
		q.heapRemove(l)
	case len(l.waiting) > 0 && l.cur.at < 0:
		q.join(l)
	case len(l.waiting) > 0:
		heap.Fix(&q.cls[l.cls].backlog, l.cur.at)
	}
}

// charge moves lane l's tag and its class's virtual time for a request of
// tokens admitted from it.
func (q *Queue) charge(l *lane, tokens int) {
	c := &q.cls[l.cls]
	start := max(c.vtime, l.cur.finish)
	l.cur.finish, c.vtime = start+tagCost(tokens, l.Weight), start
}

// refund takes back what charge did for a request given back whole
// (Unsend), if the tags have not started over since.
func (q *Queue) refund(l *lane, tokens int, epoch uint64) {
	if l.epoch == epoch && epoch == q.cls[l.cls].epoch {
		l.cur.finish = max(0, l.cur.finish-tagCost(tokens, l.Weight))
		if l.cur.at >= 0 {
			heap.Fix(&q.cls[l.cls].backlog, l.cur.at)
		}
	}
}
