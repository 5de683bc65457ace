package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/backends"
	"github.com/llproxy/llproxy/internal/metrics"

	"github.com/llproxy/llproxy/internal/safe"
)

// This file is the server's side of a route that serves a fleet of
// backends: the backend of each send, the fleet's aggregated model list,
// and /health.

// bodyFor returns the body to send the backend picked for model: the
// request's own, or a copy naming the backend's own model id.
func (rt *route) bodyFor(ex *exchange, body *bodyBuf, model, id string) *bodyBuf {
	if id == model {
		return body
	}
	if ex.renamed != nil {
		ex.renamed.release()
	}
	ex.renamed = newBodyBuf()
	p := rt.srv.parsers.Get()
	defer rt.srv.parsers.Put(p)
	v, err := p.ParseBytes(body.buf)
	if err != nil { // it parsed before; cannot happen
		ex.renamed.buf = append(ex.renamed.buf, body.buf...)
		return ex.renamed
	}
	var a fastjson.Arena
	v.Set("model", a.NewString(id))
	ex.renamed.buf = v.MarshalTo(ex.renamed.buf)
	return ex.renamed
}

// pickFree picks a backend, waiting while every backend serving model is
// at its maxConcurrent, until one frees, the request's deadline passes or
// the client leaves.
func (rt *route) pickFree(ctx context.Context, ex *exchange, model string) (*backends.Backend, string, error) {
	var timeout <-chan time.Time
	for {
		freed := rt.pool.Freed() // before Pick: a slot freed in between wakes us
		be, id, err := rt.pool.Pick(model, ex.failed)
		if !errors.Is(err, backends.ErrBusy) {
			return be, id, err
		}
		if timeout == nil {
			t := time.NewTimer(max(0, time.Until(ex.deadline)))
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

func (rt *route) writeFleetError(w http.ResponseWriter, model string, err error) {
	if errors.Is(err, backends.ErrUnknownModel) {
		writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found",
			"The model `"+model+"` does not exist on llproxy route "+rt.name+". Models: "+strings.Join(rt.pool.Models(), ", ")+".")
		return
	}
	w.Header()["Retry-After"] = []string{"5"}
	if errors.Is(err, backends.ErrBusy) {
		writeError(w, http.StatusServiceUnavailable, "server_error", "backend_busy",
			"Every backend of llproxy route "+rt.name+" serving `"+model+"` stayed at its maxConcurrent for the request's maxQueueWait.")
		return
	}
	writeError(w, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
		"No healthy backend of llproxy route "+rt.name+" serves the model `"+model+"` right now.")
}

// serveFleetUnscheduled answers a fleet request that names no model:
// GET .../v1/models is the fleet's aggregated list; anything else goes to a
// healthy backend (the default one first).
func (rt *route) serveFleetUnscheduled(ex *exchange, r *http.Request, body *bodyBuf) {
	if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/v1/models") {
		ex.Header().Set("Content-Type", "application/json")
		ex.Write(rt.pool.ModelsJSON(r.Context()))
		return
	}
	be, ok := rt.pool.Any()
	if !ok {
		writeError(ex, http.StatusServiceUnavailable, "server_error", "backend_unavailable",
			"No healthy backend on llproxy route "+rt.name+".")
		return
	}
	defer rt.pool.Done(be)
	auth := rt.up.auth
	if !be.SendKey() {
		auth = rt.up.noKey
	}
	rt.relay(ex, r, be.URL, auth, body)
}

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
		rt := s.routes[name]
		if rt.pool == nil {
			continue
		}
		if force {
			rt.pool.CheckNow(r.Context())
		}
		for _, st := range rt.pool.Status() {
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
		if rt.pool == nil {
			continue
		}
		for _, st := range rt.pool.Status() {
			yield(metrics.BackendStats{Route: name, Backend: st.Name, Healthy: st.Healthy,
				InFlight: st.InFlight, Errors: st.TotalErrors})
		}
	}
}

// Run keeps every fleet's health checks and discovery scans going until
// ctx ends.
func (s *Server) Run(ctx context.Context) {
	done := make(chan struct{})
	n := 0
	for _, rt := range s.routes {
		if rt.pool != nil {
			n++
			go func() {
				defer func() { done <- struct{}{} }()
				defer safe.Recover(s.log, "fleet of route "+rt.name)
				rt.pool.Run(ctx)
			}()
		}
	}
	for range n {
		<-done
	}
}
