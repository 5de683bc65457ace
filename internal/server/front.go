package server

import (
	"net/http"
	"sync"
	"time"

	"github.com/llproxy/llproxy/internal/request"
)

// front wraps the client's ResponseWriter for every request: it bounds
// each write to the client (a client that stops reading is cut off after
// writeTimeout, and what its request held is released as the copy fails),
// and it records whether anything was written, so a panic can still be
// answered with a status.
type front struct {
	http.ResponseWriter
	conn    request.Deadliner
	timeout time.Duration
	wrote   bool
}

var frontPool = sync.Pool{New: func() any { return new(front) }}

func getFront(w http.ResponseWriter, timeout time.Duration) *front {
	f := frontPool.Get().(*front)
	f.ResponseWriter, f.timeout, f.wrote = w, timeout, false
	f.conn = request.ConnOf(w)
	if f.conn != nil {
		f.conn.SetWriteDeadline(time.Time{}) // none left from an earlier request on the connection
	}
	return f
}

func putFront(f *front) {
	*f = front{}
	frontPool.Put(f)
}

func (f *front) arm() {
	if f.conn != nil && f.timeout > 0 {
		f.conn.SetWriteDeadline(time.Now().Add(f.timeout))
	}
}

func (f *front) WriteHeader(code int) {
	if code >= 200 {
		f.wrote = true
	}
	f.ResponseWriter.WriteHeader(code)
}

func (f *front) Write(p []byte) (int, error) {
	f.wrote = true
	f.arm()
	return f.ResponseWriter.Write(p)
}

// Flush sends what is buffered now, within the write timeout.
func (f *front) Flush() {
	f.wrote = true
	f.arm()
	if fl, ok := f.ResponseWriter.(http.Flusher); ok {
		fl.Flush()
	}
}

// Unwrap lets http.ResponseController (and connOf) reach the connection.
func (f *front) Unwrap() http.ResponseWriter { return f.ResponseWriter }
