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

	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/provider"
	"github.com/llproxy/llproxy/scheduler"
)

// Defaults and validation: what a config file leaves out, and every
// problem in it, each named by its JSON path, all in one pass.

// reservedRoutes are paths the gateway serves itself.
var reservedRoutes = []string{"metrics", "healthz", "health", "v1", "api", "status", "unload", "clients", "ui", "usage"}

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
	if c.Usage.KeepDays == 0 {
		c.Usage.KeepDays = DefaultUsageKeepDays
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
			if r.Provider == provider.NameMock || r.Provider == provider.NameAnthropic || r.Fleet() {
				// Anthropic settles output to what was used, as its
				// OTPM does at the end of a request.
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
			if m != nil && m.Tokenizer == "" {
				m.Tokenizer = TokenizerExact
				if r.Provider == provider.NameAnthropic || r.Fleet() {
					m.Tokenizer = TokenizerCalibrated
				}
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
	for _, name := range slices.Sorted(maps.Keys(c.Prices)) {
		p := c.Prices[name]
		if p == nil {
			errs = append(errs, fmt.Errorf("prices.%s: must be an object", name))
			continue
		}
		errs = append(errs, prefix("prices."+name+".", p.Validate())...)
	}
	if st := c.Usage.Store; st != "" && st != "off" && st != "sqlite" && !strings.HasPrefix(st, "sqlite:") &&
		!strings.HasPrefix(st, "postgres://") && !strings.HasPrefix(st, "postgresql://") {
		errs = append(errs, errors.New(`usage.store: want "sqlite", "sqlite:PATH", "postgres://..." or "off"`))
	}
	if c.Usage.KeepDays < 0 {
		errs = append(errs, fmt.Errorf("usage.keepDays: must be >= 0, got %d", c.Usage.KeepDays))
	}
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
	case provider.NameOpenAI, provider.NameAzure, provider.NameAnthropic:
		if r.Fleet() && r.Provider != provider.NameOpenAI {
			errs = append(errs, fmt.Errorf("provider: a fleet of backends is OpenAI-compatible: provider %q takes one forward URL", r.Provider))
		} else if r.Fleet() {
			errs = append(errs, splitErrors(r.Config.Validate())...)
			if r.Forward != "" {
				errs = append(errs, errors.New("forward: a route has either forward or backends/discover, not both"))
			}
		} else if r.Forward == "" {
			errs = append(errs, fmt.Errorf("forward: required for provider %q (or, for openai, list backends, or discover them)", r.Provider))
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
	} else if r.Provider == provider.NameAzure && r.Settle != SettleReserved {
		errs = append(errs, errors.New(`settle: Azure charges a request's prompt and max_tokens at admission and gives nothing back: must be "reserved"`))
	}
	if len(r.Deployments) > 0 && r.Provider != provider.NameAzure {
		errs = append(errs, fmt.Errorf("deployments: only for provider %q", provider.NameAzure))
	}
	for _, d := range slices.Sorted(maps.Keys(r.Deployments)) {
		model := r.Deployments[d]
		switch {
		case d == "" || strings.ContainsAny(d, "/?#"):
			errs = append(errs, fmt.Errorf("deployments: %q is not a deployment name", d))
		case r.Models[model] == nil && r.Models[scheduler.Wildcard] == nil:
			errs = append(errs, fmt.Errorf("deployments.%s: model %q has no limits in models (and there is no \"*\")", d, model))
		}
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
		if m.CountTokensRPM < 0 {
			errs = append(errs, fmt.Errorf("models.%s.countTokensRpm: must be >= 0, got %d", name, m.CountTokensRPM))
		}
		if m.Tokenizer != TokenizerExact && m.Tokenizer != TokenizerCalibrated {
			errs = append(errs, fmt.Errorf("models.%s.tokenizer: must be %q or %q, got %q", name, TokenizerExact, TokenizerCalibrated, m.Tokenizer))
		}
		errs = append(errs, prefix("models."+name+".", m.Queue().Validate())...)
	}
	if r.MaxWildcardModels < 0 {
		errs = append(errs, fmt.Errorf("maxWildcardModels: must be >= 0, got %d", r.MaxWildcardModels))
	}
	return errors.Join(errs...)
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
