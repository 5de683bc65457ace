package route

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/ticket"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
)

// The settle stage, and what happens between two sends: reading the
// upstream's rate-limit headers into the buckets, waiting before a send
// again (or, after an upstream 429, back at the head of the queue), and
// settling the reservation once the answer is done.

// nextBackoff is the wait before send number ex.tries+1 after a failure:
// the route's backoff doubled per try, less up to a quarter of jitter.
func (ex *exchange) nextBackoff() time.Duration {
	d := ex.backoff << min(ex.tries-1, 10)
	return d - time.Duration(rand.Int64N(int64(d)/4+1))
}

// canRetry reports whether a failed send may be repeated: nothing reached
// the client yet, retries are left, and the backoff ends before the
// request's deadline.
func (ex *exchange) canRetry(now time.Time) bool {
	return ex.t != nil && ex.retryable(now, ex.t.Deadline())
}

// retryable is canRetry for a request whose deadline is deadline.
func (ex *exchange) retryable(now, deadline time.Time) bool {
	return ex.status == 0 && ex.tries <= ex.maxRetries && !now.Add(ex.backoff<<min(ex.tries-1, 10)).After(deadline)
}

// upstreamOf is what the upstream's rate headers say it has left, per
// resource.
func upstreamOf(ri provider.RateInfo) scheduler.Upstream {
	var u scheduler.Upstream
	for r, b := range ri.Buckets() {
		u.Remaining[r], u.Reported[r] = b.Remaining, b.HasRemaining
		if r != int(scheduler.Requests) {
			u.Rounding[r] = ri.Rounding
		}
	}
	return u
}

// observe lowers the model's buckets to what the upstream reports is left
// (the ticket knows when: with shared limits, only while Redis is away;
// see README, Running several replicas) and records the upstream's view.
func (rt *Route) observe(t *ticket.Ticket, ri provider.RateInfo, now time.Time) {
	if !ri.Any() {
		return
	}
	if t.Observe(now, upstreamOf(ri)) {
		t.Model.Metrics.Lowered()
	}
	rt.upstreamRate(t.Model, ri)
}

// upstreamRate records the upstream's view of its limits.
func (rt *Route) upstreamRate(ms *models.Model, ri provider.RateInfo) {
	orNone := func(v int, ok bool) int {
		if ok {
			return v
		}
		return -1
	}
	for r, b := range ri.Buckets() {
		if b.Any() {
			ms.Metrics.UpstreamRate(r, orNone(b.Limit, b.HasLimit), orNone(b.Remaining, b.HasRemaining), b.Reset, b.HasReset)
		}
	}
}

// sendAgain prepares the next send after a retryable outcome. It returns
// false when the request is over: the client left, or (for an upstream 429
// that outlasts the request's budget) it was answered with an honest 429.
func (rt *Route) sendAgain(ctx context.Context, ex *exchange, a attempt, rec *requestLog) bool {
	t := ex.t
	ms := t.Model
	ms.Metrics.Retry(a.verdict.String())
	if a.verdict != relay.RetryRateLimited {
		backoff := ex.nextBackoff()
		if rt.debugging(ctx) {
			rt.debug(ctx, "sending again", slog.String("model", rec.model), slog.String("reason", a.verdict.String()),
				slog.Duration("backoff", backoff), slog.Int("try", ex.tries))
		}
		t := time.NewTimer(backoff)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-ctx.Done():
			rec.outcome = "cancelled_retrying"
			return false
		}
	}
	// The upstream refused the request before running it: its admission
	// goes back (the refusal's headers compared with the buckets as they
	// were before it paid), the whole queue is held as long as the
	// upstream asked, and it waits again at the head of the queue until
	// its ticket's deadline.
	now := time.Now()
	if t.Refused(now, upstreamOf(a.refusal), now.Add(a.retryAfter)) {
		ms.Metrics.Lowered()
	}
	rt.upstreamRate(ms, a.refusal)
	if rt.debugging(ctx) {
		rt.debug(ctx, "upstream 429: queue held, request back at its head", slog.String("model", rec.model),
			slog.Duration("hold", a.retryAfter), slog.Int("try", ex.tries))
	}
	// Out of tries: no further send. The queue is held (at least
	// minUpstreamRetry), so a requeue that may not wait is refused with the
	// gateway's own 429, whose retry-after includes the hold: the
	// upstream's 429 never reaches the client.
	if err := t.Requeue(ctx, ex.tries <= ex.maxRetries); err != nil {
		rec.outcome = rt.writeAdmitError(ex, ctx, err)
		if rec.outcome == metrics.OutcomeRejectWait {
			rec.outcome = metrics.OutcomeRejectUpstream
		}
		return false
	}
	rec.wait = t.Wait
	return true
}

