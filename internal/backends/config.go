package backends

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/duration"
)

// Config is the fleet part of a route: its backends, how requests are
// routed to them, how they are found and checked.
type Config struct {
	// Backends are the servers known in advance.
	Backends []BackendConfig `json:"backends"`
	// Rules send a model to a named backend before anything else.
	Rules []Rule `json:"rules"`
	// DefaultBackend serves models no backend reports.
	DefaultBackend string `json:"defaultBackend"`
	// Discover scans port ranges for OpenAI-compatible servers.
	Discover []DiscoverConfig `json:"discover"`
	// HealthCheck configures the active checks of every backend.
	HealthCheck HealthConfig `json:"healthCheck"`
	// ModelsCacheTTL is how long the aggregated /v1/models is served from
	// cache. Default 30s, and never more than twice the health interval.
	ModelsCacheTTL duration.Duration `json:"modelsCacheTTL"`
	// MaxSwapWait bounds how long a request for an unloaded model of a
	// group waits while the loaded one is still in use. Default 30s.
	MaxSwapWait duration.Duration `json:"maxSwapWait"`
}

// BackendConfig is one server.
type BackendConfig struct {
	Name string `json:"name"`
	URL  string `json:"url"`
	// HealthCheckPath overrides the route's healthCheck.path.
	HealthCheckPath string `json:"healthCheckPath"`
	// Models it serves, for a server that does not list them at /v1/models
	// (required with cmd: a stopped server lists nothing).
	Models []string `json:"models"`

	// Cmd, when set, makes llproxy run the server: started (argv, with
	// Env as KEY=VALUE and Dir) when a request for one of its models
	// arrives, stopped when idle. URL is where it will listen.
	Cmd []string `json:"cmd"`
	Env []string `json:"env"`
	Dir string   `json:"dir"`
	// Group makes backends exclusive (one GPU): starting one stops the
	// running member first, never while it has requests in flight.
	Group string `json:"group"`
	// UnloadAfter stops it after this long with nothing in flight or
	// queued. Default 5m; negative never.
	UnloadAfter duration.Duration `json:"unloadAfter"`
	// Ready is the check that says a started server can take requests.
	Ready ReadyConfig `json:"ready"`
	// StopGrace is how long SIGTERM has before SIGKILL. Default 10s.
	StopGrace duration.Duration `json:"stopGrace"`
	// MaxConcurrent is how many requests the server takes at once (its
	// parallel slots); more wait for one to finish. 0 means no limit.
	MaxConcurrent int `json:"maxConcurrent"`
}

// ReadyConfig is a started server's readiness check.
type ReadyConfig struct {
	// Path answered 2xx when ready. Default the health check path.
	Path string `json:"path"`
	// Timeout for the server to become ready. Default 2m.
	Timeout duration.Duration `json:"timeout"`
}

// Managed reports whether llproxy runs the backend.
func (b BackendConfig) Managed() bool { return len(b.Cmd) > 0 }

// Rule routes one model to one backend.
type Rule struct {
	Model   string `json:"model"`
	Backend string `json:"backend"`
}

// DiscoverConfig is one port range to scan.
type DiscoverConfig struct {
	Host      string   `json:"host"`
	PortStart int      `json:"portStart"`
	PortEnd   int      `json:"portEnd"`
	Tags      []string `json:"tags"`
	// Every is the time between scans. Default 30s.
	Every duration.Duration `json:"every"`
	// Timeout bounds one port's probe. Default 1s.
	Timeout duration.Duration `json:"timeout"`
	// SendAPIKey lets the route's apiKey go to the servers found here.
	// Default false: whatever process listens on a port of the range gets
	// requests, never the key.
	SendAPIKey bool `json:"sendApiKey"`
}

// HealthConfig configures active health checks.
type HealthConfig struct {
	// Interval between checks. Default 30s.
	Interval duration.Duration `json:"interval"`
	// Timeout of one check. Default 5s.
	Timeout duration.Duration `json:"timeout"`
	// Path checked on each backend. Default /v1/models.
	Path string `json:"path"`
	// FailureThreshold is how many failures in a row (checks, or
	// connections that failed while proxying) make a backend unhealthy.
	// Default 3.
	FailureThreshold int `json:"failureThreshold"`
}

// Enabled reports whether the route is a fleet.
func (c *Config) Enabled() bool { return len(c.Backends) > 0 || len(c.Discover) > 0 }

