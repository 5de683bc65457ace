package lifecycle

import (
	"reflect"
	"slices"
)

// A reload that changes a fleet reconfigures its manager in place rather
// than starting a second one beside it: two managers would run two copies
// of a model server on one port (the second crashing with "address already
// in use"), or two models of one swap group at once. A backend whose
// process is the same (command, environment, directory and URL) keeps its
// running process; one that changed, or went away, is retired: it takes no
// new request, stops once its requests in flight have finished (at once if
// it has none), and its successor on the same port starts only after it
// has exited. Retired servers show in Status, count in their swap group,
// and are stopped by Shutdown.

// withDefaults fills what a spec leaves unset.
func withDefaults(s Spec) Spec {
	if s.ReadyTimeout == 0 {
		s.ReadyTimeout = DefaultReadyTimeout
	}
	if s.StopGrace == 0 {
		s.StopGrace = DefaultStopGrace
	}
	if s.ReadyPath == "" {
		s.ReadyPath = "/v1/models"
	}
	return s
}

// sameProcess reports whether a and b run the same server process.
func sameProcess(a, b Spec) bool {
	return slices.Equal(a.Cmd, b.Cmd) && slices.Equal(a.Env, b.Env) && a.Dir == b.Dir &&
		reflect.DeepEqual(a.URL, b.URL)
}

// Reconfigure gives the manager a reloaded fleet's specs (see above);
// queued, if not nil, replaces how requests queued in the gateway for a
// backend are counted.
func (m *Manager) Reconfigure(specs []Spec, queued func(backend string) int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if queued != nil {
		m.queued = queued
	}
	procs := make(map[string]*proc, len(specs))
	for _, s := range specs {
		s = withDefaults(s)
		if old := m.procs[s.Name]; old != nil && sameProcess(old.spec, s) {
			old.spec = s // its group, idle time, models... as reloaded
			procs[s.Name] = old
			continue
		}
		procs[s.Name] = &proc{spec: s, state: Stopped}
	}
	for name, p := range m.procs {
		if procs[name] != p {
			m.retire(p)
		}
	}
	m.procs = procs
	m.next = map[string]*proc{}
	m.broadcast()
}

// retire takes p out of service: stopped now if idle, else when its last
// request ends. m.mu is held.
func (m *Manager) retire(p *proc) {
	if p.state == Stopped || p.state == Failed {
		return
	}
	m.log.Info("backend retired by a reload", "backend", p.spec.Name, "in_flight", p.inflight)
	p.draining = true
	m.cancelUnload(p)
	if p.inflight == 0 && p.waiting == 0 {
		m.stop(p)
	}
	m.retired = append(m.retired, p)
}

// portTaken reports whether a retired server still holds p's address (or
// runs in p's swap group): p must not start before it has exited. m.mu is
// held.
func (m *Manager) portTaken(p *proc) bool {
	m.retired = slices.DeleteFunc(m.retired, func(q *proc) bool { return q.state == Stopped || q.state == Failed })
	for _, q := range m.retired {
		if q.spec.URL.Host == p.spec.URL.Host || (p.spec.Group != "" && q.spec.Group == p.spec.Group) {
			return true
		}
	}
	return false
}
