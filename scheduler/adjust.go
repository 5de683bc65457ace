package scheduler

import (
	"context"
	"time"
)

// This file holds what the gateway learns after admission: what a request
// really used, what the upstream says is left, and when the upstream wants
// the queue to wait. Each changes the buckets, so each drops the cached
// prediction and lets the queue's head be reconsidered.

// observeNoise is the discrepancy Observe ignores: upstreams report whole
// numbers, truncated, so one unit of difference is rounding, not spending.
const observeNoise = 1

// Observe lowers the buckets by what someone else spent of the upstream's
// limits: the gateway is not the key's only user, and its buckets must not
// promise what the upstream will refuse. u is what the upstream reported it
// had left when it took this request (or, after Unsend, when it refused
// it). It takes effect once per admission and never raises a bucket.
//
// The request's Mark and u describe the same moment, so a response that
// arrives late (its headers were made when the request arrived, and both
// buckets have refilled since) compares like with like; what other
// responses already corrected since the mark is not corrected twice. Every
// request the gateway admitted after this one may have reached the
// upstream first, answered or still in flight (they run concurrently; the
// network and the gateway's goroutines reorder them), so the bucket is
// lowered only by a discrepancy larger than all they paid, and than the
// upstream's rounding: the gateway's own requests never lower it.
// What someone else really spent shows again in the next observations and
// is corrected then.
//
// A steady drain by someone else would surprise the gateway on every
// request, so each discrepancy also moves an estimate of what others spend,
// and the bucket refills that much slower (never below a tenth of the
// configured rate); when others stop, the upstream reports more than the
// gateway holds and the rate recovers. That estimate takes the upstream to
// have counted, of the requests admitted after this one, those answered
// before it (answers come back mostly in the order the upstream took the
// requests): a reordering makes one observation high and a later one as
// much lower, which cancel in the estimate, while a drain persists. It
// reports whether a bucket was lowered.
func (a *Admission) Observe(now time.Time, u Upstream) bool {
	if a == nil || a.q == nil {
		return false
	}
	q := a.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if a.observed {
		return false
	}
	a.observed = true
	mark := &a.Mark
	// What the requests admitted after this one paid: all of it may have
	// been counted first (the level is lowered only beyond it); what those
	// answered before it paid, most likely counted first (the drain
	// estimate).
	ahead := q.answeredAhead(a)
	q.recordAnswer(a, now)
	var lowered float64
	changed := false
	for r := range q.b {
		if !u.Reported[r] || !q.b[r].on {
			continue
		}
		level := mark.Level[r]
		if a.unsent {
			// The upstream refused it, so never counted it: compare with
			// the bucket as it was before it paid.
			level += float64(a.cost[r])
		}
		d := level - float64(u.Remaining[r])
		after := q.paid[r] - mark.Paid[r]
		n, dr, c := q.b[r].observe(now, d-(q.lowered[r]-mark.Lowered[r])-after,
			d-(q.drained[r]-mark.Drained[r])-ahead[r], float64(u.Rounding[r])/2)
		q.lowered[r] += n
		q.drained[r] += dr
		lowered, changed = lowered+n, changed || c
	}
	if lowered > 0 || changed {
		q.changed(now)
	}
	return lowered > 0
}

// answer is one observed response: which admission, when, and what the
// upstream counted for it.
type answer struct {
	seq  uint64
	at   time.Time
	paid Vector
}

// answerLog is how many recent answers a queue keeps to tell which requests
// may have overtaken one another.
const answerLog = 128

// answeredAhead sums what the requests admitted after a and answered before
// it paid. Answers come back in the order the upstream took the requests,
// so these are the ones it may have counted before a. When the log no
// longer reaches back to a's admission, everything paid since is taken,
// which never lowers a bucket wrongly. q.mu is held.
func (q *Queue) answeredAhead(a *Admission) (ahead [NumBuckets]float64) {
	n := len(q.answers)
	for i := range n {
		j := n - 1 - i // newest first
		if n == answerLog {
			j = (q.answerNext - 1 - i + 2*answerLog) % answerLog
		}
		e := &q.answers[j]
		if e.at.Before(a.start) {
			return ahead
		}
		if e.seq > a.seq {
			for r, p := range e.paid {
				ahead[r] += float64(p)
			}
		}
	}
	if n < answerLog {
		return ahead // the whole history: complete
	}
	for r := range ahead {
		ahead[r] = q.paid[r] - a.Mark.Paid[r]
	}
	return ahead
}

