// Package lifecycle starts model servers on demand and stops them when
// idle: a backend with a command is started when a request for one of its
// models arrives, waited for until its ready check answers, stopped after
// unloadAfter (or a request's keep_alive) with nothing in flight or queued,
// and swapped against the other members of its group (one GPU holds one
// model), serving the loaded model first for at most maxSwapWait.
//
// It exists apart from the fleet's routing because it owns processes and
// their timers; the server asks it for a running backend before each send
// and tells it when the send is over.
package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/llproxy/llproxy/internal/safe"
)

// State is a managed backend's state.
type State string

// The states of a managed backend.
const (
	Stopped  State = "stopped"
	Starting State = "starting"
	Ready    State = "ready"
	Stopping State = "stopping"
	Failed   State = "failed"
)

// DefaultUnloadAfter is how long a backend may sit idle before it is
// stopped, unless its config or a request's keep_alive says otherwise (as
// Ollama's default keep_alive).
const DefaultUnloadAfter = 5 * time.Minute

// ErrClosed is returned by Acquire after Shutdown.
var ErrClosed = errors.New("lifecycle: shutting down")

// Spec is one managed backend.
type Spec struct {
	Name  string
	URL   *url.URL
	Cmd   []string
	Env   []string
	Dir   string
	Group string
	// UnloadAfter: 0 means DefaultUnloadAfter, negative never.
	UnloadAfter  time.Duration
	ReadyPath    string
	ReadyTimeout time.Duration
	StopGrace    time.Duration
	// Models are served under these names (for /status).
	Models []string
}

// Clock is the manager's time: now, and the idle-unload timers. Tests pass
// a fake one; nil means real time.
type Clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is the part of *time.Timer the manager uses.
type Timer interface{ Stop() bool }

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }

// Options configure a Manager.
type Options struct {
	Logger *slog.Logger
	Clock  Clock
	// MaxSwapWait bounds how long a request for a group's unloaded model
	// waits while the loaded model is still being asked for. Default 30s.
	MaxSwapWait time.Duration
	// Queued reports how many requests wait in the gateway's queues for a
	// backend's models: a backend is never unloaded while any do.
	Queued func(backend string) int
	// Secrets are values (upstream keys, client keys) that must not reach
	// a model server: variables of llproxy's environment holding one are
	// not passed on.
	Secrets []string
}

// Manager runs the managed backends. It is safe for concurrent use.
type Manager struct {
	log         *slog.Logger
	clock       Clock
	client      *http.Client
	maxSwapWait time.Duration
	queued      func(string) int
	env         []string // llproxy's environment, less its secrets

	mu      sync.Mutex
	procs   map[string]*proc
	retired []*proc          // replaced by a reload, still running (reconfigure.go)
	next    map[string]*proc // per group: the member a drain was made for, which starts next
	changed chan struct{}    // closed and replaced on every change
	closed  bool
}

type proc struct {
	spec      Spec
	state     State
	err       error
	cmd       *exec.Cmd
	exited    chan struct{}
	startSeq  int
	readyAt   time.Time
	inflight  int
	waiting   int       // Acquire calls waiting for it
	waitSince time.Time // when the oldest of them began
	draining  bool      // its group waits to swap it out: no new sends
	unloadAsk bool      // an unload was asked for while it was busy: stop when idle
	lastUsed  time.Time
	keepAlive *time.Duration // a request's keep_alive, from then on
	unload    Timer
	unloadAt  time.Time
}

