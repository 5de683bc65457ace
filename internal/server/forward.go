package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/provider"
)

// The forward stage. The loop that sends owns its round trip, as Caddy's
// reverse proxy does: it builds the outgoing request, calls the transport,
// classifies what came back with a pure function (judge), and either hands
// the answer on (respond.go) or tells the loop to send again.

// outbound is how a route sends: its transport and its credentials (where
// to is each send's lease).
type outbound struct {
	transport http.RoundTripper
	auth      *provider.OpenAI
	noKey     *provider.OpenAI // for a discovered backend that may not have the key
	prefix    string           // "/<route>", stripped from the path
}

// newTransport returns the upstream transport of a route, with every
// timeout set on purpose: connecting is bounded by DialTimeout, the wait for
// response headers by ResponseHeaderTimeout (long: a non-streamed completion
// sends its headers only when done), and the body of a stream not at all.
func newTransport(rc *config.Route) *http.Transport {
	dialer := &net.Dialer{Timeout: time.Duration(rc.DialTimeout), KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           dialer.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          4 * rc.MaxIdleConnsPerHost,
		MaxIdleConnsPerHost:   rc.MaxIdleConnsPerHost,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		ResponseHeaderTimeout: time.Duration(rc.ResponseHeaderTimeout),
	}
}

// hopByHop are the headers of one connection, never forwarded (RFC 9110
// 7.6.1), with those the client's Connection header names.
var hopByHop = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade"}

func removeHopByHop(h http.Header) {
	for _, v := range h["Connection"] {
		for f := range strings.SplitSeq(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				h.Del(f)
			}
		}
	}
	for _, k := range hopByHop {
		delete(h, k)
	}
}

// outgoing builds the request for target: the path after the route's
// prefix joined to target's path, the query kept, hop-by-hop and
// forwarding headers dropped, the credentials applied, body attached (the
// caller closes out.Body). A nil body sends none.
func (u *outbound) outgoing(r *http.Request, target *url.URL, auth *provider.OpenAI, body *bodyBuf) *http.Request {
	out := r.Clone(r.Context())
	out.RequestURI = ""
	out.Close = false
	out.URL.Path = stripRoute(r.URL.Path, u.prefix)
	if r.URL.RawPath != "" {
		out.URL.RawPath = stripRoute(r.URL.RawPath, u.prefix)
	}
	trailers := strings.Contains(strings.ToLower(strings.Join(r.Header["Te"], ",")), "trailers")
	removeHopByHop(out.Header)
	if trailers {
		out.Header["Te"] = []string{"trailers"}
	}
	for _, k := range [...]string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		delete(out.Header, k)
	}
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header["User-Agent"] = []string{""} // not Go's own
	}
	(&httputil.ProxyRequest{In: r, Out: out}).SetURL(target)
	auth.Authorize(out.Header)
	if body != nil {
		body.attach(out)
	} else {
		out.Body, out.GetBody, out.ContentLength = nil, nil, 0
	}
	return out
}

// stripRoute removes the route's prefix from a path that starts with it;
// a request served by the default route at the root keeps its path.
func stripRoute(path, prefix string) string {
	if rest, ok := strings.CutPrefix(path, prefix); ok && (rest == "" || rest[0] == '/') {
		return rest
	}
	return path
}

// verdict is what the send loop does with one send's outcome.
type verdict uint8

const (
	deliver          verdict = iota // hand the answer to the client
	retryRateLimited                // an upstream 429 that clears by waiting
	retryServerError                // a 5xx, before any byte reached the client
	retryConnect                    // never sent, or the connection dropped before an answer
	failed                          // no answer: 502 or 504 (or nobody left to tell)
)

func (v verdict) String() string {
	return [...]string{"deliver", "rate_limited", "server_error", "connect_error", "failed"}[v]
}

// policy is what the loop allows for the send being judged.
type policy struct {
	canRetry     bool // retries left, nothing written, the backoff ends before the deadline
	canWait429   bool // upstream 429s left to wait out, nothing written
	clientGone   bool
	retryable429 bool // the 429's headers and body say waiting clears it
}

