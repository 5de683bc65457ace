// Package fleet is a route's way to its upstream: where each send of a
// request goes, held for the time of the send. A route with one forward URL
// leases that URL (Single); a route with a fleet of backends (routing,
// health and discovery: package backends; the model servers llproxy runs
// among them: package lifecycle) leases a backend that serves the model,
// waits for one with a free slot, and gets its server running (Fleet).
//
// It exists so that the request pipeline has one way to send whatever the
// route is: it asks for a lease, sends, and releases it with a defer.
package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/lifecycle"
)

// ErrNotStarted wraps the reason a managed server could not be started.
var ErrNotStarted = errors.New("fleet: the backend could not be started")

// Errors of a lease, as its callers branch on them: no backend serves the
// model, or every one serving it stayed at its maxConcurrent.
var (
	ErrUnknownModel = backends.ErrUnknownModel
	ErrBusy         = backends.ErrBusy
)

// Request is what one request asks of its route's upstream, over all its
// sends; the pipeline keeps one per request.
type Request struct {
	Model string
	// KeepAlive, if set, is the request's keep_alive for a managed server.
	KeepAlive *time.Duration
	// Deadline bounds the wait for a backend with a free slot.
	Deadline time.Time
	// avoid are the backends that failed this request already.
	avoid []*backends.Backend
}

// Reset makes r a new request's.
func (r *Request) Reset(model string, keepAlive *time.Duration, deadline time.Time) {
	*r = Request{Model: model, KeepAlive: keepAlive, Deadline: deadline, avoid: r.avoid[:0]}
}

// Lease is one send's hold on where it goes: the URL, the model id to send
// there, whether the route's key may go there. Release ends it (once; a
// nil or repeated Release does nothing).
type Lease struct {
	Target *url.URL
	// Model is the id to send: the backend's own name for the model; ""
	// sends it as the client named it.
	Model string
	// SendKey reports whether the route's apiKey may be sent to Target.
	SendKey bool
	// Backend names the backend, "" for a single URL.
	Backend string

	f       *Fleet
	be      *backends.Backend
	req     *Request
	release func() // the managed server's hold, if any
	once    sync.Once
}

// Release ends the lease: the backend's in-flight count and the managed
// server's hold are given back.
func (l *Lease) Release() {
	if l == nil || l.f == nil {
		return
	}
	l.once.Do(func() {
		if l.release != nil {
			l.release()
		}
		l.f.pool.Done(l.be)
	})
}

// Failed records that the send could not connect or lost its connection
// before an answer: a passive health check, and the request's next send
// goes elsewhere.
func (l *Lease) Failed(err error) {
	if l == nil || l.f == nil {
		return
	}
	l.f.pool.Failed(l.be, err)
	l.req.avoid = append(l.req.avoid, l.be)
}

// Single is the upstream of a route with one forward URL.
type Single struct{ lease Lease }

// NewSingle returns the lessor of target.
func NewSingle(target *url.URL) *Single {
	return &Single{lease: Lease{Target: target, SendKey: true}}
}

// Lease returns the route's URL, where the model goes as the client named
// it (Model ""); it never fails and holds nothing, and every send shares
// the one lease.
func (s *Single) Lease(context.Context, *Request) (*Lease, error) { return &s.lease, nil }

// Any is Lease, for a request that names no model.
func (s *Single) Any() (*Lease, bool) { return &s.lease, true }

// Knows reports true: a single upstream is asked about every model.
func (s *Single) Knows(string) bool { return true }

// Fleet is the upstream of a route with backends.
type Fleet struct {
	pool *backends.Pool
	life *lifecycle.Manager // nil if llproxy runs none of them
	log  *slog.Logger
	// handedOver: a reloaded fleet took life over; Shutdown leaves it.
	handedOver atomic.Bool
}

// Options are a Fleet's dependencies.
type Options struct {
	Logger *slog.Logger
	// MaxSwapWait bounds a swap's wait in a group (see lifecycle).
	MaxSwapWait time.Duration
	// Queued counts the requests waiting in the gateway for model: a
	// server is never unloaded while any wait for one of its models.
	Queued func(model string) int
	// Secrets never reach a managed server's environment.
	Secrets []string
	// Previous is the route's fleet before a reload, if it had one: its
	// model servers are handed over (see lifecycle.Manager.Reconfigure),
	// never run twice.
	Previous *Fleet
}

// New builds the fleet of cfg (validated and defaulted).
func New(cfg backends.Config, opts Options) (*Fleet, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	pool, err := backends.New(cfg, backends.Options{Logger: opts.Logger})
	if err != nil {
		return nil, err
	}
	f := &Fleet{pool: pool, log: opts.Logger}
	var specs []lifecycle.Spec
	models := map[string][]string{}
	for _, b := range cfg.Backends {
		if !b.Managed() {
			continue
		}
		u, _ := url.Parse(b.URL)
		ready := b.Ready.Path
		if ready == "" {
			ready = b.HealthCheckPath
		}
		if ready == "" {
			ready = cfg.HealthCheck.Path
		}
		specs = append(specs, lifecycle.Spec{Name: b.Name, URL: u, Cmd: b.Cmd, Env: b.Env, Dir: b.Dir, Group: b.Group,
			UnloadAfter: time.Duration(b.UnloadAfter), ReadyPath: ready, ReadyTimeout: time.Duration(b.Ready.Timeout),
			StopGrace: time.Duration(b.StopGrace), Models: b.Models})
		models[b.Name] = b.Models
	}
	if len(specs) > 0 {
		queued := func(backend string) int {
			n := 0
			if opts.Queued != nil {
				for _, m := range models[backend] {
					n += opts.Queued(m)
				}
			}
			return n
		}
		if prev := opts.Previous; prev != nil && prev.life != nil {
			prev.handedOver.Store(true)
			f.life = prev.life
			f.life.Reconfigure(specs, queued)
			return f, nil
		}
		f.life = lifecycle.New(specs, lifecycle.Options{Logger: opts.Logger, MaxSwapWait: opts.MaxSwapWait,
			Queued: queued, Secrets: opts.Secrets})
	}
	return f, nil
}