// recordAnswer logs a's answer. q.mu is held.
func (q *Queue) recordAnswer(a *Admission, now time.Time) {
	e := answer{seq: a.seq, at: now, paid: a.cost}
	if a.unsent {
		e.paid = Vector{} // refused: the upstream counted nothing
	}
	if len(q.answers) < answerLog {
		q.answers = append(q.answers, e)
		return
	}
	q.answers[q.answerNext] = e
	q.answerNext = (q.answerNext + 1) % answerLog
}

// Hold stops all admissions until until (the upstream answered 429 with a
// retry time). A later hold extends an earlier one; predictions include it.
func (q *Queue) Hold(now, until time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if until.After(q.holdUntil) {
		q.holdUntil = until
		q.changed(now)
	}
}

// HeldUntil returns the end of the current hold (zero if none was set).
func (q *Queue) HeldUntil() time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.holdUntil
}

// changed drops the kept prediction and reconsiders whose turn it is
// after the buckets or the hold changed. q.mu is held.
func (q *Queue) changed(now time.Time) {
	q.cls[Interactive].tail.ok, q.cls[Batch].tail.ok = false, false
	if !q.closed {
		q.dispatch(now)
	}
}

// Requeue puts a request that was admitted but must be sent again (the
// upstream refused it with a 429 and its admission was given back with
// Unsend) at the head of its client's FIFO, ahead of everyone of that
// client who arrived after it, ignoring MaxQueueSize; its tag went back
// with Unsend, so it is also first among the clients if it was before. It
// waits like Acquire, but its limit is the absolute deadline it arrived
// with, not a fresh MaxQueueWait: if it cannot be admitted by then it is
// rejected at once with ErrWaitTooLong, whose RetryAfter is when a
// newcomer retrying alone would be admitted.
//
// into, if not nil, is the admission to write into, as for AcquireInto
// (the one given back is fine).
func (q *Queue) Requeue(ctx context.Context, cost Cost, deadline time.Time, into *Admission) (*Admission, error) {
	q.mu.Lock()
	now := time.Now()
	w, adm, err := q.requeue(now, cost, deadline, into)
	q.mu.Unlock()
	if w == nil {
		return adm, err
	}
	return q.wait(ctx, w)
}

func (q *Queue) requeue(now time.Time, cost Cost, deadline time.Time, into *Admission) (*waiter, *Admission, error) {
	l, err := q.laneOf(cost)
	if err != nil {
		return nil, nil, err
	}
	if now.After(deadline) {
		// Its time is up: it cannot be admitted by then, even at once.
		tail := q.probe(now, l, cost)
		return nil, nil, q.reject(now, ErrWaitTooLong, tail, l, cost, q.withOthers(now, tail.at.Sub(now)))
	}
	if q.admitsNow(now, l, &cost.Amount) {
		return nil, q.pay(now, l, cost, 0, into), nil
	}
	// At the head of its lane: the lane's waiters shift back one.
	w := q.push(now, l, cost)
	w.into = into
	copy(l.waiting[1:], l.waiting[:len(l.waiting)-1])
	l.waiting[0] = w
	w.deadline = deadline
	q.headChanged(l)
	q.cls[l.cls].tail.ok = false
	ch := q.predict(now, w)
	if now.Add(q.withOthers(now, ch.at.Sub(now))).After(deadline) {
		q.cancel(now, w)
		tail := q.probe(now, l, cost)
		return nil, nil, q.reject(now, ErrWaitTooLong, ch, l, cost, q.withOthers(now, tail.at.Sub(now)))
	}
	w.ready = make(chan struct{})
	q.changed(now)
	return w, nil, nil
}
