package server

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/caller"
	"github.com/llproxy/llproxy/internal/ledger"
	"github.com/llproxy/llproxy/internal/openai"
	"github.com/llproxy/llproxy/internal/request"
	"github.com/llproxy/llproxy/internal/route"
)

// The HTTP front: one http.ServeMux with Go 1.22 patterns, and
// authentication applied once per endpoint, as middleware.

// newMux routes the gateway's endpoints. Admin endpoints need an admin
// key (client keys without adminKeys), the mutating ones POST; /metrics its
// metricsKey; the Ollama API and the routes a client key. Any other method
// on an admin path is a 405 in OpenAI's shape, after authentication.
func (s *Server) newMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.Handle("GET /metrics", s.require(s.metricsHashes, "a metrics key", s.promHTTP))
	admin := func(method, path string, h http.HandlerFunc) {
		if method == http.MethodPost {
			h = s.guarded(h) // mutating: never another site's form
		}
		if !strings.HasPrefix(path, "/ui/") {
			h = s.logged(h) // not the page's own polling
		}
		mux.Handle(method+" "+path, s.require(s.adminKeys(), "an admin key", h))
		mux.Handle(path, s.require(s.adminKeys(), "an admin key", methodNotAllowed(method)))
	}
	admin("GET", "/health", func(w http.ResponseWriter, r *http.Request) { s.health(w, r, false) })
	admin("GET", "/status", func(w http.ResponseWriter, r *http.Request) { s.status(w) })
	admin("POST", "/health/force-check", func(w http.ResponseWriter, r *http.Request) { s.health(w, r, true) })
	admin("GET", "/clients", func(w http.ResponseWriter, r *http.Request) { s.clients(w) })
	admin("GET", "/usage", s.usage)
	admin("GET", "/ui", s.page.ServeHTML)
	admin("GET", "/ui/app.js", s.page.ServeScript)
	admin("GET", "/ui/state", s.page.ServeState)
	admin("GET", "/ui/spend", s.spend)
	admin("POST", "/unload", func(w http.ResponseWriter, r *http.Request) { s.unload(w, "") })
	admin("POST", "/unload/{model...}", func(w http.ResponseWriter, r *http.Request) { s.unload(w, r.PathValue("model")) })
	ollama := s.requireOllama(http.HandlerFunc(s.serveOllama))
	mux.Handle("/api/", ollama)
	mux.Handle("GET /{$}", ollama) // "Ollama is running"
	for name := range s.routes {
		mux.Handle("/"+name+"/", s.handlers[name])
	}
	mux.HandleFunc("/", s.serveRoute) // the default route at the root, and unknown routes
	return mux
}

// ServeHTTP serves the whole gateway. No panic escapes it: one that is not
// http.ErrAbortHandler (a response cut short on purpose) is logged with its
// stack and answered with a 500 in OpenAI's shape if nothing was written
// yet. A path with dot segments is refused before anything routes it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f := getFront(w, time.Duration(s.cfg.WriteTimeout))
	defer putFront(f)
	defer s.recoverPanic(f, r)
	requestID(f, r)
	if s.cors(f, r) {
		request.DropBody(f, r)
		return // a preflight, answered here
	}
	if err := request.CheckPath(r.URL.Path, r.URL.RawPath); err != nil {
		request.DropBody(f, r)
		s.logFront(r, http.StatusBadRequest, route.OutcomeBadRequest)
		openai.WriteError(f, http.StatusBadRequest, "invalid_request_error", "invalid_path", "Invalid request path: "+err.Error()+".")
		return
	}
	if h := s.routeOf(r.URL.Path); h != nil {
		// The hot path: the handler the mux picks for /<route>/..., without
		// the allocations of its pattern matching (5 a request).
		h.ServeHTTP(f, r)
		return
	}
	s.mux.ServeHTTP(f, r)
}

