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

	"github.com/llproxy/llproxy/internal/price"
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
	dsn := "file:" + path + "?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)"
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

type hourKey struct {
	hour                          int64
	route, model, client, outcome string
}

type sums struct{ requests, prompt, cached, output, cost int64 }

// Insert writes rows, and adds them to their hours' sums, in one
// transaction.
func (s *sqlStore) Insert(ctx context.Context, rows []Row) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	ins, err := tx.PrepareContext(ctx, s.q(`INSERT INTO usage (ts, request_id, route, model, client, class, status, outcome,
		prompt, cached, output, cost_micro, wait_ms, latency_ms, backend, marked) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)`))
	if err != nil {
		return err
	}
	defer ins.Close()
	hours := map[hourKey]*sums{}
	for _, r := range rows {
		ts := r.Time.UnixMicro()
		marked := 0
		if r.Marked {
			marked = 1
		}
		if _, err := ins.ExecContext(ctx, ts, r.RequestID, r.Route, r.Model, r.Client, r.Class, r.Status, r.Outcome,
			r.Prompt, r.Cached, r.Output, int64(r.Cost), ms(r.Wait), ms(r.Latency), r.Backend, marked); err != nil {
			return err
		}
		k := hourKey{floorDiv(ts, usPerHour), r.Route, r.Model, r.Client, r.Outcome}
		h := hours[k]
		if h == nil {
			h = &sums{}
			hours[k] = h
		}
		h.requests++
		h.prompt += r.Prompt
		h.cached += r.Cached
		h.output += r.Output
		h.cost += int64(r.Cost)
	}
	up, err := tx.PrepareContext(ctx, s.q(`INSERT INTO usage_hourly (hour, route, model, client, outcome, requests, prompt, cached,
		output, cost_micro) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (hour, route, model, client, outcome) DO UPDATE SET
		requests = usage_hourly.requests + excluded.requests, prompt = usage_hourly.prompt + excluded.prompt,
		cached = usage_hourly.cached + excluded.cached, output = usage_hourly.output + excluded.output,
		cost_micro = usage_hourly.cost_micro + excluded.cost_micro`))
	if err != nil {
		return err
	}
	defer up.Close()
	for k, h := range hours {
		if _, err := up.ExecContext(ctx, k.hour, k.route, k.model, k.client, k.outcome, h.requests, h.prompt, h.cached,
			h.output, h.cost); err != nil {
			return err
		}
	}
	return tx.Commit()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && (a < 0) != (b < 0) {
		q--
	}
	return q
}

// Prune drops the rows and hours before t.
func (s *sqlStore) Prune(ctx context.Context, t time.Time) error {
	us := t.UnixMicro()
	if _, err := s.db.ExecContext(ctx, s.q(`DELETE FROM usage WHERE ts < ?`), us); err != nil {
		return err
	}
	_, err := s.db.ExecContext(ctx, s.q(`DELETE FROM usage_hourly WHERE hour < ?`), floorDiv(us, usPerHour))
	return err
}

// Sum sums the rows of q: from the hourly sums when q's bounds are whole
// hours, else from the rows.
func (s *sqlStore) Sum(ctx context.Context, q Query) ([]Group, error) {
	from, to := q.From.UnixMicro(), q.To.UnixMicro()
	hourly := from%usPerHour == 0 && to%usPerHour == 0
	var sel, group []string
	for _, by := range q.By {
		var expr string
		switch by {
		case "client", "model", "route", "outcome":
			expr = by
		case "hour":
			expr = "ts / " + strconv.FormatInt(usPerHour, 10)
			if hourly {
				expr = "hour"
			}
		case "day":
			expr = "ts / " + strconv.FormatInt(usPerDay, 10)
			if hourly {
				expr = "hour / 24"
			}
		default:
			return nil, fmt.Errorf("%w: cannot group by %q", ErrBadQuery, by)
		}
		sel = append(sel, expr)
		group = append(group, strconv.Itoa(len(group)+1))
	}
	var query string
	var args []any
	if hourly {
		query = `SELECT ` + joinComma(sel, `SUM(requests), SUM(prompt), SUM(cached), SUM(output), SUM(cost_micro)`) +
			` FROM usage_hourly WHERE hour >= ? AND hour < ?`
		args = []any{from / usPerHour, to / usPerHour}
	} else {
		query = `SELECT ` + joinComma(sel, `COUNT(*), SUM(prompt), SUM(cached), SUM(output), SUM(cost_micro)`) +
			` FROM usage WHERE ts >= ? AND ts < ?`
		args = []any{from, to}
	}
	if len(group) > 0 {
		query += ` GROUP BY ` + strings.Join(group, ", ") + ` ORDER BY ` + strings.Join(group, ", ")
	}
	rows, err := s.db.QueryContext(ctx, s.q(query), args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []Group{}
	for rows.Next() {
		keys := make([]any, len(q.By))
		vals := make([]sql.NullInt64, 5)
		dest := make([]any, 0, len(keys)+5)
		for i := range keys {
			dest = append(dest, &keys[i])
		}
		for i := range vals {
			dest = append(dest, &vals[i])
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		g := Group{Keys: map[string]string{}, Requests: vals[0].Int64, Prompt: vals[1].Int64, Cached: vals[2].Int64,
			Output: vals[3].Int64, Cost: price.Micro(vals[4].Int64)}
		if g.Requests == 0 {
			continue
		}
		for i, by := range q.By {
			g.Keys[by] = keyString(by, keys[i])
		}
		out = append(out, g)
	}
	return out, rows.Err()
}

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
