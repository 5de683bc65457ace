// Package server is llproxy's HTTP gateway: it authenticates clients, reads
// and counts each request, admits it through the scheduler queue of its
// (route, model), forwards it where the route's lessor says (package fleet)
// and streams the answer back, answering every failure in OpenAI's error
// shape.
//
// The request path reads in the file names: serve.go runs decode -> count ->
// admit -> forward -> settle, and respond.go hands answers on. It parses a
// body once with a pooled zero-copy parser, counts through the tokenizer's
// cache, takes only the per-model queue's lock, and reuses body and copy
// buffers.
package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/ollama"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// Options are the server's dependencies. Config, Tokenizer and Registry are
// required.
type Options struct {
	Config    *config.Config
	Tokenizer *tokenizer.Tokenizer
	// Registry receives the metrics and is served at /metrics.
	Registry *prometheus.Registry
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Clock drives the scheduler; nil means real time.
	Clock scheduler.Clock
	// Transport, if set, replaces every openai route's transport (tests).
	Transport http.RoundTripper
}

// Server is an http.Handler for the whole gateway.
type Server struct {
	cfg        *config.Config
	tok        *tokenizer.Tokenizer
	log        *slog.Logger
	metrics    *metrics.Metrics
	promHTTP   http.Handler
	routes     map[string]*route
	routeNames []string
	keyHashes  [][sha256.Size]byte
	// adminHashes guard the admin endpoints; metricsHash /metrics.
	adminHashes   [][sha256.Size]byte
	metricsHashes [][sha256.Size]byte
	mux           *http.ServeMux
	parsers       fastjson.ParserPool
	closing       atomic.Bool // queues closed: new requests refused, bodies still arriving cut off
	draining      atomic.Bool // shutting down: /healthz answers 503
	fallback      *route      // the defaultRoute, also served at the root
	ollama        *ollama.Handler
}

var _ metrics.Source = (*Server)(nil)

// New builds the gateway from a validated config.
func New(opts Options) (*Server, error) {
	if opts.Config == nil || opts.Tokenizer == nil || opts.Registry == nil {
		return nil, errors.New("server: Config, Tokenizer and Registry are required")
	}
	s := &Server{cfg: opts.Config, tok: opts.Tokenizer, log: opts.Logger, routes: map[string]*route{}}
	if s.log == nil {
		s.log = slog.Default()
	}
	for _, k := range opts.Config.ClientKeys {
		s.keyHashes = append(s.keyHashes, sha256.Sum256([]byte(k.Value())))
	}
	for _, k := range opts.Config.AdminKeys {
		s.adminHashes = append(s.adminHashes, sha256.Sum256([]byte(k.Value())))
	}
	if k := opts.Config.MetricsKey.Value(); k != "" {
		s.metricsHashes = append(s.metricsHashes, sha256.Sum256([]byte(k)))
	}
	m, err := metrics.New(opts.Registry, s)
	if err != nil {
		return nil, fmt.Errorf("server: metrics: %w", err)
	}
	s.metrics = m
	s.promHTTP = promhttp.HandlerFor(opts.Registry, promhttp.HandlerOpts{})
	for name, rc := range opts.Config.Routes {
		rt, err := s.newRoute(name, rc, opts)
		if err != nil {
			return nil, err
		}
		s.routes[name] = rt
		s.routeNames = append(s.routeNames, "/"+name+"/")
	}
	slices.Sort(s.routeNames)
	if opts.Config.DefaultRoute != "" {
		s.fallback = s.routes[opts.Config.DefaultRoute]
	}
	s.ollama = ollama.New(ollamaGateway{s})
	s.mux = s.newMux()
	return s, nil
}

func (s *Server) sortedRouteNames() []string {
	return slices.Sorted(maps.Keys(s.routes))
}

