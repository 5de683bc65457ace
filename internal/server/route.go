package server

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// route serves /<name>/...: it counts and schedules each request that names
// a model, then forwards it.
type route struct {
	name    string
	srv     *Server
	cfg     *config.Route
	set     *scheduler.Set
	listed  map[string]*modelState // immutable after New: read without a lock
	dynamic sync.Map               // wildcard models: string -> *modelState
	forward http.Handler
	noModel prometheus.Counter // requests that name no model
}

// modelState is what the hot path needs of one (route, model).
type modelState struct {
	q                *scheduler.Queue
	m                *metrics.Model
	defaultMaxTokens int
}

// modelFor returns the state of model, creating a wildcard queue on first
// use.
func (rt *route) modelFor(model string) (*modelState, error) {
	if ms, ok := rt.listed[model]; ok {
		return ms, nil
	}
	if ms, ok := rt.dynamic.Load(model); ok {
		return ms.(*modelState), nil
	}
	q, err := rt.set.Queue(model)
	if err != nil {
		return nil, err
	}
	ms, _ := rt.dynamic.LoadOrStore(model, rt.newModelState(q, rt.cfg.Models[scheduler.Wildcard]))
	return ms.(*modelState), nil
}

func (rt *route) newModelState(q *scheduler.Queue, mc *config.Model) *modelState {
	return &modelState{q: q, m: rt.srv.metrics.Model(rt.name, q.Model()), defaultMaxTokens: mc.DefaultMaxTokens}
}

// outcomePassthrough is the log outcome of a request that names no model.
const outcomePassthrough = "passthrough"

// maxModelName bounds a model name: it becomes a queue and a metric label.
const maxModelName = 256

// estimate is a request's counted cost.
type estimate struct {
	prompt, maxOutput, n, cost int
}

// endpointOf maps a request path to the API whose body it carries.
func endpointOf(path string) tokenizer.Endpoint {
	switch {
	case strings.HasSuffix(path, "/chat/completions"):
		return tokenizer.EndpointChat
	case strings.HasSuffix(path, "/completions"):
		return tokenizer.EndpointCompletions
	case strings.HasSuffix(path, "/embeddings"):
		return tokenizer.EndpointEmbeddings
	case strings.HasSuffix(path, "/responses"):
		return tokenizer.EndpointResponses
	}
	return tokenizer.EndpointOther
}

// estimateCost is prompt tokens + n x max output tokens. Max output is the
// first positive of max_completion_tokens, max_tokens and max_output_tokens,
// else the model's defaultMaxTokens; embeddings have none. n is
// max(n, best_of), at least 1.
func (rt *route) estimateCost(path, model string, v *fastjson.Value, ms *modelState) estimate {
	ep := endpointOf(path)
	e := estimate{prompt: rt.srv.tok.PromptTokens(ep, model, v), n: 1}
	if ep != tokenizer.EndpointEmbeddings {
		e.maxOutput = ms.defaultMaxTokens
		for _, k := range [...]string{"max_completion_tokens", "max_tokens", "max_output_tokens"} {
			if n := v.GetInt(k); n > 0 {
				e.maxOutput = n
				break
			}
		}
	}
	e.n = max(1, v.GetInt("n"), v.GetInt("best_of"))
	cost := int64(e.prompt) + int64(e.n)*int64(e.maxOutput)
	e.cost = int(min(cost, math.MaxInt32))
	return e
}

// serve is the request path: read and parse the body, count, admit,
// forward. Each step that fails answers in OpenAI's error shape and sends
// nothing upstream.
func (rt *route) serve(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	ex := getExchange(w)
	rec := requestLog{route: rt.name, method: r.Method, path: r.URL.Path, start: start}
	defer func() {
		p := recover()
		if p == http.ErrAbortHandler {
			rec.outcome = "aborted" // the upstream or the client broke off mid-stream
		}
		rt.srv.logRequest(r.Context(), ex, &rec)
		putExchange(ex)
		if p != nil {
			panic(p)
		}
	}()

	var body *bodyBuf
	if r.Body != nil && r.Body != http.NoBody && r.Method != http.MethodGet && r.Method != http.MethodHead {
		var err error
		body, err = readBody(r, rt.srv.cfg.MaxBodyBytes)
		switch {
		case errors.Is(err, errBodyTooLarge):
			writeError(ex, http.StatusRequestEntityTooLarge, "invalid_request_error", "request_too_large",
				"Request body too large: the limit is "+itoa(rt.srv.cfg.MaxBodyBytes)+" bytes.")
			return
		case err != nil:
			rec.outcome = "body_error"
			writeError(ex, http.StatusBadRequest, "invalid_request_error", "", "Could not read the request body.")
			return
		}
		defer body.release()
	}

	var ms *modelState
	var est estimate
	if body != nil && looksJSON(r.Header.Get("Content-Type"), body.buf) {
		var ok bool
		if ms, est, ok = rt.inspect(ex, r.URL.Path, body.buf, &rec); !ok {
			return
		}
	}

	if ms == nil {
		rec.outcome = outcomePassthrough
		rt.noModel.Inc()
		if body != nil {
			body.attach(r)
			defer r.Body.Close()
		}
		rt.forward.ServeHTTP(ex, r)
		return
	}

	rec.prompt, rec.cost = est.prompt, est.cost
	adm, err := ms.q.Acquire(r.Context(), scheduler.Cost{Tokens: est.cost})
	if err != nil {
		rec.outcome = rt.writeAcquireError(ex, r.Context(), ms, err)
		return
	}
	rec.outcome, rec.wait = metrics.OutcomeAdmitted, adm.Wait
	ms.m.Admitted(adm.Wait, est.prompt, est.cost)
	ex.rate, ex.hasRate = adm.State, true
	body.attach(r)
	defer r.Body.Close()
	ms.m.Inflight(1)
	defer ms.m.Inflight(-1)
	admitted := time.Now()
	defer func() {
		status := ex.status
		if ex.upstreamErr != nil {
			status = 0
		}
		if r.Context().Err() == nil || status != 0 {
			ms.m.Upstream(status, ex.headerAt.Sub(admitted))
		}
	}()
	rt.forward.ServeHTTP(ex, r)
}

