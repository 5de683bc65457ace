// Package request is what a request to the gateway may be, and how it is
// read: a body under a size and a time bound, into a pooled buffer, read
// once; a path with no dot segments; a JSON body with no key named twice;
// a model name fit to be a queue and a metric label; every number the cost
// is made of an integer within bounds.
//
// It exists so that the gateway reads a request the way the upstream will,
// or refuses it (a client must not be charged for one request and served
// another), in one place for every endpoint: the routes and the Ollama
// façade alike.
package request

import (
	"bytes"
	"errors"
	"io"
	"math"
	"math/bits"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/valyala/fastjson"
)

// Bounds on the numbers a client sends that the cost is made of.
const (
	// MaxN bounds n and best_of (OpenAI's own limit for n).
	MaxN = 128
	// MaxOutputTokens bounds max_tokens and its kin: far above any model's
	// output, far below what could overflow a cost.
	MaxOutputTokens = 1 << 24
	// MaxModelName bounds a model name: it becomes a queue and a metric label.
	MaxModelName = 256
)

// errBadPath is a request path with "." or ".." segments, which could
// escape the route's upstream base path.
var errBadPath = errors.New("the request path must not contain '.' or '..' segments")

// CheckPath rejects paths with "." or ".." segments, decoded or
// percent-encoded, with a backslash counted as a slash as some servers do.
func CheckPath(path, rawPath string) error {
	if dotSegments(path) || (rawPath != "" && dotSegments(decodeDots(rawPath))) {
		return errBadPath
	}
	return nil
}

var dotDecoder = strings.NewReplacer("%2e", ".", "%2E", ".", "%2f", "/", "%2F", "/", "%5c", "/", "%5C", "/")

func decodeDots(p string) string { return dotDecoder.Replace(p) }

// dotSegments reports whether p has a "." or ".." segment.
func dotSegments(p string) bool {
	if !strings.Contains(p, ".") {
		return false
	}
	for seg := range strings.FieldsFuncSeq(p, func(r rune) bool { return r == '/' || r == '\\' }) {
		if seg == "." || seg == ".." {
			return true
		}
	}
	return false
}

// CheckModelName rejects a model name that cannot be a queue and a metric
// label: too long, not UTF-8, or with control characters.
func CheckModelName(b []byte) error {
	if len(b) == 0 || len(b) > MaxModelName || !utf8.Valid(b) {
		return errors.New("'model' must be a non-empty UTF-8 string of at most " + strconv.Itoa(MaxModelName) + " bytes.")
	}
	for _, r := range string(b) {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return errors.New("'model' must not contain control characters.")
		}
		if r == utf8.RuneError || r == '\\' {
			// An escaped lone surrogate ("\ud800", "\ud800\u0041") is
			// kept as its escape or read as U+FFFD by the parser, and read
			// otherwise upstream: the queue and the upstream would
			// disagree on which model it is.
			return errors.New("'model' must not contain escaped lone surrogates, U+FFFD or backslashes.")
		}
	}
	return nil
}

// CheckDuplicateKeys rejects an object, at any depth, that names a key
// twice: the gateway reads the first, most upstreams the last.
func CheckDuplicateKeys(v *fastjson.Value) error {
	w := walkers.Get().(*dupWalker)
	defer walkers.Put(w)
	w.err, w.keys, w.depth = nil, w.keys[:0], 0
	w.walk(v)
	clear(w.keys[:cap(w.keys)]) // hold no pointer into the request's body
	return w.err
}

const maxJSONDepth = 128

// dupWalker walks a parsed body once, keeping the keys of the objects it is
// inside on one stack, so that checking costs no allocation per request.
type dupWalker struct {
	keys  [][]byte // keys of the enclosing objects; the current one's from frame on
	frame int
	depth int
	err   error
	visit func(k []byte, v *fastjson.Value) // w.member, bound once
}

var walkers = sync.Pool{New: func() any {
	w := &dupWalker{}
	w.visit = w.member
	return w
}}