// SetDefaults fills zero fields.
func (c *Config) SetDefaults() {
	h := &c.HealthCheck
	if h.Interval == 0 {
		h.Interval = duration.Duration(30 * time.Second)
	}
	if h.Timeout == 0 {
		h.Timeout = duration.Duration(5 * time.Second)
	}
	if h.Path == "" {
		h.Path = "/v1/models"
	}
	if h.FailureThreshold == 0 {
		h.FailureThreshold = 3
	}
	if c.ModelsCacheTTL == 0 {
		c.ModelsCacheTTL = duration.Duration(30 * time.Second)
	}
	if c.MaxSwapWait == 0 {
		c.MaxSwapWait = duration.Duration(30 * time.Second)
	}
	c.ModelsCacheTTL = min(c.ModelsCacheTTL, 2*h.Interval)
	for i := range c.Discover {
		d := &c.Discover[i]
		if d.Every == 0 {
			d.Every = duration.Duration(30 * time.Second)
		}
		if d.Timeout == 0 {
			d.Timeout = duration.Duration(time.Second)
		}
		if d.Host == "" {
			d.Host = "127.0.0.1"
		}
	}
}

// Validate reports every problem, naming fields by their JSON path below
// the route.
func (c *Config) Validate() error {
	var errs []error
	names := map[string]bool{}
	for i, b := range c.Backends {
		p := fmt.Sprintf("backends[%d]", i)
		switch {
		case b.Name == "":
			errs = append(errs, fmt.Errorf("%s.name: required", p))
		case names[b.Name]:
			errs = append(errs, fmt.Errorf("%s.name: %q is used twice", p, b.Name))
		}
		names[b.Name] = true
		if u, err := url.Parse(b.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			errs = append(errs, fmt.Errorf("%s.url: must be an http or https URL, got %q", p, redactURL(b.URL)))
		}
		if b.HealthCheckPath != "" && !strings.HasPrefix(b.HealthCheckPath, "/") {
			errs = append(errs, fmt.Errorf("%s.healthCheckPath: must start with /", p))
		}
		if b.MaxConcurrent < 0 {
			errs = append(errs, fmt.Errorf("%s.maxConcurrent: must be >= 0, got %d", p, b.MaxConcurrent))
		}
		if b.Managed() {
			if len(b.Models) == 0 {
				errs = append(errs, fmt.Errorf("%s.models: required with cmd (a stopped server lists no models)", p))
			}
			if b.Cmd[0] == "" {
				errs = append(errs, fmt.Errorf("%s.cmd[0]: the program must not be empty", p))
			}
			if b.Ready.Path != "" && !strings.HasPrefix(b.Ready.Path, "/") {
				errs = append(errs, fmt.Errorf("%s.ready.path: must start with /", p))
			}
			for j, kv := range b.Env {
				if !strings.Contains(kv, "=") {
					errs = append(errs, fmt.Errorf("%s.env[%d]: must be KEY=VALUE", p, j))
				}
			}
		} else if b.Group != "" {
			errs = append(errs, fmt.Errorf("%s.group: only backends with cmd can be grouped", p))
		}
	}
	for i, r := range c.Rules {
		if r.Model == "" {
			errs = append(errs, fmt.Errorf("rules[%d].model: required", i))
		}
		if !names[r.Backend] {
			errs = append(errs, fmt.Errorf("rules[%d].backend: no backend named %q", i, r.Backend))
		}
	}
	if c.DefaultBackend != "" && !names[c.DefaultBackend] {
		errs = append(errs, fmt.Errorf("defaultBackend: no backend named %q", c.DefaultBackend))
	}
	for i, d := range c.Discover {
		p := fmt.Sprintf("discover[%d]", i)
		if d.PortStart < 1 || d.PortEnd > 65535 || d.PortStart > d.PortEnd {
			errs = append(errs, fmt.Errorf("%s: ports must satisfy 1 <= portStart <= portEnd <= 65535, got %d-%d", p, d.PortStart, d.PortEnd))
		}
		if d.Every < 0 || (d.Every > 0 && time.Duration(d.Every) < time.Second) {
			errs = append(errs, fmt.Errorf("%s.every: must be at least 1s", p))
		}
		for j, tag := range d.Tags {
			if tag == "" || strings.ContainsAny(tag, ": /") {
				errs = append(errs, fmt.Errorf("%s.tags[%d]: must be non-empty without ':', '/' or spaces, got %q", p, j, tag))
			}
		}
	}
	h := c.HealthCheck
	if h.Interval < 0 || h.Timeout < 0 {
		errs = append(errs, errors.New("healthCheck: interval and timeout must be >= 0"))
	}
	if h.Path != "" && !strings.HasPrefix(h.Path, "/") {
		errs = append(errs, errors.New("healthCheck.path: must start with /"))
	}
	if h.FailureThreshold < 0 {
		errs = append(errs, errors.New("healthCheck.failureThreshold: must be >= 0"))
	}
	return errors.Join(errs...)
}

// redactURL hides the password of a URL that holds one, for messages.
func redactURL(s string) string {
	if u, err := url.Parse(s); err == nil {
		return u.Redacted()
	}
	if i, j := strings.Index(s, "://"), strings.LastIndex(s, "@"); i >= 0 && j > i {
		return s[:i+3] + "xxxxx" + s[j:]
	}
	return s
}
