// Package provider knows the upstreams llproxy speaks to: "openai" (any
// OpenAI-compatible server: its credentials, its rate-limit headers and
// retry advice, its usage in JSON bodies and SSE streams) and "mock", an
// OpenAI-compatible upstream answering locally (with its in-process
// transport), so the gateway runs and can be load-tested with no key and no
// network.
//
// It exists so that what differs between upstreams (authentication, what
// they report and how) stays out of the HTTP server and the scheduler. It
// imports neither.
package provider

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Names of the providers a route may use.
const (
	NameOpenAI = "openai"
	NameMock   = "mock"
)

// Names returns the known provider names.
func Names() []string { return []string{NameOpenAI, NameMock} }

// Duration is a time.Duration that reads from JSON as a number of seconds or
// a Go duration string ("50ms").
type Duration time.Duration

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		if v, err := time.ParseDuration(s); err == nil {
			*d = Duration(v)
			return nil
		}
		b = []byte(s)
	}
	f, err := strconv.ParseFloat(string(b), 64)
	if err != nil || math.IsNaN(f) || math.Abs(f) >= math.MaxInt64/float64(time.Second) {
		return fmt.Errorf("invalid duration %s: want seconds or a duration such as \"50ms\"", b)
	}
	*d = Duration(f * float64(time.Second))
	return nil
}
