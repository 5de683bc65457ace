package server

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/provider"
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
	up      outbound
	noModel prometheus.Counter // requests that name no model
	handler http.Handler       // serve, behind the client-key check
	lessor  lessor             // where each send goes: one URL, or a fleet's backend
	fleet   *fleet.Fleet       // the route's fleet, for its catalog and admin; nil for one URL

	labeled   atomic.Int64 // wildcard models with series of their own
	otherOnce sync.Once
	other     *metrics.Model // the series of the wildcard models past maxModelLabels
}

// maxModelLabels bounds the wildcard models of a route that get metric
// series of their own; the rest share model="other".
const maxModelLabels = 100

// lessor is where a route's sends go (package fleet): its one URL, or a
// backend of its fleet held for the send.
type lessor interface {
	Lease(ctx context.Context, req *fleet.Request) (*fleet.Lease, error)
	Any() (*fleet.Lease, bool)
	Knows(model string) bool
}

var (
	_ lessor = (*fleet.Single)(nil)
	_ lessor = (*fleet.Fleet)(nil)
)

// modelState is what the hot path needs of one (route, model).
type modelState struct {
	q                *scheduler.Queue
	m                *metrics.Model
	label            string // the model label of its series
	defaultMaxTokens int
	maxQueueWait     time.Duration
	defaults         []byte // JSON object of default request parameters, or nil
	system           string // default system prompt
}

// modelFor returns the state of model, creating a wildcard queue on first
// use (or anew, if its queue was retired for being idle).
func (rt *route) modelFor(model string) (*modelState, error) {
	if ms, ok := rt.listed[model]; ok {
		return ms, nil
	}
	if v, ok := rt.dynamic.Load(model); ok {
		ms := v.(*modelState)
		if !ms.q.Retired() {
			return ms, nil
		}
		rt.forget(ms)
	}
	q, err := rt.set.Queue(model)
	if err != nil {
		return nil, err
	}
	ms := rt.newModelState(q, rt.cfg.Models[scheduler.Wildcard])
	if v, loaded := rt.dynamic.LoadOrStore(model, ms); loaded {
		rt.release(ms)
		return v.(*modelState), nil
	}
	return ms, nil
}

// forget drops the state of a wildcard model whose queue was retired, and
// its series.
func (rt *route) forget(ms *modelState) {
	if rt.dynamic.CompareAndDelete(ms.q.Model(), ms) {
		rt.release(ms)
	}
}

// release gives back a wildcard model's label.
func (rt *route) release(ms *modelState) {
	if ms.label != metrics.OtherModel {
		rt.srv.metrics.DeleteModel(rt.name, ms.label)
		rt.labeled.Add(-1)
	}
}

func (rt *route) newModelState(q *scheduler.Queue, mc *config.Model) *modelState {
	ms := &modelState{q: q, label: q.Model(), defaultMaxTokens: mc.DefaultMaxTokens,
		maxQueueWait: time.Duration(mc.MaxQueueWait), system: mc.System}
	if _, listed := rt.cfg.Models[q.Model()]; !listed && rt.labeled.Add(1) > maxModelLabels {
		rt.labeled.Add(-1)
		ms.label = metrics.OtherModel
		rt.otherOnce.Do(func() { rt.other = rt.srv.metrics.Model(rt.name, metrics.OtherModel) })
		ms.m = rt.other
	} else {
		ms.m = rt.srv.metrics.Model(rt.name, q.Model())
	}
	if len(mc.Defaults) > 0 {
		ms.defaults, _ = json.Marshal(mc.Defaults)
	}
	return ms
}

// Log outcomes of requests that are not scheduled.
const (
	outcomePassthrough   = "passthrough" // names no model: forwarded unscheduled
	outcomeBadRequest    = "bad_request"
	outcomeNotFound      = "not_found"
	outcomeUnauthorized  = "unauthorized"
	outcomeForbidden     = "forbidden"
	outcomeTooLarge      = "body_too_large"
	outcomeBodyError     = "body_error"
	outcomeBodyTimeout   = "body_timeout"
	outcomeInternalError = "internal_error"
)

