package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
)

// This file is what happens around each send to the upstream: reading the
// upstream's rate-limit headers into the buckets, deciding to send again
// (upstream 429, 5xx, connection failure), tapping the response for its
// usage, and settling the reservation once the response is done.

// retryReason says why the hooks suppressed an upstream answer.
type retryReason uint8

const (
	retryNone retryReason = iota
	retryRateLimited
	retryServerError
	retryConnect
)

func (r retryReason) String() string {
	return [...]string{"", "rate_limited", "server_error", "connect_error"}[r]
}

// minUpstreamRetry is the least an upstream 429 is waited out, so that one
// that says "retry at once" is not asked again in a tight loop.
const minUpstreamRetry = 50 * time.Millisecond

// maxRateLimitRetries bounds the upstream 429s one request waits out, so an
// upstream that answers 429 with no wait cannot keep it looping.
const maxRateLimitRetries = 8

// errRetry tells ReverseProxy's ErrorHandler that ModifyResponse suppressed
// the answer to send the request again.
var errRetry = errors.New("llproxy: sending again")

type exchangeKey struct{}

// exchangeOf finds the exchange of a request the gateway scheduled.
func exchangeOf(ctx context.Context) *exchange {
	ex, _ := ctx.Value(exchangeKey{}).(*exchange)
	return ex
}

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

// modifyResponse runs on every upstream answer before anything reaches the
// client.
func (rt *route) modifyResponse(res *http.Response) error {
	ex := exchangeOf(res.Request.Context())
	if ex == nil || ex.ms == nil {
		return nil
	}
	now := time.Now()
	ri := provider.ParseRateHeaders(res.Header)
	if res.StatusCode == http.StatusTooManyRequests {
		return rt.upstream429(ex, res, ri, now)
	}
	rt.observe(ex.ms, ex.adm, ri, now)
	switch {
	case res.StatusCode >= 500 && ex.canRetry(now):
		io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
		res.Body.Close()
		ex.retry = retryServerError
		return errRetry
	case res.StatusCode < 300:
		if strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
			ex.streamTap.Reset(res.Body, ex.strip)
			if ex.strip {
				res.Header.Del("Content-Length")
				res.ContentLength = -1
			}
			res.Body, ex.tap = &ex.streamTap, &ex.streamTap
		} else {
			ex.bodyTap.Reset(res.Body)
			res.Body, ex.tap = &ex.bodyTap, &ex.bodyTap
		}
	}
	return nil
}

// upstream429 decides about an upstream 429: a rate limit that clears by
// waiting is suppressed, to be waited out at the head of the queue (its
// rate headers are applied in sendAgain, once the refused request's
// admission is given back, since what the upstream reports left does not
// include it); anything else (insufficient_quota) goes to the client at once.
func (rt *route) upstream429(ex *exchange, res *http.Response, ri provider.RateInfo, now time.Time) error {
	body, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	res.Body.Close()
	if ex.status == 0 && ex.rateRetries < maxRateLimitRetries && provider.Retryable429(res.Header, body) {
		wait, ok := provider.RetryAfter(res.Header, now)
		if !ok {
			wait = time.Second
		}
		wait = max(wait, minUpstreamRetry)
		ex.retry, ex.retryAfter, ex.refusal = retryRateLimited, wait, ri
		return errRetry
	}
	rt.observe(ex.ms, ex.adm, ri, now)
	res.Body = io.NopCloser(bytes.NewReader(body))
	return nil
}

// observe lowers the model's buckets to what the upstream reports is left
// and records the upstream's view.
func (rt *route) observe(ms *modelState, adm *scheduler.Admission, ri provider.RateInfo, now time.Time) {
	if !ri.Any() {
		return
	}
	if adm.Observe(now, scheduler.Upstream{
		RemainingRequests: ri.RemainingRequests, HasRemainingRequests: ri.HasRemainingRequests,
		RemainingTokens: ri.RemainingTokens, HasRemainingTokens: ri.HasRemainingTokens,
	}) {
		ms.m.Lowered()
	}
	orNone := func(v int, ok bool) int {
		if ok {
			return v
		}
		return -1
	}
	ms.m.UpstreamRate(0, orNone(ri.LimitRequests, ri.HasLimitRequests), orNone(ri.RemainingRequests, ri.HasRemainingRequests),
		ri.ResetRequests, ri.HasResetRequests)
	ms.m.UpstreamRate(1, orNone(ri.LimitTokens, ri.HasLimitTokens), orNone(ri.RemainingTokens, ri.HasRemainingTokens),
		ri.ResetTokens, ri.HasResetTokens)
}

