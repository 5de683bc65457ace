package route

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Errors of ReadBody: past the configured limit, or cut off by shutdown.
var (
	ErrBodyTooLarge = errors.New("request body too large")
	errShuttingDown = errors.New("shutting down")
)

// Body is a request body read into a pooled buffer. The handler holds one
// reference and every reader made for the upstream request holds one until
// it is closed; the buffer goes back to the pool when the last is released.
//
// The transport closes the reader it is given when it is done with it (and
// the sender closes it again, harmlessly); readers it makes through GetBody
// to replay a request are closed by the transport after writing them; one
// it never closes keeps its buffer out of the pool, which is safe.
type Body struct {
	buf  []byte
	refs atomic.Int32
}

const maxPooledBody = 1 << 20

var bodyPool = sync.Pool{New: func() any { return &Body{buf: make([]byte, 0, 16<<10)} }}

// newBodyBuf returns an empty pooled buffer holding one reference.
func newBodyBuf() *Body {
	b := bodyPool.Get().(*Body)
	b.refs.Store(1)
	b.buf = b.buf[:0]
	return b
}

// Limits bound a request body: its size and the client's time to send it.
type Limits struct {
	MaxBodyBytes    int64
	BodyTimeout     time.Duration // the whole body
	BodyIdleTimeout time.Duration // each read
}

// Deadliner is the connection under a ResponseWriter: what
// http.ResponseController reaches.
type Deadliner interface {
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// ConnOf finds the connection's deadlines under w, unwrapping as
// http.ResponseController does; nil if there is none (a recorder, the
// Ollama façade's capture).
func ConnOf(w http.ResponseWriter) Deadliner {
	for {
		switch t := w.(type) {
		case Deadliner:
			return t
		case interface{ Unwrap() http.ResponseWriter }:
			w = t.Unwrap()
		default:
			return nil
		}
	}
}

// ReadBody reads r's body, at most lim.MaxBodyBytes of it, with the
// client's time bounded: each read must bring bytes within bodyIdleTimeout and the
// whole body must arrive within bodyTimeout (a timeout error otherwise). A
// client that trickles its body cannot hold a goroutine and a connection
// for long. w is the client's ResponseWriter, through which the
// connection's read deadline is set.
func ReadBody(w http.ResponseWriter, r *http.Request, lim Limits, closing func() bool) (*Body, error) {
	limit := lim.MaxBodyBytes
	if r.ContentLength > limit {
		return nil, ErrBodyTooLarge
	}
	conn := ConnOf(w)
	var end time.Time
	idle := lim.BodyIdleTimeout
	if conn != nil {
		end = time.Now().Add(lim.BodyTimeout)
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
		if closing != nil && closing() {
			// Shutting down: a body still arriving is not waited for.
			b.buf = buf
			b.Release()
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
			b.Release()
			return nil, ErrBodyTooLarge
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			b.buf = buf
			b.Release()
			return nil, err
		}
	}
	b.buf = buf
	return b, nil
}

// Release drops one reference.
func (b *Body) Release() {
	if b.refs.Add(-1) != 0 {
		return
	}
	if cap(b.buf) > maxPooledBody {
		return // let a huge buffer go rather than pin it
	}
	b.buf = b.buf[:0]
	bodyPool.Put(b)
}

// Reader returns a new reader over the body that releases its reference
// when closed.
func (b *Body) Reader() io.ReadCloser {
	b.refs.Add(1)
	br := &bodyReader{b: b}
	br.r.Reset(b.buf)
	return br
}

type bodyReader struct {
	b      *Body
	r      bytes.Reader
	closed atomic.Bool
}

func (br *bodyReader) Read(p []byte) (int, error) { return br.r.Read(p) }

func (br *bodyReader) Close() error {
	if br.closed.CompareAndSwap(false, true) {
		br.b.Release()
	}
	return nil
}

// attach makes r send the buffered body: Body, GetBody (so the transport
// can replay it on a stale pooled connection) and ContentLength. The caller
// closes r.Body when forwarding is over.
func (b *Body) attach(r *http.Request) {
	r.Body = b.Reader()
	r.GetBody = func() (io.ReadCloser, error) { return b.Reader(), nil }
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

// DropBody ends a request whose body will not be read: the connection
// closes after the answer instead of net/http reading what is left of the
// body, which a client trickling it could make last for ever.
func DropBody(w http.ResponseWriter, r *http.Request) {
	if r.Body == nil || r.Body == http.NoBody {
		return
	}
	w.Header()["Connection"] = []string{"close"}
	if conn := ConnOf(w); conn != nil {
		conn.SetReadDeadline(time.Now())
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
