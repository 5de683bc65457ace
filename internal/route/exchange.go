package route

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/llproxy/llproxy/internal/anthropic"
	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/ledger"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/internal/ticket"
	"github.com/llproxy/llproxy/provider"
)

// exchange wraps the client's ResponseWriter for one request. When the
// status is written it sets the gateway's x-ratelimit-* headers (replacing
// the upstream's: the client is limited by the gateway's buckets) and
// X-Accel-Buffering: no on event streams, and it records what the request's
// log line and metrics need.
type exchange struct {
	http.ResponseWriter
	say      dialect // the route's: how its own answers and headers are written
	reqID    bool    // every answer carries a request-id (Anthropic's)
	status   int
	headerAt time.Time
	written  int64

	// For a scheduled request, set by schedule and read by the send loop.
	t          *ticket.Ticket  // its ticket, once admitted
	ticket     ticket.Ticket   // what t points to: pooled with the exchange
	backend    string          // the fleet backend of the last send
	who        *metrics.Client // its client's series
	tries      int             // sends so far
	latency    time.Duration   // the last send's time to the upstream's headers
	maxRetries int
	backoff    time.Duration
	strip      bool // include_usage was injected: strip it from the stream

	// The answer being handed on and not settled yet: settled by the send
	// loop when the answer is done, or by schedule's deferred step when
	// the copy ends in a panic (the client cut the stream).
	delivering attempt
	unsettled  bool

	// The body with a backend's own model id (if it differs from the
	// client's name).
	renamed *request.Body

	// The taps themselves, kept with the pooled exchange so their buffers
	// are reused.
	bodyTap   provider.BodyTap
	streamTap provider.StreamTap
}

// usageSource is a response body tap that knows the usage once read.
type usageSource interface {
	Usage() (provider.Usage, bool)
	// Relayed is what reached the client so far: chunks and bytes.
	Relayed() (chunks int, bytes int64)
}

var exchangePool = sync.Pool{New: func() any { return new(exchange) }}

func getExchange(w http.ResponseWriter) *exchange {
	ex := exchangePool.Get().(*exchange)
	ex.ResponseWriter = w
	return ex
}

func putExchange(ex *exchange) {
	if ex.renamed != nil {
		ex.renamed.Release()
	}
	bt, st, tk := ex.bodyTap, ex.streamTap, ex.ticket
	bt.Reset(nil)
	st.Reset(nil, false)
	tk.Reset()
	*ex = exchange{bodyTap: bt, streamTap: st, ticket: tk}
	exchangePool.Put(ex)
}

func (ex *exchange) WriteHeader(code int) {
	if code < 200 { // 1xx: informational, the real status follows
		ex.ResponseWriter.WriteHeader(code)
		return
	}
	if ex.status != 0 {
		return
	}
	ex.status = code
	ex.headerAt = time.Now()
	h := ex.Header()
	if st, ok := ex.t.Rate(); ok {
		ex.say.RateHeaders(h, st)
	}
	if ex.reqID {
		anthropic.RequestID(h)
	}
	if ex.t.Local() {
		h["X-Llproxy-Limits"] = []string{"local"}
	}
	if ct := h["Content-Type"]; len(ct) > 0 && strings.HasPrefix(ct[0], "text/event-stream") {
		h["X-Accel-Buffering"] = []string{"no"}
	}
	ex.ResponseWriter.WriteHeader(code)
}

func (ex *exchange) Write(p []byte) (int, error) {
	if ex.status == 0 {
		ex.WriteHeader(http.StatusOK)
	}
	n, err := ex.ResponseWriter.Write(p)
	ex.written += int64(n)
	return n, err
}

// Flush sends what is buffered to the client now; streams depend on it.
func (ex *exchange) Flush() {
	if ex.status == 0 {
		ex.WriteHeader(http.StatusOK)
	}
	if f, ok := ex.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the connection.
func (ex *exchange) Unwrap() http.ResponseWriter { return ex.ResponseWriter }

// requestLog is the one structured line logged per request. It holds no
// prompt text and no credentials.
type requestLog struct {
	route, client, model, method, path string
	class                              string
	outcome, id, remote, backend       string
	prompt, cost, used, tries          int
	promptUsed, cached, output         int         // as the upstream reported them (or, cut short, counted and relayed)
	money                              price.Micro // what it cost
	absurd                             bool        // the upstream's usage was beyond belief, clamped
	wait                               time.Duration
	start                              time.Time
	series                             *metrics.Model // its model's, once it reached the queue
}

// countOutcome counts a request's outcome once, where it is logged: one
// that reached its model's queue and was not admitted (an admission is
// counted as it happens, with its wait; one that later fails or is cut
// stays counted as admitted, except a rejected_upstream or a cancellation
// during a requeue, which are counted as well), in the model's series and
// its client's; a forbidden one in its client's.
func (rt *Route) countOutcome(rec *requestLog, who *clients.Client) {
	switch rec.outcome {
	case metrics.OutcomeForbidden:
	case metrics.OutcomeAdmitted, outcomeAborted:
		return
	default:
		if rec.series == nil {
			return // never reached a queue: bad input, unknown model, passthrough
		}
		rec.series.Outcome(rec.outcome)
	}
	rt.clients[who.ID].Outcome(rec.outcome)
}

func (rt *Route) logRequest(ctx context.Context, ex *exchange, rec *requestLog) {
	status := ex.status
	if status == 0 && rec.outcome == metrics.OutcomeCancelled {
		status = 499 // client closed the request while queued
	}
	rt.answers.Count(status)
	rt.record(ex, rec, status)
	if !rt.log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	attrs := [...]slog.Attr{
		slog.String("request_id", rec.id),
		slog.String("route", rec.route),
		slog.String("model", rec.model),
		slog.String("client", rec.client),
		slog.String("class", rec.class),
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
		slog.String("backend", rec.backend),
		slog.String("remote", rec.remote),
	}
	rt.log.LogAttrs(ctx, slog.LevelInfo, "request", attrs[:]...)
}

// record hands the request's row to the usage ledger: every finished
// request, refused or answered, with what it used and cost (an error
// costs 0).
func (rt *Route) record(ex *exchange, rec *requestLog, status int) {
	if rt.opts.Usage == nil {
		return
	}
	prompt := rec.promptUsed
	if prompt == 0 {
		prompt = rec.prompt
	}
	rt.opts.Usage.Add(ledger.Row{Time: time.Now(), RequestID: rec.id, Route: rec.route, Model: rec.model, Client: rec.client,
		Class: rec.class, Outcome: rec.outcome, Backend: rec.backend, Status: status, Prompt: int64(prompt),
		Cached: int64(rec.cached), Output: int64(rec.output), Cost: rec.money, Wait: rec.wait, Latency: ex.latency,
		Marked: rec.absurd})
}
