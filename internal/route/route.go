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
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"reflect"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/anthropic"
	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/ledger"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/relay"
	"github.com/llproxy/llproxy/internal/replicas"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/internal/ticket"
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
	models  *models.Registry // each model's queue, series and settings
	up      outbound
	noModel prometheus.Counter // requests that name no model
	lessor  lessor             // where each send goes: one URL, or a fleet's backend
	fleet   *fleet.Fleet       // the route's fleet, for its catalog and admin; nil for one URL
	clients []*metrics.Client  // each client's series on the route, by ID
	answers *metrics.Responses // the route's responses by status
	gate    ticket.Gate        // how its requests are admitted
	say     dialect            // how its own answers are written
	api     string             // the API it speaks: its provider's name
}

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
	// Clients are the gateway's clients; nil: one anonymous client. When
	// they have keys, a client's own credentials are never forwarded.
	Clients *clients.Directory
	// Secrets (every key the config holds) never reach a model server's
	// environment, and are redacted from upstream error bodies.
	Secrets []string
	// Shared, when set, is where the limits of every replica live.
	Shared *replicas.State
	// Prices price the requests (nil: every request costs 0).
	Prices *price.Table
	// Usage, if set, is given every finished request's row (the usage
	// ledger).
	Usage UsageSink
	// Previous is the route of the same name before a reload: its queues
	// (and its fleet, if the fleet's config is the same) go on in this one.
	Previous *Route
	// Closing reports that the gateway shuts down: a body still arriving
	// is cut off. Nil: never.
	Closing func() bool
}

