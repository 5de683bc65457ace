package server

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/ledger"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/route"
)

// The usage ledger's place in the gateway: opened once per process (a
// reload keeps it), handed every finished request by the routes and the
// front, summed by GET /usage, flushed at shutdown.

// openLedger opens the ledger the config asks for: usage.store, else
// usage.db next to the state file (when the config came from a file);
// nil when it is off.
func openLedger(cfg *config.Config, log *slog.Logger, reg prometheus.Registerer) (*ledger.Ledger, error) {
	store := cfg.Usage.Store
	if store == "" && cfg.StateFile == "" {
		return nil, nil // a config built without a file: no place for it
	}
	var st ledger.Store
	var err error
	switch {
	case store == "off":
		return nil, nil
	case store == "" || store == "sqlite":
		st, err = ledger.OpenSQLite(filepath.Join(filepath.Dir(cfg.StateFile), "usage.db"))
	case strings.HasPrefix(store, "sqlite:"):
		st, err = ledger.OpenSQLite(strings.TrimPrefix(store, "sqlite:"))
	default:
		st, err = ledger.OpenPostgres(store)
	}
	if err != nil {
		return nil, err
	}
	l, err := ledger.Open(st, cfg.Usage.KeepDays, log, reg)
	if err != nil {
		st.Close()
		return nil, err
	}
	log.Info("usage ledger", "store", st.Name(), "keepDays", cfg.Usage.KeepDays)
	return l, nil
}

// usageSink is the ledger as the routes take it: nil (not a nil pointer
// in an interface) when there is none.
func usageSink(l *ledger.Ledger) route.UsageSink {
	if l == nil {
		return nil
	}
	return l
}

// usage is GET /usage: the ledger's sums from..to (UTC; dates or RFC 3339
// instants, to inclusive) grouped by any of client, model, route,
// outcome, day, hour; JSON or CSV.
func (s *Server) usage(w http.ResponseWriter, r *http.Request) {
	if s.ledger == nil {
		openai.WriteError(w, http.StatusNotFound, "invalid_request_error", "usage_off",
			"llproxy keeps no usage ledger here (usage.store is off, or the config has no file to keep it beside).")
		return
	}
	p := r.URL.Query()
	q, err := ledger.ParseQuery(p.Get("from"), p.Get("to"), p.Get("by"), time.Now().UTC())
	if err != nil {
		openai.WriteError(w, http.StatusBadRequest, "invalid_request_error", "bad_query", err.Error())
		return
	}
	format := p.Get("format")
	if format != "" && format != "json" && format != "csv" {
		openai.WriteError(w, http.StatusBadRequest, "invalid_request_error", "bad_query", "format: want json or csv, got "+strconv.Quote(format))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	groups, err := s.ledger.Store().Sum(ctx, q)
	if err != nil {
		status := http.StatusServiceUnavailable
		if errors.Is(err, ledger.ErrBadQuery) {
			status = http.StatusBadRequest
		}
		w.Header()["Retry-After"] = []string{"5"}
		openai.WriteError(w, status, "server_error", "usage_unavailable", "llproxy could not read the usage ledger: "+err.Error())
		return
	}
	cols := append(append([]string(nil), q.By...), "requests", "promptTokens", "cachedTokens", "outputTokens", "costUsd")
	if format == "csv" {
		w.Header().Set("Content-Type", "text/csv; charset=utf-8")
		cw := csv.NewWriter(w)
		cw.Write(cols)
		for _, g := range groups {
			rec := make([]string, 0, len(cols))
			for _, by := range q.By {
				rec = append(rec, g.Keys[by])
			}
			rec = append(rec, strconv.FormatInt(g.Requests, 10), strconv.FormatInt(g.Prompt, 10), strconv.FormatInt(g.Cached, 10),
				strconv.FormatInt(g.Output, 10), g.Cost.Decimal())
			cw.Write(rec)
		}
		cw.Flush()
		return
	}
	rows := make([]map[string]any, 0, len(groups))
	for _, g := range groups {
		row := map[string]any{"requests": g.Requests, "promptTokens": g.Prompt, "cachedTokens": g.Cached,
			"outputTokens": g.Output, "costUsd": json.Number(g.Cost.Decimal())}
		for _, by := range q.By {
			row[by] = g.Keys[by]
		}
		rows = append(rows, row)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"from": q.From.Format(time.RFC3339Nano), "to": q.To.Add(-time.Microsecond).Format(time.RFC3339Nano),
		"by": q.By, "rows": rows})
}