// judge is the retry policy: a pure function of a send's status (0 for
// none), its transport error and what the loop allows.
func judge(status int, err error, p policy) verdict {
	switch {
	case err != nil:
		if !p.clientGone && p.canRetry && (isConnectError(err) || isConnectionDrop(err)) {
			return retryConnect
		}
		return failed
	case status == http.StatusTooManyRequests && p.canWait429 && p.retryable429:
		return retryRateLimited
	case status >= 500 && p.canRetry:
		return retryServerError
	}
	return deliver
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

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// describeUpstreamError keeps the useful part of a transport error (the
// operation and cause), which never holds credentials: keys travel in
// headers, not URLs.
func describeUpstreamError(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		return oe.Op + ": " + oe.Err.Error()
	}
	return err.Error()
}

// writeUpstreamError answers a send that got no answer: 504 for a
// timeout, else 502.
func writeUpstreamError(w http.ResponseWriter, err error) {
	status, msg := http.StatusBadGateway, "llproxy could not reach the upstream: "+describeUpstreamError(err)
	if isTimeout(err) {
		status, msg = http.StatusGatewayTimeout, "The upstream did not answer in time: "+describeUpstreamError(err)
	}
	writeError(w, status, "upstream_error", "upstream_unavailable", msg)
}

// relay forwards a request that is not scheduled (it names no model) where
// the route's lessor says and hands the answer on, or answers 502/503/504.
func (rt *route) relay(ex *exchange, r *http.Request, body *bodyBuf) {
	l, ok := rt.lessor.Any()
	if !ok {
		writeError(ex, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
			"No healthy backend on llproxy route "+rt.name+".")
		return
	}
	defer l.Release()
	auth := rt.up.auth
	if !l.SendKey {
		auth = rt.up.noKey
	}
	out := rt.up.outgoing(r, l.Target, auth, body)
	if out.Body != nil {
		defer out.Body.Close()
	}
	res, err := rt.up.transport.RoundTrip(out)
	if err != nil {
		if r.Context().Err() == nil {
			writeUpstreamError(ex, err)
		}
		return
	}
	respond(ex, r, res)
}

// attempt is what one send came to, for the loop.
type attempt struct {
	verdict    verdict
	noBackend  bool              // no backend could take it; the client was answered
	neverSent  bool              // the upstream never received it
	retryAfter time.Duration     // retryRateLimited: how long the upstream asked to wait
	refusal    provider.RateInfo // retryRateLimited: the refusal's rate headers
	tap        usageSource       // deliver: reads the answer's usage on its way
}

// maxRateLimitRetries bounds the upstream 429s one request waits out, so an
// upstream that answers 429 with no wait cannot keep it looping.
const maxRateLimitRetries = 8

// minUpstreamRetry is the least an upstream 429 is waited out, so that one
// that says "retry at once" is not asked again in a tight loop.
const minUpstreamRetry = 50 * time.Millisecond