// New returns a manager of specs. Nothing starts until asked for.
func New(specs []Spec, opts Options) *Manager {
	m := &Manager{log: opts.Logger, clock: opts.Clock, maxSwapWait: opts.MaxSwapWait, queued: opts.Queued,
		procs: map[string]*proc{}, next: map[string]*proc{}, changed: make(chan struct{}),
		client: &http.Client{Timeout: 2 * time.Second}}
	if m.log == nil {
		m.log = slog.Default()
	}
	if m.clock == nil {
		m.clock = realClock{}
	}
	if m.maxSwapWait == 0 {
		m.maxSwapWait = 30 * time.Second
	}
	if m.queued == nil {
		m.queued = func(string) int { return 0 }
	}
	for _, kv := range os.Environ() {
		_, v, _ := strings.Cut(kv, "=")
		if !holdsSecret(v, opts.Secrets) {
			m.env = append(m.env, kv)
		}
	}
	for _, s := range specs {
		m.procs[s.Name] = &proc{spec: withDefaults(s), state: Stopped}
	}
	return m
}

// Defaults of a Spec.
const (
	DefaultReadyTimeout = 2 * time.Minute
	DefaultStopGrace    = 10 * time.Second
)

func (m *Manager) broadcast() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// Acquire returns when backend is running and may take one more request,
// starting it (and stopping the running member of its group) if it must.
// The caller sends the request and then calls the returned release. It
// fails when the backend cannot start (the error says why), on Shutdown, or
// when ctx ends.
func (m *Manager) Acquire(ctx context.Context, backend string) (release func(), err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.procs[backend]
	if p == nil {
		return nil, fmt.Errorf("lifecycle: no managed backend %q", backend)
	}
	p.waiting++
	if p.waiting == 1 {
		p.waitSince = m.clock.Now()
	}
	m.cancelUnload(p)
	defer func() {
		p.waiting--
		if p.waiting == 0 {
			if g := p.spec.Group; g != "" && m.next[g] == p {
				delete(m.next, g) // nobody waits for it any more
				m.broadcast()
			}
			m.idle(p)
		}
	}()
	attempt := -1 // the start this call waits for
	for {
		if m.closed {
			return nil, ErrClosed
		}
		switch p.state {
		case Ready:
			if !p.draining {
				p.inflight++
				return m.releaser(p), nil
			}
		case Failed:
			if attempt == p.startSeq {
				return nil, p.err // the start we waited for failed
			}
			fallthrough
		case Stopped:
			if !m.portTaken(p) && m.makeRoom(p) {
				m.start(p)
				attempt = p.startSeq
				if p.state == Failed {
					return nil, p.err
				}
				continue
			}
		case Starting:
			attempt = p.startSeq
		}
		if err := m.wait(ctx, p); err != nil {
			return nil, err
		}
	}
}

// wait sleeps until something changes, ctx ends, or (for a swap) the
// loaded model's grace runs out. m.mu is held; it is released meanwhile.
func (m *Manager) wait(ctx context.Context, p *proc) error {
	ch := m.changed
	if p.spec.Group != "" {
		// A swap may become due when the loaded model's grace runs out.
		if left := p.waitSince.Add(m.maxSwapWait).Sub(m.clock.Now()); left > 0 {
			t := m.clock.AfterFunc(left, safe.Func(m.log, "swap timer", func() {
				m.mu.Lock()
				m.broadcast()
				m.mu.Unlock()
			}))
			defer t.Stop()
		}
	}
	m.mu.Unlock()
	defer m.mu.Lock()
	select {
	case <-ch:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// makeRoom reports whether p's group lets it start now. A running member
// is stopped once nothing is in flight or waiting for it; while it still
// has work, p waits, but for at most maxSwapWait: then the member drains
// (no new sends) and is stopped when its last request finishes. A drain is
// made for the member that waited: it gets the group next, and the drained
// member cannot take it back meanwhile (no thrashing). m.mu is held.
func (m *Manager) makeRoom(p *proc) bool {
	g := p.spec.Group
	if g == "" {
		return true
	}
	if n := m.next[g]; n != nil && n != p && n.waiting > 0 {
		return false // the group is promised to another member
	}
	free := true
	for _, q := range m.procs {
		if q == p || q.spec.Group != p.spec.Group {
			continue
		}
		switch q.state {
		case Stopping, Starting:
			free = false
		case Ready:
			free = false
			busy := q.inflight > 0 || q.waiting > 0 || m.queued(q.spec.Name) > 0
			if busy && m.clock.Now().Sub(p.waitSince) < m.maxSwapWait {
				continue // serve the loaded model first
			}
			q.draining = true
			if m.next[g] == nil {
				m.next[g] = p
			}
			if q.inflight == 0 {
				m.stop(q)
			}
		}
	}
	return free
}

// releaser returns the release of one send to p.
func (m *Manager) releaser(p *proc) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			defer m.mu.Unlock()
			p.inflight--
			p.lastUsed = m.clock.Now()
			if (p.draining || (p.unloadAsk && p.waiting == 0)) && p.inflight == 0 {
				if p.unloadAsk {
					m.log.Info("backend unloaded as asked, after its last request", "backend", p.spec.Name)
				}
				m.stop(p)
			}
			m.idle(p)
			m.broadcast()
		})
	}
}

