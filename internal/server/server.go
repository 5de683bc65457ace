// Package server is llproxy's HTTP front: one http.ServeMux for every
// endpoint, authentication applied once per endpoint as middleware (client
// keys, admin keys, the metrics key), the admin endpoints over the routes'
// fleets, the Ollama façade's view of the routes, the write timeout and the
// last recovery of every request, and shutdown.
//
// It exists apart from a route's request path (package route) so that each
// reads as one idea: here, which endpoint and who may call it; there, what
// happens to a request.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"sync/atomic"
	"time"

	"github.com/llproxy/llproxy/internal/caller"
	"github.com/llproxy/llproxy/internal/catalog"
	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/ledger"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/replicas"
	"github.com/llproxy/llproxy/internal/statuspage"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/ollama"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/internal/route"
	"github.com/llproxy/llproxy/provider/mock"
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
	// Transport, if set, replaces every openai route's transport (tests).
	Transport http.RoundTripper
	// ClockOffset skews this replica's own clock for the shared limits
	// (tests: replicas whose clocks disagree). The buckets run on Redis's.
	ClockOffset time.Duration
	// Previous is the gateway before a reload (SIGHUP): its queues, with
	// their waiters and admissions, its fleets whose config is the same,
	// its metrics, its shared state and its clients' use today go on in
	// the new one.
	Previous *Server
}

// Server is an http.Handler for the whole gateway.
type Server struct {
	cfg        *config.Config
	tok        *tokenizer.Tokenizer
	log        *slog.Logger
	metrics    *metrics.Metrics
	promHTTP   http.Handler
	routes     map[string]*route.Route
	handlers   map[string]http.Handler // each route behind the client-key check
	routeNames []string
	keyHashes  caller.Keys // every client key
	dir        *clients.Directory
	shared     *replicas.State // the limits shared with other replicas; nil alone
	statePath  string          // where the clients' usage is kept; "" without budgets
	// adminHashes guard the admin endpoints; metricsHash /metrics.
	adminHashes   caller.Keys
	metricsHashes caller.Keys
	mux           *http.ServeMux
	closing       atomic.Bool      // queues closed: new requests refused, bodies still arriving cut off
	draining      atomic.Bool      // shutting down: /healthz answers 503
	fallback      *route.Route     // the defaultRoute, also served at the root
	routeList     []*route.Route   // the routes in the config's order
	catalog       *catalog.Catalog // which route serves which model, for the root and Ollama
	front         *metrics.Responses
	page          *statuspage.Page // GET /ui: it outlives reloads
	src           *source          // what the scrape-time metrics and the shared hooks read: the current gateway
	ollama        *ollama.Handler
	ledger        *ledger.Ledger // where every finished request is written; nil: none (it outlives reloads)
}

var _ metrics.Source = (*Server)(nil)

// source is the current gateway for the scrape-time collectors and the
// shared state's hooks, which outlive a reload.
type source struct{ cur atomic.Pointer[Server] }

func (p *source) QueueStats(y func(metrics.QueueStats))     { p.cur.Load().QueueStats(y) }
func (p *source) BackendStats(y func(metrics.BackendStats)) { p.cur.Load().BackendStats(y) }
func (p *source) ClientStats(y func(metrics.ClientStats))   { p.cur.Load().ClientStats(y) }
func (p *source) BudgetStats(y func(metrics.BudgetStats))   { p.cur.Load().BudgetStats(y) }

