package ledger

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/pgtest"
	"github.com/llproxy/llproxy/internal/price"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func row(i int, at time.Time) Row {
	return Row{Time: at, RequestID: fmt.Sprint("r", i), Route: "openai", Model: []string{"gpt-4o", "gpt-4o-mini"}[i%2],
		Client: []string{"search", "evals", "interns"}[i%3], Class: "interactive", Outcome: "admitted", Status: 200,
		Prompt: 100, Cached: 10, Output: 20, Cost: price.Micro(i % 7), Wait: time.Millisecond, Latency: 2 * time.Millisecond}
}

// stores runs f on a fresh SQLite file and a fresh PostgreSQL database.
func stores(t *testing.T, f func(t *testing.T, open func() Store)) {
	t.Run("sqlite", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "usage.db")
		f(t, func() Store {
			s, err := OpenSQLite(path)
			require.NoError(t, err)
			return s
		})
	})
	t.Run("postgres", func(t *testing.T) {
		pg := pgtest.Start(t)
		f(t, func() Store {
			s, err := OpenPostgres(pg.URL())
			require.NoError(t, err)
			return s
		})
	})
}

// Rows written through the ledger are the rows added, and the sums read
// from the hourly rollup equal the sums of the rows (whole hours) as the
// rows' own (any bounds).
func TestLedgerWritesAndSums(t *testing.T) {
	stores(t, func(t *testing.T, open func() Store) {
		l, err := Open(open(), 400, quiet, prometheus.NewRegistry())
		require.NoError(t, err)
		base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
		want := map[string]int64{}
		var cost price.Micro
		for i := range 3000 {
			at := base.Add(time.Duration(i) * 37 * time.Minute / 10) // spread over about a week
			r := row(i, at)
			want[r.Client+"/"+r.Model]++
			cost += r.Cost
			l.Add(r)
		}
		require.NoError(t, l.Close(context.Background()))
		s := open()
		defer s.Close()
		q, err := ParseQuery("2026-12-01", "2026-12-31", "client,model", base)
		require.NoError(t, err)
		groups, err := s.Sum(context.Background(), q)
		require.NoError(t, err)
		got := map[string]int64{}
		var gotCost price.Micro
		for _, g := range groups {
			got[g.Keys["client"]+"/"+g.Keys["model"]] = g.Requests
			gotCost += g.Cost
			assert.Equal(t, g.Requests*100, g.Prompt)
		}
		assert.Equal(t, want, got)
		assert.Equal(t, cost, gotCost)

		// By day: from the rollup (whole hours) and from the rows
		// (instants) alike.
		q, _ = ParseQuery("2026-12-01", "2026-12-02", "day", base)
		byDay, err := s.Sum(context.Background(), q)
		require.NoError(t, err)
		q, _ = ParseQuery("2026-12-01T00:00:00Z", "2026-12-02T23:59:59.999999Z", "day", base)
		byDayRows, err := s.Sum(context.Background(), q)
		require.NoError(t, err)
		assert.Equal(t, byDay, byDayRows)
		require.Len(t, byDay, 2)
		assert.Equal(t, "2026-12-01", byDay[0].Keys["day"])

		// Retention: pruning drops the rows and hours before.
		require.NoError(t, s.Prune(context.Background(), base.Add(3*24*time.Hour)))
		q, _ = ParseQuery("2026-12-01", "2026-12-02", "day", base)
		gone, err := s.Sum(context.Background(), q)
		require.NoError(t, err)
		assert.Empty(t, gone)
	})
}

// Bad queries are refused, naming what is wrong.
func TestParseQuery(t *testing.T) {
	now := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	q, err := ParseQuery("", "", "", now)
	require.NoError(t, err)
	assert.Equal(t, time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC), q.From, "this month by default")
	assert.Equal(t, []string{"client", "model"}, q.By)
	q, err = ParseQuery("2026-12-01", "2026-12-31", "Day, client,day", now)
	require.NoError(t, err)
	assert.Equal(t, time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC), q.To, "to is inclusive: its whole day")
	assert.Equal(t, []string{"day", "client"}, q.By)
	for _, bad := range [][3]string{{"yesterday", "", ""}, {"", "2026-13-01", ""}, {"2026-12-05", "2026-12-01", ""}, {"", "", "team"}} {
		_, err := ParseQuery(bad[0], bad[1], bad[2], now)
		assert.ErrorIs(t, err, ErrBadQuery, bad)
	}
}

// A file that is not a SQLite database is refused, named, and left as it
// was.
func TestCorruptSQLiteIsRefusedNotOverwritten(t *testing.T) {
	path := filepath.Join(t.TempDir(), "usage.db")
	junk := []byte("this is not a database, it is somebody's notes\n")
	require.NoError(t, os.WriteFile(path, junk, 0o600))
	_, err := OpenSQLite(path)
	require.Error(t, err)
	assert.Contains(t, err.Error(), path)
	after, _ := os.ReadFile(path)
	assert.Equal(t, junk, after, "never overwritten")
}

// flaky fails every Insert while down.
type flaky struct {
	Store
	mu   sync.Mutex
	down bool
}

func (f *flaky) Insert(ctx context.Context, rows []Row) error {
	f.mu.Lock()
	down := f.down
	f.mu.Unlock()
	if down {
		return errors.New("connection refused")
	}
	return f.Store.Insert(ctx, rows)
}