// estimate is a request's counted cost.
type estimate struct {
	prompt, maxOutput, n, cost int
}

// call is what inspect learns of a request body.
type call struct {
	ms  *modelState // nil: the body names no model
	est estimate
	// inject is the body to send instead of the request's own, or nil:
	// rewritten to ask for a stream's usage, to drop keep_alive, or to add
	// the model's defaults.
	inject *bodyBuf
	// keepAlive is the request's keep_alive, if it had one.
	keepAlive *time.Duration
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
// first of max_completion_tokens, max_tokens and max_output_tokens that is
// set (-1 and 0, which some servers take for "no limit", count as unset),
// else the model's defaultMaxTokens; embeddings have none. n is
// max(n, best_of), at least 1. Each number is bounded (an error names the
// one that is not) and the sum saturates, so no cost is ever negative or
// wraps.
func (rt *route) estimateCost(ep tokenizer.Endpoint, model string, v *fastjson.Value, ms *modelState) (estimate, error) {
	e := estimate{prompt: rt.srv.tok.PromptTokens(ep, model, v), n: 1}
	if ep != tokenizer.EndpointEmbeddings {
		e.maxOutput = ms.defaultMaxTokens
		found := false
		for _, k := range [...]string{"max_completion_tokens", "max_tokens", "max_output_tokens"} {
			n, ok, err := intParam(v, k, 1, maxOutputTokens, true)
			if err != nil {
				return e, err
			}
			if ok && !found {
				e.maxOutput, found = int(n), true
			}
		}
	}
	for _, k := range [...]string{"n", "best_of"} {
		n, ok, err := intParam(v, k, 1, maxN, false)
		if err != nil {
			return e, err
		}
		if ok {
			e.n = max(e.n, int(n))
		}
	}
	cost := int64(max(0, e.prompt)) + int64(e.n)*int64(e.maxOutput)
	e.cost = int(min(cost, math.MaxInt32))
	return e, nil
}

// inspect parses a JSON body once, finds its model's queue and counts its
// cost; for a stream whose client did not ask for usage it also prepares the
// body that asks for it. On bad input it answers the client and returns ok
// false.
func (rt *route) inspect(w http.ResponseWriter, path string, body []byte, rec *requestLog) (c call, ok bool) {
	p := rt.srv.parsers.Get()
	defer rt.srv.parsers.Put(p)
	v, err := p.ParseBytes(body)
	if err != nil || v.Type() != fastjson.TypeObject {
		rec.outcome = outcomeBadRequest
		writeError(w, http.StatusBadRequest, "invalid_request_error", "",
			"We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
		return c, false
	}
	if err := checkDuplicateKeys(v); err != nil {
		rec.outcome = outcomeBadRequest
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", "Invalid request: "+err.Error())
		return c, false
	}
	mv := v.Get("model")
	if mv == nil || mv.Type() == fastjson.TypeNull {
		if endpointOf(path) != tokenizer.EndpointOther {
			rec.outcome = outcomeBadRequest
			writeParamError(w, "model", "you must provide a model parameter")
			return c, false
		}
		return c, true
	}
	if mv.Type() != fastjson.TypeString {
		rec.outcome = outcomeBadRequest
		writeParamError(w, "model", "'model' must be a string.")
		return c, false
	}
	if err := checkModelName(mv.GetStringBytes()); err != nil {
		rec.outcome = outcomeBadRequest
		writeParamError(w, "model", err.Error())
		return c, false
	}
	rec.model = string(mv.GetStringBytes())
	if !rt.lessor.Knows(rec.model) {
		rec.outcome = outcomeNotFound
		rt.writeLeaseError(w, rec.model, backends.ErrUnknownModel)
		return call{}, false
	}
	if c.ms, err = rt.modelFor(rec.model); err != nil {
		rec.outcome = outcomeNotFound
		if errors.Is(err, scheduler.ErrTooManyModels) {
			rec.outcome = "too_many_models"
		}
		rt.writeModelError(w, rec.model, err)
		return call{}, false
	}
	// keep_alive is for llproxy's model lifecycle, never for the upstream;
	// model defaults go in before counting, so they are paid for.
	var dp fastjson.Parser
	var a fastjson.Arena
	rewrite := false
	if ka := v.Get("keep_alive"); ka != nil {
		d, err := keepAlive(ka)
		if err != nil {
			rec.outcome = outcomeBadRequest
			writeParamError(w, "keep_alive", err.Error())
			return call{}, false
		}
		c.keepAlive = &d
		v.Del("keep_alive")
		rewrite = true
	}
	ep := endpointOf(path)
	if ep == tokenizer.EndpointChat && (c.ms.defaults != nil || c.ms.system != "") {
		rewrite = applyDefaults(v, c.ms, &dp, &a) || rewrite
	}
	if c.est, err = rt.estimateCost(ep, rec.model, v, c.ms); err != nil {
		rec.outcome = outcomeBadRequest
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", err.Error())
		return call{}, false
	}
	stream := v.GetBool("stream")
	wantUsage := *rt.cfg.InjectStreamUsage && stream && !provider.WantsStreamUsage(v) &&
		(ep == tokenizer.EndpointChat || ep == tokenizer.EndpointCompletions)
	switch {
	case rewrite:
		c.inject = newBodyBuf()
		if wantUsage {
			c.inject.buf = provider.WithStreamUsage(c.inject.buf, nil, v)
		} else {
			c.inject.buf = v.MarshalTo(c.inject.buf)
		}
	case wantUsage:
		c.inject = newBodyBuf()
		c.inject.buf = provider.WithStreamUsage(c.inject.buf, body, v)
	}
	return c, true
}

// writeAcquireError answers a request the scheduler did not admit and
// returns its outcome.
func (rt *route) writeAcquireError(w http.ResponseWriter, ctx context.Context, err error) string {
	var re *scheduler.RejectError
	switch {
	case errors.As(err, &re):
		writeReject(w, rt.name, re)
		switch {
		case errors.Is(err, scheduler.ErrTooLarge):
			return metrics.OutcomeRejectTooLarge
		case errors.Is(err, scheduler.ErrQueueFull):
			return metrics.OutcomeRejectQueueFull
		}
		return metrics.OutcomeRejectWait
	case errors.Is(err, scheduler.ErrClosed):
		w.Header()["Retry-After"] = []string{"1"}
		writeError(w, http.StatusServiceUnavailable, "server_error", "service_unavailable", "llproxy is shutting down; retry on another instance.")
		return metrics.OutcomeShuttingDown
	case ctx.Err() != nil:
		// The client left while queued: nothing was sent upstream and
		// nobody is left to answer.
		return metrics.OutcomeCancelled
	}
	writeError(w, http.StatusInternalServerError, "server_error", "", "llproxy: "+err.Error())
	return "error"
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

// labelOf is the model label of q's series.
func (rt *route) labelOf(q *scheduler.Queue) string {
	if _, ok := rt.listed[q.Model()]; ok {
		return q.Model()
	}
	if v, ok := rt.dynamic.Load(q.Model()); ok && v.(*modelState).q == q {
		return v.(*modelState).label
	}
	return metrics.OtherModel // being created or retired: not a series of its own
}

// queued counts the requests waiting in the route's queue of model (for
// the fleet: a server is not unloaded while any wait for it).
func (rt *route) queued(model string) int {
	if q, ok := rt.set.Lookup(model); ok {
		return q.Stats(time.Now()).Depth
	}
	return 0
}