// Lease picks the backend for the next send of req (skipping those that
// failed it), waiting while every backend serving the model is at its
// maxConcurrent, until one frees, req.Deadline passes or ctx ends; then,
// for a backend llproxy runs, starts it (or swaps it in) and holds it. It
// fails with backends.ErrUnknownModel, ErrUnavailable or ErrBusy, with an
// error wrapping ErrNotStarted, or with ctx.Err().
func (f *Fleet) Lease(ctx context.Context, req *Request) (*Lease, error) {
	be, id, err := f.pick(ctx, req)
	if err != nil {
		return nil, err
	}
	l := &Lease{Target: be.URL, Model: id, SendKey: be.SendKey(), Backend: be.Name, f: f, be: be, req: req}
	if f.life != nil && be.Managed() {
		if req.KeepAlive != nil {
			f.life.KeepAlive(be.Name, *req.KeepAlive, false) // a request's: never a pin
		}
		release, err := f.life.Acquire(ctx, be.Name)
		if err != nil {
			f.pool.Done(be)
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("%w: %w", ErrNotStarted, err)
		}
		l.release = release
	}
	return l, nil
}

func (f *Fleet) pick(ctx context.Context, req *Request) (*backends.Backend, string, error) {
	var timeout <-chan time.Time
	for {
		freed := f.pool.Freed() // before Pick: a slot freed in between wakes us
		be, id, err := f.pool.Pick(req.Model, req.avoid)
		if !errors.Is(err, backends.ErrBusy) {
			return be, id, err
		}
		if timeout == nil {
			t := time.NewTimer(max(0, time.Until(req.Deadline)))
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-freed:
		case <-timeout:
			return nil, "", err
		case <-ctx.Done():
			return nil, "", ctx.Err()
		}
	}
}

// Any leases a healthy backend (the default one first) for a request that
// names no model.
func (f *Fleet) Any() (*Lease, bool) {
	be, ok := f.pool.Any()
	if !ok {
		return nil, false
	}
	return &Lease{Target: be.URL, SendKey: be.SendKey(), Backend: be.Name, f: f, be: be}, true
}

// Knows reports whether the fleet can route model at all.
func (f *Fleet) Knows(model string) bool { return f.pool.Knows(model) }

// Models lists the models the fleet serves, by the names clients use.
func (f *Fleet) Models() []string { return f.pool.Models() }

// ModelsJSON is the fleet's aggregated /v1/models answer.
func (f *Fleet) ModelsJSON(ctx context.Context) []byte { return f.pool.ModelsJSON(ctx) }

// Pool is the fleet's backends.
func (f *Fleet) Pool() *backends.Pool { return f.pool }

// Health reports every backend's health, running every check first if
// force is set.
func (f *Fleet) Health(ctx context.Context, force bool) []backends.Status {
	if force {
		f.pool.CheckNow(ctx)
	}
	return f.pool.Status()
}

// Servers reports the model servers llproxy runs (none: nil).
func (f *Fleet) Servers() []lifecycle.Status {
	if f.life == nil {
		return nil
	}
	return f.life.Status()
}

// Unload stops the managed servers serving model (all for ""), at once if
// idle, else when their last request ends; it returns their names.
func (f *Fleet) Unload(model string) lifecycle.Unloaded {
	var out lifecycle.Unloaded
	if f.life == nil {
		return out
	}
	if model == "" {
		return f.life.Unload("")
	}
	for _, b := range f.pool.Serving(model) {
		if b.Managed() {
			u := f.life.Unload(b.Name)
			out.Stopped = append(out.Stopped, u.Stopped...)
			out.Deferred = append(out.Deferred, u.Deferred...)
		}
	}
	return out
}

// Load starts the managed server serving model (an Ollama load request),
// with keepAlive if given; pin lets it exceed the configured idle time (an
// admin's request), else it is clamped to it.
func (f *Fleet) Load(ctx context.Context, model string, keepAlive *time.Duration, pin bool) error {
	if f.life == nil {
		return nil
	}
	for _, b := range f.pool.Serving(model) {
		if !b.Managed() {
			continue
		}
		if keepAlive != nil {
			f.life.KeepAlive(b.Name, *keepAlive, pin)
		}
		release, err := f.life.Acquire(ctx, b.Name)
		if err != nil {
			return err
		}
		release()
		return nil
	}
	return nil
}

// Run keeps the health checks and discovery scans going until ctx ends.
func (f *Fleet) Run(ctx context.Context) { f.pool.Run(ctx) }

// Shutdown stops every server llproxy started, unless a reloaded fleet
// took them over.
func (f *Fleet) Shutdown() {
	if f.life != nil && !f.handedOver.Load() {
		f.life.Shutdown()
	}
}
