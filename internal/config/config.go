// Package config reads llproxy's config file, JSON or YAML (read as the same
// document, package yamljson): it expands ${VAR} and
// ${VAR:-default} from the environment, rejects unknown fields, applies
// defaults and validates, naming every error by its JSON path
// ("routes.openai.models.gpt-4o.tpm: must be > 0, got 0").
//
// Each leaf package (scheduler, provider, tokenizer) owns the Config of its
// part and its Validate; this package composes them into the file's shape and
// prefixes their errors with where they sit in the file.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/internal/replicas"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/provider/mock"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

// Defaults applied by Load.
const (
	DefaultListen           = ":8080"
	DefaultMaxBodyBytes     = 32 << 20
	DefaultShutdownTimeout  = 30 * time.Second
	DefaultMaxTokens        = 1024
	DefaultResponseHeader   = 10 * time.Minute
	DefaultDialTimeout      = 10 * time.Second
	DefaultMaxIdlePerHost   = 256
	DefaultMaxWildcardModel = 1000
	DefaultBodyTimeout      = 60 * time.Second
	DefaultBodyIdleTimeout  = 10 * time.Second
	DefaultWriteTimeout     = 30 * time.Second
	DefaultStateFile        = "llproxy-state.json"
)

// Config is the whole file.
type Config struct {
	// Listen is the address to serve on. Default ":8080".
	Listen string `json:"listen"`
	// ClientKeys, when set, are the only keys accepted from clients, as
	// "Authorization: Bearer <key>" or "api-key: <key>".
	ClientKeys []Secret `json:"clientKeys"`
	// MaxBodyBytes bounds a request body; larger ones get 413. Default 32 MiB.
	MaxBodyBytes int64 `json:"maxBodyBytes"`
	// ShutdownTimeout bounds how long admitted requests may finish after
	// SIGTERM. Default 30s.
	ShutdownTimeout duration.Duration `json:"shutdownTimeout"`
	// LogLevel is debug, info (default), warn or error.
	LogLevel string `json:"logLevel"`
	// BodyTimeout bounds how long a client may take to send a request
	// body; BodyIdleTimeout how long it may send nothing meanwhile (408
	// after either). Defaults 60s and 10s.
	BodyTimeout     duration.Duration `json:"bodyTimeout"`
	BodyIdleTimeout duration.Duration `json:"bodyIdleTimeout"`
	// WriteTimeout bounds each write to a client: one that stops reading
	// a response (a stream included) is cut off after this long, and what
	// it held goes back. Default 30s.
	WriteTimeout duration.Duration `json:"writeTimeout"`
	// ShutdownDelay is how long, after SIGTERM, the gateway keeps serving
	// (with /healthz answering 503) before it stops accepting connections,
	// so a load balancer can take it out first. Default 0.
	ShutdownDelay duration.Duration `json:"shutdownDelay"`
	// Clients are the teams that share the gateway, by name: each with its
	// keys, weight, routes and limits. See Client.
	Clients map[string]*Client `json:"clients"`
	// Shared, when set, keeps the limits of every replica pointed at the
	// same Redis together. See package replicas.
	Shared *replicas.Config `json:"shared"`
	// StateFile keeps what must survive a restart (the clients' token use
	// today, for their daily budgets). Default llproxy-state.json next to
	// the config file.
	StateFile string `json:"stateFile"`
	// CORS lets browsers call the gateway from the listed origins.
	CORS CORS `json:"cors"`
	// AdminKeys, when set, are the only keys accepted on the admin
	// endpoints (/status, /health, /health/force-check, /unload). Without
	// them any client key is, when clientKeys are set.
	AdminKeys []Secret `json:"adminKeys"`
	// MetricsKey, when set, is required on /metrics (as a Bearer token).
	MetricsKey Secret `json:"metricsKey"`
	// Tokenizer tunes token counting.
	Tokenizer tokenizer.Config `json:"tokenizer"`
	// Routes maps a route name R, served at /R/..., to its upstream.
	Routes map[string]*Route `json:"routes"`
	// DefaultRoute breaks ties when several routes serve a model asked for
	// at the root (/v1/...), and serves the root's requests that name no
	// model.
	DefaultRoute string `json:"defaultRoute"`
	// RouteOrder is the routes' names in the order the file lists them:
	// the root resolves a model in that order.
	RouteOrder []string `json:"-"`
}

