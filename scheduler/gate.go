package scheduler

import (
	"math"
	"slices"
	"time"
)

// A gate is one set of limits a request must pass: a bucket per resource
// (one of capacity 0 is no limit) and, optionally, concurrency slots. A
// queue has one for its model (the upstream's limits) and one per client
// (the client's own limits for that model); a request is admitted only
// when both let it through.
//
// Concurrency slots are the last resource: a local model server has N
// parallel slots, so a request waits until one frees, that is until an
// admitted request is released when its response completes. When a slot
// frees cannot be known in advance, so predictions use how long requests
// have held a slot on average: each in-flight request is expected to
// finish that long after its admission (or now, if it is already overdue).
type gate struct {
	b             [NumBuckets]bucket
	act           [NumBuckets]Resource // the buckets that are on: act[:nact]
	nact          int
	maxConcurrent int
	inflight      []*Admission // admissions holding one of its slots (maxConcurrent only)
	// fullConcurrent is the configured maxConcurrent while a share of it is
	// in force (see Queue.Share); 0 before.
	fullConcurrent int
	// pendN admissions are pending the shared store's word, pend what
	// they paid (share.go).
	pendN int
	pend  Vector
}

func newGate(limits Vector, maxConcurrent int) gate {
	g := gate{maxConcurrent: maxConcurrent}
	for r, n := range limits {
		g.b[r] = newBucket(n)
	}
	g.index()
	return g
}

// index lists the buckets that are on, so that the hot loops skip the
// rest.
func (g *gate) index() {
	g.nact = 0
	for r := range g.b {
		if g.b[r].on {
			g.act[g.nact] = Resource(r)
			g.nact++
		}
	}
}

// active are the buckets that are on.
func (g *gate) active() []Resource { return g.act[:g.nact] }

// limited reports whether the gate has any bucket.
func (g *gate) limited() bool { return g.nact > 0 }

// sim is a predicted gate state: the levels right after a request is
// admitted at time at.
type sim struct {
	at time.Time
	lv [NumBuckets]float64
	// slots are the predicted times the concurrency slots free up,
	// ascending; nil unless the gate has maxConcurrent.
	slots []time.Time
}

// slotFree reports whether an admission may take a slot now.
func (g *gate) slotFree() bool {
	return g.maxConcurrent == 0 || len(g.inflight) < g.maxConcurrent
}

// bucketWait is how long from now until every bucket can pay for v, and
// the bucket it waits longest for.
func (g *gate) bucketWait(now time.Time, v *Vector) (time.Duration, Resource) {
	var lv [NumBuckets]float64
	for _, r := range g.active() {
		lv[r] = g.b[r].level(now)
	}
	return g.waitFrom(&lv, v)
}

// waitFrom is how long buckets at levels lv need to hold v, and the
// bucket that binds (the first of the longest).
func (g *gate) waitFrom(lv *[NumBuckets]float64, v *Vector) (time.Duration, Resource) {
	var d time.Duration
	binding := Requests
	for _, r := range g.active() {
		if w := g.b[r].waitFrom(lv[r], v[r]); w > d {
			d, binding = w, r
		}
	}
	return d, binding
}

// canPay reports whether the gate lets a request of cost v through now.
func (g *gate) canPay(now time.Time, v *Vector) bool {
	if !g.slotFree() {
		return false
	}
	for _, r := range g.active() {
		if g.b[r].waitFrom(g.b[r].level(now), v[r]) > 0 {
			return false
		}
	}
	return true
}

// take pays v from the buckets.
func (g *gate) take(now time.Time, v *Vector) {
	for _, r := range g.active() {
		g.b[r].take(now, v[r])
	}
}

// give returns v to the buckets (capped at their capacities).
func (g *gate) give(now time.Time, v *Vector) {
	for _, r := range g.active() {
		g.b[r].give(now, v[r])
	}
}

// at is the gate's state at now, as a prediction starts from it.
func (g *gate) at(now time.Time, service time.Duration) sim {
	s := sim{at: now, slots: g.slotTimes(now, service)}
	for _, r := range g.active() {
		s.lv[r] = g.b[r].level(now)
	}
	return s
}

