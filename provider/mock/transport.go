package mock

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"sync"
)

// HandlerTransport is an http.RoundTripper that serves requests with an
// http.Handler in the same process, streaming its response through a pipe.
// The mock is an upstream like any other this way: its responses go through
// the same send loop and accounting as a remote one's.
//
// The handler runs in a goroutine of the transport's own, which never takes
// the process down: a panic is logged with its stack (to Log, or
// slog.Default) and answered as a failing upstream would, with a 500 if
// nothing was sent yet, else with a body that breaks off.
type HandlerTransport struct {
	Handler http.Handler
	Log     *slog.Logger
}

// ErrHandlerPanic ends a response whose in-process handler panicked after
// it had begun answering.
var ErrHandlerPanic = errors.New("provider: the in-process upstream failed")

// RoundTrip implements http.RoundTripper.
func (t HandlerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	pr, pw := io.Pipe()
	rw := &pipeWriter{header: http.Header{}, pw: pw, ready: make(chan struct{})}
	go func() {
		defer func() {
			if req.Body != nil {
				req.Body.Close()
			}
			if p := recover(); p != nil {
				if p != http.ErrAbortHandler {
					log := t.Log
					if log == nil {
						log = slog.Default()
					}
					log.Error("panic in the in-process upstream", "path", req.URL.Path, "panic", fmt.Sprint(p),
						"stack", string(debug.Stack()))
				}
				if rw.started() {
					pw.CloseWithError(ErrHandlerPanic)
					return
				}
				rw.header = http.Header{}
				mockError(rw, http.StatusInternalServerError, "server_error", "internal_error",
					"The in-process upstream failed on this request; it was logged.")
			}
			rw.WriteHeader(http.StatusOK) // a handler that wrote nothing answers 200
			pw.Close()
		}()
		t.Handler.ServeHTTP(rw, req)
	}()
	<-rw.ready
	return &http.Response{
		Status: http.StatusText(rw.status), StatusCode: rw.status, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: rw.sent, Body: pr, ContentLength: -1, Request: req,
	}, nil
}

// pipeWriter is the ResponseWriter the handler sees: headers are released
// to RoundTrip at the first WriteHeader or Write, the body goes through the
// pipe as it is written (every write reaches the reader at once, so Flush
// has nothing to do).
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
