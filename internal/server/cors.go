package server

import (
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/llproxy/llproxy/internal/openai"
)

// CORS: browsers may call the gateway from the origins cors.allowOrigins
// lists. Preflights are answered here, never forwarded; the answers carry
// the headers a browser client needs to read (rate limits, retry times,
// the request id).

var corsExposed = strings.Join([]string{"X-Request-Id", "Retry-After", "Retry-After-Ms", "X-Llproxy-Limits",
	"X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests",
	"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens"}, ", ")

// corsAllowed reports whether origin may call the gateway.
func (s *Server) corsAllowed(origin string) bool {
	o := s.cfg.CORS.AllowOrigins
	return origin != "" && (slices.Contains(o, "*") || slices.Contains(o, origin))
}

// cors sets the CORS headers of a request from an allowed origin, and
// answers a preflight; it returns true when the request is answered.
func (s *Server) cors(w http.ResponseWriter, r *http.Request) bool {
	if len(s.cfg.CORS.AllowOrigins) == 0 {
		return false
	}
	origin := r.Header.Get("Origin")
	h := w.Header()
	preflight := r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
	if !s.corsAllowed(origin) {
		if preflight {
			openai.WriteError(w, http.StatusForbidden, "invalid_request_error", "origin_not_allowed",
				"Origin "+strconv.Quote(origin)+" may not call this gateway (cors.allowOrigins).")
			return true
		}
		return false
	}
	h.Add("Vary", "Origin")
	h["Access-Control-Allow-Origin"] = []string{origin}
	if !preflight {
		h["Access-Control-Expose-Headers"] = []string{corsExposed}
		return false
	}
	h["Access-Control-Allow-Methods"] = []string{"GET, POST, OPTIONS"}
	if req := r.Header.Get("Access-Control-Request-Headers"); req != "" {
		h["Access-Control-Allow-Headers"] = []string{req}
	}
	h["Access-Control-Max-Age"] = []string{strconv.Itoa(int(time.Duration(s.cfg.CORS.MaxAge).Seconds()))}
	w.WriteHeader(http.StatusNoContent)
	return true
}