// advance is s at a later time at: refilled, with the slots that free
// before then free.
func (g *gate) advance(s sim, at time.Time) sim {
	if d := at.Sub(s.at); d > 0 {
		s.at = at
		for _, r := range g.active() {
			s.lv[r] = g.b[r].fill(s.lv[r], d)
		}
	}
	return s
}

// ready is how long after s.at the gate can pay for a request of cost v,
// and the resource it waits longest for.
func (g *gate) ready(s sim, v *Vector) (time.Duration, Resource) {
	d, binding := g.waitFrom(&s.lv, v)
	if len(s.slots) > 0 {
		if free := s.slots[0].Sub(s.at); free > d {
			d, binding = free, Slots
		}
	}
	return d, binding
}

// pass is the state right after a request of cost v is admitted at at
// (not before the gate can pay for it: see ready).
func (g *gate) pass(s sim, v *Vector, at time.Time, service time.Duration) sim {
	s2 := g.advance(s, at)
	for _, r := range g.active() {
		s2.lv[r] -= float64(v[r])
	}
	if len(s.slots) > 0 {
		s2.slots = takeSlot(s.slots, at.Add(service))
	}
	return s2
}

// step predicts when a request of cost v is admitted after state s, and
// the state right after it pays. binding is the resource it waited
// longest for.
func (g *gate) step(s sim, v *Vector, service time.Duration) (sim, Resource) {
	d, binding := g.ready(s, v)
	return g.pass(s, v, s.at.Add(d), service), binding
}

// slotTimes predicts when each slot frees, from at on, ascending; nil for a
// gate without maxConcurrent.
func (g *gate) slotTimes(at time.Time, service time.Duration) []time.Time {
	n := g.maxConcurrent
	if n == 0 {
		return nil
	}
	times := make([]time.Time, 0, n)
	for _, a := range g.inflight {
		free := a.start.Add(service)
		if free.Before(at) {
			free = at
		}
		times = append(times, free)
	}
	for len(times) < n {
		times = append(times, at)
	}
	slices.SortFunc(times, time.Time.Compare)
	return times
}

// takeSlot returns a copy of slots with its earliest slot taken by a
// request that will hold it until free.
func takeSlot(slots []time.Time, free time.Time) []time.Time {
	out := make([]time.Time, 0, len(slots))
	i, _ := slices.BinarySearchFunc(slots[1:], free, time.Time.Compare)
	out = append(out, slots[1:1+i]...)
	out = append(out, free)
	return append(out, slots[1+i:]...)
}

// dropSlot removes a's hold on one of the gate's slots.
func (g *gate) dropSlot(a *Admission) {
	if i := slices.Index(g.inflight, a); i >= 0 {
		g.inflight = slices.Delete(g.inflight, i, i+1)
	}
}

// state reports the buckets as a newcomer sees them at now: their levels
// less what queued requests will take (queued).
func (g *gate) state(now time.Time, queued *Vector) (st RateState) {
	g.stateInto(&st, now, queued)
	return st
}

// stateInto is state written into st, which is zero.
func (g *gate) stateInto(st *RateState, now time.Time, queued *Vector) {
	for _, r := range g.active() {
		b := &g.b[r]
		lv := b.level(now) - float64(queued[r])
		st.Limit[r], st.Remaining[r], st.Reset[r] = int(b.capacity), max(0, int(math.Floor(lv))), b.untilFull(lv)
	}
}

// describe fills a rejection's limit, use and request for the resource
// that binds, with queued waiting (depth requests).
func (g *gate) describe(e *RejectError, now time.Time, v, queued *Vector, depth int) {
	if e.Resource == Slots {
		e.Limit, e.Requested = g.maxConcurrent, 1
		e.Used = len(g.inflight) + depth
		return
	}
	b := &g.b[e.Resource]
	avail := b.level(now) - float64(queued[e.Resource])
	e.Limit, e.Requested = int(b.capacity), v[e.Resource]
	e.Used = max(0, e.Limit-int(math.Floor(avail)))
}

// full reports whether every bucket is full at now and no slot is held:
// a new gate would stand exactly where this one does.
func (g *gate) full(now time.Time) bool {
	if len(g.inflight) > 0 {
		return false
	}
	for _, r := range g.active() {
		if g.b[r].level(now) < g.b[r].capacity {
			return false
		}
	}
	return true
}
