package ledger

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/price"
)

// Sums over any bounds (instants inside hours, whole hours, dates) and
// any grouping equal the sums of the rows themselves, though whole hours
// are read from the rollup and only the ends from the rows.
func TestSumsEqualTheRowsForAnyBounds(t *testing.T) {
	stores(t, func(t *testing.T, open func() Store) {
		s := open()
		defer s.Close()
		require.NoError(t, s.Ready(context.Background()))
		rng := rand.New(rand.NewPCG(1, 2))
		base := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
		span := 6 * 24 * time.Hour
		var rows []Row
		for i := range 2000 {
			r := row(i, base.Add(time.Duration(rng.Int64N(int64(span)))))
			r.Outcome = []string{"admitted", "rejected_wait"}[rng.IntN(2)]
			r.Prompt, r.Output, r.Cost = rng.Int64N(1000), rng.Int64N(500), price.Micro(rng.Int64N(10_000))
			rows = append(rows, r)
		}
		require.NoError(t, s.Insert(context.Background(), rows))
		groupings := []string{"", "client", "day", "hour", "client,model", "day,client", "outcome,route,hour"}
		for range 60 {
			a := base.Add(time.Duration(rng.Int64N(int64(span))))
			b := base.Add(time.Duration(rng.Int64N(int64(span))))
			if rng.IntN(3) == 0 {
				a = a.Truncate(time.Hour) // a whole hour at one end
			}
			if b.Before(a) {
				a, b = b, a
			}
			by := groupings[rng.IntN(len(groupings))]
			q, err := ParseQuery(a.Format(time.RFC3339Nano), b.Format(time.RFC3339Nano), by, base)
			require.NoError(t, err)
			got, err := s.Sum(context.Background(), q)
			require.NoError(t, err)
			assert.Equal(t, bruteSum(rows, q), sumsByKey(q, got), "%s..%s by %q", a, b, by)
		}
	})
}

// bruteSum sums rows in q's bounds by q.By in Go.
func bruteSum(rows []Row, q Query) map[string]Group {
	out := map[string]Group{}
	for _, r := range rows {
		if r.Time.Before(q.From) || !r.Time.Before(q.To) {
			continue
		}
		keys := map[string]string{}
		for _, by := range q.By {
			switch by {
			case "client":
				keys[by] = r.Client
			case "model":
				keys[by] = r.Model
			case "route":
				keys[by] = r.Route
			case "outcome":
				keys[by] = r.Outcome
			case "day":
				keys[by] = r.Time.UTC().Format("2006-01-02")
			case "hour":
				keys[by] = r.Time.UTC().Truncate(time.Hour).Format(time.RFC3339)
			}
		}
		k := groupKey(q.By, keys)
		g := out[k]
		g.Keys = keys
		g.Requests++
		g.Prompt += r.Prompt
		g.Cached += r.Cached
		g.Output += r.Output
		g.Cost += r.Cost
		out[k] = g
	}
	return out
}

func sumsByKey(q Query, groups []Group) map[string]Group {
	out := map[string]Group{}
	for _, g := range groups {
		out[groupKey(q.By, g.Keys)] = g
	}
	return out
}

// BenchmarkSumMonth sums a month of LLPROXY_BENCH_ROWS rows (default ten
// million: 40 clients, 6 models, 2 routes, 3 outcomes, spread evenly over
// December) on SQLite, as GET /usage does: the month by client and model,
// by day, and up to now (an instant: the last partial hour from the rows).
// The rows are generated once into a file kept in the system's temp
// directory (minutes for ten million), then reused.
func BenchmarkSumMonth(b *testing.B) {
	n := 10_000_000
	if v, err := strconv.Atoi(os.Getenv("LLPROXY_BENCH_ROWS")); err == nil && v > 0 {
		n = v
	}
	path := filepath.Join(os.TempDir(), fmt.Sprintf("llproxy-bench-usage-%d.db", n))
	if _, err := os.Stat(path); err != nil {
		generate(b, path+".tmp", n)
		require.NoError(b, os.Rename(path+".tmp", path))
	}
	s, err := OpenSQLite(path)
	require.NoError(b, err)
	defer s.Close()
	require.NoError(b, s.Ready(context.Background()))
	now := time.Date(2026, 12, 31, 17, 42, 13, 0, time.UTC)
	for _, c := range []struct{ name, from, to, by string }{
		{"month-by-client-model", "2026-12-01", "2026-12-31", "client,model"},
		{"month-by-day", "2026-12-01", "2026-12-31", "day"},
		{"month-until-now-by-client", "2026-12-01", "", "client"},
		{"one-day-by-hour-from-instants", "2026-12-15T09:30:00Z", "2026-12-16T09:30:00Z", "hour"},
	} {
		b.Run(c.name, func(b *testing.B) {
			q, err := ParseQuery(c.from, c.to, c.by, now)
			require.NoError(b, err)
			var groups []Group
			for b.Loop() {
				groups, err = s.Sum(context.Background(), q)
				require.NoError(b, err)
			}
			total := int64(0)
			for _, g := range groups {
				total += g.Requests
			}
			b.ReportMetric(float64(total), "rows")
		})
	}
}

// generate writes n rows spread evenly over December 2026 into a new
// SQLite file through Insert (so the rollup is the one the gateway
// writes), 50,000 rows a transaction.
func generate(b *testing.B, path string, n int) {
	os.Remove(path)
	s, err := OpenSQLite(path)
	require.NoError(b, err)
	defer s.Close()
	ctx := context.Background()
	require.NoError(b, s.Ready(ctx))
	start := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	step := 31 * 24 * time.Hour / time.Duration(n)
	rng := rand.New(rand.NewPCG(3, 4))
	batch := make([]Row, 0, 50_000)
	models := []string{"gpt-4o", "gpt-4o-mini", "gpt-4.1", "o4-mini", "claude-sonnet-4-5", "claude-haiku-4-5"}
	outcomes := []string{"admitted", "admitted", "admitted", "admitted", "rejected_wait", "bad_request"}
	for i := range n {
		m := rng.IntN(len(models))
		batch = append(batch, Row{Time: start.Add(time.Duration(i) * step), RequestID: "req_" + strconv.Itoa(i),
			Route: []string{"openai", "claude"}[m/4], Model: models[m], Client: "team-" + strconv.Itoa(rng.IntN(40)),
			Class: "interactive", Status: 200, Outcome: outcomes[rng.IntN(len(outcomes))], Prompt: rng.Int64N(4000),
			Cached: rng.Int64N(1000), Output: rng.Int64N(800), Cost: price.Micro(rng.Int64N(20_000)),
			Wait: time.Duration(rng.Int64N(int64(time.Second))), Latency: time.Duration(rng.Int64N(int64(5 * time.Second)))})
		if len(batch) == cap(batch) || i == n-1 {
			require.NoError(b, s.Insert(ctx, batch))
			batch = batch[:0]
		}
	}
}
