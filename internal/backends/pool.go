// Package backends runs a route's fleet of OpenAI-compatible model servers
// (llama.cpp, vLLM, TabbyAPI, Ollama, LM Studio): which backend serves which
// model, which are healthy, which exist at all (port-range discovery), and
// what the fleet lists at /v1/models.
//
// It exists apart from the HTTP server so that routing decisions are plain
// functions over a table the health checks and scans keep up to date; the
// server asks it for a backend per send and tells it how the send went.
package backends

import (
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Errors Pick returns.
var (
	ErrUnknownModel = errors.New("backends: no backend serves this model")
	ErrUnavailable  = errors.New("backends: every backend serving this model is unhealthy")
	ErrBusy         = errors.New("backends: every backend serving this model is at its maxConcurrent")
)

// Backend is one server of the fleet. Its health and model list are guarded
// by the pool's mutex; Outstanding is atomic.
type Backend struct {
	Name       string
	URL        *url.URL
	healthPath string
	discovered bool // found by a scan: dropped when a scan no longer finds it
	managed    bool // run by llproxy: its process's state is its health
	sendKey    bool // may be sent the route's apiKey
	staticIDs  []string

	// Outstanding counts requests sent to it and not yet finished.
	Outstanding   atomic.Int64
	maxConcurrent int // 0: no limit

	healthy     bool
	lastCheck   time.Time
	errorCount  int // failures in a row
	totalErrors int
	lastError   string
	models      []Model
}

// Model is one model a backend serves.
type Model struct {
	// Name is what clients use: the id, or for discovered servers the id
	// without directory and extension, with ":tag".
	Name string
	// ID is the backend's own id, sent upstream.
	ID string
	// Raw is the backend's /v1/models entry, if it listed one.
	Raw []byte
}

// Pool is a route's fleet. It is safe for concurrent use.
type Pool struct {
	cfg    Config
	client *http.Client
	log    *slog.Logger
	now    func() time.Time

	mu       sync.RWMutex
	backends []*Backend
	rules    map[string]string // model -> backend name

	cacheMu  sync.Mutex
	cached   []byte
	cachedAt time.Time

	freedMu sync.Mutex
	freed   chan struct{} // closed and replaced when a capped backend frees a slot
}

// Options are a Pool's dependencies; all are optional.
type Options struct {
	Logger *slog.Logger
	// Client makes health checks, model listings and scans. Default: one
	// with the health timeout and short dials.
	Client *http.Client
	// Now is the clock of the models cache and health timestamps.
	Now func() time.Time
}

// New builds a pool from a validated, defaulted config. Backends start
// healthy; the first check corrects that.
func New(cfg Config, opts Options) (*Pool, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Pool{cfg: cfg, client: opts.Client, log: opts.Logger, now: opts.Now, rules: map[string]string{},
		freed: make(chan struct{})}
	if p.log == nil {
		p.log = slog.Default()
	}
	if p.now == nil {
		p.now = time.Now
	}
	if p.client == nil {
		p.client = newProbeClient(time.Duration(cfg.HealthCheck.Timeout))
	}
	for _, bc := range cfg.Backends {
		u, _ := url.Parse(bc.URL)
		b := &Backend{Name: bc.Name, URL: u, healthPath: bc.HealthCheckPath, staticIDs: bc.Models, healthy: true,
			managed: bc.Managed(), maxConcurrent: bc.MaxConcurrent, sendKey: true}
		if b.healthPath == "" {
			b.healthPath = cfg.HealthCheck.Path
		}
		for _, id := range bc.Models {
			b.models = append(b.models, Model{Name: id, ID: id})
		}
		p.backends = append(p.backends, b)
	}
	for _, r := range cfg.Rules {
		p.rules[r.Model] = r.Backend
	}
	return p, nil
}

// Pick chooses the backend for a send of model: (1) a rule's backend; (2)
// the healthy backends serving it, the one with the fewest outstanding
// requests; (3) the default backend. It skips the backends in exclude
// (those that already failed this request) and those at their
// maxConcurrent; when only those are left it returns ErrBusy, and the
// caller waits for Freed. It returns the backend and the model id to send
// it; the caller calls Done when the send is over.
func (p *Pool) Pick(model string, exclude []*Backend) (*Backend, string, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	for {
		b, id, err := p.choose(model, exclude)
		if err != nil || b.take() {
			return b, id, err
		}
		// Another send took its last slot meanwhile: choose again.
	}
}

// choose is Pick's decision; it does not count the send. p.mu is held.
func (p *Pool) choose(model string, exclude []*Backend) (*Backend, string, error) {
	busy := false
	usable := func(b *Backend) bool {
		if !b.healthy || slices.Contains(exclude, b) {
			return false
		}
		if b.full() {
			busy = true
			return false
		}
		return true
	}
	unavailable := func() error {
		if busy {
			return ErrBusy
		}
		return ErrUnavailable
	}
	// (1)
	if name, ok := p.rules[model]; ok {
		b := p.byName(name)
		if b == nil || !usable(b) {
			return nil, "", unavailable()
		}
		return b, b.idFor(model), nil
	}
	// (2)
	var best *Backend
	var bestID string
	serving := false
	for _, b := range p.backends {
		id, ok := b.serves(model)
		if !ok {
			continue
		}
		serving = true
		if usable(b) && (best == nil || b.Outstanding.Load() < best.Outstanding.Load()) {
			best, bestID = b, id
		}
	}
	if best != nil {
		return best, bestID, nil
	}
	// (3)
	if d := p.byName(p.cfg.DefaultBackend); d != nil && usable(d) {
		return d, model, nil
	}
	if serving || p.cfg.DefaultBackend != "" {
		return nil, "", unavailable()
	}
	return nil, "", ErrUnknownModel
}

// full reports whether b has all its maxConcurrent sends in flight.
func (b *Backend) full() bool {
	return b.maxConcurrent > 0 && b.Outstanding.Load() >= int64(b.maxConcurrent)
}

// take counts one more send to b, unless that would pass its
// maxConcurrent.
func (b *Backend) take() bool {
	for {
		n := b.Outstanding.Load()
		if b.maxConcurrent > 0 && n >= int64(b.maxConcurrent) {
			return false
		}
		if b.Outstanding.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Freed is closed when a send ends (Done): a backend at its maxConcurrent
// may have room again.
func (p *Pool) Freed() <-chan struct{} {
	p.freedMu.Lock()
	defer p.freedMu.Unlock()
	return p.freed
}

// Knows reports whether Pick can route model at all (ignoring health): a
// rule, a backend listing it, or a default backend.
func (p *Pool) Knows(model string) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if _, ok := p.rules[model]; ok || p.cfg.DefaultBackend != "" {
		return true
	}
	for _, b := range p.backends {
		if _, ok := b.serves(model); ok {
			return true
		}
	}
	return false
}

// Any returns a healthy backend for a request that names no model (the
// default backend if healthy).
func (p *Pool) Any() (*Backend, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if d := p.byName(p.cfg.DefaultBackend); d != nil && d.healthy && d.take() {
		return d, true
	}
	for _, b := range p.backends {
		if b.healthy && b.take() {
			return b, true
		}
	}
	return nil, false
}

// Done ends a send Pick or Any started.
func (p *Pool) Done(b *Backend) {
	b.Outstanding.Add(-1)
	if b.maxConcurrent > 0 {
		p.freedMu.Lock()
		close(p.freed)
		p.freed = make(chan struct{})
		p.freedMu.Unlock()
	}
}

// Failed records a connection failure while proxying to b (a passive
// health check): it counts toward the failure threshold.
func (p *Pool) Failed(b *Backend, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fail(b, err)
}

// fail counts one failure of b. p.mu is held.
func (p *Pool) fail(b *Backend, err error) {
	if b.managed {
		return // a managed server is restarted on demand, not avoided
	}
	b.errorCount++
	b.totalErrors++
	b.lastError = err.Error()
	if b.healthy && b.errorCount >= p.cfg.HealthCheck.FailureThreshold {
		b.healthy = false
		p.log.Warn("backend unhealthy", "backend", b.Name, "url", b.URL.Redacted(), "err", b.lastError)
	}
}

// ok records a successful check of b. p.mu is held.
func (p *Pool) ok(b *Backend) {
	if !b.healthy {
		p.log.Info("backend healthy again", "backend", b.Name, "url", b.URL.Redacted())
	}
	b.healthy, b.errorCount = true, 0
}

// Models returns every client-visible model name of the fleet, sorted.
func (p *Pool) Models() []string {
	p.mu.RLock()
	defer p.mu.RUnlock()
	var names []string
	for _, b := range p.backends {
		for _, m := range b.models {
			if !slices.Contains(names, m.Name) {
				names = append(names, m.Name)
			}
		}
	}
	for model := range p.rules {
		if !slices.Contains(names, model) {
			names = append(names, model)
		}
	}
	slices.Sort(names)
	return names
}

func (p *Pool) byName(name string) *Backend {
	if name == "" {
		return nil
	}
	for _, b := range p.backends {
		if b.Name == name {
			return b
		}
	}
	return nil
}

// serves reports whether b lists model, and its id there. p.mu is held.
func (b *Backend) serves(model string) (string, bool) {
	for _, m := range b.models {
		if m.Name == model {
			return m.ID, true
		}
	}
	return "", false
}

// idFor is the id to send b for model: its own id if it lists the model.
func (b *Backend) idFor(model string) string {
	if id, ok := b.serves(model); ok {
		return id
	}
	return model
}

// Managed reports whether llproxy runs the backend (see package lifecycle).
func (b *Backend) Managed() bool { return b.managed }

// SendKey reports whether the route's apiKey may be sent to the backend:
// always to a configured one; to a discovered one (whatever listens on a
// port of the range) only when its discover entry says sendApiKey.
func (b *Backend) SendKey() bool { return b.sendKey }

// Config returns the pool's (defaulted) configuration.
func (p *Pool) Config() Config { return p.cfg }

// Serving returns the backends a rule or a listing sends model to.
func (p *Pool) Serving(model string) []*Backend {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if name, ok := p.rules[model]; ok {
		if b := p.byName(name); b != nil {
			return []*Backend{b}
		}
	}
	var out []*Backend
	for _, b := range p.backends {
		if _, ok := b.serves(model); ok {
			out = append(out, b)
		}
	}
	return out
}