// routeOf returns the handler of the route path names as /<route>/..., if
// any.
func (s *Server) routeOf(path string) http.Handler {
	if len(path) < 2 || path[0] != '/' {
		return nil
	}
	i := strings.IndexByte(path[1:], '/')
	if i < 0 {
		return nil
	}
	return s.handlers[path[1:1+i]]
}

// recoverPanic is the last line of defence of a request.
func (s *Server) recoverPanic(f *front, r *http.Request) {
	p := recover()
	if p == nil {
		return
	}
	if p == http.ErrAbortHandler {
		panic(p) // net/http closes the connection without logging
	}
	s.log.Error("panic serving a request", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(p),
		"stack", string(debug.Stack()))
	if f.wrote {
		panic(http.ErrAbortHandler) // too late for a status: cut the response
	}
	openai.WriteError(f, http.StatusInternalServerError, "server_error", "internal_error",
		"llproxy failed on this request; it was logged. Nothing was sent upstream on its behalf unless it was admitted.")
}

// serveRoute serves /<route>/... (and the default route at the root). An
// unknown route's 404 names the routes only to an authenticated client.
func (s *Server) serveRoute(w http.ResponseWriter, r *http.Request) {
	name := strings.TrimPrefix(r.URL.Path, "/")
	if i := strings.IndexByte(name, '/'); i >= 0 {
		name = name[:i]
	}
	h, ok := s.handlers[name]
	if !ok && name == "v1" {
		s.serveRoot(w, r) // one base URL for every model
		return
	}
	if !ok && s.fallback != nil {
		h, ok = s.handlers[s.fallback.Name()], true // the default route, at the root
	}
	if !ok {
		msg := "Unknown route " + strconv.Quote(r.URL.Path) + "."
		if s.authorized(r) {
			msg = "Unknown route " + strconv.Quote(r.URL.Path) + ": this gateway serves " + strings.Join(s.routeNames, ", ") + "."
		}
		request.DropBody(w, r)
		s.logFront(r, http.StatusNotFound, route.OutcomeNotFound)
		openai.WriteError(w, http.StatusNotFound, "invalid_request_error", "unknown_route", msg)
		return
	}
	h.ServeHTTP(w, r)
}

// require is the authentication middleware: with hashes, a request must
// carry one of their keys (Authorization: Bearer, or api-key), compared in
// constant time; else 401. No hashes: open.
func (s *Server) require(hashes caller.Keys, what string, h http.Handler) http.Handler {
	if len(hashes) == 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hashes.Match(caller.Key(r)) {
			s.unauthorized(w, r, what)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// authenticate finds who sends a request to rt by its key (401 without
// one of the client keys) and hands it to rt.
func (s *Server) authenticate(rt *route.Route) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		who, ok := s.dir.Identify(caller.Key(r))
		if !ok {
			s.unauthorizedAs(rt, w, r, "one of its client keys")
			return
		}
		rt.Serve(w, r, who)
	})
}

