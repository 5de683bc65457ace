package server

import (
	"bytes"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/llproxy/llproxy/internal/caller"
	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/ollama"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/route"
	"github.com/llproxy/llproxy/scheduler"
)

// ollamaGateway lets the Ollama façade reach every route.
type ollamaGateway struct{ s *Server }

var _ ollama.Gateway = ollamaGateway{}

// routeFor finds the route that serves model for the façade: the same
// resolution as the root's (package catalog).
func (g ollamaGateway) routeFor(model string) *route.Route { return g.s.catalog.Resolve(model) }

func (g ollamaGateway) Known(model string) bool { return g.routeFor(model) != nil }

func (g ollamaGateway) Models() []string { return g.s.catalog.Models() }

// ServeChat sends an OpenAI chat request through the model's route, as if
// the client had posted it to /<route>/v1/chat/completions.
func (g ollamaGateway) ServeChat(w http.ResponseWriter, r *http.Request, model string, body []byte) {
	rt := g.routeFor(model)
	if rt == nil {
		openai.WriteError(w, http.StatusNotFound, "invalid_request_error", "model_not_found", "model '"+model+"' not found")
		return
	}
	out := r.Clone(r.Context())
	out.Method = http.MethodPost
	out.URL = &url.URL{Path: "/" + rt.Name() + "/v1/chat/completions"}
	out.RequestURI = ""
	out.Header.Set("Content-Type", "application/json")
	out.Header.Del("Content-Length")
	out.Body = io.NopCloser(bytes.NewReader(body))
	out.ContentLength = int64(len(body))
	defer func() {
		// A stream the upstream cut short ends the route's copy with
		// http.ErrAbortHandler. Here the answer is the façade's to end:
		// it writes Ollama's final error line.
		if p := recover(); p != nil && p != http.ErrAbortHandler {
			panic(p)
		}
	}()
	who, ok := g.s.dir.Identify(caller.Key(r))
	if !ok { // requireOllama let it in: only a key gone since could get here
		openai.WriteError(w, http.StatusUnauthorized, "invalid_request_error", "invalid_api_key", "Incorrect API key provided.")
		return
	}
	rt.Serve(w, out, who)
}

// Load and unload are inference-scoped: a client may load or unload only
// the models of the routes it may use. A non-admin's pin (a keep_alive
// beyond the backend's configured idle time, or negative) is clamped to
// that idle time, and its unload of a model other clients have requests
// waiting or in flight for is refused: that is the admin's (POST /unload).

func (g ollamaGateway) Load(r *http.Request, model string, keepAlive *time.Duration) error {
	rt, who, err := g.lifecycleCall(r, model)
	if err != nil || rt.Fleet() == nil {
		return err
	}
	admin := g.s.isAdmin(r)
	if err := rt.Fleet().Load(r.Context(), model, keepAlive, admin); err != nil {
		return err
	}
	g.s.log.Info("ollama load", "model", model, "route", rt.Name(), "client", who.Name, "admin", admin)
	return nil
}

func (g ollamaGateway) Unload(r *http.Request, model string) error {
	rt, who, err := g.lifecycleCall(r, model)
	if err != nil || rt.Fleet() == nil {
		return err
	}
	if !g.s.isAdmin(r) {
		if q, ok := rt.Queue(model); ok {
			busy := false
			q.Clients(func(id int, st scheduler.ClientStats) {
				busy = busy || (id != who.ID && (st.Depth > 0 || st.InFlight > 0))
			})
			if busy {
				return &ollama.Refusal{Status: http.StatusForbidden, Message: "model '" + model +
					"' has other clients' requests in flight: only an admin may unload it now (POST /unload/" + model + ")"}
			}
		}
	}
	u := rt.Fleet().Unload(model)
	g.s.log.Info("ollama unload", "model", model, "route", rt.Name(), "client", who.Name, "stopped", u.Stopped,
		"deferred", len(u.Deferred))
	return nil
}

// lifecycleCall checks that the client of r may load or unload model: the
// route that serves it is one of the client's routes.
func (g ollamaGateway) lifecycleCall(r *http.Request, model string) (*route.Route, *clients.Client, error) {
	who, ok := g.s.dir.Identify(caller.Key(r))
	if !ok {
		return nil, nil, &ollama.Refusal{Status: http.StatusUnauthorized, Message: "unauthorized: llproxy expects one of its client keys"}
	}
	rt := g.routeFor(model)
	if rt == nil {
		return nil, nil, &ollama.Refusal{Status: http.StatusNotFound, Message: "model '" + model + "' not found"}
	}
	if !who.Allowed(rt.Name()) {
		return nil, nil, &ollama.Refusal{Status: http.StatusForbidden, Message: "client " + who.Name +
			" may not use llproxy route " + rt.Name() + ", which serves model '" + model + "'"}
	}
	return rt, who, nil
}

func (g ollamaGateway) Running() []ollama.Loaded {
	var out []ollama.Loaded
	for _, l := range g.s.catalog.Running() {
		out = append(out, ollama.Loaded{Name: l.Name, ExpiresAt: l.ExpiresAt})
	}
	return out
}
