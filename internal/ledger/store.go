package ledger

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver
	_ "modernc.org/sqlite"             // the "sqlite" database/sql driver: pure Go, the static build stays
)

// sqlStore is the ledger in SQLite or PostgreSQL, through database/sql:
// the rows in usage, and their sums per hour in usage_hourly, which the
// sums read (a query whose bounds are not whole hours reads the rows).
type sqlStore struct {
	db       *sql.DB
	postgres bool
	name     string
}

// schemaVersion is the tables' version, kept in usage_schema.
const schemaVersion = 1

// OpenSQLite opens (or creates) the ledger in the SQLite file path. A file
// that is not a SQLite database, or is corrupt, is an error naming it: it
// is never overwritten.
func OpenSQLite(path string) (Store, error) {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return nil, fmt.Errorf("usage store sqlite:%s is a directory", path)
	}
	// A page cache of 512 KiB a connection (SQLite's default is 2 MiB):
	// the writer appends and the sums read the rollups, and every replica
	// carries it (llbench: 53 → 48 MiB peak RSS with the inbox below).
	dsn := "file:" + path + "?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=cache_size(-512)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("usage store sqlite:%s: %w", path, err)
	}
	var check string
	if err := db.QueryRow("PRAGMA quick_check").Scan(&check); err != nil || check != "ok" {
		db.Close()
		if err == nil {
			err = errors.New(check)
		}
		return nil, fmt.Errorf("usage store sqlite:%s is not a usable SQLite database (%v): move it away or fix it; llproxy never overwrites it", path, err)
	}
	s := &sqlStore{db: db, name: "sqlite:" + path}
	if err := s.Ready(context.Background()); err != nil {
		db.Close()
		return nil, fmt.Errorf("usage store sqlite:%s: %w", path, err)
	}
	return s, nil
}

// OpenPostgres opens the ledger in the PostgreSQL database at dsn. It does
// not connect: a database that is away at start is waited for (Ready).
func OpenPostgres(dsn string) (Store, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, fmt.Errorf("usage store %s: %w", redact(dsn), err)
	}
	db.SetMaxOpenConns(4)
	return &sqlStore{db: db, postgres: true, name: redact(dsn)}, nil
}

// redact is a database URL without its password.
func redact(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return "postgres://..."
	}
	return u.Redacted()
}

func (s *sqlStore) Name() string { return s.name }
func (s *sqlStore) Close() error { return s.db.Close() }

// q writes a query's placeholders for the database: ? for SQLite, $n for
// PostgreSQL.
func (s *sqlStore) q(query string) string {
	if !s.postgres {
		return query
	}
	var b strings.Builder
	n := 0
	for _, c := range query {
		if c == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(c)
	}
	return b.String()
}