// requireOllama is require with the client keys, answering in Ollama's
// error shape.
func (s *Server) requireOllama(h http.Handler) http.Handler {
	if len(s.keyHashes) == 0 {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.authorized(r) {
			request.DropBody(w, r)
			s.logFront(r, http.StatusUnauthorized, route.OutcomeUnauthorized)
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"error":"unauthorized: llproxy expects one of its client keys in Authorization: Bearer <key>"}`+"\n")
			return
		}
		h.ServeHTTP(w, r)
	})
}

// adminKeys are the keys of the admin endpoints: adminKeys, else the
// client keys.
func (s *Server) adminKeys() caller.Keys {
	if len(s.adminHashes) > 0 {
		return s.adminHashes
	}
	return s.keyHashes
}

// methodNotAllowed answers any method but want with a 405, so that no link
// or image on a web page can trigger a mutating endpoint.
func methodNotAllowed(want string) http.HandlerFunc {
	allow := want
	if want == http.MethodGet {
		allow = "GET, HEAD"
	}
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		openai.WriteError(w, http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed", "Use "+want+" "+r.URL.Path+".")
	}
}

// serveOllama serves the Ollama API, with the body read under the same
// bounds as any other before the façade sees it.
func (s *Server) serveOllama(w http.ResponseWriter, r *http.Request) {
	if r.Body != nil && r.Body != http.NoBody && r.Method != http.MethodGet && r.Method != http.MethodHead {
		body, err := request.ReadBody(w, r, s.limits(), s.closing.Load)
		if err != nil {
			// Ollama's shape: {"error": "..."}.
			f := request.FailureOf(err, s.limits())
			request.DropBody(w, r)
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.WriteHeader(f.Status)
			b, _ := json.Marshal(map[string]string{"error": f.Message})
			w.Write(append(b, '\n'))
			return
		}
		defer body.Release()
		r.Body = body.Reader()
		defer r.Body.Close()
	}
	s.ollama.ServeHTTP(w, r)
}

// unauthorized answers 401 and logs it.
func (s *Server) unauthorized(w http.ResponseWriter, r *http.Request, what string) {
	s.unauthorizedAs(openai.Dialect{}, w, r, what)
}

// unauthorizedAs is unauthorized in the shape of the API the path speaks.
func (s *Server) unauthorizedAs(say errorWriter, w http.ResponseWriter, r *http.Request, what string) {
	request.DropBody(w, r)
	if strings.HasPrefix(r.URL.Path, "/ui") {
		w.Header().Set("WWW-Authenticate", `Basic realm="llproxy", charset="UTF-8"`) // the browser asks for the key
	}
	s.logFront(r, http.StatusUnauthorized, route.OutcomeUnauthorized)
	say.Error(w, http.StatusUnauthorized, "invalid_request_error", "invalid_api_key",
		"Incorrect API key provided. llproxy expects "+what+" in Authorization: Bearer <key>, x-api-key: <key> or api-key: <key>.")
}

// logFront logs a request answered before it reached a route.
// Its client is the one the request's key names, or "unknown".
func (s *Server) logFront(r *http.Request, status int, outcome string) {
	s.front.Count(status)
	who := "unknown"
	if c, ok := s.dir.Identify(caller.Key(r)); ok {
		who = c.Name
	}
	s.log.LogAttrs(r.Context(), slog.LevelInfo, "request", slog.String("request_id", r.Header.Get("X-Request-Id")),
		slog.String("method", r.Method), slog.String("path", r.URL.Path), slog.String("client", who),
		slog.Int("status", status), slog.String("outcome", outcome), slog.String("remote", r.RemoteAddr))
	s.ledger.Add(ledger.Row{Time: time.Now(), RequestID: r.Header.Get("X-Request-Id"), Client: who, Outcome: outcome,
		Status: status})
}

// authorized checks the client's key against clientKeys in constant time.
func (s *Server) authorized(r *http.Request) bool {
	return len(s.keyHashes) == 0 || s.keyHashes.Match(caller.Key(r))
}

// isAdmin reports whether r carries an admin key (the admin rule: adminKeys,
// else any client key; open without keys).
func (s *Server) isAdmin(r *http.Request) bool {
	hashes := s.adminKeys()
	return len(hashes) == 0 || hashes.Match(caller.Key(r))
}

// requestID gives every request an id: the client's X-Request-Id if it is
// a reasonable one, else a new one. It is in every log line of the
// request, goes upstream, and comes back in the response.
func requestID(w http.ResponseWriter, r *http.Request) {
	if v := r.Header["X-Request-Id"]; len(v) > 0 && validRequestID(v[0]) {
		w.Header()["X-Request-Id"] = v[:1:1]
		return
	}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], rand.Uint64())
	v := []string{hex.EncodeToString(b[:])} // one value for both: headers replace, never append in place
	r.Header["X-Request-Id"], w.Header()["X-Request-Id"] = v, v
}

// validRequestID accepts 1 to 128 printable ASCII characters.
func validRequestID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := range len(id) {
		if id[i] <= ' ' || id[i] > '~' {
			return false
		}
	}
	return true
}