// settle reconciles the reservation with what happened: a request the
// upstream never received gives all of it back; one whose answer reported
// usage settles to it when the route settles on actual usage; anything else
// (an error answer, a stream cut short) keeps its reservation, as OpenAI
// counts failed requests against the limit too.
func (rt *Route) settle(ex *exchange, c *call, a attempt, rec *requestLog) {
	t := ex.t
	now := time.Now()
	ex.unsettled = false
	if a.neverSent {
		t.Unsend(now)
		return
	}
	var u provider.Usage
	ok := false
	if a.tap != nil {
		u, ok = a.tap.Usage()
	}
	answered := ex.status >= 200 && ex.status < 300 && a.tap != nil
	if !ok || u.Partial {
		// No usage reported (a stream the client cut, a server that
		// reports none), or only its input (an Anthropic stream that
		// ended before its message_delta): an answer counts against the
		// client's budget as its prompt (as counted, or as reported) plus
		// the output relayed so far, never more than its reservation; an
		// error not at all. The buckets keep the reservation.
		if answered {
			out := relayedOutput(a.tap, ex.Header().Get("Content-Type"), c.est.cost-c.est.prompt)
			in := c.est.prompt - c.est.cached
			bill := price.Usage{Prompt: int64(c.est.prompt), Output: int64(out)}
			if ok {
				in = rt.inputCounted(u, t.Model)
				rt.learn(t.Model, c, u)
				bill = price.Usage{Prompt: int64(u.Prompt), CacheRead: int64(u.CacheRead), CacheWrite: int64(u.CacheWrite), Output: int64(out)}
			}
			rec.used, rec.promptUsed, rec.cached, rec.output = in+out, int(bill.Prompt), int(bill.CacheRead), out
			cost := rt.bill(rec, bill)
			t.Settle(now, scheduler.Request(in, out), cost, false)
			ex.who.Used(rec.used)
		}
		return
	}
	rec.used, rec.promptUsed, rec.cached, rec.output = u.Total, u.Prompt, u.CacheRead, u.Completion
	rec.absurd = u.Prompt >= provider.MaxUsage || u.Completion >= provider.MaxUsage
	t.Model.Metrics.Used(c.est.prompt, u.Prompt, u.Completion)
	rt.learn(t.Model, c, u)
	in := rt.inputCounted(u, t.Model)
	cost := rt.bill(rec, price.Usage{Prompt: int64(u.Prompt), CacheRead: int64(u.CacheRead), CacheWrite: int64(u.CacheWrite),
		Output: int64(u.Completion)})
	t.Settle(now, scheduler.Vector{scheduler.Requests: 1, scheduler.Tokens: max(u.Total-u.Prompt+in, in+u.Completion),
		scheduler.InputTokens: in, scheduler.OutputTokens: u.Completion}, cost, true)
	ex.who.Used(u.Total)
}

// bill prices what a request used at its model's prices, records it in
// its log line and counts it (an unpriced model's requests cost 0 and
// are counted as such).
func (rt *Route) bill(rec *requestLog, u price.Usage) price.Micro {
	rate, ok := rt.opts.Prices.For(rec.model)
	if !ok {
		rec.series.Unpriced()
		return 0
	}
	cost := rate.Cost(u)
	rec.money = cost
	rec.series.Spent(rec.client, cost.USD())
	return cost
}

// inputCounted is the part of a reported prompt the input bucket counts:
// all of it, but for a provider whose cache reads are free (the model has
// a cache predictor), less what the cache read.
func (rt *Route) inputCounted(u provider.Usage, ms *models.Model) int {
	if rt.api == provider.NameAnthropic && ms.Cache != nil {
		return max(0, u.Prompt-u.CacheRead)
	}
	return u.Prompt
}

// learn takes what an answer reported of its prompt: a calibrated model's
// factor moves toward it, and the prompt cache's share of it is
// remembered under the prompt's prefix.
func (rt *Route) learn(ms *models.Model, c *call, u provider.Usage) {
	if c.est.prefix != 0 && ms.Cache != nil {
		ms.Cache.Store(c.est.prefix, u.CacheRead+u.CacheWrite, c.est.ttl, time.Now())
	}
	if ms.Factor == nil || u.Prompt <= 0 {
		return
	}
	if _, ok := ms.Factor.Learn(c.est.raw, u.Prompt); ok {
		ms.Metrics.Calibrated(ms.Factor.Value(), float64(c.est.prompt)/float64(u.Prompt))
	}
}

// relayedOutput estimates the output tokens of an answer that reported no
// usage from what reached the client, at most reserved: a chunk of a
// stream (an SSE event, an NDJSON line) carries about one token, a JSON
// body about one per 4 bytes.
func relayedOutput(tap usageSource, contentType string, reserved int) int {
	chunks, n := tap.Relayed()
	out := chunks
	if !strings.HasPrefix(contentType, "text/event-stream") && !strings.Contains(contentType, "ndjson") {
		out = int(min(n/4, int64(reserved)))
	}
	return max(0, min(out, reserved))
}
