// Package server is llproxy's HTTP front: it authenticates clients, reads and
// counts each request, admits it through the scheduler queue of its (route,
// model), forwards it to the route's upstream and streams the answer back,
// answering every failure in OpenAI's error shape.
//
// The hot path is decode -> count -> admit -> forward. It parses a body once
// with a pooled zero-copy parser, counts through the tokenizer's cache, takes
// only the per-model queue's lock, and reuses body and copy buffers.
package server

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/url"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/ollama"
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
	adminHashes [][sha256.Size]byte
	metricsHash *[sha256.Size]byte
	parsers     fastjson.ParserPool
	closing     atomic.Bool // queues closed: new requests refused, bodies still arriving cut off
	draining    atomic.Bool // shutting down: /healthz answers 503
	fallback    *route      // the defaultRoute, also served at the root
	ollama      *ollama.Handler
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
		h := sha256.Sum256([]byte(k))
		s.metricsHash = &h
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
			rt.up.transport = newTransport(rc)
		}
	default:
		target, err := url.Parse(rc.Forward)
		if err != nil {
			return nil, fmt.Errorf("server: routes.%s.forward: %w", name, err)
		}
		rt.lessor = fleet.NewSingle(target)
		rt.up.transport = opts.Transport
		if rt.up.transport == nil {
			rt.up.transport = newTransport(rc)
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

// ServeHTTP serves the whole gateway: /healthz, /metrics, the admin
// endpoints, the Ollama API and /<route>/... No panic escapes it: one that
// is not http.ErrAbortHandler (a response cut short on purpose) is logged
// with its stack and answered with a 500 in OpenAI's shape if nothing was
// written yet.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f := getFront(w, time.Duration(s.cfg.WriteTimeout))
	defer putFront(f)
	defer s.recoverPanic(f, r)
	s.route(f, r)
}

// recoverPanic is the last line of defence of a request.
func (s *Server) recoverPanic(f *front, r *http.Request) {
	p := recover()
	if p == nil {
		return
	}
	if p == http.ErrAbortHandler {
		panic(p) // net/http closes the connection without logging
	}
	s.log.Error("panic serving a request", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(p),
		"stack", string(debug.Stack()))
	if f.wrote {
		panic(http.ErrAbortHandler) // too late for a status: cut the response
	}
	writeError(f, http.StatusInternalServerError, "server_error", "internal_error",
		"llproxy failed on this request; it was logged. Nothing was sent upstream on its behalf unless it was admitted.")
}

func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	switch path {
	case "/healthz":
		s.healthz(w)
		return
	case "/metrics":
		if s.metricsHash != nil && !keyMatches(requestKey(r), []([sha256.Size]byte){*s.metricsHash}) {
			s.unauthorized(w, r, "a metrics key")
			return
		}
		s.promHTTP.ServeHTTP(w, r)
		return
	case "/health", "/status":
		if s.admin(w, r, false) {
			if path == "/status" {
				s.status(w)
			} else {
				s.health(w, r, false)
			}
		}
		return
	case "/health/force-check":
		if s.admin(w, r, true) {
			s.health(w, r, true)
		}
		return
	case "/unload":
		if s.admin(w, r, true) {
			s.unload(w, "")
		}
		return
	}
	if strings.HasPrefix(path, "/unload/") {
		if s.admin(w, r, true) {
			s.unload(w, unquoteModel(path))
		}
		return
	}
	if ollama.Handles(path) {
		s.serveOllama(w, r)
		return
	}
	name := strings.TrimPrefix(path, "/")
	if i := strings.IndexByte(name, '/'); i >= 0 {
		name = name[:i]
	}
	rt, ok := s.routes[name]
	if !ok && s.fallback != nil {
		rt, ok = s.fallback, true // the default route, at the root
	}
	authorized := s.authorized(r)
	if !ok {
		msg := "Unknown route " + strconv.Quote(path) + "."
		if authorized {
			msg = "Unknown route " + strconv.Quote(path) + ": this gateway serves " + strings.Join(s.routeNames, ", ") + "."
		}
		dropBody(w, r)
		s.logFront(r, http.StatusNotFound, outcomeNotFound)
		writeError(w, http.StatusNotFound, "invalid_request_error", "unknown_route", msg)
		return
	}
	if !authorized {
		s.unauthorized(w, r, "one of its client keys")
		return
	}
	rt.serve(w, r)
}

