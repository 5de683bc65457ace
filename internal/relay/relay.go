// Package relay is one HTTP round trip to an upstream and the handing on
// of its answer: the outgoing request (path under the route's prefix
// joined to the target's, hop-by-hop and forwarding headers dropped), the
// transport with every timeout set on purpose, the judgement of an
// outcome (deliver, or send again and why: a pure function), and the
// answer copied to the client as it arrives.
//
// It exists apart from the gateway's request path so that the path owns
// its round trip (as Caddy's reverse proxy does) without the mechanics of
// proxying HTTP in the same room; it knows nothing of queues or tokens.
package relay

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// TransportConfig is how a route's transport connects.
type TransportConfig struct {
	DialTimeout           time.Duration
	ResponseHeaderTimeout time.Duration
	MaxIdleConnsPerHost   int
}

// NewTransport returns an upstream transport with every timeout set on
// purpose: connecting is bounded by DialTimeout, the wait for response
// headers by ResponseHeaderTimeout (long: a non-streamed completion sends
// its headers only when done), and the body of a stream not at all.
func NewTransport(c TransportConfig) *http.Transport {
	rc := c
	dialer := &net.Dialer{Timeout: c.DialTimeout, KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           dialer.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          4 * rc.MaxIdleConnsPerHost,
		MaxIdleConnsPerHost:   rc.MaxIdleConnsPerHost,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		ResponseHeaderTimeout: rc.ResponseHeaderTimeout,
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

// Request builds the request that carries r to target: the path after
// prefix joined to target's path, the query kept, hop-by-hop and
// forwarding headers dropped, no body (the caller attaches one and sets
// the credentials).
func Request(r *http.Request, prefix string, target *url.URL) *http.Request {
	out := r.Clone(r.Context())
	out.RequestURI = ""
	out.Close = false
	out.Body, out.GetBody, out.ContentLength = nil, nil, 0
	out.URL.Path = stripRoute(r.URL.Path, prefix)
	if r.URL.RawPath != "" {
		out.URL.RawPath = stripRoute(r.URL.RawPath, prefix)
	}
	trailers := strings.Contains(strings.ToLower(strings.Join(r.Header["Te"], ",")), "trailers")
	removeHopByHop(out.Header)
	if trailers {
		out.Header["Te"] = []string{"trailers"}
	}
	for _, k := range [...]string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
		"X-Llproxy-Class", "X-Llproxy-Max-Wait"} { // the gateway's own headers stay with it
		delete(out.Header, k)
	}
	if _, ok := out.Header["User-Agent"]; !ok {
		out.Header["User-Agent"] = []string{""} // not Go's own
	}
	// A pooled connection the upstream closed as idle while the request
	// was on its way ("server closed idle connection") never ran it: the
	// transport sends it again on a fresh connection, as it does for
	// idempotent requests, when the request is marked so. A zero-length
	// key marks it without sending the header; a client's own key stays.
	_, own := out.Header["Idempotency-Key"]
	if _, ownX := out.Header["X-Idempotency-Key"]; !own && !ownX {
		out.Header["X-Idempotency-Key"] = []string{}
	}
	(&httputil.ProxyRequest{In: r, Out: out}).SetURL(target)
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

// Verdict is what a send loop does with one send's outcome.
type Verdict uint8

// The verdicts Judge gives.
const (
	Deliver          Verdict = iota // hand the answer to the client
	RetryRateLimited                // an upstream 429 that clears by waiting
	RetryServerError                // a 5xx, before any byte reached the client
	RetryConnect                    // never sent, or the connection dropped before an answer
	Failed                          // no answer: 502 or 504 (or nobody left to tell)
)

// String is the verdict's name in metrics: the reason of a retry.
func (v Verdict) String() string {
	return [...]string{"deliver", "rate_limited", "server_error", "connect_error", "failed"}[v]
}

// Policy is what the loop allows for the send being judged.
type Policy struct {
	CanRetry     bool // retries left, nothing written, the backoff ends before the deadline
	CanWait429   bool // upstream 429s left to wait out, nothing written
	ClientGone   bool
	Retryable429 bool // the 429's headers and body say waiting clears it
}

// Judge is the retry policy: a pure function of a send's status (0 for
// none), its transport error and what the loop allows.
func Judge(status int, err error, p Policy) Verdict {
	switch {
	case err != nil:
		if !p.ClientGone && p.CanRetry && (IsConnectError(err) || IsConnectionDrop(err)) {
			return RetryConnect
		}
		return Failed
	case status == http.StatusTooManyRequests && p.CanWait429 && p.Retryable429:
		return RetryRateLimited
	case status >= 500 && p.CanRetry:
		return RetryServerError
	}
	return Deliver
}

// IsConnectError reports an error from before the request left: dialing
// or resolving the upstream. The upstream never saw the request.
func IsConnectError(err error) bool {
	var oe *net.OpError
	var dns *net.DNSError
	return (errors.As(err, &oe) && oe.Op == "dial") || errors.As(err, &dns)
}

// IsConnectionDrop reports a connection that broke before any response
// (reset, closed, a broken pipe on a pooled connection the upstream had
// dropped), which is safe to retry; a timeout is not (the upstream may
// still be working on it). It reads the error's chain, never its text.
func IsConnectionDrop(err error) bool {
	if IsTimeout(err) {
		return false
	}
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, syscall.ECONNREFUSED)
}

// IsTimeout reports a timeout, the client's deadline or the network's.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// Describe keeps the useful part of a transport error (the
// operation and cause), which never holds credentials: keys travel in
// headers, not URLs.
func Describe(err error) string {
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

// Respond hands the upstream's answer to the client: its headers but the
// hop-by-hop ones, its status, then its body as it arrives, each read
// flushed at once (a stream is never buffered), then its trailers. If the
// copy breaks (the upstream or the client went away), the response is cut
// off with http.ErrAbortHandler, so the client sees it broke, as
// httputil.ReverseProxy does; a request that did not come from a server
// (the Ollama façade's, a test's) just ends.
func Respond(w http.ResponseWriter, r *http.Request, res *http.Response) {
	defer res.Body.Close()
	removeHopByHop(res.Header)
	h := w.Header()
	for k, v := range res.Header {
		h[k] = v
	}
	if len(res.Trailer) > 0 {
		names := make([]string, 0, len(res.Trailer))
		for k := range res.Trailer {
			names = append(names, k)
		}
		h["Trailer"] = []string{strings.Join(names, ", ")}
	}
	w.WriteHeader(res.StatusCode)
	// A stream (an event stream, or a body of unknown length such as
	// Ollama's NDJSON) is flushed after every read; any other body goes out
	// as the server buffers it, headers and body together.
	stream := res.ContentLength < 0 || strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream")
	if err := copyBody(w, res.Body, stream); err != nil {
		if r.Context().Value(http.ServerContextKey) != nil {
			panic(http.ErrAbortHandler)
		}
		return
	}
	for k, v := range res.Trailer {
		h[k] = v
	}
}

// copyBody copies src to w, flushing after every read if flush.
func copyBody(w http.ResponseWriter, src io.Reader, flush bool) error {
	bp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bp)
	buf := *bp
	var f http.Flusher
	if flush {
		f, _ = w.(http.Flusher)
	}
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
			if f != nil {
				f.Flush()
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// copyBuffers are the 8 KiB buffers answers are copied through, so that
// streaming allocates none. An open stream holds one: its events are far
// smaller, and a large body takes a few more reads.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 8<<10); return &b }}

// maxRedacted bounds how much of an error body is searched for secrets;
// error bodies are small, and the rest of a larger one passes as it is.
const maxRedacted = 1 << 20

// Redacted is what stands in an answer for a secret.
const Redacted = "[redacted]"

// RedactErrors replaces every secret in the body of an error answer
// (status 400 and above) with Redacted before it is handed on: an upstream
// that quotes the key it was sent ("Incorrect API key provided: sk-...")
// must not hand it to the client. Successful answers pass untouched.
func RedactErrors(res *http.Response, secrets []string) {
	if res.StatusCode < 400 || len(secrets) == 0 {
		return
	}
	head, err := io.ReadAll(io.LimitReader(res.Body, maxRedacted))
	changed := false
	for _, s := range secrets {
		if s != "" && bytes.Contains(head, []byte(s)) {
			head = bytes.ReplaceAll(head, []byte(s), []byte(Redacted))
			changed = true
		}
	}
	var rest io.Reader = res.Body
	if err != nil {
		rest = errReader{err}
	}
	res.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(head), rest), res.Body}
	if changed {
		res.Header.Del("Content-Length")
		res.ContentLength = -1
		if len(head) < maxRedacted {
			res.ContentLength = int64(len(head))
			res.Header.Set("Content-Length", strconv.Itoa(len(head)))
		}
	}
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }
