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
	"log/slog"
	"time"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/internal/price"
	"github.com/llproxy/llproxy/internal/replicas"
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
	// Prices are each model's prices in USD per million tokens (exact
	// names, then "*"): what a request costs, for budgets in money, the
	// usage ledger and the spend metrics. A model without one costs 0.
	Prices map[string]*price.Price `json:"prices"`
	// Usage is the usage ledger: where every finished request is written.
	Usage UsageConfig `json:"usage"`
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

// UsageConfig is the usage ledger's: its store, "sqlite" (usage.db next
// to the state file), "sqlite:PATH" or a "postgres://..." URL (replicas
// share one), or "off"; and how many days of rows it keeps.
type UsageConfig struct {
	// Store is where the rows go. A postgres URL is a secret (see
	// Secrets): it never appears in logs or answers.
	Store    string `json:"store"`
	KeepDays int    `json:"keepDays"`
}

// Default of the ledger's retention.
const DefaultUsageKeepDays = 400

// Route is one upstream and its per-model queues.
type Route struct {
	// Forward is the upstream's base URL; the path after /R/ and the query
	// are appended. Required for provider "openai".
	Forward string `json:"forward"`
	// Provider is "openai" (default: any OpenAI-compatible server),
	// "azure" (Azure OpenAI), "anthropic" (Anthropic's Messages API) or
	// "mock".
	Provider string `json:"provider"`
	// Deployments map an Azure route's deployment names to the models
	// whose limits (and queue) their requests take.
	Deployments map[string]string `json:"deployments"`
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

// Tokenizer modes of a model.
const (
	TokenizerExact      = "exact"
	TokenizerCalibrated = "calibrated"
)

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
	// BatchHeadroom is the fraction of each bucket batch requests leave
	// (0 to 0.9; default 0.1); BatchMaxAge how long one waits before it
	// goes as interactive (default 10m); BatchMaxQueueWait and
	// BatchMaxQueueSize their wait and queue (default 1h, 10,000).
	BatchHeadroom     *float64          `json:"batchHeadroom"`
	BatchMaxAge       duration.Duration `json:"batchMaxAge"`
	BatchMaxQueueWait duration.Duration `json:"batchMaxQueueWait"`
	BatchMaxQueueSize *int              `json:"batchMaxQueueSize"`
	// CacheReadsCount: prompt tokens read from the provider's cache count
	// against the input bucket (Anthropic's older models); by default they
	// are free, as Anthropic counts them.
	CacheReadsCount bool `json:"cacheReadsCount"`
	// CountTokensRPM limits the model's count_tokens calls per minute
	// (Anthropic: free, with a limit of its own); 0: unlimited.
	CountTokensRPM int `json:"countTokensRpm"`
	// Tokenizer is how the model's prompts are counted: "exact" (the
	// model's own encoding) or "calibrated" (the o200k count scaled by a
	// factor learned from what the upstream reports). Default calibrated
	// for Anthropic routes and fleets, exact otherwise.
	Tokenizer string `json:"tokenizer"`
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
	c := scheduler.Config{MaxQueueSize: m.MaxQueueSize, MaxQueueWait: m.MaxQueueWait.D(), RPM: m.RPM, TPM: m.TPM,
		ITPM: m.ITPM, OTPM: m.OTPM, MaxConcurrent: m.MaxConcurrent, BatchHeadroom: scheduler.DefaultBatchHeadroom,
		BatchMaxAge: m.BatchMaxAge.D(), BatchMaxQueueWait: m.BatchMaxQueueWait.D(), BatchMaxQueueSize: scheduler.DefaultBatchMaxQueueSize}
	if m.BatchHeadroom != nil {
		c.BatchHeadroom = *m.BatchHeadroom
	}
	if m.BatchMaxQueueSize != nil {
		c.BatchMaxQueueSize = *m.BatchMaxQueueSize
	}
	return c
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
