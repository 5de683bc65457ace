// Package ledger is the usage ledger: every finished request, the
// gateway's own refusals included, as one row (who, what, what it used
// and cost, how long it waited), written to a real database (embedded
// SQLite by default; PostgreSQL for replicas, which share one table), and
// summed on demand by client, model, route, outcome, day or hour.
//
// It exists so that the question "who spent what" has an exact answer
// without slowing a request: the request path hands a row to a bounded
// channel and goes on; a writer batches rows into one transaction a
// second (or every 500), keeps them in a bounded buffer while the
// database is away, and counts what overflows. Each batch also adds to an
// hourly rollup, which the sums read: a month of ten million rows sums in
// milliseconds.
package ledger

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/safe"
)

// Row is one finished request.
type Row struct {
	Time                            time.Time
	RequestID, Route, Model, Client string
	Class, Outcome, Backend         string
	Status                          int
	Prompt, Cached, Output          int64
	Cost                            price.Micro
	Wait, Latency                   time.Duration
	Marked                          bool // the upstream's usage was absurd and clamped
}

// Tuning of the writer.
const (
	// FlushEvery and FlushRows: a batch is written a second after its
	// first row, or at 500 rows.
	FlushEvery = time.Second
	FlushRows  = 500
	// MaxBuffered bounds the rows kept while the database is away; past
	// it, rows are dropped and counted.
	MaxBuffered = 100_000
	// inbox is the channel between requests and the writer, which takes
	// from it whatever the database is doing (see run): a second of the
	// gateway's fastest, each row about 200 bytes.
	inbox = 4096
)

// Store is a database the ledger writes to and sums from.
type Store interface {
	// Insert writes rows (and their rollup) in one transaction.
	Insert(ctx context.Context, rows []Row) error
	// Sum sums the rows of q.
	Sum(ctx context.Context, q Query) ([]Group, error)
	// Prune drops the rows before t.
	Prune(ctx context.Context, t time.Time) error
	// Ready prepares the database (creates or migrates its tables); it is
	// called until it succeeds.
	Ready(ctx context.Context) error
	Close() error
	// Name is the store as logs may name it (no password).
	Name() string
}

// Ledger takes rows from the request path and writes them. It is safe
// for concurrent use.
type Ledger struct {
	store    Store
	log      *slog.Logger
	keep     time.Duration
	in       chan Row
	stop     chan struct{}
	done     chan struct{}
	stopOnce sync.Once

	written, dropped prometheus.Counter
	buffered         prometheus.Gauge
	lastErr          atomic.Pointer[error]
	ready            atomic.Bool
}

// Open starts a ledger writing to store, keeping keepDays of rows (0:
// forever); its metrics go on reg (nil: none).
func Open(store Store, keepDays int, log *slog.Logger, reg prometheus.Registerer) (*Ledger, error) {
	l := &Ledger{store: store, log: log, keep: time.Duration(keepDays) * 24 * time.Hour, in: make(chan Row, inbox),
		stop: make(chan struct{}), done: make(chan struct{}),
		written: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "llproxy", Name: "usage_rows_written_total",
			Help: "Rows the usage ledger wrote to its database."}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "llproxy", Name: "usage_rows_dropped_total",
			Help: "Rows the usage ledger could not keep: its buffer was full while the database was away."}),
		buffered: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "llproxy", Name: "usage_rows_buffered",
			Help: "Rows waiting to be written (the database is away, or the batch is not due)."}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{l.written, l.dropped, l.buffered} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	l.prepare(context.Background())
	safe.Go(log, "usage ledger", l.run)
	return l, nil
}