func (w *dupWalker) walk(v *fastjson.Value) {
	if w.err != nil {
		return
	}
	if w.depth++; w.depth > maxJSONDepth {
		w.err = errors.New("the JSON body is nested too deeply")
		return
	}
	defer func() { w.depth-- }()
	switch v.Type() {
	case fastjson.TypeObject:
		o, _ := v.Object()
		saved := w.frame
		w.frame = len(w.keys)
		o.Visit(w.visit)
		w.keys = w.keys[:w.frame]
		w.frame = saved
	case fastjson.TypeArray:
		a, _ := v.Array()
		for _, x := range a {
			w.walk(x)
		}
	}
}

func (w *dupWalker) member(k []byte, v *fastjson.Value) {
	if w.err != nil {
		return
	}
	for _, seen := range w.keys[w.frame:] {
		if bytes.Equal(seen, k) {
			w.err = duplicateKey(k)
			return
		}
	}
	w.keys = append(w.keys, k)
	w.walk(v)
}

func duplicateKey(k []byte) error {
	if len(k) > 64 || !utf8.Valid(k) {
		return errors.New("the JSON body names a key twice in one object")
	}
	return errors.New("the JSON body names the key " + strconv.Quote(string(k)) + " twice in one object")
}

// IntParam reads an optional integer parameter the cost is made of: absent
// or null is (0, false, nil); a number with an integral value (100000,
// 1e5, 100000.0) is accepted as that integer; anything else, or a value
// outside [lo, hi] (max_tokens -1 or 0 included, as OpenAI answers them),
// is an error naming the parameter.
func IntParam(v *fastjson.Value, key string, lo, hi int64) (int64, bool, error) {
	x := v.Get(key)
	if x == nil || x.Type() == fastjson.TypeNull {
		return 0, false, nil
	}
	bad := func() error {
		return errors.New("Invalid '" + key + "': expected an integer between " + strconv.FormatInt(lo, 10) +
			" and " + strconv.FormatInt(hi, 10) + ".")
	}
	if x.Type() != fastjson.TypeNumber {
		return 0, false, bad()
	}
	f, err := x.Float64()
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) || f != math.Trunc(f) {
		return 0, false, bad()
	}
	if f < float64(lo) || f > float64(hi) {
		return 0, false, bad()
	}
	return int64(f), true, nil
}

// Errors of ReadBody: past the configured limit, or cut off by shutdown.
var (
	ErrBodyTooLarge = errors.New("request body too large")
	ErrShuttingDown = errors.New("shutting down")
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
	// Buf is the body. Append to it in place of a new one.
	Buf  []byte
	refs atomic.Int32
}

// Body buffers are pooled by size class, 1 KiB to 1 MiB in powers of
// two, so that a request holds about its own size while it waits, not a
// fixed large buffer. Larger bodies are not pooled.
const (
	minBodyClass  = 10 // 1 KiB
	maxBodyClass  = 20 // 1 MiB
	maxPooledBody = 1 << maxBodyClass
)

var bodyPools [maxBodyClass + 1]sync.Pool

// bodyClass is the smallest class that holds n bytes, or -1.
func bodyClass(n int) int {
	c := max(minBodyClass, bits.Len(uint(max(n, 1)-1)))
	if c > maxBodyClass {
		return -1
	}
	return c
}

// NewBody returns an empty pooled buffer holding one reference, for a
// body of about 1 KiB (it grows as needed).
func NewBody() *Body { return NewBodySize(0) }

// NewBodySize returns an empty pooled buffer of at least n bytes holding
// one reference.
func NewBodySize(n int) *Body {
	c := bodyClass(n)
	if c < 0 {
		b := &Body{Buf: make([]byte, 0, n)}
		b.refs.Store(1)
		return b
	}
	b, _ := bodyPools[c].Get().(*Body)
	if b == nil {
		b = &Body{Buf: make([]byte, 0, 1<<c)}
	}
	b.refs.Store(1)
	b.Buf = b.Buf[:0]
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
	// One byte more than the length, so that the read that finds EOF does
	// not grow the buffer.
	b := NewBodySize(int(max(r.ContentLength, 0)) + 1)
	buf := b.Buf
	for {
		if len(buf) == cap(buf) {
			// Grow to the next class, in the pool's sizes.
			nb := NewBodySize(2 * cap(buf))
			nb.Buf = append(nb.Buf, buf...)
			b.Buf = buf
			b.Release()
			b, buf = nb, nb.Buf
		}
		if closing != nil && closing() {
			// Shutting down: a body still arriving is not waited for.
			b.Buf = buf
			b.Release()
			return nil, ErrShuttingDown
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
			b.Buf = buf
			b.Release()
			return nil, ErrBodyTooLarge
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			b.Buf = buf
			b.Release()
			return nil, err
		}
	}
	b.Buf = buf
	return b, nil
}

