// Package route is one route's request path, a file a stage: serve.go
// runs decode -> count -> admit -> forward -> settle, and respond.go
// writes the gateway's own answers in OpenAI's shape. A request is read
// once into a pooled buffer, parsed once, counted through the tokenizer's
// cache, admitted through its model's queue (only that queue's lock is
// taken), sent where the route's lessor says (package fleet) by a loop
// that owns its round trip (package relay), and settled against the usage
// the upstream reports.
//
// It exists apart from the HTTP front (package server: the mux,
// authentication, the admin endpoints) so that the path a request takes
// reads in one room, end to end.
package route

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/provider/mock"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// Route serves /<name>/...: it counts and schedules each request that
// names a model, then forwards it. It is safe for concurrent use.
type Route struct {
	name    string
	opts    Options
	log     *slog.Logger
	metrics *metrics.Metrics
	cfg     *config.Route
	set     *scheduler.Set
	listed  map[string]*modelState // immutable after New: read without a lock
	dynamic sync.Map               // wildcard models: string -> *modelState
	up      outbound
	noModel prometheus.Counter // requests that name no model
	lessor  lessor             // where each send goes: one URL, or a fleet's backend
	fleet   *fleet.Fleet       // the route's fleet, for its catalog and admin; nil for one URL

	labeled   atomic.Int64 // wildcard models with series of their own
	otherOnce sync.Once
	other     *metrics.Model // the series of the wildcard models past MaxModelLabels
}

// MaxModelLabels bounds the wildcard models of a route that get metric
// series of their own; the rest share model="other".
const MaxModelLabels = 100

// Options are a route's dependencies. Tokenizer, Metrics and Logger are
// required.
type Options struct {
	Tokenizer *tokenizer.Tokenizer
	Metrics   *metrics.Metrics
	Logger    *slog.Logger
	// Transport, if set, replaces the route's transport (tests).
	Transport http.RoundTripper
	// Limits bound request bodies.
	Limits request.Limits
	// ClientKeys says the gateway has client keys: a client's own
	// credentials are then never forwarded.
	ClientKeys bool
	// Secrets never reach a model server's environment.
	Secrets []string
	// Closing reports that the gateway shuts down: a body still arriving
	// is cut off. Nil: never.
	Closing func() bool
}

// New builds the route name from its validated config.
func New(name string, rc *config.Route, opts Options) (*Route, error) {
	if opts.Tokenizer == nil || opts.Metrics == nil || opts.Logger == nil {
		return nil, errors.New("route: Tokenizer, Metrics and Logger are required")
	}
	set, err := scheduler.NewSet(rc.SchedulerConfig())
	if err != nil {
		return nil, fmt.Errorf("route: routes.%s: %w", name, err)
	}
	rt := &Route{name: name, opts: opts, log: opts.Logger, metrics: opts.Metrics, cfg: rc, set: set,
		listed: map[string]*modelState{}, noModel: opts.Metrics.Passthrough(name)}
	set.OnRetire(func(q *scheduler.Queue) {
		if v, ok := rt.dynamic.Load(q.Model()); ok && v.(*modelState).q == q {
			rt.forget(v.(*modelState))
		}
	})
	for model, mc := range rc.Models {
		if model == scheduler.Wildcard {
			continue
		}
		q, err := set.Queue(model)
		if err != nil {
			return nil, err
		}
		rt.listed[model] = rt.newModelState(q, mc)
	}
	rt.up = outbound{prefix: "/" + name, auth: rt.authorizer(rc.APIKey.Value()),
		// A discovered backend that may not have the key gets the
		// client's credentials handled as on a route without one.
		noKey: rt.authorizer("")}
	transport := func() http.RoundTripper {
		if opts.Transport != nil {
			return opts.Transport
		}
		return relay.NewTransport(relay.TransportConfig{DialTimeout: time.Duration(rc.DialTimeout),
			ResponseHeaderTimeout: time.Duration(rc.ResponseHeaderTimeout), MaxIdleConnsPerHost: rc.MaxIdleConnsPerHost})
	}
	switch {
	case rc.Provider == provider.NameMock:
		m := mock.New(rc.Mock.Config(), MockCounter(opts.Tokenizer))
		rt.lessor = fleet.NewSingle(&url.URL{Scheme: "http", Host: "mock.invalid"})
		rt.up.transport = mock.HandlerTransport{Handler: m, Log: opts.Logger}
		rt.up.auth = rt.authorizer("")
	case rc.Fleet():
		f, err := fleet.New(rc.Config, fleet.Options{Logger: opts.Logger.With("route", name),
			MaxSwapWait: time.Duration(rc.MaxSwapWait), Queued: rt.queued, Secrets: opts.Secrets})
		if err != nil {
			return nil, fmt.Errorf("route: routes.%s: %w", name, err)
		}
		rt.fleet, rt.lessor = f, f
		rt.up.transport = transport() // each send leases its backend
	default:
		target, err := url.Parse(rc.Forward)
		if err != nil {
			return nil, fmt.Errorf("route: routes.%s.forward: %w", name, err)
		}
		rt.lessor = fleet.NewSingle(target)
		rt.up.transport = transport()
	}
	return rt, nil
}