// Ready creates the tables, or migrates them to schemaVersion.
func (s *sqlStore) Ready(ctx context.Context) error {
	real := "REAL"
	if s.postgres {
		real = "DOUBLE PRECISION"
	}
	stmts := []string{
		`CREATE TABLE IF NOT EXISTS usage_schema (version INTEGER NOT NULL)`,
		`CREATE TABLE IF NOT EXISTS usage (
			ts BIGINT NOT NULL, request_id TEXT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL,
			client TEXT NOT NULL, class TEXT NOT NULL, status INTEGER NOT NULL, outcome TEXT NOT NULL,
			prompt BIGINT NOT NULL, cached BIGINT NOT NULL, output BIGINT NOT NULL, cost_micro BIGINT NOT NULL,
			wait_ms ` + real + ` NOT NULL, latency_ms ` + real + ` NOT NULL, backend TEXT NOT NULL, marked INTEGER NOT NULL)`,
		`CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts)`,
		`CREATE TABLE IF NOT EXISTS usage_hourly (
			hour BIGINT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL, client TEXT NOT NULL, outcome TEXT NOT NULL,
			requests BIGINT NOT NULL, prompt BIGINT NOT NULL, cached BIGINT NOT NULL, output BIGINT NOT NULL,
			cost_micro BIGINT NOT NULL, PRIMARY KEY (hour, route, model, client, outcome))`,
		`CREATE TABLE IF NOT EXISTS usage_daily (
			day BIGINT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL, client TEXT NOT NULL, outcome TEXT NOT NULL,
			requests BIGINT NOT NULL, prompt BIGINT NOT NULL, cached BIGINT NOT NULL, output BIGINT NOT NULL,
			cost_micro BIGINT NOT NULL, PRIMARY KEY (day, route, model, client, outcome))`,
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	for _, st := range stmts {
		if _, err := tx.ExecContext(ctx, st); err != nil {
			return err
		}
	}
	var v int
	switch err := tx.QueryRowContext(ctx, `SELECT version FROM usage_schema`).Scan(&v); {
	case errors.Is(err, sql.ErrNoRows):
		if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO usage_schema (version) VALUES (?)`), schemaVersion); err != nil {
			return err
		}
	case err != nil:
		return err
	case v > schemaVersion:
		return fmt.Errorf("its tables are of version %d, newer than this llproxy's %d", v, schemaVersion)
	}
	return tx.Commit()
}

const (
	usPerHour = int64(time.Hour / time.Microsecond)
	usPerDay  = 24 * usPerHour
)

// rollupKey is a group of a rollup table: its period (an hour or a day
// since the epoch) and the row's keys.
type rollupKey struct {
	at                            int64
	route, model, client, outcome string
}

type sums struct{ requests, prompt, cached, output, cost int64 }

func (a *sums) add(b sums) {
	a.requests, a.prompt, a.cached, a.output, a.cost = a.requests+b.requests, a.prompt+b.prompt,
		a.cached+b.cached, a.output+b.output, a.cost+b.cost
}

// Insert writes rows, and adds them to their hours' and days' sums, in
// one transaction.
func (s *sqlStore) Insert(ctx context.Context, rows []Row) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	hours, days := map[rollupKey]*sums{}, map[rollupKey]*sums{}
	for _, r := range rows {
		ts := r.Time.UnixMicro()
		one := sums{1, r.Prompt, r.Cached, r.Output, int64(r.Cost)}
		for _, t := range [...]struct {
			m    map[rollupKey]*sums
			unit int64
		}{{hours, usPerHour}, {days, usPerDay}} {
			k := rollupKey{floorDiv(ts, t.unit), r.Route, r.Model, r.Client, r.Outcome}
			if t.m[k] == nil {
				t.m[k] = &sums{}
			}
			t.m[k].add(one)
		}
	}
	// The rows go insertChunk at a time, one statement each: a statement
	// per row costs SQLite more in binding and stepping than the row.
	args := make([]any, 0, insertChunk*rowColumns)
	// The few names rows repeat (route, model, client, ...) are boxed
	// once per batch, not once per row.
	boxed := map[string]any{}
	box := func(v string) any {
		b, ok := boxed[v]
		if !ok {
			b = v
			boxed[v] = b
		}
		return b
	}
	var full *sql.Stmt
	for len(rows) > 0 {
		n := min(len(rows), insertChunk)
		args = args[:0]
		for _, r := range rows[:n] {
			marked := 0
			if r.Marked {
				marked = 1
			}
			args = append(args, r.Time.UnixMicro(), r.RequestID, box(r.Route), box(r.Model), box(r.Client), box(r.Class),
				r.Status, box(r.Outcome), r.Prompt, r.Cached, r.Output, int64(r.Cost), ms(r.Wait), ms(r.Latency),
				box(r.Backend), marked)
		}
		rows = rows[n:]
		if n == insertChunk {
			if full == nil {
				if full, err = tx.PrepareContext(ctx, s.insertRows(n)); err != nil {
					return err
				}
				defer full.Close()
			}
			_, err = full.ExecContext(ctx, args...)
		} else {
			_, err = tx.ExecContext(ctx, s.insertRows(n), args...)
		}
		if err != nil {
			return err
		}
	}
	if err := s.rollup(ctx, tx, "usage_hourly", "hour", hours); err != nil {
		return err
	}
	if err := s.rollup(ctx, tx, "usage_daily", "day", days); err != nil {
		return err
	}
	return tx.Commit()
}

// insertChunk is how many rows one INSERT writes (× rowColumns
// parameters: within SQLite's 32,766 and PostgreSQL's 65,535).
const (
	insertChunk = 100
	rowColumns  = 16
)

// insertRows is the INSERT of n rows.
func (s *sqlStore) insertRows(n int) string {
	var b strings.Builder
	b.WriteString(`INSERT INTO usage (ts, request_id, route, model, client, class, status, outcome, prompt, cached, output,
		cost_micro, wait_ms, latency_ms, backend, marked) VALUES `)
	for i := range n {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString("(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
	}
	return s.q(b.String())
}

// rollup adds sums to a rollup table's groups.
func (s *sqlStore) rollup(ctx context.Context, tx *sql.Tx, table, at string, groups map[rollupKey]*sums) error {
	up, err := tx.PrepareContext(ctx, s.q(`INSERT INTO `+table+` (`+at+`, route, model, client, outcome, requests, prompt,
		cached, output, cost_micro) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (`+at+`, route, model, client, outcome) DO UPDATE SET
		requests = `+table+`.requests + excluded.requests, prompt = `+table+`.prompt + excluded.prompt,
		cached = `+table+`.cached + excluded.cached, output = `+table+`.output + excluded.output,
		cost_micro = `+table+`.cost_micro + excluded.cost_micro`))
	if err != nil {
		return err
	}
	defer up.Close()
	for k, h := range groups {
		if _, err := up.ExecContext(ctx, k.at, k.route, k.model, k.client, k.outcome, h.requests, h.prompt, h.cached,
			h.output, h.cost); err != nil {
			return err
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// Prune drops the rows, hours and days before t's day (so that every
// day kept is whole in each table).
func (s *sqlStore) Prune(ctx context.Context, t time.Time) error {
	day := floorDiv(t.UnixMicro(), usPerDay)
	for _, d := range [...]struct {
		query string
		arg   int64
	}{{`DELETE FROM usage WHERE ts < ?`, day * usPerDay}, {`DELETE FROM usage_hourly WHERE hour < ?`, day * 24},
		{`DELETE FROM usage_daily WHERE day < ?`, day}} {
		if _, err := s.db.ExecContext(ctx, s.q(d.query), d.arg); err != nil {
			return err
		}
	}
	return nil
}
