package server

import (
	"context"
	"encoding/json"
	"net/http"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/lifecycle"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/safe"
)

// The admin endpoints over the routes' fleets: /health, /status, /unload,
// and what metrics and the Ollama façade ask of them.

// healthReport is GET /health: every fleet backend's health.
type healthReport struct {
	Status   string          `json:"status"`
	Healthy  int             `json:"healthy"`
	Total    int             `json:"total"`
	Backends []backendHealth `json:"backends"`
}

type backendHealth struct {
	Route string `json:"route"`
	backends.Status
}

// health answers GET /health and, with force, POST /health/force-check
// (which runs every fleet's checks first). "ok": every backend healthy;
// "degraded": some; "down" (503): none.
func (s *Server) health(w http.ResponseWriter, r *http.Request, force bool) {
	rep := healthReport{Status: "ok", Backends: []backendHealth{}}
	for _, name := range s.sortedRouteNames() {
		f := s.routes[name].Fleet()
		if f == nil {
			continue
		}
		for _, st := range f.Health(r.Context(), force) {
			rep.Total++
			if st.Healthy {
				rep.Healthy++
			}
			rep.Backends = append(rep.Backends, backendHealth{Route: name, Status: st})
		}
	}
	status := http.StatusOK
	switch {
	case rep.Total > 0 && rep.Healthy == 0:
		rep.Status, status = "down", http.StatusServiceUnavailable
	case rep.Healthy < rep.Total:
		rep.Status = "degraded"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(rep)
}

// BackendStats implements metrics.BackendSource.
func (s *Server) BackendStats(yield func(metrics.BackendStats)) {
	for name, rt := range s.routes {
		if rt.Fleet() == nil {
			continue
		}
		for _, st := range rt.Fleet().Pool().Status() {
			yield(metrics.BackendStats{Route: name, Backend: st.Name, Healthy: st.Healthy,
				InFlight: st.InFlight, Errors: st.TotalErrors})
		}
	}
}

// Run keeps every fleet's health checks and discovery scans going, and
// the clients' usage saved, until ctx ends.
func (s *Server) Run(ctx context.Context) {
	done := make(chan struct{})
	n := 0
	if s.shared != nil {
		n++
		go func() {
			defer func() { done <- struct{}{} }()
			defer safe.Recover(s.log, "shared limits")
			s.shared.Run(ctx)
		}()
	}
	if s.statePath != "" {
		n++
		go func() {
			defer func() { done <- struct{}{} }()
			defer safe.Recover(s.log, "state file")
			s.dir.Keep(ctx, s.statePath, s.log)
		}()
	}
	for _, rt := range s.routes {
		if rt.Fleet() != nil {
			n++
			go func() {
				defer func() { done <- struct{}{} }()
				defer safe.Recover(s.log, "fleet of route "+rt.Name())
				rt.Fleet().Run(ctx)
			}()
		}
	}
	for range n {
		<-done
	}
}

// managedStatus is GET /status.
type managedStatus struct {
	Route string `json:"route"`
	lifecycle.Status
}

func (s *Server) status(w http.ResponseWriter) {
	out := []managedStatus{}
	for _, name := range s.sortedRouteNames() {
		if f := s.routes[name].Fleet(); f != nil {
			for _, st := range f.Servers() {
				out = append(out, managedStatus{Route: name, Status: st})
			}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"backends": out})
}

// unload serves POST /unload (every managed server) and /unload/{model}
// (those serving model): it answers once the idle ones' processes are
// gone ("unloaded"), and lists the busy ones apart ("deferred", with
// their requests in flight), which stop when their last request ends.
func (s *Server) unload(w http.ResponseWriter, model string) {
	stopped, deferred := []string{}, []lifecycle.Deferred{}
	for _, name := range s.sortedRouteNames() {
		if f := s.routes[name].Fleet(); f != nil {
			u := f.Unload(model)
			stopped, deferred = append(stopped, u.Stopped...), append(deferred, u.Deferred...)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"unloaded": stopped, "deferred": deferred})
}

// StopBackends stops every model server llproxy started. No process is
// left behind.
func (s *Server) StopBackends() {
	for _, rt := range s.routes {
		if rt.Fleet() != nil {
			rt.Fleet().Shutdown()
		}
	}
}