// authorizer sets a route's upstream credentials: its key if it has one;
// never a client key of the gateway's.
func (rt *Route) authorizer(apiKey string) *provider.OpenAI {
	return provider.NewOpenAIWith(provider.OpenAIConfig{APIKey: apiKey, DropClientAuth: rt.opts.ClientKeys,
		ForwardOrganization: rt.cfg.ForwardOrganization})
}

// ServeHTTP serves one request of the route (its path starts /<name>/, or
// it is the default route's at the root).
func (rt *Route) ServeHTTP(w http.ResponseWriter, r *http.Request) { rt.serve(w, r) }

// Name is the route's name.
func (rt *Route) Name() string { return rt.name }

// Config is the route's config.
func (rt *Route) Config() *config.Route { return rt.cfg }

// Fleet is the route's fleet; nil for a route with one URL.
func (rt *Route) Fleet() *fleet.Fleet { return rt.fleet }

// Queue returns the queue of model if it exists, without creating one.
func (rt *Route) Queue(model string) (*scheduler.Queue, bool) { return rt.set.Lookup(model) }

// Queues calls f for every queue of the route, with the model label of its
// metric series.
func (rt *Route) Queues(f func(q *scheduler.Queue, label string)) {
	rt.set.Range(func(q *scheduler.Queue) { f(q, rt.labelOf(q)) })
}

// Close closes the route's queues: waiting requests are answered with 503
// and new ones refused.
func (rt *Route) Close() { rt.set.Close() }

// Transport is the route's upstream transport.
func (rt *Route) Transport() http.RoundTripper { return rt.up.transport }

// mockCounter lets the mock report the usage the gateway counts.
type mockCounter struct{ t *tokenizer.Tokenizer }

// MockCounter adapts the tokenizer to the mock provider's TokenCounter.
func MockCounter(t *tokenizer.Tokenizer) mock.TokenCounter { return mockCounter{t} }

func (c mockCounter) PromptTokens(path, model string, body *fastjson.Value) int {
	return c.t.PromptTokens(endpointOf(path), model, body)
}

func (c mockCounter) TextTokens(model, text string) int {
	return c.t.EncodingFor(model).Count(text)
}

// parsers parse request bodies, each once.
var parsers fastjson.ParserPool

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
func (rt *Route) modelFor(model string) (*modelState, error) {
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
func (rt *Route) forget(ms *modelState) {
	if rt.dynamic.CompareAndDelete(ms.q.Model(), ms) {
		rt.release(ms)
	}
}

// release gives back a wildcard model's label.
func (rt *Route) release(ms *modelState) {
	if ms.label != metrics.OtherModel {
		rt.metrics.DeleteModel(rt.name, ms.label)
		rt.labeled.Add(-1)
	}
}

func (rt *Route) newModelState(q *scheduler.Queue, mc *config.Model) *modelState {
	ms := &modelState{q: q, label: q.Model(), defaultMaxTokens: mc.DefaultMaxTokens,
		maxQueueWait: time.Duration(mc.MaxQueueWait), system: mc.System}
	if _, listed := rt.cfg.Models[q.Model()]; !listed && rt.labeled.Add(1) > MaxModelLabels {
		rt.labeled.Add(-1)
		ms.label = metrics.OtherModel
		rt.otherOnce.Do(func() { rt.other = rt.metrics.Model(rt.name, metrics.OtherModel) })
		ms.m = rt.other
	} else {
		ms.m = rt.metrics.Model(rt.name, q.Model())
	}
	if len(mc.Defaults) > 0 {
		ms.defaults, _ = json.Marshal(mc.Defaults)
	}
	return ms
}

// Log outcomes of requests that are not scheduled.
const (
	outcomePassthrough   = "passthrough" // names no model: forwarded unscheduled
	OutcomeBadRequest    = "bad_request"
	OutcomeNotFound      = "not_found"
	OutcomeUnauthorized  = "unauthorized"
	outcomeForbidden     = "forbidden"
	outcomeTooLarge      = "body_too_large"
	outcomeBodyError     = "body_error"
	outcomeBodyTimeout   = "body_timeout"
	outcomeInternalError = "internal_error"
)

// labelOf is the model label of q's series.
func (rt *Route) labelOf(q *scheduler.Queue) string {
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
func (rt *Route) queued(model string) int {
	if q, ok := rt.set.Lookup(model); ok {
		return q.Stats(time.Now()).Depth
	}
	return 0
}
