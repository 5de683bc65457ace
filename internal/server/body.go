package server

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Errors of readBody: past the configured limit, or cut off by shutdown.
var (
	errBodyTooLarge = errors.New("request body too large")
	errShuttingDown = errors.New("shutting down")
)

// bodyBuf is a request body read into a pooled buffer. The handler holds one
// reference and every reader made for the upstream request holds one until
// it is closed; the buffer goes back to the pool when the last is released.
//
// httputil.ReverseProxy hands the transport a wrapper whose Close does
// nothing and which refuses reads once ServeHTTP returns, so the handler
// closes the request's own reader after forwarding (see attach). Readers
// the transport makes through GetBody to replay a request are closed by the
// transport after writing them; one it never closes keeps its buffer out of
// the pool, which is safe.
type bodyBuf struct {
	buf  []byte
	refs atomic.Int32
}

const maxPooledBody = 1 << 20

var bodyPool = sync.Pool{New: func() any { return &bodyBuf{buf: make([]byte, 0, 16<<10)} }}

// newBodyBuf returns an empty pooled buffer holding one reference.
func newBodyBuf() *bodyBuf {
	b := bodyPool.Get().(*bodyBuf)
	b.refs.Store(1)
	b.buf = b.buf[:0]
	return b
}

// deadliner is the connection under a ResponseWriter: what
// http.ResponseController reaches.
type deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// connOf finds the connection's deadlines under w, unwrapping as
// http.ResponseController does; nil if there is none (a recorder, the
// Ollama façade's capture).
func connOf(w http.ResponseWriter) deadliner {
	for {
		switch t := w.(type) {
		case deadliner:
			return t
		case interface{ Unwrap() http.ResponseWriter }:
			w = t.Unwrap()
		default:
			return nil
		}
	}
}

// readBody reads r's body, at most maxBodyBytes of it, with the client's
// time bounded: each read must bring bytes within bodyIdleTimeout and the
// whole body must arrive within bodyTimeout (a timeout error otherwise). A
// client that trickles its body cannot hold a goroutine and a connection
// for long. w is the client's ResponseWriter, through which the
// connection's read deadline is set.
func (s *Server) readBody(w http.ResponseWriter, r *http.Request) (*bodyBuf, error) {
	limit := s.cfg.MaxBodyBytes
	if r.ContentLength > limit {
		return nil, errBodyTooLarge
	}
	conn := connOf(w)
	var end time.Time
	idle := time.Duration(s.cfg.BodyIdleTimeout)
	if conn != nil {
		end = time.Now().Add(time.Duration(s.cfg.BodyTimeout))
		defer conn.SetReadDeadline(time.Time{})
	}
	b := newBodyBuf()
	buf := b.buf
	if r.ContentLength > 0 && int(r.ContentLength) > cap(buf) {
		buf = make([]byte, 0, r.ContentLength)
	}
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		if s.closing.Load() {
			// Shutting down: a body still arriving is not waited for.
			b.buf = buf
			b.release()
			return nil, errShuttingDown
		}
		if conn != nil {
			d := end
			if idle > 0 {
				if next := time.Now().Add(idle); next.Before(d) {
					d = next
				}
			}
			conn.SetReadDeadline(d)
		}
		n, err := r.Body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if int64(len(buf)) > limit {
			b.buf = buf
			b.release()
			return nil, errBodyTooLarge
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			b.buf = buf
			b.release()
			return nil, err
		}
	}
	b.buf = buf
	return b, nil
}

// release drops one reference.
func (b *bodyBuf) release() {
	if b.refs.Add(-1) != 0 {
		return
	}
	if cap(b.buf) > maxPooledBody {
		return // let a huge buffer go rather than pin it
	}
	b.buf = b.buf[:0]
	bodyPool.Put(b)
}

// reader returns a new reader over the body that releases its reference
// when closed.
func (b *bodyBuf) reader() io.ReadCloser {
	b.refs.Add(1)
	br := &bodyReader{b: b}
	br.r.Reset(b.buf)
	return br
}

type bodyReader struct {
	b      *bodyBuf
	r      bytes.Reader
	closed atomic.Bool
}

func (br *bodyReader) Read(p []byte) (int, error) { return br.r.Read(p) }

func (br *bodyReader) Close() error {
	if br.closed.CompareAndSwap(false, true) {
		br.b.release()
	}
	return nil
}

// attach makes r send the buffered body: Body, GetBody (so the transport
// can replay it on a stale pooled connection) and ContentLength. The caller
// closes r.Body when forwarding is over.
func (b *bodyBuf) attach(r *http.Request) {
	r.Body = b.reader()
	r.GetBody = func() (io.ReadCloser, error) { return b.reader(), nil }
	r.ContentLength = int64(len(b.buf))
}

// looksJSON reports whether a body should be parsed as JSON: a JSON content
// type, or no multipart/form type and an object as the first character.
func looksJSON(contentType string, body []byte) bool {
	if strings.HasPrefix(contentType, "application/json") || strings.Contains(contentType, "+json") {
		return true
	}
	if strings.HasPrefix(contentType, "multipart/") {
		return false
	}
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	return len(trimmed) > 0 && trimmed[0] == '{'
}
