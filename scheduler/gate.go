package scheduler

import (
	"math"
	"slices"
	"time"
)

// A gate is one set of limits a request must pass: a request bucket, a
// token bucket and, optionally, concurrency slots. A queue has one for its
// model (the upstream's limits) and one per client (the client's own
// limits for that model); a request is admitted only when both let it
// through. A client's gate may have no buckets: a bucket of capacity 0 is
// no limit.
//
// Concurrency slots are the third resource: a local model server has N
// parallel slots, so a request waits until one frees, that is until an
// admitted request is released when its response completes. When a slot
// frees cannot be known in advance, so predictions use how long requests
// have held a slot on average: each in-flight request is expected to
// finish that long after its admission (or now, if it is already overdue).
type gate struct {
	req, tok      bucket
	maxConcurrent int
	inflight      []*Admission // admissions holding one of its slots (maxConcurrent only)
	// fullConcurrent is the configured maxConcurrent while a share of it is
	// in force (see Queue.Share); 0 before.
	fullConcurrent int
}

func newGate(rpm, tpm, maxConcurrent int) gate {
	return gate{req: newBucket(rpm), tok: newBucket(tpm), maxConcurrent: maxConcurrent}
}

// sim is a predicted gate state: the levels right after a request is
// admitted at time at.
type sim struct {
	at       time.Time
	req, tok float64
	// slots are the predicted times the concurrency slots free up,
	// ascending; nil unless the gate has maxConcurrent.
	slots []time.Time
}

// slotFree reports whether an admission may take a slot now.
func (g *gate) slotFree() bool {
	return g.maxConcurrent == 0 || len(g.inflight) < g.maxConcurrent
}

// bucketWait is how long from now until both buckets can pay for cost.
func (g *gate) bucketWait(now time.Time, tokens int) time.Duration {
	return max(g.req.waitFrom(g.req.level(now), 1), g.tok.waitFrom(g.tok.level(now), tokens))
}

// canPay reports whether the gate lets a request of tokens through now.
func (g *gate) canPay(now time.Time, tokens int) bool {
	return g.slotFree() && g.bucketWait(now, tokens) == 0
}

// take pays a request's cost from both buckets.
func (g *gate) take(now time.Time, tokens int) {
	g.req.take(now, 1)
	g.tok.take(now, tokens)
}

// at is the gate's state at now, as a prediction starts from it.
func (g *gate) at(now time.Time, service time.Duration) sim {
	return sim{at: now, req: g.req.level(now), tok: g.tok.level(now), slots: g.slotTimes(now, service)}
}

// advance is s at a later time at: refilled, with the slots that free
// before then free.
func (g *gate) advance(s sim, at time.Time) sim {
	if d := at.Sub(s.at); d > 0 {
		s = sim{at: at, req: g.req.fill(s.req, d), tok: g.tok.fill(s.tok, d), slots: s.slots}
	}
	return s
}

// ready is how long after s.at the gate can pay for a request of tokens,
// and the resource it waits longest for.
func (g *gate) ready(s sim, tokens int) (time.Duration, Resource) {
	dr := g.req.waitFrom(s.req, 1)
	dt := g.tok.waitFrom(s.tok, tokens)
	d, binding := dr, Requests
	if dt > dr {
		d, binding = dt, Tokens
	}
	if len(s.slots) > 0 {
		if free := s.slots[0].Sub(s.at); free > d {
			d, binding = free, Slots
		}
	}
	return d, binding
}

// pass is the state right after a request of tokens is admitted at at
// (not before the gate can pay for it: see ready).
func (g *gate) pass(s sim, tokens int, at time.Time, service time.Duration) sim {
	s2 := g.advance(s, at)
	s2.req -= 1
	s2.tok -= float64(tokens)
	if len(s.slots) > 0 {
		s2.slots = takeSlot(s.slots, at.Add(service))
	}
	return s2
}

// step predicts when a request of tokens is admitted after state s, and
// the state right after it pays. binding is the resource it waited
// longest for.
func (g *gate) step(s sim, tokens int, service time.Duration) (sim, Resource) {
	d, binding := g.ready(s, tokens)
	return g.pass(s, tokens, s.at.Add(d), service), binding
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
// less what queued requests (queuedReq of them, queuedTok tokens) will
// take.
func (g *gate) state(now time.Time, queuedReq, queuedTok int) RateState {
	lr := g.req.level(now) - float64(queuedReq)
	lt := g.tok.level(now) - float64(queuedTok)
	return RateState{
		LimitRequests: int(g.req.capacity), RemainingRequests: max(0, int(math.Floor(lr))), ResetRequests: g.req.untilFull(lr),
		LimitTokens: int(g.tok.capacity), RemainingTokens: max(0, int(math.Floor(lt))), ResetTokens: g.tok.untilFull(lt),
	}
}

// describe fills a rejection's limit, use and request for the resource
// that binds, with queuedReq requests and queuedTok tokens waiting.
func (g *gate) describe(e *RejectError, now time.Time, tokens, queuedReq, queuedTok int) {
	switch e.Resource {
	case Slots:
		e.Limit, e.Requested = g.maxConcurrent, 1
		e.Used = len(g.inflight) + queuedReq
	case Tokens:
		avail := g.tok.level(now) - float64(queuedTok)
		e.Limit, e.Requested = int(g.tok.capacity), tokens
		e.Used = max(0, e.Limit-int(math.Floor(avail)))
	default:
		avail := g.req.level(now) - float64(queuedReq)
		e.Limit, e.Requested = int(g.req.capacity), 1
		e.Used = max(0, e.Limit-int(math.Floor(avail)))
	}
}

// full reports whether both buckets are full at now and no slot is held:
// a new gate would stand exactly where this one does.
func (g *gate) full(now time.Time) bool {
	return len(g.inflight) == 0 && g.req.level(now) >= g.req.capacity && g.tok.level(now) >= g.tok.capacity
}