// Route is one upstream and its per-model queues.
type Route struct {
	// Forward is the upstream's base URL; the path after /R/ and the query
	// are appended. Required for provider "openai".
	Forward string `json:"forward"`
	// Provider is "openai" (default) or "mock".
	Provider string `json:"provider"`
	// APIKey, when set, replaces the client's credentials upstream.
	APIKey Secret `json:"apiKey"`
	// ForwardOrganization keeps the client's OpenAI-Organization and
	// OpenAI-Project headers when APIKey is injected. Default false: they
	// are dropped, so a client cannot bill the shared key elsewhere.
	ForwardOrganization bool `json:"forwardOrganization"`
	// Models maps model names (and "*" for all others) to their limits.
	Models map[string]*Model `json:"models"`
	// MaxWildcardModels bounds the distinct unlisted models queued. Default 1000.
	MaxWildcardModels int `json:"maxWildcardModels"`
	// ResponseHeaderTimeout bounds the wait for the upstream's response
	// headers once a request is sent (504 after). Default 10m.
	ResponseHeaderTimeout duration.Duration `json:"responseHeaderTimeout"`
	// DialTimeout bounds connecting to the upstream (502 after). Default 10s.
	DialTimeout duration.Duration `json:"dialTimeout"`
	// MaxIdleConnsPerHost is the upstream connection pool size. Default 256.
	MaxIdleConnsPerHost int `json:"maxIdleConnsPerHost"`
	// Settle is "reserved" (the bucket keeps what a request reserved at
	// admission) or "actual" (once the upstream reports usage, the unused
	// reservation goes back and an overrun is charged). Default "reserved"
	// for provider openai, "actual" for mock.
	Settle string `json:"settle"`
	// InjectStreamUsage asks the upstream for a stream's usage
	// (stream_options.include_usage) when the client did not, and strips it
	// from what the client receives. Default true.
	InjectStreamUsage *bool `json:"injectStreamUsage"`
	// Retries is how often a request that failed with a 5xx or a connection
	// error before any byte reached the client is sent again, with backoff,
	// within its maxQueueWait. Default 2; 0 disables.
	Retries *int `json:"retries"`
	// RetryBackoff is the first backoff; each retry doubles it. Default 250ms.
	RetryBackoff duration.Duration `json:"retryBackoff"`
	// Mock configures provider "mock".
	Mock MockConfig `json:"mock"`
	// Config is the fleet of a route that lists backends (or discovers
	// them) instead of one forward URL: backends, rules, defaultBackend,
	// discover, healthCheck, modelsCacheTTL.
	backends.Config
}

// MockConfig is provider "mock"'s part of a route, as the file writes it
// (durations as seconds or Go duration strings).
type MockConfig struct {
	Latency    duration.Duration `json:"latency,omitempty"`
	Chunks     int               `json:"chunks,omitempty"`
	ChunkDelay duration.Duration `json:"chunkDelay,omitempty"`
	Models     []string          `json:"models,omitempty"`
}

// Config is the mock's own config.
func (m MockConfig) Config() mock.Config {
	return mock.Config{Latency: time.Duration(m.Latency), Chunks: m.Chunks, ChunkDelay: time.Duration(m.ChunkDelay),
		Models: m.Models}
}

// Settle modes.
const (
	SettleReserved = "reserved"
	SettleActual   = "actual"
)

// Defaults of the retry settings.
const (
	DefaultRetries      = 2
	DefaultRetryBackoff = 250 * time.Millisecond
)

