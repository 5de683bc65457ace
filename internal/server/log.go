package server

import (
	"context"
	"log/slog"
	"time"

	"github.com/llproxy/llproxy/internal/metrics"
)

// requestLog is the one structured line logged per request. It holds no
// prompt text and no credentials.
type requestLog struct {
	route, model, method, path, outcome string
	prompt, cost, used, tries           int
	wait                                time.Duration
	start                               time.Time
}

func (s *Server) logRequest(ctx context.Context, ex *exchange, rec *requestLog) {
	if !s.log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	status := ex.status
	if status == 0 && rec.outcome == metrics.OutcomeCancelled {
		status = 499 // client closed the request while queued
	}
	attrs := [...]slog.Attr{
		slog.String("route", rec.route),
		slog.String("model", rec.model),
		slog.String("method", rec.method),
		slog.String("path", rec.path),
		slog.Int("status", status),
		slog.String("outcome", rec.outcome),
		slog.Int("prompt_tokens", rec.prompt),
		slog.Int("cost_tokens", rec.cost),
		slog.Int("used_tokens", rec.used),
		slog.Int("tries", rec.tries),
		slog.Float64("wait_ms", float64(rec.wait.Microseconds())/1000),
		slog.Float64("duration_ms", float64(time.Since(rec.start).Microseconds())/1000),
		slog.Int64("bytes", ex.written),
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "request", attrs[:]...)
}