// New builds the route name from its validated config.
func New(name string, rc *config.Route, opts Options) (*Route, error) {
	if opts.Tokenizer == nil || opts.Metrics == nil || opts.Logger == nil {
		return nil, errors.New("route: Tokenizer, Metrics and Logger are required")
	}
	if opts.Clients == nil {
		opts.Clients = clients.New(&config.Config{})
	}
	var share models.Share
	if opts.Shared != nil {
		share = func(model string, cfg scheduler.Config) *replicas.Buckets {
			return opts.Shared.Queue(name, model, cfg, opts.Clients.Queue(model, cfg))
		}
	}
	var prevModels *models.Registry
	if opts.Previous != nil {
		prevModels = opts.Previous.models
	}
	reg, err := models.New(name, rc, opts.Metrics, opts.Clients.Queue, share, prevModels)
	if err != nil {
		return nil, fmt.Errorf("route: routes.%s: %w", name, err)
	}
	rt := &Route{name: name, opts: opts, log: opts.Logger, metrics: opts.Metrics, cfg: rc, models: reg,
		noModel: opts.Metrics.Passthrough(name)}
	for _, c := range opts.Clients.All() {
		rt.clients = append(rt.clients, opts.Metrics.Client(name, c.Name))
	}
	rt.answers = opts.Metrics.Responses(name)
	rt.api = rc.Provider
	switch rt.api {
	case provider.NameAnthropic:
		rt.say = anthropic.Dialect{}
	case provider.NameAzure:
		rt.say = openai.Dialect{Azure: true}
	default:
		rt.say = openai.Dialect{}
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
	case rc.Fleet() && opts.Previous != nil && opts.Previous.fleet != nil && opts.Previous.SameFleet(rc):
		// The same backends: the fleet (its health, its running model
		// servers) goes on.
		rt.fleet, rt.lessor = opts.Previous.fleet, opts.Previous.fleet
		rt.up.transport = opts.Previous.up.transport
	case rc.Fleet():
		var prev *fleet.Fleet
		if opts.Previous != nil {
			prev = opts.Previous.fleet
		}
		f, err := fleet.New(rc.Config, fleet.Options{Logger: opts.Logger.With("route", name),
			MaxSwapWait: time.Duration(rc.MaxSwapWait), Queued: rt.models.Queued, Secrets: opts.Secrets, Previous: prev})
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
	rt.gate = ticket.Gate{Models: reg, Shared: opts.Shared, SettleActual: rc.Settle == config.SettleActual,
		Lessor: rt.lessor, Logger: opts.Logger.With("route", name)}
	return rt, nil
}

// authorizer sets a route's upstream credentials: its key if it has one;
// never a client key of the gateway's.
func (rt *Route) authorizer(apiKey string) *provider.Credentials {
	header := provider.KeyBearer
	switch rt.cfg.Provider {
	case provider.NameAzure:
		header = provider.KeyAPIKey
	case provider.NameAnthropic:
		header = provider.KeyXAPIKey
	}
	return provider.NewCredentials(provider.CredentialsConfig{APIKey: apiKey, Header: header,
		DropClientAuth: rt.opts.Clients.Keyed(), ForwardOrganization: rt.cfg.ForwardOrganization})
}

// rates reads the rate-limit headers of an upstream answer, as the
// route's API writes them.
func (rt *Route) rates(h http.Header, now time.Time) provider.RateInfo {
	if rt.api == provider.NameAnthropic {
		return provider.ParseAnthropicRateHeaders(h, now)
	}
	return provider.ParseRateHeaders(h)
}

// Error writes an error in the shape of the API the route speaks (for
// the front's answers on the route's paths: 401, 404, 405).
func (rt *Route) Error(w http.ResponseWriter, status int, typ, code, msg string) {
	rt.say.Error(w, status, typ, code, msg)
}

// ParamError writes a 400 naming param, in the route's API's shape.
func (rt *Route) ParamError(w http.ResponseWriter, param, msg string) {
	rt.say.ParamError(w, param, msg)
}

// Serve serves one request of the route (its path starts /<name>/, or it
// is the default route's at the root) from client who, whom the caller
// authenticated.
func (rt *Route) Serve(w http.ResponseWriter, r *http.Request, who *clients.Client) {
	rt.serve(w, r, who, nil)
}

// Read is a request body a front has read already (the root reads it to
// find the model): the route takes the body over (it releases it) and
// reads it no more. Value, if not nil, is the body parsed, valid until
// ServeRead returns; the route may change it.
type Read struct {
	Body  *request.Body
	Value *fastjson.Value
}

// ServeRead is Serve for a request whose body the caller read (and maybe
// parsed) already.
func (rt *Route) ServeRead(w http.ResponseWriter, r *http.Request, who *clients.Client, in Read) {
	rt.serve(w, r, who, &in)
}

// Clients is the gateway's clients.
func (rt *Route) Clients() *clients.Directory { return rt.opts.Clients }

// API is the API the route speaks: its provider's name.
func (rt *Route) API() string { return rt.api }

// Name is the route's name.
func (rt *Route) Name() string { return rt.name }

// Config is the route's config.
func (rt *Route) Config() *config.Route { return rt.cfg }

// Fleet is the route's fleet; nil for a route with one URL.
func (rt *Route) Fleet() *fleet.Fleet { return rt.fleet }

// Queue returns the queue of model if it exists, without creating one.
func (rt *Route) Queue(model string) (*scheduler.Queue, bool) { return rt.models.Set().Lookup(model) }

// Queues calls f for every queue of the route, with the model label of its
// metric series.
func (rt *Route) Queues(f func(q *scheduler.Queue, label string)) {
	rt.models.Set().Range(func(q *scheduler.Queue) { f(q, rt.models.LabelOf(q)) })
}

// Close closes the route's queues: waiting requests are answered with 503
// and new ones refused.
func (rt *Route) Close() { rt.models.Set().Close() }

// Transport is the route's upstream transport.
func (rt *Route) Transport() http.RoundTripper { return rt.up.transport }

// mockCounter lets the mock report the usage the gateway counts.
type mockCounter struct{ t *tokenizer.Tokenizer }

// MockCounter adapts the tokenizer to the mock provider's TokenCounter.
func MockCounter(t *tokenizer.Tokenizer) mock.TokenCounter { return mockCounter{t} }

func (c mockCounter) PromptTokens(path, model string, body *fastjson.Value) int {
	return c.t.PromptTokens(openai.Endpoint(path), model, body)
}

func (c mockCounter) TextTokens(model, text string) int {
	return c.t.EncodingFor(model).Count(text)
}

// parsers parse request bodies, each once.
var parsers fastjson.ParserPool

// UsageSink takes finished requests' rows; it never blocks.
type UsageSink interface{ Add(ledger.Row) }

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

// Log outcomes of requests that are not scheduled.
const (
	outcomePassthrough  = "passthrough" // names no model: forwarded unscheduled
	outcomeAborted      = "aborted"     // admitted, then the upstream or the client broke off
	OutcomeBadRequest   = "bad_request"
	OutcomeNotFound     = "not_found"
	OutcomeUnauthorized = "unauthorized"
)

// Models calls f with every model of the route that has a queue now.
func (rt *Route) Models(f func(ms *models.Model)) { rt.models.Range(f) }

// SameFleet reports whether rc describes the route's fleet as it is: the
// same backends, discovery, health checks and swap wait.
func (rt *Route) SameFleet(rc *config.Route) bool {
	return rt.cfg.Fleet() && reflect.DeepEqual(rt.cfg.Config, rc.Config) && rt.cfg.MaxSwapWait == rc.MaxSwapWait &&
		rt.cfg.DialTimeout == rc.DialTimeout && rt.cfg.ResponseHeaderTimeout == rc.ResponseHeaderTimeout &&
		rt.cfg.MaxIdleConnsPerHost == rc.MaxIdleConnsPerHost
}