// Model is one model's limits plus how its requests are costed.
type Model struct {
	// MaxQueueSize is how many requests may wait at once (0: admit now or
	// reject now); MaxQueueWait the longest predicted wait a request is
	// queued for.
	MaxQueueSize int               `json:"maxQueueSize"`
	MaxQueueWait duration.Duration `json:"maxQueueWait"`
	// RPM, TPM, ITPM and OTPM are the model's buckets per minute:
	// requests, tokens, and input and output tokens apart (0: none of
	// that kind; at least one token bucket).
	RPM  int `json:"rpm"`
	TPM  int `json:"tpm"`
	ITPM int `json:"itpm"`
	OTPM int `json:"otpm"`
	// MaxConcurrent is how many of its requests may be in flight at once
	// (a local server's parallel slots); 0: no limit.
	MaxConcurrent int `json:"maxConcurrent"`
	// DefaultMaxTokens is the output a request is charged for when it names
	// no max_completion_tokens, max_tokens or max_output_tokens. Default 1024.
	DefaultMaxTokens int `json:"defaultMaxTokens"`
	// Defaults are request parameters (temperature, top_p, top_k,
	// max_tokens, ...) used when a chat request does not set them.
	Defaults map[string]any `json:"defaults"`
	// System is a system prompt put first in a chat request that has no
	// system message; "{{now}}" in it becomes the current time.
	System string `json:"system"`
}

// CORS is the "cors" section: the origins browsers may call the gateway
// from ("*": any), and how long a preflight's answer may be cached.
type CORS struct {
	AllowOrigins []string          `json:"allowOrigins"`
	MaxAge       duration.Duration `json:"maxAge"`
}

// Queue is the model's limits as its queue takes them.
func (m *Model) Queue() scheduler.Config {
	return scheduler.Config{MaxQueueSize: m.MaxQueueSize, MaxQueueWait: m.MaxQueueWait.D(), RPM: m.RPM, TPM: m.TPM,
		ITPM: m.ITPM, OTPM: m.OTPM, MaxConcurrent: m.MaxConcurrent}
}

// Secret is a string that never prints: not in logs, errors or JSON.
type Secret string

// Value returns the secret itself.
func (s Secret) Value() string { return string(s) }

func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "[redacted]"
}

// GoString keeps %#v from printing the secret.
func (s Secret) GoString() string { return `"` + s.String() + `"` }

// LogValue keeps slog from printing the secret.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalText keeps encoders from writing the secret.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// reservedRoutes are paths the gateway serves itself.
var reservedRoutes = []string{"metrics", "healthz", "health", "v1", "api", "status", "unload", "clients", "ui"}

var routeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// setDefaults fills zero fields with their defaults.
func (c *Config) setDefaults() {
	if c.CORS.MaxAge == 0 {
		c.CORS.MaxAge = duration.Duration(10 * time.Minute)
	}
	if c.Shared != nil {
		c.Shared.SetDefaults()
	}
	for _, cl := range c.Clients {
		if cl != nil && cl.Weight == 0 {
			cl.Weight = 1
		}
	}
	if c.Listen == "" {
		c.Listen = DefaultListen
	}
	if c.MaxBodyBytes == 0 {
		c.MaxBodyBytes = DefaultMaxBodyBytes
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = duration.Duration(DefaultShutdownTimeout)
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.BodyTimeout == 0 {
		c.BodyTimeout = duration.Duration(DefaultBodyTimeout)
	}
	if c.BodyIdleTimeout == 0 {
		c.BodyIdleTimeout = duration.Duration(DefaultBodyIdleTimeout)
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = duration.Duration(DefaultWriteTimeout)
	}
	for _, r := range c.Routes {
		if r == nil {
			continue
		}
		if r.Provider == "" {
			r.Provider = provider.NameOpenAI
		}
		if r.MaxWildcardModels == 0 {
			r.MaxWildcardModels = DefaultMaxWildcardModel
		}
		if r.ResponseHeaderTimeout == 0 {
			r.ResponseHeaderTimeout = duration.Duration(DefaultResponseHeader)
		}
		if r.DialTimeout == 0 {
			r.DialTimeout = duration.Duration(DefaultDialTimeout)
		}
		if r.MaxIdleConnsPerHost == 0 {
			r.MaxIdleConnsPerHost = DefaultMaxIdlePerHost
		}
		if r.Fleet() {
			r.Config.SetDefaults()
		}
		if r.Settle == "" {
			r.Settle = SettleReserved
			if r.Provider == provider.NameMock || r.Fleet() {
				r.Settle = SettleActual
			}
		}
		if r.InjectStreamUsage == nil {
			yes := true
			r.InjectStreamUsage = &yes
		}
		if r.Retries == nil {
			n := DefaultRetries
			r.Retries = &n
		}
		if r.RetryBackoff == 0 {
			r.RetryBackoff = duration.Duration(DefaultRetryBackoff)
		}
		for _, m := range r.Models {
			if m != nil && m.DefaultMaxTokens == 0 {
				m.DefaultMaxTokens = DefaultMaxTokens
			}
		}
	}
}

// Validate reports every error, each prefixed by its JSON path.
func (c *Config) Validate() error {
	var errs []error
	add := func(path string, err error) {
		if err != nil {
			errs = append(errs, prefix(path, err)...)
		}
	}
	if c.MaxBodyBytes < 0 {
		errs = append(errs, fmt.Errorf("maxBodyBytes: must be > 0, got %d", c.MaxBodyBytes))
	}
	for _, d := range []struct {
		name string
		v    duration.Duration
	}{{"shutdownTimeout", c.ShutdownTimeout}, {"shutdownDelay", c.ShutdownDelay}, {"bodyTimeout", c.BodyTimeout},
		{"bodyIdleTimeout", c.BodyIdleTimeout}, {"writeTimeout", c.WriteTimeout}} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("%s: must be >= 0", d.name))
		}
	}
	seen := map[string]string{}
	for _, k := range c.keyPaths() {
		if prev, ok := seen[k.key.Value()]; ok && k.key != "" {
			errs = append(errs, fmt.Errorf("%s: the same key as %s", k.path, prev))
			continue
		}
		seen[k.key.Value()] = k.path
	}
	errs = append(errs, c.validateClients()...)
	for i, k := range c.AdminKeys {
		if k == "" {
			errs = append(errs, fmt.Errorf("adminKeys[%d]: must not be empty", i))
		}
	}
	for i, o := range c.CORS.AllowOrigins {
		if u, err := url.Parse(o); o != "*" && (err != nil || u.Scheme == "" || u.Host == "" || u.Path != "") {
			errs = append(errs, fmt.Errorf("cors.allowOrigins[%d]: want \"*\" or an origin such as https://app.example.com, got %q", i, o))
		}
	}
	if _, port, err := net.SplitHostPort(c.Listen); err != nil || port == "" {
		errs = append(errs, fmt.Errorf("listen: want host:port or :port, got %q", c.Listen))
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.LogLevel)); err != nil {
		errs = append(errs, fmt.Errorf("logLevel: must be debug, info, warn or error, got %q", c.LogLevel))
	}
	for i, k := range c.ClientKeys {
		if k == "" {
			errs = append(errs, fmt.Errorf("clientKeys[%d]: must not be empty", i))
		}
	}
	add("tokenizer.", c.Tokenizer.Validate())
	if c.Shared != nil {
		add("replicas.", c.Shared.Validate())
	}
	if len(c.Routes) == 0 {
		errs = append(errs, errors.New("routes: must have at least one route"))
	}
	if c.DefaultRoute != "" && c.Routes[c.DefaultRoute] == nil {
		errs = append(errs, fmt.Errorf("defaultRoute: no route named %q", c.DefaultRoute))
	}
	for _, name := range slices.Sorted(maps.Keys(c.Routes)) {
		path := "routes." + name
		r := c.Routes[name]
		switch {
		case !routeName.MatchString(name):
			errs = append(errs, fmt.Errorf("%s: route name must be letters, digits, '.', '_' or '-'", path))
		case slices.Contains(reservedRoutes, name):
			errs = append(errs, fmt.Errorf("%s: route name is reserved (%s)", path, strings.Join(reservedRoutes, ", ")))
		}
		if r == nil {
			errs = append(errs, fmt.Errorf("%s: must be an object", path))
			continue
		}
		add(path+".", r.validate())
	}
	return errors.Join(errs...)
}