// New builds the gateway from a validated config.
func New(opts Options) (*Server, error) {
	if opts.Config == nil || opts.Tokenizer == nil || opts.Registry == nil {
		return nil, errors.New("server: Config, Tokenizer and Registry are required")
	}
	s := &Server{cfg: opts.Config, tok: opts.Tokenizer, log: opts.Logger, routes: map[string]*route.Route{},
		handlers: map[string]http.Handler{}}
	if s.log == nil {
		s.log = slog.Default()
	}
	prev := opts.Previous
	s.dir = clients.New(opts.Config)
	s.keyHashes = s.dir.Hashes()
	s.src = &source{}
	src := s.src
	s.page = statuspage.New(func() []*route.Route { return src.cur.Load().routeList })
	if prev != nil {
		s.dir.Adopt(prev.dir)
		s.src, s.page = prev.src, prev.page
		s.statePath = prev.statePath
		if s.statePath == "" && opts.Config.HasBudgets() {
			s.statePath = opts.Config.StateFile // budgets from now on: kept from now on
		}
	} else if opts.Config.HasBudgets() && opts.Config.StateFile != "" {
		// Budgets survive a restart: today's use so far is read back.
		s.statePath = opts.Config.StateFile
		if err := s.dir.Open(s.statePath, time.Now()); err != nil {
			return nil, fmt.Errorf("server: %w", err)
		}
	}
	for _, k := range opts.Config.AdminKeys {
		s.adminHashes = append(s.adminHashes, caller.Hash(k.Value())...)
	}
	if k := opts.Config.MetricsKey.Value(); k != "" {
		s.metricsHashes = caller.Hash(k)
	}
	if prev != nil {
		s.ledger = prev.ledger
	} else {
		l, err := openLedger(opts.Config, s.log, opts.Registry)
		if err != nil {
			return nil, fmt.Errorf("server: %w", err)
		}
		s.ledger = l
	}
	if prev != nil && prev.shared != nil {
		s.shared = prev.shared // its config is the process's: changed by a restart
		s.dir.Share(s.shared)
	} else if sc := opts.Config.Shared; sc != nil {
		st, err := replicas.New(*sc, s.log, opts.Registry)
		if err != nil {
			return nil, fmt.Errorf("server: %w", err)
		}
		s.shared = st
		if off := opts.ClockOffset; off != 0 {
			st.SetClock(func() time.Time { return time.Now().Add(off) })
		}
		s.dir.Share(st)
		// The hooks reach whichever gateway is current (reloads swap it).
		st.OnChange(func(degraded bool) { src.cur.Load().sharedChanged(degraded) })
		st.OnRecover(func(ctx context.Context) error {
			for _, rt := range src.cur.Load().routes {
				if err := rt.RecoverShared(ctx); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if prev != nil {
		s.metrics, s.front, s.promHTTP = prev.metrics, prev.front, prev.promHTTP
	} else {
		m, err := metrics.New(opts.Registry, s.src)
		if err != nil {
			return nil, fmt.Errorf("server: metrics: %w", err)
		}
		s.metrics = m
		s.front = m.Responses("")
		s.promHTTP = promhttp.HandlerFor(opts.Registry, promhttp.HandlerOpts{})
	}
	prices, secrets := price.NewTable(opts.Config.Prices), s.cfg.Secrets()
	for name, rc := range opts.Config.Routes {
		var prevRoute *route.Route
		if prev != nil {
			prevRoute = prev.routes[name]
		}
		rt, err := route.New(name, rc, route.Options{Tokenizer: s.tok, Metrics: s.metrics, Logger: s.log,
			Transport: opts.Transport, Clients: s.dir, Secrets: secrets, Shared: s.shared, Prices: prices, Usage: usageSink(s.ledger),
			Closing: s.closing.Load, Limits: s.limits(), Previous: prevRoute})
		if err != nil {
			return nil, fmt.Errorf("server: %w", err)
		}
		s.routes[name] = rt
		s.handlers[name] = s.authenticate(rt)
		s.routeNames = append(s.routeNames, "/"+name+"/")
	}
	slices.Sort(s.routeNames)
	if opts.Config.DefaultRoute != "" {
		s.fallback = s.routes[opts.Config.DefaultRoute]
	}
	s.routeList = s.ordered()
	s.catalog = catalog.New(s.routeList, s.fallback)
	if prev == nil {
		s.src.cur.Store(s) // a reload swaps it when it takes over (Takeover)
	}
	s.ollama = ollama.New(ollamaGateway{s})
	s.mux = s.newMux()
	return s, nil
}

func (s *Server) sortedRouteNames() []string {
	return slices.Sorted(maps.Keys(s.routes))
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if s.draining.Load() || s.closing.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"status":"shutting down"}`+"\n")
		return
	}
	if err := s.dir.StateError(); err != nil {
		// Still serving, but today's use is not kept: a restart would
		// start the budgets from what the file last held.
		json.NewEncoder(w).Encode(map[string]string{"status": "degraded", "stateFile": err.Error()})
		return
	}
	if err := s.ledger.Err(); err != nil {
		// Still serving: rows wait in memory until the database answers.
		json.NewEncoder(w).Encode(map[string]string{"status": "degraded", "usage": err.Error()})
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
		rt.Close()
	}
}

// QueueStats implements metrics.QueueSource.
func (s *Server) QueueStats(yield func(metrics.QueueStats)) {
	now := time.Now()
	for name, rt := range s.routes {
		other := metrics.QueueStats{Route: name, Model: metrics.OtherModel, Folded: true}
		folded := false
		rt.Queues(func(q *scheduler.Queue, label string) {
			st := q.Stats(now)
			if label == metrics.OtherModel {
				other.Depth += st.Depth
				if other.Classes == nil {
					other.Classes = classStats(&st)
				} else {
					for i, cl := range classStats(&st) {
						other.Classes[i].Depth += cl.Depth
					}
				}
				other.QueuedTokens += st.Queued[scheduler.Tokens]
				folded = true
				return
			}
			c := q.Config()
			qs := metrics.QueueStats{Route: name, Model: q.Model(), Depth: st.Depth, QueuedTokens: st.Queued[scheduler.Tokens],
				PredictedWait: st.PredictedWait.Seconds(), MaxWait: c.MaxQueueWait.Seconds(), Classes: classStats(&st),
				Promoted: float64(st.Promoted)}
			for r, limit := range st.Limit {
				if limit > 0 {
					qs.Buckets = append(qs.Buckets, metrics.BucketStats{Resource: scheduler.Resource(r).String(),
						Remaining: st.Remaining[r], Limit: float64(limit), Refill: st.Refill[r]})
				}
			}
			yield(qs)
		})
		if folded {
			yield(other)
		}
	}
}

// classStats is a queue's classes, as metrics name them.
func classStats(st *scheduler.Stats) []metrics.ClassStats {
	out := make([]metrics.ClassStats, scheduler.NumClasses)
	for c := range out {
		out[c] = metrics.ClassStats{Class: scheduler.Class(c).String(), Depth: st.DepthBy[c], Oldest: st.Oldest[c].Seconds(),
			PredictedWait: st.PredictedWaitBy[c].Seconds()}
	}
	return out
}

// limits bound request bodies.
func (s *Server) limits() request.Limits {
	return request.Limits{MaxBodyBytes: s.cfg.MaxBodyBytes, BodyTimeout: time.Duration(s.cfg.BodyTimeout),
		BodyIdleTimeout: time.Duration(s.cfg.BodyIdleTimeout)}
}

// MockCounter adapts the tokenizer to the mock provider's TokenCounter,
// for the standalone mock server.
func MockCounter(t *tokenizer.Tokenizer) mock.TokenCounter { return route.MockCounter(t) }

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
	s.SaveState()    // after the last request settled
	if s.ledger != nil {
		// SIGTERM loses no row: what is buffered is written.
		lctx, lcancel := context.WithTimeout(context.Background(), 30*time.Second)
		if lerr := s.ledger.Close(lctx); lerr != nil {
			s.log.Error("usage ledger: not every row was written", "err", lerr)
		}
		lcancel()
	}
	if s.shared != nil {
		s.shared.Close()
	}
	if err != nil {
		return fmt.Errorf("server: admitted requests did not finish within %s: %w", timeout, err)
	}
	return nil
}
