package scheduler

import (
	"context"
	"time"
)

// This file holds what the gateway learns after admission: what a request
// really used, what the upstream says is left, and when the upstream wants
// the queue to wait. Each changes the buckets, so each drops the cached
// prediction and lets the queue's head be reconsidered.

// Settle corrects the token bucket once a request's real usage is known:
// reserved is what it paid at admission, actual what the upstream reports.
// Unused tokens go back (the head may be admitted sooner); an overrun is
// charged, possibly leaving the bucket in debt that refill repays before
// anything else is admitted. A request that was never sent settles with
// actual 0 and also gives back its request.
func (q *Queue) Settle(now time.Time, reserved, actual int) {
	if actual == reserved {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if actual < reserved {
		q.tok.give(now, reserved-actual)
	} else {
		q.tok.charge(now, actual-reserved)
	}
	q.changed(now)
}

// Unsend returns a whole admission: the request was never received by the
// upstream (it could not connect), or was refused before it ran (an
// upstream 429). Its request, its reserved tokens and its concurrency slot
// go back; it must not be released as well.
func (q *Queue) Unsend(now time.Time, adm Admission, reserved int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.req.give(now, 1)
	q.tok.give(now, reserved)
	q.dropSlot(adm.Start)
	q.changed(now)
}

// Upstream is what an upstream reported about its own limits in response
// headers. A false Has field means that value was not reported.
type Upstream struct {
	RemainingRequests, RemainingTokens       int
	HasRemainingRequests, HasRemainingTokens bool
}

// Observe lowers the buckets by what someone else spent of the upstream's
// limits: the gateway is not the key's only user, and its buckets must not
// promise what the upstream will refuse. mark is the request's Admission.Mark
// and u what the upstream reported it had left when it took that request.
// Both describe the same moment, so a response that arrives late (its
// headers were made when the request arrived, and both buckets have refilled
// since) compares like with like; and what other responses already corrected
// since mark is not corrected twice. It never raises a bucket.
//
// A steady drain by someone else would surprise the gateway on every
// request, so each discrepancy also moves an estimate of what others spend,
// and the bucket refills that much slower (never below a tenth of the
// configured rate); when others stop, the upstream reports more than the
// gateway holds and the rate recovers. It reports whether a bucket was
// lowered.
func (q *Queue) Observe(now time.Time, mark Mark, u Upstream) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	var lowered float64
	changed := false
	if u.HasRemainingRequests {
		n, c := q.req.observe(now, mark.Requests-float64(u.RemainingRequests)-(q.loweredReq-mark.LoweredRequests))
		q.loweredReq += n
		lowered, changed = lowered+n, changed || c
	}
	if u.HasRemainingTokens {
		n, c := q.tok.observe(now, mark.Tokens-float64(u.RemainingTokens)-(q.loweredTok-mark.LoweredTokens))
		q.loweredTok += n
		lowered, changed = lowered+n, changed || c
	}
	if lowered > 0 || changed {
		q.changed(now)
	}
	return lowered > 0
}

// Unpaid returns mark as it was before the request paid: for comparing with
// an upstream that refused the request, and so never counted it.
func (m Mark) Unpaid(cost Cost) Mark {
	m.Requests++
	m.Tokens += float64(cost.Tokens)
	return m
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

// changed drops the cached prediction and reconsiders the head after the
// buckets or the hold changed. q.mu is held.
func (q *Queue) changed(now time.Time) {
	q.tailOK = false
	if !q.closed {
		q.dispatch(now)
	}
}

// Requeue puts a request that was admitted but must be sent again (the
// upstream refused it with a 429 and its admission was given back with
// Unsend) at the head of the queue, ahead of everyone who arrived after it,
// ignoring MaxQueueSize. It waits like Acquire, but its limit is the
// absolute deadline it arrived with, not a fresh MaxQueueWait: if it cannot
// be admitted by then it is rejected at once with ErrWaitTooLong, whose
// RetryAfter is when a newcomer retrying alone would be admitted.
func (q *Queue) Requeue(ctx context.Context, cost Cost, deadline time.Time) (Admission, error) {
	q.mu.Lock()
	now := q.clock.Now()
	w, adm, err := q.requeue(now, cost, deadline)
	q.mu.Unlock()
	if w == nil {
		return adm, err
	}
	return q.wait(ctx, w)
}

func (q *Queue) requeue(now time.Time, cost Cost, deadline time.Time) (*waiter, Admission, error) {
	if q.closed {
		return nil, Admission{}, ErrClosed
	}
	if len(q.waiting) == 0 && q.canPay(now, cost) {
		return nil, q.pay(now, cost, 0), nil
	}
	first, binding := q.step(q.headAt(now), cost)
	if first.at.After(deadline) {
		tail, _ := q.step(q.tailAt(now), cost)
		return nil, Admission{}, q.reject(now, ErrWaitTooLong, binding, cost, tail.at.Sub(now))
	}
	w := &waiter{cost: cost, enqueued: now, ready: make(chan struct{})}
	q.waiting = append(q.waiting, nil)
	copy(q.waiting[1:], q.waiting)
	q.waiting[0] = w
	q.queuedTokens += cost.Tokens
	q.changed(now)
	return w, Admission{}, nil
}