func (s *Server) newRoute(name string, rc *config.Route, opts Options) (*route, error) {
	set, err := scheduler.NewSet(rc.SchedulerConfig(), opts.Clock)
	if err != nil {
		return nil, fmt.Errorf("server: routes.%s: %w", name, err)
	}
	rt := &route{name: name, srv: s, cfg: rc, set: set, listed: map[string]*modelState{},
		noModel: s.metrics.Passthrough(name)}
	rt.handler = s.require(s.keyHashes, "one of its client keys", http.HandlerFunc(rt.serve))
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
	switch {
	case rc.Provider == provider.NameMock:
		mock := provider.NewMock(rc.Mock, mockCounter{s.tok})
		rt.lessor = fleet.NewSingle(&url.URL{Scheme: "http", Host: "mock.invalid"})
		rt.up.transport = provider.HandlerTransport{Handler: mock, Log: s.log}
		rt.up.auth = rt.authorizer("")
	case rc.Fleet():
		f, err := fleet.New(rc.Config, fleet.Options{Logger: s.log.With("route", name),
			MaxSwapWait: time.Duration(rc.MaxSwapWait), Queued: rt.queued, Secrets: s.secrets()})
		if err != nil {
			return nil, fmt.Errorf("server: routes.%s: %w", name, err)
		}
		rt.fleet, rt.lessor = f, f
		rt.up.transport = opts.Transport // each send leases its backend
		if rt.up.transport == nil {
			rt.up.transport = relay.NewTransport(relay.TransportConfig{DialTimeout: time.Duration(rc.DialTimeout),
				ResponseHeaderTimeout: time.Duration(rc.ResponseHeaderTimeout), MaxIdleConnsPerHost: rc.MaxIdleConnsPerHost})
		}
	default:
		target, err := url.Parse(rc.Forward)
		if err != nil {
			return nil, fmt.Errorf("server: routes.%s.forward: %w", name, err)
		}
		rt.lessor = fleet.NewSingle(target)
		rt.up.transport = opts.Transport
		if rt.up.transport == nil {
			rt.up.transport = relay.NewTransport(relay.TransportConfig{DialTimeout: time.Duration(rc.DialTimeout),
				ResponseHeaderTimeout: time.Duration(rc.ResponseHeaderTimeout), MaxIdleConnsPerHost: rc.MaxIdleConnsPerHost})
		}
	}
	return rt, nil
}

// authorizer sets a route's upstream credentials: its key if it has one;
// never a client key of the gateway's.
func (rt *route) authorizer(apiKey string) *provider.OpenAI {
	return provider.NewOpenAIWith(provider.OpenAIConfig{APIKey: apiKey, DropClientAuth: len(rt.srv.cfg.ClientKeys) > 0,
		ForwardOrganization: rt.cfg.ForwardOrganization})
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if s.draining.Load() || s.closing.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"status":"shutting down"}`+"\n")
		return
	}
	io.WriteString(w, `{"status":"ok"}`+"\n")
}

// BeginShutdown closes every queue: waiting requests are answered with 503
// at once and new ones are refused, while admitted ones go on. Then stop
// the listener with http.Server.Shutdown.
func (s *Server) BeginShutdown() {
	s.closing.Store(true)
	for _, rt := range s.routes {
		rt.set.Close()
	}
}

// QueueStats implements metrics.QueueSource.
func (s *Server) QueueStats(yield func(metrics.QueueStats)) {
	now := time.Now()
	for name, rt := range s.routes {
		other := metrics.QueueStats{Route: name, Model: metrics.OtherModel, Folded: true}
		folded := false
		rt.set.Range(func(q *scheduler.Queue) {
			st := q.Stats(now)
			if rt.labelOf(q) == metrics.OtherModel {
				other.Depth += st.Depth
				other.QueuedTokens += st.QueuedTokens
				folded = true
				return
			}
			c := q.Config()
			yield(metrics.QueueStats{Route: name, Model: q.Model(), Depth: st.Depth, QueuedTokens: st.QueuedTokens,
				RemainingRequests: st.RemainingRequests, RemainingTokens: st.RemainingTokens,
				LimitRequests: c.RPM, LimitTokens: c.TPM, RefillRequests: st.RefillRequests, RefillTokens: st.RefillTokens})
		})
		if folded {
			yield(other)
		}
	}
}

// mockCounter lets the mock report the usage the gateway counts.
type mockCounter struct{ t *tokenizer.Tokenizer }

// MockCounter adapts the tokenizer to the mock provider's TokenCounter.
func MockCounter(t *tokenizer.Tokenizer) provider.TokenCounter { return mockCounter{t} }

func (c mockCounter) PromptTokens(path, model string, body *fastjson.Value) int {
	return c.t.PromptTokens(endpointOf(path), model, body)
}

func (c mockCounter) TextTokens(model, text string) int {
	return c.t.EncodingFor(model).Count(text)
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// Shutdown is the whole SIGTERM sequence for srv serving s: after
// shutdownDelay with /healthz at 503 (if set), answer queued requests and
// refuse new ones, stop accepting, and let admitted requests finish within
// timeout before closing what is left.
func Shutdown(ctx context.Context, srv *http.Server, s *Server, timeout time.Duration) error {
	if d := time.Duration(s.cfg.ShutdownDelay); d > 0 {
		// /healthz answers 503 while everything else is still served, so
		// a load balancer takes the instance out before it stops.
		s.draining.Store(true)
		s.log.Info("shutdown: draining before the listener closes", "delay", d.String())
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	s.BeginShutdown()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := srv.Shutdown(ctx)
	if err != nil {
		srv.Close()
	}
	s.StopBackends() // no model server outlives llproxy
	if err != nil {
		return fmt.Errorf("server: admitted requests did not finish within %s: %w", timeout, err)
	}
	return nil
}
