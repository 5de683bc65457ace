package route

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/provider"
)

// The forward stage. The loop that sends owns its round trip, as Caddy's
// reverse proxy does: it builds the outgoing request, calls the transport,
// classifies what came back with a pure function (relay.Judge), and either
// hands the answer on (relay.Respond) or tells the loop to send again.

// outbound is how a route sends: its transport and its credentials (where
// to is each send's lease).
type outbound struct {
	transport http.RoundTripper
	auth      *provider.Credentials
	noKey     *provider.Credentials // for a discovered backend that may not have the key
	prefix    string                // "/<route>", stripped from the path
}

// outgoing is the request that carries r where the lease goes
// (relay.Request), with the credentials the lease allows applied and the
// body attached (the caller closes out.Body); a nil body sends none.
func (u *outbound) outgoing(r *http.Request, l *fleet.Lease, body *request.Body) *http.Request {
	out := relay.Request(r, u.prefix, l.Target)
	auth := u.auth
	if !l.SendKey {
		auth = u.noKey
	}
	auth.Authorize(out.Header)
	if body != nil {
		body.Attach(out)
	}
	return out
}

// relay forwards a request that is not scheduled (it names no model) where
// the route's lessor says and hands the answer on, or answers 502/503/504.
func (rt *Route) relay(ex *exchange, r *http.Request, body *request.Body) {
	l, ok := rt.lessor.Any()
	if !ok {
		rt.say.Error(ex, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
			"No healthy backend on llproxy route "+rt.name+".")
		return
	}
	defer l.Release()
	out := rt.up.outgoing(r, l, body)
	if out.Body != nil {
		defer out.Body.Close()
	}
	res, err := rt.up.transport.RoundTrip(out)
	if err != nil {
		if r.Context().Err() == nil {
			rt.writeUpstreamError(ex, err)
		}
		return
	}
	relay.RedactErrors(res, rt.opts.Secrets)
	relay.Respond(ex, r, res)
}

// attempt is what one send came to, for the loop.
type attempt struct {
	verdict    relay.Verdict
	noBackend  bool              // no backend could take it; the client was answered
	neverSent  bool              // the upstream never received it
	retryAfter time.Duration     // retryRateLimited: how long the upstream asked to wait
	refusal    provider.RateInfo // retryRateLimited: the refusal's rate headers
	tap        usageSource       // deliver: reads the answer's usage on its way
}

// minUpstreamRetry is the least an upstream 429 is waited out, so that one
// that says "retry at once" (or names a date in the past) is not asked
// again in a tight loop, even with retryBackoff 0.
const minUpstreamRetry = 50 * time.Millisecond

// try makes one send of a scheduled request: it leases where the send goes
// (for a fleet: a backend serving the model, started if llproxy runs it),
// sends, judges the outcome, and hands a deliverable answer on. The lease
// is released by a defer where it is taken, so an answer cut mid-way,
// which ends with a panic, gives everything back as well.
func (rt *Route) try(ex *exchange, r *http.Request, model string, c *call, body *request.Body) (a attempt) {
	ctx := r.Context()
	l, err := ex.t.Lease(ctx)
	if err != nil {
		if ctx.Err() == nil {
			rt.writeLeaseError(ex, model, err)
		}
		return attempt{verdict: relay.Failed, noBackend: true}
	}
	defer l.Release()
	ex.backend = l.Backend
	body = rt.bodyFor(ex, body, model, l.Model)
	if l.Backend != "" && rt.debugging(ctx) {
		rt.debug(ctx, "backend picked", slog.String("model", model), slog.String("backend", l.Backend),
			slog.String("upstream_id", l.Model), slog.Int("try", ex.tries))
	}
	out := rt.up.outgoing(r, l, body)
	if out.Body != nil {
		defer out.Body.Close()
	}
	sent := time.Now()
	res, err := rt.up.transport.RoundTrip(out)
	now := time.Now()
	ms := ex.t.Model
	p := relay.Policy{CanRetry: ex.canRetry(now), CanWait429: ex.status == 0,
		ClientGone: ctx.Err() != nil}
	status := 0
	var ri provider.RateInfo
	var refused []byte // a 429's body, read to judge it
	if err == nil {
		status = res.StatusCode
		ri = rt.rates(res.Header, now)
		if status == http.StatusTooManyRequests {
			refused, _ = io.ReadAll(io.LimitReader(res.Body, 64<<10))
			res.Body.Close()
			res.Body = io.NopCloser(bytes.NewReader(refused))
			p.Retryable429 = provider.Retryable429(res.Header, refused)
		}
	}
	a.verdict = relay.Judge(status, err, p)
	switch a.verdict {
	case relay.RetryConnect, relay.Failed: // judged so only on a transport error
		a.neverSent = relay.IsConnectError(err)
		if a.neverSent || relay.IsConnectionDrop(err) {
			l.Failed(err) // a passive health check; and the next send goes elsewhere
		}
		if a.verdict == relay.Failed && !p.ClientGone {
			ms.Metrics.Upstream(0, 0)
			rt.writeUpstreamError(ex, err)
		}
		return a
	case relay.RetryRateLimited:
		wait, ok := provider.RetryAfter(res.Header, now)
		if !ok {
			wait = time.Second
		}
		// Whatever the headers say, at least the backoff of this try:
		// the tries of one request back off as any retry does.
		a.retryAfter, a.refusal = max(wait, minUpstreamRetry, ex.nextBackoff()), ri
		res.Body.Close()
		return a
	case relay.RetryServerError:
		rt.observe(ex.t, ri, now)
		io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
		res.Body.Close()
		return a
	}
	a.verdict = relay.Deliver
	rt.observe(ex.t, ri, now)
	if status < 300 {
		switch {
		case strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") && rt.api == provider.NameAnthropic:
			// Anthropic always streams its usage: nothing to strip.
			ex.streamTap.ResetMessages(res.Body)
			res.Body, a.tap = &ex.streamTap, &ex.streamTap
		case strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream"):
			ex.streamTap.Reset(res.Body, ex.strip)
			if ex.strip {
				res.Header.Del("Content-Length")
				res.ContentLength = -1
			}
			res.Body, a.tap = &ex.streamTap, &ex.streamTap
		default:
			ex.bodyTap.Reset(res.Body)
			res.Body, a.tap = &ex.bodyTap, &ex.bodyTap
		}
	}
	ex.latency = now.Sub(sent)
	ms.Metrics.Upstream(status, ex.latency)
	relay.RedactErrors(res, rt.opts.Secrets)
	ex.delivering, ex.unsettled = a, true
	relay.Respond(ex, r, res)
	return a
}

// bodyFor returns the body to send where a lease goes: the request's own,
// or a copy naming the backend's own model id ("" or model: as it is).
func (rt *Route) bodyFor(ex *exchange, body *request.Body, model, id string) *request.Body {
	if id == "" || id == model {
		return body
	}
	if ex.renamed != nil {
		ex.renamed.Release()
	}
	ex.renamed = request.NewBodySize(len(body.Buf) + 64)
	p := parsers.Get()
	defer parsers.Put(p)
	v, err := p.ParseBytes(body.Buf)
	if err != nil { // it parsed before; cannot happen
		ex.renamed.Buf = append(ex.renamed.Buf, body.Buf...)
		return ex.renamed
	}
	var a fastjson.Arena
	v.Set("model", a.NewString(id))
	ex.renamed.Buf = v.MarshalTo(ex.renamed.Buf)
	return ex.renamed
}
