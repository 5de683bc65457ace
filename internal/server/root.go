package server

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/anthropic"
	"github.com/llproxy/llproxy/internal/caller"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/internal/route"
	"github.com/llproxy/llproxy/tokenizer"
)

// One base URL: /v1/... without a route prefix goes to the route that
// serves the body's model (package catalog), so that one base_url reaches
// every model.

// rootParsers parse a root request's body: to pick the route by its
// model, and then for the route itself (it is not parsed again).
var rootParsers fastjson.ParserPool

// ordered returns the routes in the order the config lists them.
func (s *Server) ordered() []*route.Route {
	out := make([]*route.Route, 0, len(s.routes))
	for _, name := range s.cfg.RouteOrder {
		if rt := s.routes[name]; rt != nil {
			out = append(out, rt)
		}
	}
	for _, name := range s.sortedRouteNames() { // configs built without a file
		if rt := s.routes[name]; !slices.Contains(out, rt) {
			out = append(out, rt)
		}
	}
	return out
}

// serveRoot serves /v1/... without a route prefix: the models of every
// route; a request whose body names a model, on the route that serves it;
// an inference call that names none is a 400; anything else goes to the
// defaultRoute, if there is one.
func (s *Server) serveRoot(w http.ResponseWriter, r *http.Request) {
	say := errorsFor(r.URL.Path)
	who, ok := s.dir.Identify(caller.Key(r))
	if !ok {
		s.unauthorizedAs(say, w, r, "one of its client keys")
		return
	}
	if r.Method == http.MethodGet && r.URL.Path == "/v1/models" {
		s.listModels(w, r)
		return
	}
	var model string
	var in route.Read // the body, read once and parsed once, handed to the route
	if r.Body != nil && r.Body != http.NoBody && r.Method != http.MethodGet && r.Method != http.MethodHead {
		body, err := request.ReadBody(w, r, s.limits(), s.closing.Load)
		if err != nil {
			request.DropBody(w, r)
			f := request.FailureOf(err, s.limits())
			say.Error(w, f.Status, "invalid_request_error", f.Code, f.Message)
			return
		}
		in.Body = body
		defer func() {
			if in.Body != nil {
				in.Body.Release() // not handed on
			}
		}()
		p := rootParsers.Get()
		defer rootParsers.Put(p) // after the route is done with the value
		if v, err := p.ParseBytes(body.Buf); err == nil && v.Type() == fastjson.TypeObject {
			model, in.Value = string(v.GetStringBytes("model")), v
		}
	}
	serve := func(rt *route.Route) {
		if in.Body == nil {
			rt.Serve(w, r, who)
			return
		}
		handed := in
		in.Body = nil // the route releases it
		rt.ServeRead(w, r, who, handed)
	}
	ep := openai.Endpoint(r.URL.Path)
	messages := ep == tokenizer.EndpointMessages || strings.HasSuffix(r.URL.Path, "/v1/messages/count_tokens")
	inference := r.Method == http.MethodPost && (ep != tokenizer.EndpointOther || messages)
	switch {
	case model != "":
		rt := s.catalog.ResolveFor(model, messages)
		if rt == nil {
			s.logFront(r, http.StatusNotFound, route.OutcomeNotFound)
			say.Error(w, http.StatusNotFound, "invalid_request_error", "model_not_found",
				"The model `"+model+"` does not exist or you do not have access to it. llproxy serves: "+
					strings.Join(s.catalog.Models(), ", ")+".")
			return
		}
		serve(rt)
	case inference:
		s.logFront(r, http.StatusBadRequest, route.OutcomeBadRequest)
		say.ParamError(w, "model", "you must provide a model parameter: 'model' is required.")
	case s.fallback != nil:
		serve(s.fallback)
	default:
		s.logFront(r, http.StatusNotFound, route.OutcomeNotFound)
		say.Error(w, http.StatusNotFound, "invalid_request_error", "unknown_route",
			"llproxy serves /v1/... by model, and "+strings.Join(s.routeNames, ", ")+".")
	}
}

// errorWriter writes an error in one API's shape.
type errorWriter interface {
	Error(w http.ResponseWriter, status int, typ, code, msg string)
	ParamError(w http.ResponseWriter, param, msg string)
}

// errorsFor is the shape of the errors the root writes for a path:
// Anthropic's for its Messages API, OpenAI's for every other.
func errorsFor(path string) errorWriter {
	if openai.Endpoint(path) == tokenizer.EndpointMessages || strings.HasSuffix(path, "/v1/messages/count_tokens") {
		return anthropic.Dialect{}
	}
	return openai.Dialect{}
}

// listModels answers GET /v1/models at the root: every model of every
// route, once (as the route that resolve picks for it lists it: a fleet's
// entries keep their backends and upstream ids), in OpenAI's list shape.
func (s *Server) listModels(w http.ResponseWriter, r *http.Request) {
	entries := map[string]json.RawMessage{}
	for _, rt := range s.routeList {
		if rt.Fleet() == nil {
			continue
		}
		var list struct{ Data []json.RawMessage }
		if json.Unmarshal(rt.Fleet().ModelsJSON(r.Context()), &list) != nil {
			continue
		}
		for _, e := range list.Data {
			var id struct{ ID string }
			if json.Unmarshal(e, &id) == nil && id.ID != "" && s.catalog.Resolve(id.ID) == rt {
				entries[id.ID] = e
			}
		}
	}
	list := struct {
		Object string            `json:"object"`
		Data   []json.RawMessage `json:"data"`
	}{Object: "list", Data: []json.RawMessage{}}
	for _, m := range s.catalog.Models() {
		e, ok := entries[m]
		if !ok {
			owner := "llproxy"
			if rt := s.catalog.Resolve(m); rt != nil {
				owner = "llproxy/" + rt.Name()
			}
			e, _ = json.Marshal(struct {
				ID      string `json:"id"`
				Object  string `json:"object"`
				Created int64  `json:"created"`
				OwnedBy string `json:"owned_by"`
			}{m, "model", 0, owner})
		}
		list.Data = append(list.Data, e)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(list)
}
