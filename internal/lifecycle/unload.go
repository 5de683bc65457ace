package lifecycle

import (
	"slices"
	"sort"
	"time"

	"github.com/llproxy/llproxy/internal/safe"
)

// When a managed backend stops: idle for its unloadAfter (or the
// keep_alive a request asked for), or unloaded on demand (the admin's
// /unload, an Ollama client's keep_alive 0).

// idle arms p's unload timer if nothing is in flight or waiting. Every
// path that leaves p idle comes through here. m.mu is held.
func (m *Manager) idle(p *proc) {
	if p.state != Ready || p.inflight > 0 || p.waiting > 0 {
		return
	}
	after := p.idleAfter()
	if p.keepAlive != nil {
		after = *p.keepAlive
	}
	if after < 0 {
		return // never
	}
	m.arm(p, after, after)
}

// idleRecheck is the least time before an idle backend that had requests
// queued for it is looked at again.
const idleRecheck = time.Second

// arm sets p's unload timer to fire after d; after is the idle time it
// stands for, for the log. When it fires with requests still queued for p
// in the gateway, they will use it, unless their clients give up: it is
// armed again, so an unload is never forgotten. m.mu is held.
func (m *Manager) arm(p *proc, d, after time.Duration) {
	m.cancelUnload(p)
	p.unloadAt = m.clock.Now().Add(d)
	p.unload = m.clock.AfterFunc(d, safe.Func(m.log, "unload timer of "+p.spec.Name, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		p.unload = nil
		if p.state != Ready || p.inflight > 0 || p.waiting > 0 {
			return // busy again: its release arms the timer anew
		}
		if m.queued(p.spec.Name) > 0 {
			m.arm(p, max(after, idleRecheck), after)
			return
		}
		m.log.Info("backend idle: unloading", "backend", p.spec.Name, "after", after.String())
		m.stop(p)
	}))
}

func (m *Manager) cancelUnload(p *proc) {
	if p.unload != nil {
		p.unload.Stop()
		p.unload = nil
	}
	p.unloadAt = time.Time{}
}

// KeepAlive sets how long backend stays loaded after its last request,
// from this request on: 0 unloads right after it, negative never. Unless
// pin is set (an admin's), a keep-alive longer than the backend's
// configured idle time (negative included) is clamped to it: a client
// cannot hold a GPU past what the operator configured.
func (m *Manager) KeepAlive(backend string, d time.Duration, pin bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p := m.procs[backend]; p != nil {
		if idle := p.idleAfter(); !pin && idle >= 0 && (d < 0 || d > idle) {
			d = idle
		}
		p.keepAlive = &d
		m.idle(p)
	}
}

// idleAfter is how long p may sit idle as configured: its UnloadAfter,
// DefaultUnloadAfter when unset; negative means never.
func (p *proc) idleAfter() time.Duration {
	if p.spec.UnloadAfter == 0 {
		return DefaultUnloadAfter
	}
	return p.spec.UnloadAfter
}

// Unloaded is what an unload did: the backends stopped (their processes
// have exited, or their stop timed out and they were killed), and the
// busy ones it will stop when their last request ends, with the requests
// they have in flight or waiting for them.
type Unloaded struct {
	Stopped  []string
	Deferred []Deferred
}

// Deferred is a busy backend an unload stops when its last request ends.
type Deferred struct {
	Name     string `json:"name"`
	InFlight int    `json:"inFlight"`
}

// Unload stops backend, or every backend when backend is "": the idle ones
// (nothing in flight, waiting or queued) now, returning once their
// processes have exited (bounded by their stop grace, after which they are
// killed); the busy ones when their last request ends, as Ollama does.
func (m *Manager) Unload(backend string) Unloaded {
	m.mu.Lock()
	var out Unloaded
	var exits []chan struct{}
	for name, p := range m.procs {
		if backend != "" && name != backend {
			continue
		}
		switch {
		case p.state == Ready && p.inflight == 0 && p.waiting == 0 && m.queued(name) == 0:
			exits = append(exits, p.exited)
			m.stop(p)
			out.Stopped = append(out.Stopped, name)
		case p.state == Stopping:
			exits = append(exits, p.exited) // already on its way: answer when it is gone
			out.Stopped = append(out.Stopped, name)
		case (p.state == Ready || p.state == Starting) && (p.inflight > 0 || p.waiting > 0):
			p.unloadAsk = true
			out.Deferred = append(out.Deferred, Deferred{Name: name, InFlight: p.inflight + p.waiting})
		}
	}
	m.mu.Unlock()
	for _, e := range exits {
		<-e // the stop's grace ends with a kill, and the waiter closes it
	}
	sort.Strings(out.Stopped)
	slices.SortFunc(out.Deferred, func(a, b Deferred) int { return cmpString(a.Name, b.Name) })
	return out
}
