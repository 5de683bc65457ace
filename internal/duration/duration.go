// Package duration is how the gateway's config writes a length of time: a
// number of seconds (30, 1.5) or a Go duration string ("1500ms", "2m").
//
// It exists so that every part of the config (models, clients, fleets,
// replicas, request bodies' keep_alive) reads durations one way, and so
// that the scheduler, which works in time.Duration, knows no JSON.
package duration

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"time"
)

// Duration is a time.Duration that reads from JSON as a number of seconds
// or a Go duration string, and writes as a duration string.
type Duration time.Duration

// D is the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		v, err := time.ParseDuration(s)
		if err != nil {
			// A bare number in a string means seconds too.
			f, ferr := strconv.ParseFloat(s, 64)
			if ferr != nil {
				return fmt.Errorf("invalid duration %q: want seconds or a duration such as \"1500ms\"", s)
			}
			return d.setSeconds(f)
		}
		*d = Duration(v)
		return nil
	}
	var f float64
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("invalid duration %s: want seconds or a duration such as \"1500ms\"", b)
	}
	return d.setSeconds(f)
}

func (d *Duration) setSeconds(f float64) error {
	if math.IsNaN(f) || math.Abs(f) > math.MaxInt64/float64(time.Second) {
		return fmt.Errorf("invalid duration %v seconds", f)
	}
	*d = Duration(f * float64(time.Second))
	return nil
}

// MarshalJSON writes the duration as a Go duration string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return json.Marshal(time.Duration(d).String())
}

// Parse reads a duration as the config writes one, outside JSON: a number
// of seconds ("2.5") or a Go duration string ("1500ms"); never negative.
func Parse(s string) (time.Duration, error) {
	var d Duration
	if _, err := strconv.ParseFloat(s, 64); err == nil {
		err = d.setSeconds(mustFloat(s))
		if err != nil {
			return 0, err
		}
	} else if v, err := time.ParseDuration(s); err == nil {
		d = Duration(v)
	} else {
		return 0, fmt.Errorf("invalid duration %q: want seconds or a duration such as \"1500ms\"", s)
	}
	if d < 0 {
		return 0, fmt.Errorf("invalid duration %q: must not be negative", s)
	}
	return d.D(), nil
}

func mustFloat(s string) float64 {
	f, _ := strconv.ParseFloat(s, 64)
	return f
}
