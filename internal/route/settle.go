package route

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/relay"
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
	return ex.ms != nil && ex.status == 0 && ex.tries <= ex.maxRetries &&
		!now.Add(ex.backoff<<min(ex.tries-1, 10)).After(ex.deadline)
}

// observe lowers the model's buckets to what the upstream reports is left
// and records the upstream's view.
func (rt *Route) observe(ms *models.Model, adm *scheduler.Admission, ri provider.RateInfo, now time.Time) {
	if !ri.Any() {
		return
	}
	// With shared limits, the shared buckets are the key's: another
	// replica's spend is not someone else's, and the headers are not
	// applied to this replica's view (see README, Running several
	// replicas), unless Redis is down and this view is all there is.
	alone := ms.Shared == nil || rt.opts.Shared.Degraded()
	if alone && adm.Observe(now, scheduler.Upstream{
		RemainingRequests: ri.RemainingRequests, HasRemainingRequests: ri.HasRemainingRequests,
		RemainingTokens: ri.RemainingTokens, HasRemainingTokens: ri.HasRemainingTokens,
	}) {
		ms.Metrics.Lowered()
	}
	orNone := func(v int, ok bool) int {
		if ok {
			return v
		}
		return -1
	}
	ms.Metrics.UpstreamRate(0, orNone(ri.LimitRequests, ri.HasLimitRequests), orNone(ri.RemainingRequests, ri.HasRemainingRequests),
		ri.ResetRequests, ri.HasResetRequests)
	ms.Metrics.UpstreamRate(1, orNone(ri.LimitTokens, ri.HasLimitTokens), orNone(ri.RemainingTokens, ri.HasRemainingTokens),
		ri.ResetTokens, ri.HasResetTokens)
}

// sendAgain prepares the next send after a retryable outcome. It returns
// false when the request is over: the client left, or (for an upstream 429
// that outlasts the request's budget) it was answered with an honest 429.
func (rt *Route) sendAgain(ctx context.Context, ex *exchange, a attempt, cost scheduler.Cost, rec *requestLog) bool {
	ms := ex.ms
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
	// The upstream refused the request before running it: give its
	// admission back, hold the whole queue as long as the upstream asked,
	// and wait again at the head of the queue within the original budget.
	now := time.Now()
	ex.unsend(now)
	ms.Metrics.Unsent(cost.Tokens)
	rt.observe(ms, ex.adm, a.refusal, now) // compared as unpaid: the upstream refused it
	ms.Queue.Hold(now, now.Add(a.retryAfter))
	if rt.debugging(ctx) {
		rt.debug(ctx, "upstream 429: queue held, request back at its head", slog.String("model", rec.model),
			slog.Duration("hold", a.retryAfter), slog.Int("try", ex.tries))
	}
	deadline := ex.deadline
	if ex.tries > ex.maxRetries {
		// Out of tries: no further send. The queue is held (at least
		// minUpstreamRetry), so a requeue that may not wait is refused
		// with the gateway's own 429, whose retry-after includes the hold:
		// the upstream's 429 never reaches the client.
		deadline = now
	}
	adm, err := ms.Queue.Requeue(ctx, cost, deadline, ex.adm) // given back whole: reused
	if err != nil {
		ex.hasRate = false // writeReject sets the headers of the rejection
		rec.outcome = rt.writeAcquireError(ex, ctx, err)
		if rec.outcome == metrics.OutcomeRejectWait {
			rec.outcome = metrics.OutcomeRejectUpstream
		}
		return false
	}
	ex.rate, ex.adm = adm.State, adm
	ex.hasRate = true
	rec.wait += adm.Wait
	return rt.takeShared(ctx, ex, ms, cost, rec)
}

// settle reconciles the reservation with what happened: a request the
// upstream never received gives all of it back; one whose answer reported
// usage settles to it when the route settles on actual usage; anything else
// (an error answer, a stream cut short) keeps its reservation, as OpenAI
// counts failed requests against the limit too.
func (rt *Route) settle(ex *exchange, c *call, a attempt, rec *requestLog) {
	ms, cost := ex.ms, c.est.cost
	now := time.Now()
	ex.unsettled = false
	if a.neverSent {
		ex.unsend(now)
		ms.Metrics.Unsent(cost)
		return
	}
	var u provider.Usage
	ok := false
	if a.tap != nil {
		u, ok = a.tap.Usage()
	}
	if !ok {
		// No usage reported (a stream the client cut, a server that
		// reports none): an answer counts against the client's budget
		// as its counted prompt plus the output relayed so far, never
		// more than its reservation; an error not at all.
		if ex.status >= 200 && ex.status < 300 && a.tap != nil {
			used := c.est.prompt + relayedOutput(a.tap, ex.Header().Get("Content-Type"), cost-c.est.prompt)
			rec.used = used
			ex.spend.Settle(now, used)
			ex.who.Used(used)
		}
		return
	}
	rec.used = u.Total
	ms.Metrics.Used(c.est.prompt, u.Prompt, u.Completion)
	ex.spend.Settle(now, u.Total)
	ex.who.Used(u.Total)
	if rt.cfg.Settle == config.SettleActual {
		ex.adm.Settle(now, u.Total)
		ex.hold.settle(u.Total)
		ms.Metrics.Settled(cost - u.Total)
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