// Release drops one reference.
func (b *Body) Release() {
	if b.refs.Add(-1) != 0 {
		return
	}
	c := bodyClass(cap(b.Buf))
	if c < 0 || cap(b.Buf) != 1<<c {
		return // huge, or grown to no class: let it go rather than pin it
	}
	b.Buf = b.Buf[:0]
	bodyPools[c].Put(b)
}

// Reader returns a new reader over the body that releases its reference
// when closed.
func (b *Body) Reader() io.ReadCloser {
	b.refs.Add(1)
	br := &bodyReader{b: b}
	br.r.Reset(b.Buf)
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

// Attach makes r send the buffered body: Body, GetBody (so the transport
// can replay it on a stale pooled connection) and ContentLength. The caller
// closes r.Body when forwarding is over.
func (b *Body) Attach(r *http.Request) {
	r.Body = b.Reader()
	r.GetBody = func() (io.ReadCloser, error) { return b.Reader(), nil }
	r.ContentLength = int64(len(b.Buf))
}

// LooksJSON reports whether a body should be parsed as JSON: a JSON content
// type, or a body that is a JSON object whatever its content type claims
// (multipart and form types included: a real multipart body starts with
// its boundary, never with "{"), after any UTF-8 byte order mark and white
// space. What the upstream would read as JSON is scheduled, never
// forwarded unscheduled for a claim.
func LooksJSON(contentType string, body []byte) bool {
	if strings.HasPrefix(contentType, "application/json") || strings.Contains(contentType, "+json") {
		return true
	}
	trimmed := bytes.TrimLeft(bytes.TrimPrefix(body, utf8BOM), " \t\r\n")
	return len(trimmed) > 0 && trimmed[0] == '{'
}

var utf8BOM = []byte("\xef\xbb\xbf")

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

// errKeepAlive is the one complaint about a keep_alive.
var errKeepAlive = errors.New(`keep_alive must be a number of seconds or a duration such as "10m"`)

// ParseKeepAlive reads a keep_alive (raw JSON) as Ollama does: a number of
// seconds or a duration string ("10m"), read as every duration of the
// config is (duration.Duration). A negative value, or a number too large
// to be a duration, means never unload (-1).
func ParseKeepAlive(raw []byte) (time.Duration, error) {
	var d duration.Duration
	if err := d.UnmarshalJSON(raw); err != nil {
		if f, ferr := strconv.ParseFloat(string(raw), 64); ferr == nil && f > 0 && !math.IsInf(f, 0) {
			return -1, nil // a number of seconds past any duration: never
		}
		return 0, errKeepAlive
	}
	if d < 0 {
		return -1, nil
	}
	return time.Duration(d), nil
}

// Failure is how the gateway answers a body ReadBody could not read, in
// whichever shape the endpoint speaks: the status, an error code, a
// message, and the log outcome.
type Failure struct {
	Status        int
	Code, Message string
	Outcome       string
}

// FailureOf describes err, from ReadBody with the limit lim.
func FailureOf(err error, lim Limits) Failure {
	switch {
	case errors.Is(err, ErrBodyTooLarge):
		return Failure{http.StatusRequestEntityTooLarge, "request_too_large",
			"Request body too large: the limit is " + strconv.FormatInt(lim.MaxBodyBytes, 10) + " bytes.", "body_too_large"}
	case errors.Is(err, ErrShuttingDown):
		return Failure{http.StatusServiceUnavailable, "service_unavailable",
			"llproxy is shutting down; retry on another instance.", "rejected_shutdown"}
	case relay.IsTimeout(err):
		return Failure{http.StatusRequestTimeout, "request_timeout", "The request body did not arrive in time.", "body_timeout"}
	}
	return Failure{http.StatusBadRequest, "", "Could not read the request body.", "body_error"}
}
