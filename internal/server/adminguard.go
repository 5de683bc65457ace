package server

import (
	"net/http"
	"strconv"

	"github.com/llproxy/llproxy/internal/caller"
	"github.com/llproxy/llproxy/internal/openai"
)

// The admin endpoints' guard against other sites (see
// caller.CrossSite), and their log of who called.

// guarded wraps a mutating admin endpoint: another site's request is a 403
// in OpenAI's shape, and nothing is done.
func (s *Server) guarded(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if why := caller.CrossSite(r); why != "" {
			s.log.Warn("admin call refused", "method", r.Method, "path", r.URL.Path, "caller", s.caller(r),
				"reason", why, "remote", r.RemoteAddr, "request_id", r.Header.Get("X-Request-Id"))
			openai.WriteError(w, http.StatusForbidden, "invalid_request_error", "cross_site_request",
				"llproxy refuses "+why+" on "+r.URL.Path+": send the key as Authorization: Bearer, or add "+caller.AdminHeader+": 1.")
			return
		}
		h(w, r)
	}
}

// logged logs every admin call with its caller, once authenticated.
func (s *Server) logged(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.log.Info("admin call", "method", r.Method, "path", r.URL.Path, "caller", s.caller(r),
			"remote", r.RemoteAddr, "request_id", r.Header.Get("X-Request-Id"))
		h(w, r)
	}
}

// caller names who sends r, never by its key: "adminKeys[i]", a client's
// name, or "open" on a gateway without keys; with how it was sent.
func (s *Server) caller(r *http.Request) string {
	key := caller.Key(r)
	if key == "" {
		return "open"
	}
	how := caller.How(r)
	if i := s.adminHashes.Index(key); i >= 0 {
		return "adminKeys[" + strconv.Itoa(i) + "] (" + how + ")"
	}
	if who, ok := s.dir.Identify(key); ok && s.dir.Keyed() {
		return "client " + who.Name + " (" + how + ")"
	}
	return "unknown key (" + how + ")"
}
