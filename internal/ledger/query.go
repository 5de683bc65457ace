package ledger

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/price"
)

// Query is a sum over the rows from From (inclusive) to To (exclusive),
// grouped by By: any of client, model, route, outcome, day, hour.
type Query struct {
	From, To time.Time
	By       []string
}

// Group is one group's sums.
type Group struct {
	Keys                             map[string]string
	Requests, Prompt, Cached, Output int64
	Cost                             price.Micro
}

// Groupings are what a sum may be grouped by.
var Groupings = []string{"client", "model", "route", "outcome", "day", "hour"}

// ParseQuery reads a sum's parameters as /usage takes them: from and to
// as dates (to inclusive: to its day's end) or RFC 3339 instants (to
// inclusive), in UTC; by a comma-separated list of groupings. Without
// from, this month; without to, now.
func ParseQuery(from, to, by string, now time.Time) (Query, error) {
	q := Query{From: time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC), To: now.UTC().Add(time.Microsecond)}
	if from != "" {
		t, _, err := parseBound(from)
		if err != nil {
			return q, fmt.Errorf("%w: from: %v", ErrBadQuery, err)
		}
		q.From = t
	}
	if to != "" {
		t, day, err := parseBound(to)
		if err != nil {
			return q, fmt.Errorf("%w: to: %v", ErrBadQuery, err)
		}
		if day {
			q.To = t.AddDate(0, 0, 1)
		} else {
			q.To = t.Add(time.Microsecond)
		}
	}
	if !q.From.Before(q.To) {
		return q, fmt.Errorf("%w: from must be before to", ErrBadQuery)
	}
	if by == "" {
		by = "client,model"
	}
	for _, b := range strings.Split(by, ",") {
		b = strings.TrimSpace(strings.ToLower(b))
		if !slices.Contains(Groupings, b) {
			return q, fmt.Errorf("%w: by: %q is not one of %s", ErrBadQuery, b, strings.Join(Groupings, ", "))
		}
		if !slices.Contains(q.By, b) {
			q.By = append(q.By, b)
		}
	}
	return q, nil
}

// parseBound reads a date (2026-12-01: its start, UTC) or an RFC 3339
// instant; day reports which.
func parseBound(s string) (t time.Time, day bool, err error) {
	if t, err := time.Parse("2006-01-02", s); err == nil {
		return t, true, nil
	}
	t, err = time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return t, false, fmt.Errorf("want a date (2026-12-01) or an RFC 3339 time, got %q", s)
	}
	return t.UTC().Truncate(time.Microsecond), false, nil
}