// serveOllama serves the Ollama API: authenticated, and with the body read
// under the same bounds as any other before the façade sees it.
func (s *Server) serveOllama(w http.ResponseWriter, r *http.Request) {
	if !s.authorized(r) {
		dropBody(w, r)
		s.logFront(r, http.StatusUnauthorized, outcomeUnauthorized)
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"error":"unauthorized: llproxy expects one of its client keys in Authorization: Bearer <key>"}`+"\n")
		return
	}
	if r.Body != nil && r.Body != http.NoBody && r.Method != http.MethodGet && r.Method != http.MethodHead {
		body, err := s.readBody(w, r)
		if err != nil {
			status, msg := http.StatusBadRequest, "could not read the request body"
			switch {
			case errors.Is(err, errBodyTooLarge):
				status, msg = http.StatusRequestEntityTooLarge, "request body too large: the limit is "+itoa(s.cfg.MaxBodyBytes)+" bytes"
			case isTimeout(err):
				status, msg = http.StatusRequestTimeout, "the request body did not arrive in time"
			}
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.WriteHeader(status)
			b, _ := json.Marshal(map[string]string{"error": msg})
			w.Write(append(b, '\n'))
			return
		}
		defer body.release()
		r.Body = body.reader()
		defer r.Body.Close()
	}
	s.ollama.ServeHTTP(w, r)
}

// admin authenticates an admin endpoint: with adminKeys, one of them;
// without, one of the client keys when there are any. A mutating endpoint
// also takes only POST, so that no link or image on a web page can
// trigger it. It answers the client and returns false when the request may
// not go on.
func (s *Server) admin(w http.ResponseWriter, r *http.Request, mutating bool) bool {
	hashes := s.adminHashes
	if len(hashes) == 0 {
		hashes = s.keyHashes
	}
	if len(hashes) > 0 && !keyMatches(requestKey(r), hashes) {
		s.unauthorized(w, r, "an admin key")
		return false
	}
	if mutating && r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeError(w, http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed", "Use POST "+r.URL.Path+".")
		return false
	}
	if !mutating && r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeError(w, http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed", "Use GET "+r.URL.Path+".")
		return false
	}
	return true
}

// dropBody ends a request whose body will not be read: the connection
// closes after the answer instead of net/http reading what is left of the
// body, which a client trickling it could make last for ever.
func dropBody(w http.ResponseWriter, r *http.Request) {
	if r.Body == nil || r.Body == http.NoBody {
		return
	}
	w.Header()["Connection"] = []string{"close"}
	if conn := connOf(w); conn != nil {
		conn.SetReadDeadline(time.Now())
	}
}

// unauthorized answers 401 and logs it.
func (s *Server) unauthorized(w http.ResponseWriter, r *http.Request, what string) {
	dropBody(w, r)
	s.logFront(r, http.StatusUnauthorized, outcomeUnauthorized)
	writeError(w, http.StatusUnauthorized, "invalid_request_error", "invalid_api_key",
		"Incorrect API key provided. llproxy expects "+what+" in Authorization: Bearer <key> or api-key: <key>.")
}

// logFront logs a request answered before it reached a route.
func (s *Server) logFront(r *http.Request, status int, outcome string) {
	s.log.LogAttrs(r.Context(), slog.LevelInfo, "request", slog.String("method", r.Method),
		slog.String("path", r.URL.Path), slog.Int("status", status), slog.String("outcome", outcome))
}

// authorized checks the client's key against clientKeys in constant time.
func (s *Server) authorized(r *http.Request) bool {
	return len(s.keyHashes) == 0 || keyMatches(requestKey(r), s.keyHashes)
}

// requestKey is the key a request carries: Authorization: Bearer, else
// api-key.
func requestKey(r *http.Request) string {
	key := r.Header.Get("Api-Key")
	if auth := r.Header.Get("Authorization"); auth != "" {
		if len(auth) > 7 && strings.EqualFold(auth[:7], "bearer ") {
			key = strings.TrimSpace(auth[7:])
		}
	}
	return key
}

// keyMatches compares key with every hash in constant time: both sides are
// hashed to equal length and every key is compared.
func keyMatches(key string, hashes [][sha256.Size]byte) bool {
	if key == "" {
		return false
	}
	h := sha256.Sum256([]byte(key))
	ok := 0
	for i := range hashes {
		ok |= subtle.ConstantTimeCompare(h[:], hashes[i][:])
	}
	return ok == 1
}

func (s *Server) healthz(w http.ResponseWriter) {
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
