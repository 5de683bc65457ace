package route

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/internal/ticket"
	"github.com/llproxy/llproxy/scheduler"
)

// The admit stage: a request gets its ticket (package ticket: its budget,
// its queue, the shared buckets), then the send loop runs while it holds
// it.

// schedule admits a request and forwards it, sending it again when the
// upstream answers with a retryable 429 (back to the head of the queue,
// which is held as long as the upstream asked), a 5xx or a connection
// failure (after a backoff), as long as nothing has reached the client and
// the ticket's deadline allows.
func (rt *Route) schedule(ex *exchange, r *http.Request, body *request.Body, c *call, who *clients.Client, rec *requestLog) {
	ctx := r.Context()
	rec.prompt, rec.cost, rec.series = c.est.prompt, c.est.cost, c.ms.Metrics
	ex.who = rt.clients[who.ID]
	ask := ticket.Ask{Client: who, Model: c.ms, Name: rec.model, Cost: c.est.vector(), Money: c.est.money, KeepAlive: c.keepAlive}
	var err error
	if ask.Class, ask.MaxWait, ask.OwnWait, err = classOf(r.Header, who.Class); err != nil {
		rec.outcome = OutcomeBadRequest
		rt.say.Error(ex, http.StatusBadRequest, "invalid_request_error", "", err.Error())
		return
	}
	rec.class = ask.Class.String()
	t, err := rt.gate.AdmitInto(ctx, ask, &ex.ticket)
	if err != nil {
		rec.outcome = rt.writeAdmitError(ex, ctx, err)
		if rt.debugging(ctx) {
			rt.debug(ctx, "not admitted", slog.String("model", rec.model), slog.Int("cost", c.est.cost),
				slog.String("reason", err.Error()))
		}
		return
	}
	// Whatever happens from here (a requeue's new admission, a response
	// cut short by a panic with http.ErrAbortHandler), the ticket gives
	// back what it holds when the request ends.
	ex.t = t
	defer func() { t.Release(time.Now()) }()
	// An answer whose copy broke off (the client cut the stream: a panic
	// with http.ErrAbortHandler) still settles what it relayed.
	defer func() {
		if ex.unsettled {
			rt.settle(ex, c, ex.delivering, rec)
		}
	}()
	ms := t.Model
	rec.wait, rec.series = t.Wait, ms.Metrics
	ms.Metrics.ClassAdmitted(int(t.Class()))
	if rt.debugging(ctx) {
		st, _ := t.Rate()
		rt.debug(ctx, "admitted", slog.String("model", rec.model), slog.Int("cost", c.est.cost),
			slog.Duration("wait", t.Wait), slog.Duration("predicted_wait", t.Predicted),
			slog.Int("remaining_requests", st.Remaining[scheduler.Requests]),
			slog.Int("remaining_tokens", st.Remaining[scheduler.Tokens]))
	}
	ms.Metrics.Inflight(1)
	defer ms.Metrics.Inflight(-1)
	rec.outcome = metrics.OutcomeAdmitted
	ms.Metrics.Admitted(rec.wait, c.est.prompt, c.est.cost)
	ex.who.Outcome(rec.outcome)

	ex.strip = c.inject != nil
	ex.maxRetries, ex.backoff = *rt.cfg.Retries, time.Duration(rt.cfg.RetryBackoff)
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
				t.Unsend(time.Now()) // never sent
				rec.outcome = "no_backend"
				if ctx.Err() != nil {
					rec.outcome = metrics.OutcomeCancelled
				}
				return
			}
			rt.settle(ex, c, a, rec)
			return
		}
		if !rt.sendAgain(ctx, ex, a, rec) {
			return
		}
	}
}

// writeAdmitError answers a request that got no ticket and returns its
// outcome: over its budget, the shared limits away (deny), or not
// admitted by its queue.
func (rt *Route) writeAdmitError(ex *exchange, ctx context.Context, err error) string {
	var reserved *clients.Reserved
	var exhausted *clients.Exhausted
	var cashReserved *clients.CashReserved
	var overspent *clients.Overspent
	switch {
	case errors.As(err, &reserved):
		rt.say.BudgetReserved(ex, reserved)
		return metrics.OutcomeRejectBudget
	case errors.As(err, &exhausted):
		rt.say.Quota(ex, exhausted)
		return metrics.OutcomeRejectBudget
	case errors.As(err, &cashReserved):
		rt.say.BudgetReserved(ex, cashReserved)
		return metrics.OutcomeRejectBudget
	case errors.As(err, &overspent):
		rt.say.Quota(ex, overspent)
		return metrics.OutcomeRejectBudget
	case errors.Is(err, ticket.ErrLimitsUnavailable):
		h := ex.Header()
		h["X-Llproxy-Limits"] = []string{"local"}
		h["Retry-After"] = []string{"1"}
		rt.say.Error(ex, http.StatusServiceUnavailable, "server_error", "limits_unavailable",
			"llproxy cannot reach the shared limits (Redis) and is configured to refuse until it can (onRedisDown: deny).")
		return metrics.OutcomeSharedDown
	}
	return rt.writeAcquireError(ex, ctx, err)
}

// RecoverShared lowers the shared buckets of every model of the route to
// what this replica's queues hold of them, after an outage (see
// ticket.Gate.Recover).
func (rt *Route) RecoverShared(ctx context.Context) error {
	return rt.gate.Recover(ctx, len(rt.clients))
}

// classOf is a request's class and its own limit on its wait, from its
// headers: x-llproxy-class may lower its client's class (to "batch",
// never up: "interactive" from a batch client stays batch), and
// x-llproxy-max-wait (seconds, or a duration) lowers its maxQueueWait.
func classOf(h http.Header, class scheduler.Class) (scheduler.Class, time.Duration, bool, error) {
	if v := h.Get("X-Llproxy-Class"); v != "" {
		switch strings.ToLower(strings.TrimSpace(v)) {
		case "batch":
			class = scheduler.Batch
		case "interactive":
		default:
			return class, 0, false, fmt.Errorf("x-llproxy-class: unknown class %q: use interactive or batch", v)
		}
	}
	v := h.Get("X-Llproxy-Max-Wait")
	if v == "" {
		return class, 0, false, nil
	}
	d, err := duration.Parse(strings.TrimSpace(v))
	if err != nil {
		return class, 0, false, fmt.Errorf("x-llproxy-max-wait: %v", err)
	}
	return class, d, true, nil
}
