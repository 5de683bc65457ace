package scheduler

import (
	"math"
	"time"
)

// What a queue shows: the buckets as a newcomer sees them (for
// x-ratelimit-* headers), its depth and levels (for metrics), each
// client's state, and its end: Close, and Retire when idle.

// state reports the buckets as a newcomer of lane l sees them at now: the
// model's, less what the queued requests will take, or the client's own
// where they leave less.
func (q *Queue) state(now time.Time, l *lane) (st RateState) {
	q.stateInto(&st, now, l)
	return st
}

// stateInto is state written into st, which is zero.
func (q *Queue) stateInto(st *RateState, now time.Time, l *lane) {
	q.gate.stateInto(st, now, &q.queued)
	if !l.limited() {
		return
	}
	own := l.gate.state(now, &l.queued)
	for _, r := range l.active() {
		if own.Remaining[r] < st.Remaining[r] || !q.b[r].on {
			st.Limit[r], st.Remaining[r], st.Reset[r] = own.Limit[r], own.Remaining[r], own.Reset[r]
		}
	}
}

// State returns the model's buckets' state at now as a newcomer sees it.
func (q *Queue) State(now time.Time) RateState {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.gate.state(now, &q.queued)
}

// StateFor returns the buckets' state at now as a newcomer of client
// number client sees them: the model's, or its own where they leave less.
func (q *Queue) StateFor(now time.Time, client int) RateState {
	q.mu.Lock()
	defer q.mu.Unlock()
	if client < 0 || client >= q.clients {
		return q.gate.state(now, &q.queued)
	}
	return q.state(now, q.lanes[client])
}

// Stats returns the queue's depth and bucket levels at now, and the wait
// predicted for a newcomer: a request of one token from a client that is
// not waiting and has no limits of its own (not any configured client,
// whose own limits or backlog would make it that client's wait); a wait
// beyond the model's maxQueueWait is reported as just past it.
func (q *Queue) Stats(now time.Time) Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	st := Stats{Depth: q.depth, Queued: q.queued, Limit: q.cfg.Limits(), InFlight: len(q.inflight)}
	for r := range q.b {
		if q.b[r].on {
			st.Remaining[r], st.Refill[r] = q.b[r].level(now), perMinute(q.b[r].perSec)
		}
	}
	st.Promoted, st.Headroom = q.promoted, q.headroom()
	for c := range numClasses {
		st.DepthBy[c], st.Oldest[c] = q.cls[c].depth, q.oldest(now, c)
	}
	if !q.closed {
		// The replay stops just past the newcomer's maxQueueWait: beyond
		// it, it would be refused anyway, and a scrape or a status poll
		// must not hold the queue's lock over a deep backlog.
		for c := range numClasses {
			l := q.newcomer(c)
			lim := bound{horizon: now.Add(l.MaxQueueWait)}
			if c == Batch {
				lim.steps = statsSteps // an hour of a busy key is a long replay
			}
			st.PredictedWaitBy[c] = max(0, q.probeUntil(now, l, Cost{Amount: Request(1, 0), Class: c}, lim).at.Sub(now))
		}
		st.PredictedWait = st.PredictedWaitBy[Interactive]
	}
	return st
}

// Next is the nearest deadline of the client's requests waiting in the
// queue (each lane's head: a lane is a FIFO), zero if none waits.
func (q *Queue) Next(client int) time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	if client < 0 || client >= q.clients {
		return time.Time{}
	}
	var next time.Time
	for _, l := range [2]*lane{q.lanes[client], q.blanes[client]} {
		if len(l.waiting) > 0 && (next.IsZero() || l.waiting[0].deadline.Before(next)) {
			next = l.waiting[0].deadline
		}
	}
	return next
}

// Clients calls f with each client's state, in the order of NewQueue's
// clients.
func (q *Queue) Clients(f func(i int, st ClientStats)) {
	q.mu.Lock()
	stats := make([]ClientStats, q.clients)
	for i, l := range q.lanes[:q.clients] {
		b := q.blanes[i]
		st := ClientStats{Name: l.Name, Depth: len(l.waiting) + len(b.waiting), Queued: l.queued,
			InFlight: l.running + b.running}
		st.Queued.add(&b.queued, 1)
		st.DepthBy[Interactive], st.DepthBy[Batch] = len(l.waiting), len(b.waiting)
		stats[i] = st
	}
	q.mu.Unlock()
	for i, st := range stats {
		f(i, st)
	}
}

// Close rejects every waiting request with ErrClosed, and every later one.
func (q *Queue) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.disarm()
	for _, l := range append(q.lanes[:len(q.lanes):len(q.lanes)], q.blanes...) {
		for _, w := range l.waiting {
			w.done, w.err = true, ErrClosed
			close(w.ready)
		}
		l.waiting, l.queued = nil, Vector{}
		l.cur.at = -1
	}
	for c := range q.cls {
		q.cls[c].backlog, q.cls[c].depth = q.cls[c].backlog[:0], 0
	}
	q.depth, q.queued = 0, Vector{}
}

// Retire marks the queue retired if it is idle at now (nobody waiting or in
// flight, no hold, every bucket full again: a new queue for its model would
// start exactly where it stands) and reports whether it did. A retired
// queue answers Acquire with ErrRetired.
func (q *Queue) Retire(now time.Time) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	idle := q.depth == 0 && !q.holdUntil.After(now) && q.full(now)
	for i, l := range q.lanes {
		idle = idle && l.running == 0 && q.blanes[i].running == 0 && l.full(now)
	}
	if idle && !q.closed {
		q.retired.Store(true)
	}
	return q.retired.Load()
}

// Retired reports whether the queue was retired.
func (q *Queue) Retired() bool { return q.retired.Load() }

// statsSteps bounds the replay of a batch newcomer's prediction for
// Stats (its horizon, batchMaxQueueWait, is hours of a busy key): a scrape
// or a status poll holds the queue's lock for at most this many
// admissions replayed (a few µs); past them, the wait it reports is a
// lower bound. An interactive newcomer's replay ends at its maxQueueWait.
const statsSteps = 64

// perMinute converts a per-second rate, rounding away float noise.
func perMinute(perSec float64) float64 { return math.Round(perSec*60*1e6) / 1e6 }

// Depth is how many requests wait in the queue: Stats without its
// prediction, for callers that want only this.
func (q *Queue) Depth() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.depth
}

// newcomer is a lane for predictions only: a client of weight 1 and
// class cls, with no limits of its own and nothing waiting, that is in no
// backlog.
func (q *Queue) newcomer(cls Class) *lane {
	g := newGate(Vector{}, 0)
	return newLane(q.cfg.Client("", 1), &g, cls)
}