// PostgreSQL killed in the middle of a run and back: rows wait in the
// buffer and are written when it answers; nothing is lost within it. Two
// ledgers (two replicas) write into the one database.
func TestPostgresAwayAndBack(t *testing.T) {
	pg := pgtest.Start(t)
	open := func() *Ledger {
		s, err := OpenPostgres(pg.URL())
		require.NoError(t, err)
		l, err := Open(s, 400, quiet, nil)
		require.NoError(t, err)
		return l
	}
	a, b := open(), open()
	base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	add := func(count int) {
		for range count {
			n++
			l := a
			if n%2 == 0 {
				l = b
			}
			l.Add(row(n, base.Add(time.Duration(n)*time.Second)))
		}
	}
	add(1000)
	require.Eventually(t, func() bool { return count(t, pg) == 1000 }, 10*time.Second, 50*time.Millisecond)
	pg.Stop()
	add(1500)
	require.Eventually(t, func() bool { return a.Err() != nil && b.Err() != nil }, 10*time.Second, 50*time.Millisecond,
		"both know the database is away")
	pg.Restart()
	add(500)
	require.Eventually(t, func() bool { return count(t, pg) == 3000 }, 20*time.Second, 100*time.Millisecond,
		"what was buffered is written")
	require.NoError(t, a.Close(context.Background()))
	require.NoError(t, b.Close(context.Background()))
	assert.Equal(t, 3000, count(t, pg))
}

func count(t *testing.T, pg *pgtest.Server) int {
	s, err := OpenPostgres(pg.URL())
	require.NoError(t, err)
	defer s.Close()
	q, _ := ParseQuery("2026-11-01", "2026-12-31", "route", time.Now())
	groups, err := s.Sum(context.Background(), q)
	if err != nil || len(groups) == 0 {
		return 0
	}
	return int(groups[0].Requests)
}

// The buffer is bounded: past MaxBuffered rows while the store is down,
// rows are dropped and counted; the rest are written when it is back.
func TestBufferIsBounded(t *testing.T) {
	s, err := OpenSQLite(filepath.Join(t.TempDir(), "usage.db"))
	require.NoError(t, err)
	f := &flaky{Store: s, down: true}
	reg := prometheus.NewRegistry()
	l, err := Open(f, 400, quiet, reg)
	require.NoError(t, err)
	base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	// Beyond the buffer by more than the inbox holds: whatever the inbox
	// drops when this loop outruns the writer, the buffer fills.
	const offered = MaxBuffered + 5000
	for i := range offered {
		l.Add(row(i, base))
		if i%100 == 0 {
			time.Sleep(time.Millisecond) // let the writer take them
		}
	}
	require.Eventually(t, func() bool { return len(l.in) == 0 }, 10*time.Second, time.Millisecond, "all taken or dropped")
	f.mu.Lock()
	f.down = false
	f.mu.Unlock()
	require.NoError(t, l.Close(context.Background()))
	s2, err := OpenSQLite(filepath.Join(filepath.Dir(pathOf(s)), "usage.db"))
	require.NoError(t, err)
	q, _ := ParseQuery("2026-12-01", "2026-12-01", "route", base)
	g, err := s2.Sum(context.Background(), q)
	require.NoError(t, err)
	require.Len(t, g, 1)
	assert.Equal(t, int64(offered)-int64(metricValue(t, reg, "llproxy_usage_rows_dropped_total")), g[0].Requests)
	assert.Equal(t, int64(MaxBuffered), g[0].Requests, "the buffer's worth kept")
}

func pathOf(s Store) string { return s.Name()[len("sqlite:"):] }

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

// stalled is a store whose writes wait until it is let go.
type stalled struct {
	Store
	gate chan struct{}
}

func (s *stalled) Insert(ctx context.Context, rows []Row) error {
	<-s.gate
	return s.Store.Insert(ctx, rows)
}

// A database that takes its time (a slow disk, a long prune) never holds
// up the rows: while a write is out, the writer goes on taking them, so
// more than the inbox holds arrive and none is dropped; all are written
// once it answers.
func TestASlowWriteDropsNothing(t *testing.T) {
	s, err := OpenSQLite(filepath.Join(t.TempDir(), "usage.db"))
	require.NoError(t, err)
	st := &stalled{Store: s, gate: make(chan struct{})}
	reg := prometheus.NewRegistry()
	l, err := Open(st, 400, quiet, reg)
	require.NoError(t, err)
	base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	const n = 12_000 // three inboxes, and more than an earlier one of 10,000
	for i := range n {
		l.Add(row(i, base))
		if i%100 == 0 {
			time.Sleep(100 * time.Microsecond) // requests arrive; they do not burst all at once
		}
	}
	require.Eventually(t, func() bool { return len(l.in) == 0 }, 10*time.Second, time.Millisecond, "taken while the write is out")
	assert.Zero(t, metricValue(t, reg, "llproxy_usage_rows_dropped_total"))
	close(st.gate)
	require.NoError(t, l.Close(context.Background()))
	s2, err := OpenSQLite(pathOf(s))
	require.NoError(t, err)
	defer s2.Close()
	q, _ := ParseQuery("2026-12-01", "2026-12-01", "route", base)
	g, err := s2.Sum(context.Background(), q)
	require.NoError(t, err)
	require.Len(t, g, 1)
	assert.Equal(t, int64(n), g[0].Requests)
}