func (r *Route) validate() error {
	var errs []error
	switch r.Provider {
	case provider.NameOpenAI:
		if r.Fleet() {
			errs = append(errs, splitErrors(r.Config.Validate())...)
			if r.Forward != "" {
				errs = append(errs, errors.New("forward: a route has either forward or backends/discover, not both"))
			}
		} else if r.Forward == "" {
			errs = append(errs, errors.New("forward: required for provider \"openai\" (or list backends, or discover them)"))
		} else if u, err := url.Parse(r.Forward); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("forward: must be an http or https URL, got %q", redactedURL(r.Forward)))
		} else if strings.HasSuffix(strings.TrimRight(u.Path, "/"), "/v1") {
			errs = append(errs, fmt.Errorf("forward: ends in /v1, but the client's path (/v1/...) is appended to it: the upstream would get /v1/v1/...; drop the /v1 (got %q)", redactedURL(r.Forward)))
		}
	case provider.NameMock:
		errs = append(errs, prefix("mock.", r.Mock.Config().Validate())...)
	default:
		errs = append(errs, fmt.Errorf("provider: unknown provider %q (valid: %s)", r.Provider, strings.Join(provider.Names(), ", ")))
	}
	if r.ResponseHeaderTimeout < 0 {
		errs = append(errs, errors.New("responseHeaderTimeout: must be >= 0"))
	}
	if r.DialTimeout < 0 {
		errs = append(errs, errors.New("dialTimeout: must be >= 0"))
	}
	if r.MaxIdleConnsPerHost < 0 {
		errs = append(errs, errors.New("maxIdleConnsPerHost: must be >= 0"))
	}
	if r.Settle != SettleReserved && r.Settle != SettleActual {
		errs = append(errs, fmt.Errorf("settle: must be %q or %q, got %q", SettleReserved, SettleActual, r.Settle))
	}
	if r.Retries != nil && (*r.Retries < 0 || *r.Retries > 10) {
		errs = append(errs, fmt.Errorf("retries: must be between 0 and 10, got %d", *r.Retries))
	}
	if r.RetryBackoff < 0 {
		errs = append(errs, errors.New("retryBackoff: must be >= 0"))
	}
	if len(r.Models) == 0 {
		errs = append(errs, errors.New("models: must list at least one model or \"*\""))
	}
	for _, name := range slices.Sorted(maps.Keys(r.Models)) {
		m := r.Models[name]
		if name == "" {
			errs = append(errs, errors.New("models: a model name must not be empty"))
		}
		if m == nil {
			errs = append(errs, fmt.Errorf("models.%s: must be an object", name))
			continue
		}
		if m.DefaultMaxTokens < 0 {
			errs = append(errs, fmt.Errorf("models.%s.defaultMaxTokens: must be >= 0, got %d", name, m.DefaultMaxTokens))
		}
		errs = append(errs, prefix("models."+name+".", m.Queue().Validate())...)
	}
	if r.MaxWildcardModels < 0 {
		errs = append(errs, fmt.Errorf("maxWildcardModels: must be >= 0, got %d", r.MaxWildcardModels))
	}
	return errors.Join(errs...)
}

// Fleet reports whether the route serves a fleet of backends rather than
// one forward URL.
func (r *Route) Fleet() bool { return r.Config.Enabled() }

// QueueConfigs returns the limits of the route's queues, by model (and
// scheduler.Wildcard).
func (r *Route) QueueConfigs() map[string]scheduler.Config {
	models := make(map[string]scheduler.Config, len(r.Models))
	for name, m := range r.Models {
		if m != nil {
			models[name] = m.Queue()
		}
	}
	return models
}

func splitErrors(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// prefix prefixes each error joined in err with path.
func prefix(path string, err error) []error {
	parts := splitErrors(err)
	out := make([]error, len(parts))
	for i, p := range parts {
		out[i] = fmt.Errorf("%s%w", path, p)
	}
	return out
}

// redactedURL hides the password of a URL, for messages.
func redactedURL(s string) string {
	if u, err := url.Parse(s); err == nil {
		return u.Redacted()
	}
	return "(not a URL)"
}
