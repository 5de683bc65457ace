package server

import (
	"errors"
	"math"
	"strconv"
	"strings"
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
	return dupWalk(v, 0)
}

const maxJSONDepth = 128

func dupWalk(v *fastjson.Value, depth int) error {
	if depth > maxJSONDepth {
		return errors.New("the JSON body is nested too deeply")
	}
	switch v.Type() {
	case fastjson.TypeObject:
		o, _ := v.Object()
		var err error
		n := o.Len()
		var small [16]string
		var keys []string
		var set map[string]struct{}
		if n <= len(small) {
			keys = small[:0]
		} else {
			set = make(map[string]struct{}, n)
		}
		o.Visit(func(k []byte, x *fastjson.Value) {
			if err != nil {
				return
			}
			if set != nil {
				if _, dup := set[string(k)]; dup {
					err = duplicateKey(k)
					return
				}
				set[string(k)] = struct{}{}
			} else {
				for _, seen := range keys {
					if seen == string(k) {
						err = duplicateKey(k)
						return
					}
				}
				keys = append(keys, string(k))
			}
			err = dupWalk(x, depth+1)
		})
		return err
	case fastjson.TypeArray:
		a, _ := v.Array()
		for _, x := range a {
			if err := dupWalk(x, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
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