// inspect parses a JSON body once, finds its model's queue and counts its
// cost. A body without a model gives a nil state. On bad input it answers
// the client and returns ok false.
func (rt *route) inspect(w http.ResponseWriter, path string, body []byte, rec *requestLog) (ms *modelState, est estimate, ok bool) {
	p := rt.srv.parsers.Get()
	defer rt.srv.parsers.Put(p)
	v, err := p.ParseBytes(body)
	if err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "",
			"We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
		return nil, est, false
	}
	mv := v.Get("model")
	if mv == nil {
		return nil, est, true
	}
	if mv.Type() != fastjson.TypeString || len(mv.GetStringBytes()) > maxModelName {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "",
			"'model' must be a string of at most "+itoa(maxModelName)+" bytes.")
		return nil, est, false
	}
	rec.model = string(mv.GetStringBytes())
	if ms, err = rt.modelFor(rec.model); err != nil {
		rt.writeModelError(w, rec.model, err)
		return nil, est, false
	}
	return ms, rt.estimateCost(path, rec.model, v, ms), true
}

// writeAcquireError answers a request the scheduler did not admit and
// returns its outcome.
func (rt *route) writeAcquireError(w http.ResponseWriter, ctx context.Context, ms *modelState, err error) string {
	var re *scheduler.RejectError
	outcome := metrics.OutcomeCancelled
	switch {
	case errors.As(err, &re):
		switch {
		case errors.Is(err, scheduler.ErrTooLarge):
			outcome = metrics.OutcomeRejectTooLarge
		case errors.Is(err, scheduler.ErrQueueFull):
			outcome = metrics.OutcomeRejectQueueFull
		default:
			outcome = metrics.OutcomeRejectWait
		}
		writeReject(w, rt.name, re)
	case errors.Is(err, scheduler.ErrClosed):
		outcome = metrics.OutcomeShuttingDown
		w.Header()["Retry-After"] = []string{"1"}
		writeError(w, http.StatusServiceUnavailable, "server_error", "service_unavailable", "llproxy is shutting down; retry on another instance.")
	case ctx.Err() != nil:
		// The client left while queued: nothing was sent upstream and
		// nobody is left to answer.
	default:
		writeError(w, http.StatusInternalServerError, "server_error", "", "llproxy: "+err.Error())
	}
	ms.m.Outcome(outcome)
	return outcome
}

func (rt *route) writeModelError(w http.ResponseWriter, model string, err error) {
	if errors.Is(err, scheduler.ErrTooManyModels) {
		writeError(w, http.StatusServiceUnavailable, "server_error", "too_many_models",
			"llproxy route "+rt.name+" already queues its limit of distinct models; the model `"+model+"` cannot get a queue.")
		return
	}
	writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found",
		"The model `"+model+"` does not exist or you do not have access to it. llproxy route "+rt.name+
			" serves: "+strings.Join(rt.set.Models(), ", ")+".")
}

// requestLog is the one structured line logged per request. It holds no
// prompt text and no credentials.
type requestLog struct {
	route, model, method, path, outcome string
	prompt, cost                        int
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
		slog.Float64("wait_ms", float64(rec.wait.Microseconds())/1000),
		slog.Float64("duration_ms", float64(time.Since(rec.start).Microseconds())/1000),
		slog.Int64("bytes", ex.written),
	}
	s.log.LogAttrs(ctx, slog.LevelInfo, "request", attrs[:]...)
}
