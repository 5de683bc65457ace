package server

import (
	"bytes"
	"errors"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/valyala/fastjson"
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

// checkPath rejects paths with "." or ".." segments, decoded or
// percent-encoded, with a backslash counted as a slash as some servers do.
func checkPath(path, rawPath string) error {
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

// keepAlive reads a keep_alive as Ollama does: a number of seconds, or a
// duration string ("10m"); negative means never unload.
func keepAlive(v *fastjson.Value) (time.Duration, error) {
	switch v.Type() {
	case fastjson.TypeNumber:
		f := v.GetFloat64()
		switch {
		case f < 0, f*float64(time.Second) >= math.MaxInt64:
			return -1, nil // never (a number too large to be a duration means as much)
		case f != f:
			return 0, errors.New("keep_alive must be a number of seconds or a duration such as \"10m\"")
		}
		return time.Duration(f * float64(time.Second)), nil
	case fastjson.TypeString:
		d, err := time.ParseDuration(string(v.GetStringBytes()))
		if err != nil {
			return 0, errors.New("keep_alive must be a number of seconds or a duration such as \"10m\"")
		}
		if d < 0 {
			return -1, nil
		}
		return d, nil
	}
	return 0, errors.New("keep_alive must be a number of seconds or a duration such as \"10m\"")
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
