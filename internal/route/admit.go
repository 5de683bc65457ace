package route

import (
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/scheduler"
)

// The admit stage: a request waits its turn in its model's queue, then the
// send loop runs while it holds its admission.

// schedule admits a request through its model's queue and forwards it,
// sending it again when the upstream answers with a retryable 429 (back to
// the head of the queue, which is held as long as the upstream asked), a
// 5xx or a connection failure (after a backoff), as long as nothing has
// reached the client and the request's maxQueueWait budget lasts.
func (rt *Route) schedule(ex *exchange, r *http.Request, body *request.Body, c *call, who *clients.Client, rec *requestLog) {
	ms := c.ms
	rec.prompt, rec.cost, rec.series = c.est.prompt, c.est.cost, ms.Metrics
	arrived := time.Now()
	ex.who = rt.clients[who.ID]
	// The client's daily budget first: over it, nothing is queued.
	spend, err := who.Reserve(arrived, rec.model, c.est.cost)
	if err != nil {
		rec.outcome = metrics.OutcomeRejectBudget
		var reserved *clients.Reserved
		if errors.As(err, &reserved) {
			openai.WriteBudgetReserved(ex, reserved)
		} else {
			openai.WriteQuota(ex, err.(*clients.Exhausted))
		}
		return
	}
	ex.spend = spend
	defer ex.spend.Release()
	goOn, unlimited := rt.degradedBefore(ex, ms, rec)
	if !goOn {
		return
	}
	cost := scheduler.Cost{Tokens: c.est.cost, Client: who.ID, Name: who.Name}
	var adm *scheduler.Admission
	if unlimited {
		adm = &ex.admission // the zero admission: nothing held, nothing to give back
	} else {
		adm, err = ms.Queue.AcquireInto(r.Context(), cost, &ex.admission)
	}
	if errors.Is(err, scheduler.ErrRetired) {
		// Its queue was retired for being idle between lookup and
		// admission: look again (a new queue with full buckets, exactly
		// what the idle one held).
		if ms, err = rt.models.For(rec.model); err == nil {
			c.ms, rec.series = ms, ms.Metrics
			adm, err = ms.Queue.AcquireInto(r.Context(), cost, &ex.admission)
		}
	}
	if err != nil {
		rec.outcome = rt.writeAcquireError(ex, r.Context(), err)
		if rt.debugging(r.Context()) {
			rt.debug(r.Context(), "not admitted", slog.String("model", rec.model), slog.Int("cost", c.est.cost),
				slog.String("reason", err.Error()))
		}
		return
	}
	if rt.debugging(r.Context()) {
		rt.debug(r.Context(), "admitted", slog.String("model", rec.model), slog.Int("cost", c.est.cost),
			slog.Duration("wait", adm.Wait), slog.Duration("predicted_wait", adm.Predicted),
			slog.Int("remaining_requests", adm.State.RemainingRequests),
			slog.Int("remaining_tokens", adm.State.RemainingTokens))
	}
	// Whatever happens from here (a retry's new admission, a response cut
	// short by a panic with http.ErrAbortHandler), the admission in force
	// when the request ends gives back its concurrency slot.
	ex.adm = adm
	defer func() { ex.adm.Release(time.Now()) }()
	defer ex.hold.release()
	// An answer whose copy broke off (the client cut the stream: a panic
	// with http.ErrAbortHandler) still settles what it relayed.
	defer func() {
		if ex.unsettled {
			rt.settle(ex, c, ex.delivering, rec)
		}
	}()
	ex.rate, ex.hasRate = adm.State, !unlimited
	// The request's deadline is its client's maxQueueWait (the model's
	// where the client has none): retries, requeues and slot waits end by it.
	maxWait := adm.MaxQueueWait
	if unlimited {
		maxWait = ms.MaxQueueWait
	}
	ex.deadline = arrived.Add(maxWait)
	rec.wait = adm.Wait
	if !unlimited && !rt.takeShared(r.Context(), ex, ms, cost, rec) {
		return
	}
	ms.Metrics.Inflight(1)
	defer ms.Metrics.Inflight(-1)
	rec.outcome = metrics.OutcomeAdmitted
	ms.Metrics.Admitted(rec.wait, c.est.prompt, c.est.cost)
	ex.who.Outcome(rec.outcome)

	ex.ms, ex.strip = ms, c.inject != nil
	ex.maxRetries, ex.backoff = *rt.cfg.Retries, time.Duration(rt.cfg.RetryBackoff)
	ex.lease.Reset(rec.model, c.keepAlive, ex.deadline)
	send := body
	if c.inject != nil {
		send = c.inject
	}
	// The loop owns each round trip (forward.go): it sends, and sends
	// again while the outcome allows, then settles.
	for {
		ex.tries++
		a := rt.try(ex, r, rec.model, c, send)
		switch a.verdict {
		case relay.Deliver, relay.Failed:
			if a.noBackend {
				ex.unsend(time.Now()) // never sent
				ms.Metrics.Unsent(c.est.cost)
				rec.outcome = "no_backend"
				if r.Context().Err() != nil {
					rec.outcome = metrics.OutcomeCancelled
				}
				return
			}
			rt.settle(ex, c, a, rec)
			return
		}
		if !rt.sendAgain(r.Context(), ex, a, cost, rec) {
			return
		}
	}
}