// proxyError is ReverseProxy's ErrorHandler: the upstream gave no usable
// answer. A connection failure may be sent again; otherwise the client gets
// an OpenAI-shaped 502 or 504.
func (rt *route) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	ex, _ := w.(*exchange)
	if errors.Is(err, errRetry) {
		return // modifyResponse decided to send again
	}
	neverSent := isConnectError(err)
	if ex != nil && ex.backend != nil && (neverSent || isConnectionDrop(err)) {
		// A passive health check; and the next send goes elsewhere.
		rt.pool.Failed(ex.backend, err)
		ex.failed = append(ex.failed, ex.backend)
	}
	if ex != nil {
		ex.neverSent = neverSent
		if r.Context().Err() == nil && (neverSent || isConnectionDrop(err)) && ex.canRetry(time.Now()) {
			ex.retry = retryConnect
			return
		}
		ex.upstreamErr = err
	}
	if r.Context().Err() != nil {
		return // the client left; nobody to answer
	}
	status, msg := http.StatusBadGateway, "llproxy could not reach the upstream: "+describeUpstreamError(err)
	if isTimeout(err) {
		status, msg = http.StatusGatewayTimeout, "The upstream did not answer in time: "+describeUpstreamError(err)
	}
	writeError(w, status, "upstream_error", "upstream_unavailable", msg)
}

// isConnectError reports an error from before the request left: dialing
// or resolving the upstream. The upstream never saw the request.
func isConnectError(err error) bool {
	var oe *net.OpError
	var dns *net.DNSError
	return (errors.As(err, &oe) && oe.Op == "dial") || errors.As(err, &dns)
}

// isConnectionDrop reports a connection that broke before any response
// (reset, closed, a broken pipe on a pooled connection the upstream had
// dropped), which is safe to retry; a timeout is not (the upstream may
// still be working on it). It reads the error's chain, never its text.
func isConnectionDrop(err error) bool {
	if isTimeout(err) {
		return false
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, syscall.ECONNREFUSED)
}

// sendAgain prepares the next send after the hooks suppressed an answer. It
// returns false when the request is over: the client left, or (for an
// upstream 429 that outlasts the request's budget) it was answered with an
// honest 429.
func (rt *route) sendAgain(ctx context.Context, ex *exchange, cost int, rec *requestLog) bool {
	ms := ex.ms
	ms.m.Retry(ex.retry.String())
	if ex.retry != retryRateLimited {
		backoff := ex.nextBackoff()
		if rt.debugging(ctx) {
			rt.debug(ctx, "sending again", slog.String("model", rec.model), slog.String("reason", ex.retry.String()),
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
	ex.adm.Unsend(now)
	ms.m.Unsent(cost)
	rt.observe(ms, ex.adm, ex.refusal, now) // compared as unpaid: the upstream refused it
	ms.q.Hold(now, now.Add(ex.retryAfter))
	if rt.debugging(ctx) {
		rt.debug(ctx, "upstream 429: queue held, request back at its head", slog.String("model", rec.model),
			slog.Duration("hold", ex.retryAfter), slog.Int("try", ex.tries))
	}
	ex.rateRetries++
	adm, err := ms.q.Requeue(ctx, scheduler.Cost{Tokens: cost}, ex.deadline)
	if err != nil {
		ex.hasRate = false // writeReject sets the headers of the rejection
		rec.outcome = rt.writeAcquireError(ex, ctx, err)
		if rec.outcome == metrics.OutcomeRejectWait {
			rec.outcome = metrics.OutcomeRejectUpstream
			ms.m.Outcome(rec.outcome)
		}
		return false
	}
	ex.rate, ex.adm = adm.State, adm
	ex.hasRate = true
	rec.wait += adm.Wait
	return true
}

// settle reconciles the reservation with what happened: a request the
// upstream never received gives all of it back; one whose response reported
// usage settles to it when the route settles on actual usage; anything else
// (an error answer, a stream cut short) keeps its reservation, as OpenAI
// counts failed requests against the limit too.
func (rt *route) settle(ex *exchange, c *call, rec *requestLog) {
	ms, cost := ex.ms, c.est.cost
	now := time.Now()
	if ex.neverSent {
		ex.adm.Unsend(now)
		ms.m.Unsent(cost)
		return
	}
	if ex.tap == nil {
		return
	}
	u, ok := ex.tap.Usage()
	if !ok {
		return
	}
	rec.used = u.Total
	ms.m.Used(c.est.prompt, u.Prompt, u.Completion)
	if rt.cfg.Settle == config.SettleActual {
		ex.adm.Settle(now, u.Total)
		ms.m.Settled(cost - u.Total)
	}
}