// prepare readies the store, remembering why it could not.
func (l *Ledger) prepare(ctx context.Context) bool {
	if l.ready.Load() {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := l.store.Ready(ctx); err != nil {
		l.fail(fmt.Errorf("usage store %s: %w", l.store.Name(), err))
		return false
	}
	l.ready.Store(true)
	return true
}

func (l *Ledger) fail(err error) {
	if prev := l.lastErr.Swap(&err); prev == nil {
		l.log.Warn("usage ledger: rows are kept in memory until the database answers", "err", err)
	}
}

// Add hands a finished request's row to the writer. It never blocks: a
// row that finds the writer's inbox full is dropped and counted.
func (l *Ledger) Add(r Row) {
	if l == nil {
		return
	}
	select {
	case l.in <- r:
	default:
		l.dropped.Inc()
	}
}

// Err is why the database could not be written lately; nil when the last
// write succeeded.
func (l *Ledger) Err() error {
	if l == nil {
		return nil
	}
	if e := l.lastErr.Load(); e != nil {
		return *e
	}
	return nil
}

// Store is the ledger's store (for sums).
func (l *Ledger) Store() Store { return l.store }

// Close writes what is buffered (until ctx ends) and closes the store.
func (l *Ledger) Close(ctx context.Context) error {
	if l == nil {
		return nil
	}
	l.stopOnce.Do(func() { close(l.stop) })
	select {
	case <-l.done:
	case <-ctx.Done():
	}
	err := l.Err()
	if cerr := l.store.Close(); err == nil {
		err = cerr
	}
	return err
}

// run is the writer: it batches rows, writes them a second after the
// first or at FlushRows, keeps them while the database is away, prunes
// daily, and on Close writes what is left. A write (or a prune) runs in a
// goroutine of its own, one at a time, so that taking rows from the
// request path never waits for the database: what arrives meanwhile
// waits in pending (bounded by MaxBuffered), behind the rows out, not in
// the inbox, which stays small.
func (l *Ledger) run() {
	defer close(l.done)
	tick := time.NewTicker(FlushEvery)
	defer tick.Stop()
	var (
		pending   []Row // the oldest first; its first `writing` rows are with the write in flight
		lastPrune time.Time
		writing   = -1                // none in flight
		results   = make(chan int, 1) // how many rows a write wrote
	)
	take := func(r Row) {
		if len(pending) >= MaxBuffered {
			l.dropped.Inc()
			return
		}
		pending = append(pending, r) // past the rows out: the write only reads those
	}
	start := func(prune time.Time) {
		rows := pending[:len(pending):len(pending)]
		writing = len(rows)
		safe.Go(l.log, "usage ledger write", func() {
			n := 0
			defer func() { results <- n }() // even after a panic: the rest is kept
			n = len(rows) - len(l.write(context.Background(), rows))
			if !prune.IsZero() && n == len(rows) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if err := l.store.Prune(ctx, prune); err != nil {
					l.log.Warn("usage ledger: pruning failed", "err", err)
				}
			}
		})
	}
	back := func(n int) {
		writing = -1
		clear(pending[:n]) // their strings go
		pending = pending[n:]
		if len(pending) == 0 {
			pending = nil
		}
		l.buffered.Set(float64(len(pending)))
	}
	for {
		select {
		case r := <-l.in:
			take(r)
			if writing < 0 && len(pending) >= FlushRows && l.Err() == nil {
				start(time.Time{})
			}
		case n := <-results:
			back(n)
		case now := <-tick.C:
			l.buffered.Set(float64(len(pending)))
			if writing >= 0 {
				break
			}
			var prune time.Time
			if l.keep > 0 && now.Sub(lastPrune) > 24*time.Hour && l.Err() == nil {
				prune, lastPrune = now.Add(-l.keep), now
			}
			if len(pending) > 0 || !prune.IsZero() {
				start(prune)
			}
		case <-l.stop:
			if writing >= 0 {
				back(<-results)
			}
			for {
				select {
				case r := <-l.in:
					take(r)
					continue
				default:
				}
				break
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			pending = l.write(ctx, pending)
			cancel()
			l.buffered.Set(float64(len(pending)))
			if len(pending) > 0 {
				l.log.Error("usage ledger: rows not written at shutdown", "rows", len(pending), "err", l.Err())
			}
			return
		}
	}
}

// write writes rows in batches while the database takes them, and
// returns what it could not write.
func (l *Ledger) write(ctx context.Context, rows []Row) []Row {
	for len(rows) > 0 && l.prepare(ctx) {
		n := min(len(rows), FlushRows*10)
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := l.store.Insert(wctx, rows[:n])
		cancel()
		if err != nil {
			l.fail(fmt.Errorf("usage store %s: %w", l.store.Name(), err))
			break
		}
		if l.lastErr.Swap(nil) != nil {
			l.log.Info("usage ledger: the database answers again; buffered rows written", "rows", n)
		}
		l.written.Add(float64(n))
		rows = rows[n:]
	}
	return rows
}

// ErrBadQuery is a sum that cannot be asked.
var ErrBadQuery = errors.New("ledger: bad query")
