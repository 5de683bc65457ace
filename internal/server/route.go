package server

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/scheduler"
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