// Status is a managed backend's state, as /status reports it.
type Status struct {
	Name     string   `json:"name"`
	State    State    `json:"state"`
	Models   []string `json:"models"`
	Group    string   `json:"group,omitempty"`
	PID      int      `json:"pid,omitempty"`
	InFlight int      `json:"inFlight"`
	Queued   int      `json:"queued"`
	// Draining: its group waits to swap it out, so it takes no new sends.
	Draining bool      `json:"draining,omitempty"`
	IdleFor  string    `json:"idleFor,omitempty"`
	UnloadAt time.Time `json:"unloadAt,omitzero"`
	Error    string    `json:"error,omitempty"`
}

// Status reports every managed backend, by name.
func (m *Manager) Status() []Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.clock.Now()
	var out []Status
	for _, p := range m.all() {
		name := p.spec.Name
		s := Status{Name: name, State: p.state, Models: p.spec.Models, Group: p.spec.Group, InFlight: p.inflight,
			Queued: p.waiting + m.queued(name), UnloadAt: p.unloadAt, Draining: p.draining}
		if p.cmd != nil {
			s.PID = p.cmd.Process.Pid
		}
		if p.state == Ready && p.inflight == 0 && !p.lastUsed.IsZero() {
			s.IdleFor = now.Sub(p.lastUsed).Round(time.Second).String()
		}
		if p.err != nil {
			s.Error = p.err.Error()
		}
		out = append(out, s)
	}
	slices.SortStableFunc(out, func(a, b Status) int { return cmpString(a.Name, b.Name) })
	return out
}

// all is every process the manager knows: its backends, then the retired
// ones still running. m.mu is held.
func (m *Manager) all() []*proc {
	out := make([]*proc, 0, len(m.procs)+len(m.retired))
	for _, p := range m.procs {
		out = append(out, p)
	}
	for _, p := range m.retired {
		if p.state != Stopped && p.state != Failed {
			out = append(out, p)
		}
	}
	return out
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Shutdown stops every process the manager started and waits (at most
// the longest grace period plus a second) until they are gone; new
// Acquires fail with ErrClosed.
func (m *Manager) Shutdown() {
	m.mu.Lock()
	m.closed = true
	var exits []chan struct{}
	var grace time.Duration
	for _, p := range m.all() {
		if p.cmd != nil {
			exits = append(exits, p.exited)
			grace = max(grace, p.spec.StopGrace)
			m.stop(p)
		}
	}
	m.broadcast()
	m.mu.Unlock()
	deadline := time.After(grace + time.Second)
	for _, ch := range exits {
		select {
		case <-ch:
		case <-deadline:
		}
	}
}

// holdsSecret reports whether an environment value is a secret, or holds
// one (a URL with a password, a list of keys): such a variable is not
// handed to a model server. Secrets shorter than 8 bytes count only as
// the whole value, so that a short one does not drop unrelated variables.
func holdsSecret(v string, secrets []string) bool {
	if v == "" {
		return false
	}
	for _, s := range secrets {
		if s != "" && (v == s || (len(s) >= 8 && strings.Contains(v, s))) {
			return true
		}
	}
	return false
}