// try makes one send of a scheduled request: it leases where the send goes
// (for a fleet: a backend serving the model, started if llproxy runs it),
// sends, judges the outcome, and hands a deliverable answer on. The lease
// is released by a defer where it is taken, so an answer cut mid-way,
// which ends with a panic, gives everything back as well.
func (rt *route) try(ex *exchange, r *http.Request, model string, c *call, body *bodyBuf) (a attempt) {
	ctx := r.Context()
	l, err := rt.lessor.Lease(ctx, &ex.lease)
	if err != nil {
		if ctx.Err() == nil {
			rt.writeLeaseError(ex, model, err)
		}
		return attempt{verdict: failed, noBackend: true}
	}
	defer l.Release()
	auth := rt.up.auth
	if !l.SendKey {
		auth = rt.up.noKey
	}
	body = rt.bodyFor(ex, body, model, l.Model)
	if l.Backend != "" && rt.debugging(ctx) {
		rt.debug(ctx, "backend picked", slog.String("model", model), slog.String("backend", l.Backend),
			slog.String("upstream_id", l.Model), slog.Int("try", ex.tries))
	}
	target := l.Target

	out := rt.up.outgoing(r, target, auth, body)
	if out.Body != nil {
		defer out.Body.Close()
	}
	sent := time.Now()
	res, err := rt.up.transport.RoundTrip(out)
	now := time.Now()
	ms := ex.ms
	p := policy{canRetry: ex.canRetry(now), canWait429: ex.status == 0 && ex.rateRetries < maxRateLimitRetries,
		clientGone: ctx.Err() != nil}
	status := 0
	var ri provider.RateInfo
	var refused []byte // a 429's body, read to judge it
	if err == nil {
		status = res.StatusCode
		ri = provider.ParseRateHeaders(res.Header)
		if status == http.StatusTooManyRequests {
			refused, _ = io.ReadAll(io.LimitReader(res.Body, 64<<10))
			res.Body.Close()
			res.Body = io.NopCloser(bytes.NewReader(refused))
			p.retryable429 = provider.Retryable429(res.Header, refused)
		}
	}
	a.verdict = judge(status, err, p)
	switch a.verdict {
	case retryConnect, failed: // judged so only on a transport error
		a.neverSent = isConnectError(err)
		if a.neverSent || isConnectionDrop(err) {
			l.Failed(err) // a passive health check; and the next send goes elsewhere
		}
		if a.verdict == failed && !p.clientGone {
			ms.m.Upstream(0, 0)
			writeUpstreamError(ex, err)
		}
		return a
	case retryRateLimited:
		wait, ok := provider.RetryAfter(res.Header, now)
		if !ok {
			wait = time.Second
		}
		a.retryAfter, a.refusal = max(wait, minUpstreamRetry), ri
		res.Body.Close()
		return a
	case retryServerError:
		rt.observe(ms, ex.adm, ri, now)
		io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
		res.Body.Close()
		return a
	}
	a.verdict = deliver
	rt.observe(ms, ex.adm, ri, now)
	if status < 300 {
		if strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream") {
			ex.streamTap.Reset(res.Body, ex.strip)
			if ex.strip {
				res.Header.Del("Content-Length")
				res.ContentLength = -1
			}
			res.Body, a.tap = &ex.streamTap, &ex.streamTap
		} else {
			ex.bodyTap.Reset(res.Body)
			res.Body, a.tap = &ex.bodyTap, &ex.bodyTap
		}
	}
	ms.m.Upstream(status, now.Sub(sent))
	respond(ex, r, res)
	return a
}

// bodyFor returns the body to send where a lease goes: the request's own,
// or a copy naming the backend's own model id ("" or model: as it is).
func (rt *route) bodyFor(ex *exchange, body *bodyBuf, model, id string) *bodyBuf {
	if id == "" || id == model {
		return body
	}
	if ex.renamed != nil {
		ex.renamed.release()
	}
	ex.renamed = newBodyBuf()
	p := rt.srv.parsers.Get()
	defer rt.srv.parsers.Put(p)
	v, err := p.ParseBytes(body.buf)
	if err != nil { // it parsed before; cannot happen
		ex.renamed.buf = append(ex.renamed.buf, body.buf...)
		return ex.renamed
	}
	var a fastjson.Arena
	v.Set("model", a.NewString(id))
	ex.renamed.buf = v.MarshalTo(ex.renamed.buf)
	return ex.renamed
}

// writeLeaseError answers a request no send could be leased for.
func (rt *route) writeLeaseError(w http.ResponseWriter, model string, err error) {
	if errors.Is(err, backends.ErrUnknownModel) {
		models := ""
		if rt.fleet != nil {
			models = " Models: " + strings.Join(rt.fleet.Models(), ", ") + "."
		}
		writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found",
			"The model `"+model+"` does not exist on llproxy route "+rt.name+"."+models)
		return
	}
	w.Header()["Retry-After"] = []string{"5"}
	switch {
	case errors.Is(err, fleet.ErrNotStarted):
		writeError(w, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
			"llproxy could not start the backend for `"+model+"`: "+err.Error())
	case errors.Is(err, backends.ErrBusy):
		writeError(w, http.StatusServiceUnavailable, "server_error", "backend_busy",
			"Every backend of llproxy route "+rt.name+" serving `"+model+"` stayed at its maxConcurrent for the request's maxQueueWait.")
	default:
		writeError(w, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
			"No healthy backend of llproxy route "+rt.name+" serves the model `"+model+"` right now.")
	}
}
