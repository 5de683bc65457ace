package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/provider"
)

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

// bufferPool lends ReverseProxy its 32 KiB copy buffers, so streaming a
// response allocates none.
type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if v := b.p.Get(); v != nil {
		return *(v.(*[]byte))
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(buf []byte) { b.p.Put(&buf) }

var copyBuffers = &bufferPool{}

// newReverseProxy forwards /<route>/<rest> to target/<rest>: path and query
// kept, the route's credentials applied, responses streamed as they arrive
// (FlushInterval -1). The route's hooks read the upstream's answer first
// (modifyResponse) and turn transport failures into retries or
// OpenAI-shaped 502s and 504s (proxyError).
func (rt *route) newReverseProxy(target *url.URL, auth *provider.OpenAI, transport http.RoundTripper, logger *slog.Logger) *httputil.ReverseProxy {
	prefix := "/" + rt.name
	// A discovered backend that may not have the key gets the client's
	// credentials handled as on a route without one.
	noKey := provider.NewOpenAIWith(provider.OpenAIConfig{DropClientAuth: len(rt.srv.cfg.ClientKeys) > 0})
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Path = stripRoute(pr.In.URL.Path, prefix)
			if pr.In.URL.RawPath != "" {
				pr.Out.URL.RawPath = stripRoute(pr.In.URL.RawPath, prefix)
			}
			to, a := target, auth
			if ex := exchangeOf(pr.In.Context()); ex != nil && ex.backend != nil {
				to = ex.backend.URL // a fleet: the backend picked for this send
				if !ex.backend.SendKey() {
					a = noKey
				}
			}
			pr.SetURL(to)
			a.Authorize(pr.Out.Header)
		},
		Transport:      transport,
		FlushInterval:  -1,
		BufferPool:     copyBuffers,
		ErrorLog:       log.New(slogWriter{logger}, "", 0),
		ModifyResponse: rt.modifyResponse,
		ErrorHandler:   rt.proxyError,
	}
}

// stripRoute removes the route's prefix from a path that starts with it;
// a request served by the default route at the root keeps its path.
func stripRoute(path, prefix string) string {
	if rest, ok := strings.CutPrefix(path, prefix); ok && (rest == "" || rest[0] == '/') {
		return rest
	}
	return path
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

// slogWriter sends ReverseProxy's own log lines to slog.
type slogWriter struct{ l *slog.Logger }

func (s slogWriter) Write(p []byte) (int, error) {
	s.l.Warn("proxy", "msg", strings.TrimSpace(string(p)))
	return len(p), nil
}

// handlerTransport is an http.RoundTripper that serves requests with an
// http.Handler in the same process, streaming its response through a pipe.
// The mock provider is an upstream like any other this way: its responses go
// through the same ReverseProxy, hooks and accounting as a remote one's.
type handlerTransport struct {
	h   http.Handler
	log *slog.Logger // where a panic of the handler is logged; nil: slog.Default()
}

// errHandlerPanic ends a response whose in-process handler panicked after
// it had begun answering.
var errHandlerPanic = errors.New("llproxy: the in-process upstream failed")

func (t handlerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	pr, pw := io.Pipe()
	rw := &pipeWriter{header: http.Header{}, pw: pw, ready: make(chan struct{})}
	go func() {
		defer func() {
			if req.Body != nil {
				req.Body.Close()
			}
			if p := recover(); p != nil {
				// This goroutine is the gateway's: a panic here must not
				// take the process down. Answer as a failing upstream.
				if p != http.ErrAbortHandler {
					logger := t.log
					if logger == nil {
						logger = slog.Default()
					}
					logger.Error("panic in the in-process upstream", "path", req.URL.Path, "panic", fmt.Sprint(p),
						"stack", string(debug.Stack()))
				}
				if rw.started() {
					pw.CloseWithError(errHandlerPanic)
					return
				}
				rw.header = http.Header{}
				writeError(rw, http.StatusInternalServerError, "server_error", "internal_error",
					"The in-process upstream failed on this request; it was logged.")
			}
			rw.WriteHeader(http.StatusOK) // a handler that wrote nothing answers 200
			pw.Close()
		}()
		t.h.ServeHTTP(rw, req)
	}()
	<-rw.ready
	return &http.Response{
		Status: http.StatusText(rw.status), StatusCode: rw.status, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: rw.sent, Body: pr, ContentLength: -1, Request: req,
	}, nil
}

// pipeWriter is the ResponseWriter the handler sees: headers are released
// to RoundTrip at the first WriteHeader or Write, the body goes through the
// pipe as it is written (every write reaches the reader at once, so Flush has
// nothing to do).
type pipeWriter struct {
	header http.Header
	sent   http.Header
	pw     *io.PipeWriter
	once   sync.Once
	ready  chan struct{}
	status int
}

func (w *pipeWriter) Header() http.Header { return w.header }

// started reports whether the headers were released to RoundTrip.
func (w *pipeWriter) started() bool {
	select {
	case <-w.ready:
		return true
	default:
		return false
	}
}

func (w *pipeWriter) WriteHeader(code int) {
	w.once.Do(func() {
		w.status = code
		w.sent = w.header.Clone()
		close(w.ready)
	})
}

func (w *pipeWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return w.pw.Write(p)
}

func (w *pipeWriter) Flush() {}
