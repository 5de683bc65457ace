package route

import (
	"bytes"
	"errors"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/ollama"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// This file is the decode stage's rules: the gateway must read a request the
// way the upstream will, or a client could be charged for one request and
// served another. What the gateway cannot read that way is a 400, before
// anything is counted or queued.

// Bounds on the numbers a client sends that the cost is made of.
const (
	// maxN bounds n and best_of (OpenAI's own limit for n).
	maxN = 128
	// maxOutputTokens bounds max_tokens and its kin: far above any model's
	// output, far below what could overflow a cost.
	maxOutputTokens = 1 << 24
	// maxModelName bounds a model name: it becomes a queue and a metric label.
	maxModelName = 256
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

// checkModelName rejects a model name that cannot be a queue and a metric
// label: too long, not UTF-8, or with control characters.
func checkModelName(b []byte) error {
	if len(b) == 0 || len(b) > maxModelName || !utf8.Valid(b) {
		return errors.New("'model' must be a non-empty UTF-8 string of at most " + strconv.Itoa(maxModelName) + " bytes.")
	}
	for _, r := range string(b) {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return errors.New("'model' must not contain control characters.")
		}
	}
	return nil
}

// checkDuplicateKeys rejects an object, at any depth, that names a key
// twice: the gateway reads the first, most upstreams the last.
func checkDuplicateKeys(v *fastjson.Value) error {
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

// intParam reads an optional integer parameter the cost is made of: absent
// or null is (0, false, nil); a number with an integral value (100000,
// 1e5, 100000.0) is accepted as that integer; anything else, or a value
// outside [lo, hi], is an error naming the parameter. Values below lo that
// upstreams take to mean "no limit" (-1, 0) are returned with ok false when
// lenient is set.
func intParam(v *fastjson.Value, key string, lo, hi int64, lenient bool) (int64, bool, error) {
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
	if f < float64(lo) {
		if lenient && f <= 0 && f >= -1 {
			return 0, false, nil
		}
		return 0, false, bad()
	}
	if f > float64(hi) {
		return 0, false, bad()
	}
	return int64(f), true, nil
}

// applyDefaults gives a chat request the model's default parameters it does
// not set, and its default system prompt if it has no system message. It
// reports whether it changed v. dp parses the defaults and must live as
// long as v.
func applyDefaults(v *fastjson.Value, ms *modelState, dp *fastjson.Parser, a *fastjson.Arena) bool {
	changed := false
	if ms.defaults != nil {
		if d, err := dp.ParseBytes(ms.defaults); err == nil {
			d.GetObject().Visit(func(k []byte, val *fastjson.Value) {
				if v.Get(string(k)) == nil {
					v.Set(string(k), val)
					changed = true
				}
			})
		}
	}
	if ms.system == "" {
		return changed
	}
	msgs := v.GetArray("messages")
	for _, m := range msgs {
		if r := string(m.GetStringBytes("role")); r == "system" || r == "developer" {
			return changed // the request's own system message wins
		}
	}
	sys := a.NewObject()
	sys.Set("role", a.NewString("system"))
	sys.Set("content", a.NewString(strings.ReplaceAll(ms.system, "{{now}}", time.Now().Format(time.RFC1123))))
	arr := a.NewArray()
	arr.SetArrayItem(0, sys)
	for i, m := range msgs {
		arr.SetArrayItem(i+1, m)
	}
	v.Set("messages", arr)
	return true
}

// call is what inspect learns of a request body.
type call struct {
	ms  *modelState // nil: the body names no model
	est estimate
	// inject is the body to send instead of the request's own, or nil:
	// rewritten to ask for a stream's usage, to drop keep_alive, or to add
	// the model's defaults.
	inject *Body
	// keepAlive is the request's keep_alive, if it had one.
	keepAlive *time.Duration
}

// inspect parses a JSON body once, finds its model's queue and counts its
// cost; for a stream whose client did not ask for usage it also prepares the
// body that asks for it. On bad input it answers the client and returns ok
// false.
func (rt *Route) inspect(w http.ResponseWriter, path string, body []byte, rec *requestLog) (c call, ok bool) {
	p := parsers.Get()
	defer parsers.Put(p)
	v, err := p.ParseBytes(body)
	if err != nil || v.Type() != fastjson.TypeObject {
		rec.outcome = OutcomeBadRequest
		WriteError(w, http.StatusBadRequest, "invalid_request_error", "",
			"We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
		return c, false
	}
	if err := checkDuplicateKeys(v); err != nil {
		rec.outcome = OutcomeBadRequest
		WriteError(w, http.StatusBadRequest, "invalid_request_error", "", "Invalid request: "+err.Error())
		return c, false
	}
	mv := v.Get("model")
	if mv == nil || mv.Type() == fastjson.TypeNull {
		if endpointOf(path) != tokenizer.EndpointOther {
			rec.outcome = OutcomeBadRequest
			writeParamError(w, "model", "you must provide a model parameter")
			return c, false
		}
		return c, true
	}
	if mv.Type() != fastjson.TypeString {
		rec.outcome = OutcomeBadRequest
		writeParamError(w, "model", "'model' must be a string.")
		return c, false
	}
	if err := checkModelName(mv.GetStringBytes()); err != nil {
		rec.outcome = OutcomeBadRequest
		writeParamError(w, "model", err.Error())
		return c, false
	}
	rec.model = string(mv.GetStringBytes())
	if !rt.lessor.Knows(rec.model) {
		rec.outcome = OutcomeNotFound
		rt.writeLeaseError(w, rec.model, backends.ErrUnknownModel)
		return call{}, false
	}
	if c.ms, err = rt.modelFor(rec.model); err != nil {
		rec.outcome = OutcomeNotFound
		if errors.Is(err, scheduler.ErrTooManyModels) {
			rec.outcome = "too_many_models"
		}
		rt.writeModelError(w, rec.model, err)
		return call{}, false
	}
	// keep_alive is for llproxy's model lifecycle, never for the upstream;
	// model defaults go in before counting, so they are paid for.
	var dp fastjson.Parser
	var a fastjson.Arena
	rewrite := false
	if ka := v.Get("keep_alive"); ka != nil {
		d, err := ollama.ParseKeepAlive(ka.MarshalTo(nil))
		if err != nil {
			rec.outcome = OutcomeBadRequest
			writeParamError(w, "keep_alive", err.Error())
			return call{}, false
		}
		c.keepAlive = &d
		v.Del("keep_alive")
		rewrite = true
	}
	ep := endpointOf(path)
	if ep == tokenizer.EndpointChat && (c.ms.defaults != nil || c.ms.system != "") {
		rewrite = applyDefaults(v, c.ms, &dp, &a) || rewrite
	}
	if c.est, err = rt.estimateCost(ep, rec.model, v, c.ms); err != nil {
		rec.outcome = OutcomeBadRequest
		WriteError(w, http.StatusBadRequest, "invalid_request_error", "", err.Error())
		return call{}, false
	}
	stream := v.GetBool("stream")
	wantUsage := *rt.cfg.InjectStreamUsage && stream && !provider.WantsStreamUsage(v) &&
		(ep == tokenizer.EndpointChat || ep == tokenizer.EndpointCompletions)
	switch {
	case rewrite:
		c.inject = newBodyBuf()
		if wantUsage {
			c.inject.buf = provider.WithStreamUsage(c.inject.buf, nil, v)
		} else {
			c.inject.buf = v.MarshalTo(c.inject.buf)
		}
	case wantUsage:
		c.inject = newBodyBuf()
		c.inject.buf = provider.WithStreamUsage(c.inject.buf, body, v)
	}
	return c, true
}
