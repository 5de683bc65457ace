package server

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/lifecycle"
)

// This file wires model lifecycle into the gateway: the manager of a
// fleet's managed backends, keep_alive, per-model defaults, /status and
// /unload.

// newLifecycle returns the manager of rc's backends that llproxy runs, or
// nil if it runs none.
func (rt *route) newLifecycle(rc *config.Route) *lifecycle.Manager {
	var specs []lifecycle.Spec
	for _, b := range rc.Backends {
		if !b.Managed() {
			continue
		}
		u, _ := url.Parse(b.URL)
		ready := b.Ready.Path
		if ready == "" {
			ready = b.HealthCheckPath
		}
		if ready == "" {
			ready = rc.HealthCheck.Path
		}
		specs = append(specs, lifecycle.Spec{Name: b.Name, URL: u, Cmd: b.Cmd, Env: b.Env, Dir: b.Dir, Group: b.Group,
			UnloadAfter: time.Duration(b.UnloadAfter), ReadyPath: ready, ReadyTimeout: time.Duration(b.Ready.Timeout),
			StopGrace: time.Duration(b.StopGrace), Models: b.Models})
	}
	if len(specs) == 0 {
		return nil
	}
	return lifecycle.New(specs, lifecycle.Options{Logger: rt.srv.log.With("route", rt.name),
		MaxSwapWait: time.Duration(rc.MaxSwapWait), Queued: rt.queuedFor, Secrets: rt.srv.secrets()})
}

// queuedFor counts the requests waiting in the gateway's queues for the
// models of backend.
func (rt *route) queuedFor(backend string) int {
	n := 0
	for _, b := range rt.cfg.Backends {
		if b.Name != backend {
			continue
		}
		for _, model := range b.Models {
			if q, ok := rt.set.Lookup(model); ok {
				n += q.Stats(time.Now()).Depth
			}
		}
	}
	return n
}

// keepAlive reads a keep_alive as Ollama does: a number of seconds, or a
// duration string ("10m"); negative means never unload.
func keepAlive(v *fastjson.Value) (time.Duration, error) {
	switch v.Type() {
	case fastjson.TypeNumber:
		f := v.GetFloat64()
		switch {
		case f < 0, f*float64(time.Second) >= math.MaxInt64:
			return -1, nil // never (a number too large to be a duration means as much)
		case f != f:
			return 0, errors.New("keep_alive must be a number of seconds or a duration such as \"10m\"")
		}
		return time.Duration(f * float64(time.Second)), nil
	case fastjson.TypeString:
		d, err := time.ParseDuration(string(v.GetStringBytes()))
		if err != nil {
			return 0, errors.New("keep_alive must be a number of seconds or a duration such as \"10m\"")
		}
		if d < 0 {
			return -1, nil
		}
		return d, nil
	}
	return 0, errors.New("keep_alive must be a number of seconds or a duration such as \"10m\"")
}

// applyDefaults gives a chat request the model's default parameters it does
// not set, and its default system prompt if it has no system message. It
// reports whether it changed v. dp parses the defaults and must live as
// long as v.
func applyDefaults(v *fastjson.Value, ms *modelState, dp *fastjson.Parser, a *fastjson.Arena) bool {
	changed := false
	if ms.defaults != nil {
		if d, err := dp.ParseBytes(ms.defaults); err == nil {
			d.GetObject().Visit(func(k []byte, val *fastjson.Value) {
				if v.Get(string(k)) == nil {
					v.Set(string(k), val)
					changed = true
				}
			})
		}
	}
	if ms.system == "" {
		return changed
	}
	msgs := v.GetArray("messages")
	for _, m := range msgs {
		if r := string(m.GetStringBytes("role")); r == "system" || r == "developer" {
			return changed // the request's own system message wins
		}
	}
	sys := a.NewObject()
	sys.Set("role", a.NewString("system"))
	sys.Set("content", a.NewString(strings.ReplaceAll(ms.system, "{{now}}", time.Now().Format(time.RFC1123))))
	arr := a.NewArray()
	arr.SetArrayItem(0, sys)
	for i, m := range msgs {
		arr.SetArrayItem(i+1, m)
	}
	v.Set("messages", arr)
	return true
}

// managedStatus is GET /status.
type managedStatus struct {
	Route string `json:"route"`
	lifecycle.Status
}

func (s *Server) status(w http.ResponseWriter) {
	out := []managedStatus{}
	for _, name := range s.sortedRouteNames() {
		if life := s.routes[name].life; life != nil {
			for _, st := range life.Status() {
				out = append(out, managedStatus{Route: name, Status: st})
			}
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"backends": out})
}

// unload serves /unload (every idle managed backend) and /unload/{model}
// (the backends serving model), GET or POST as older tools do.
func (s *Server) unload(w http.ResponseWriter, model string) {
	stopped := []string{}
	for _, name := range s.sortedRouteNames() {
		stopped = append(stopped, s.routes[name].unloadModel(model)...)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"unloaded": stopped})
}

// unloadModel stops the idle managed backends serving model (all of them
// for ""), and returns their names.
func (rt *route) unloadModel(model string) []string {
	if rt.life == nil {
		return nil
	}
	if model == "" {
		return rt.life.Unload("")
	}
	var out []string
	for _, b := range rt.pool.Serving(model) {
		if b.Managed() {
			out = append(out, rt.life.Unload(b.Name)...)
		}
	}
	return out
}

// loadModel starts the managed backend serving model (an Ollama load
// request), with keep_alive if given.
func (rt *route) loadModel(ctx context.Context, model string, ka *time.Duration) error {
	if rt.life == nil {
		return nil
	}
	for _, b := range rt.pool.Serving(model) {
		if !b.Managed() {
			continue
		}
		if ka != nil {
			rt.life.KeepAlive(b.Name, *ka)
		}
		release, err := rt.life.Acquire(ctx, b.Name)
		if err != nil {
			return err
		}
		release()
		return nil
	}
	return nil
}

// StopBackends stops every model server llproxy started. No process is
// left behind.
func (s *Server) StopBackends() {
	for _, rt := range s.routes {
		if rt.life != nil {
			rt.life.Shutdown()
		}
	}
}

func unquoteModel(path string) string {
	m := strings.TrimPrefix(path, "/unload/")
	if u, err := url.PathUnescape(m); err == nil {
		return u
	}
	return m
}

// secrets are every key the config holds: upstream keys and client keys.
func (s *Server) secrets() []string {
	var out []string
	for _, k := range s.cfg.ClientKeys {
		out = append(out, k.Value())
	}
	for _, rc := range s.cfg.Routes {
		if k := rc.APIKey.Value(); k != "" {
			out = append(out, k)
		}
	}
	return out
}
