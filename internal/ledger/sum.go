package ledger

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/price"
)

// Summing the ledger: whole days come from the daily rollup, whole hours
// at either end of them from the hourly one, and only the partial hours at
// the very ends from the rows, by their time index. A month by client and
// model reads about 31 × its groups of a day, however many rows it had
// (BenchmarkSumMonth: ten million rows).

// Sum sums the rows of q, grouped by q.By, groups in the order of their
// keys.
func (s *sqlStore) Sum(ctx context.Context, q Query) ([]Group, error) {
	from, to := q.From.UnixMicro(), q.To.UnixMicro()
	if to <= from {
		return []Group{}, nil
	}
	for _, by := range q.By {
		if !slices.Contains(Groupings, by) {
			return nil, fmt.Errorf("%w: cannot group by %q", ErrBadQuery, by)
		}
	}
	acc := map[string]*Group{}
	var order []string
	add := func(g Group) {
		key := groupKey(q.By, g.Keys)
		if a := acc[key]; a != nil {
			a.Requests, a.Prompt, a.Cached, a.Output, a.Cost = a.Requests+g.Requests, a.Prompt+g.Prompt,
				a.Cached+g.Cached, a.Output+g.Output, a.Cost+g.Cost
			return
		}
		acc[key] = &g
		order = append(order, key)
	}
	levels := []int64{usPerDay, usPerHour, 0}
	if slices.Contains(q.By, "hour") {
		levels = levels[1:] // the daily sums know no hours
	}
	if err := s.sumSpan(ctx, q.By, from, to, levels, add); err != nil {
		return nil, err
	}
	slices.Sort(order)
	out := make([]Group, 0, len(order))
	for _, k := range order {
		out = append(out, *acc[k])
	}
	return out, nil
}

// sumSpan sums [from, to): its whole units (levels[0]: a day or an hour)
// from that unit's rollup, the rest at either end at the next level, and
// at the last level (0) from the rows.
func (s *sqlStore) sumSpan(ctx context.Context, by []string, from, to int64, levels []int64, add func(Group)) error {
	if from >= to {
		return nil
	}
	unit := levels[0]
	if unit == 0 {
		return s.sumRange(ctx, by, from, to, 0, add)
	}
	a, b := ceilDiv(from, unit)*unit, floorDiv(to, unit)*unit
	if a >= b {
		return s.sumSpan(ctx, by, from, to, levels[1:], add)
	}
	if err := s.sumSpan(ctx, by, from, a, levels[1:], add); err != nil {
		return err
	}
	if err := s.sumRange(ctx, by, a, b, unit, add); err != nil {
		return err
	}
	return s.sumSpan(ctx, by, b, to, levels[1:], add)
}

// groupKey is a group's keys as one string that sorts as the keys do in
// by's order.
func groupKey(by []string, keys map[string]string) string {
	var b strings.Builder
	for _, k := range by {
		b.WriteString(keys[k])
		b.WriteByte(0)
	}
	return b.String()
}

// sumRange sums [from, to) (Unix microseconds) from the rows (unit 0),
// or from the hourly or daily sums (from and to whole units), and hands
// each group to add.
func (s *sqlStore) sumRange(ctx context.Context, by []string, from, to, unit int64, add func(Group)) error {
	sel := make([]string, 0, len(by))
	for _, g := range by {
		expr := g // client, model, route, outcome
		switch {
		case g == "hour" && unit == usPerHour:
			expr = "hour"
		case g == "hour":
			expr = "ts / " + strconv.FormatInt(usPerHour, 10)
		case g == "day" && unit == usPerDay:
			expr = "day"
		case g == "day" && unit == usPerHour:
			expr = "hour / 24"
		case g == "day":
			expr = "ts / " + strconv.FormatInt(usPerDay, 10)
		}
		sel = append(sel, expr)
	}
	sums := `SUM(requests), SUM(prompt), SUM(cached), SUM(output), SUM(cost_micro)`
	var query string
	args := []any{from / max(unit, 1), to / max(unit, 1)}
	switch unit {
	case usPerDay:
		query = `SELECT ` + joinComma(sel, sums) + ` FROM usage_daily WHERE day >= ? AND day < ?`
	case usPerHour:
		query = `SELECT ` + joinComma(sel, sums) + ` FROM usage_hourly WHERE hour >= ? AND hour < ?`
	default:
		query = `SELECT ` + joinComma(sel, `COUNT(*), SUM(prompt), SUM(cached), SUM(output), SUM(cost_micro)`) +
			` FROM usage WHERE ts >= ? AND ts < ?`
	}
	if len(by) > 0 {
		cols := make([]string, len(by))
		for i := range by {
			cols[i] = strconv.Itoa(i + 1)
		}
		query += ` GROUP BY ` + strings.Join(cols, ", ")
	}
	rows, err := s.db.QueryContext(ctx, s.q(query), args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	keys := make([]any, len(by))
	vals := make([]sql.NullInt64, 5)
	dest := make([]any, 0, len(keys)+len(vals))
	for i := range keys {
		dest = append(dest, &keys[i])
	}
	for i := range vals {
		dest = append(dest, &vals[i])
	}
	for rows.Next() {
		if err := rows.Scan(dest...); err != nil {
			return err
		}
		g := Group{Keys: make(map[string]string, len(by)), Requests: vals[0].Int64, Prompt: vals[1].Int64,
			Cached: vals[2].Int64, Output: vals[3].Int64, Cost: price.Micro(vals[4].Int64)}
		if g.Requests == 0 {
			continue
		}
		for i, b := range by {
			g.Keys[b] = keyString(b, keys[i])
		}
		add(g)
	}
	return rows.Err()
}

func ceilDiv(a, b int64) int64 { return -floorDiv(-a, b) }

func joinComma(cols []string, tail string) string {
	if len(cols) == 0 {
		return tail
	}
	return strings.Join(cols, ", ") + ", " + tail
}

// keyString writes a group's key: days and hours as UTC dates and times.
func keyString(by string, v any) string {
	var n int64
	switch x := v.(type) {
	case int64:
		n = x
	case float64:
		n = int64(x)
	case []byte:
		return string(x)
	case string:
		return x
	case nil:
		return ""
	default:
		return fmt.Sprint(x)
	}
	switch by {
	case "day":
		return time.UnixMicro(n * usPerDay).UTC().Format("2006-01-02")
	case "hour":
		return time.UnixMicro(n * usPerHour).UTC().Format(time.RFC3339)
	}
	return strconv.FormatInt(n, 10)
}
