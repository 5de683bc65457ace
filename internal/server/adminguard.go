package server

import (
	"crypto/sha256"
	"crypto/subtle"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/llproxy/llproxy/internal/openai"
)

// The admin endpoints' guard against other sites. A browser that opened
// /ui re-sends its saved Basic login with any request to the gateway, a
// form POST from another site included; so a mutating admin endpoint
// takes only requests no form can make: a key in a header a page cannot
// set on a cross-site form (Authorization: Bearer, api-key), or, with a
// browser's Basic login, Content-Type: application/json or the status
// page's own header x-llproxy-admin: 1. Whatever the credentials, it
// refuses what a browser marks as another site's: Sec-Fetch-Site:
// cross-site, and an Origin that is not the gateway's own.

// adminHeader is the header the status page sends with its calls.
const adminHeader = "X-Llproxy-Admin"

// crossSite says why r may be another site's request to a mutating admin
// endpoint, or "" if it is not.
func crossSite(r *http.Request) string {
	if strings.EqualFold(r.Header.Get("Sec-Fetch-Site"), "cross-site") {
		return "a cross-site request (Sec-Fetch-Site: cross-site)"
	}
	if o := r.Header.Get("Origin"); o != "" && !sameOrigin(o, r.Host) {
		return "a request from another origin (" + strconv.Quote(o) + ")"
	}
	if _, _, basic := r.BasicAuth(); basic {
		ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
		if ct != "application/json" && r.Header.Get(adminHeader) != "1" {
			return "a browser login without Content-Type: application/json or " + adminHeader + ": 1 (a form could send it)"
		}
	}
	return ""
}

// sameOrigin reports whether origin (scheme://host[:port]) is the
// gateway's own, as the request's Host names it.
func sameOrigin(origin, host string) bool {
	u, err := url.Parse(origin)
	return err == nil && u.Host != "" && strings.EqualFold(u.Host, host)
}

// guarded wraps a mutating admin endpoint: another site's request is a 403
// in OpenAI's shape, and nothing is done.
func (s *Server) guarded(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if why := crossSite(r); why != "" {
			s.log.Warn("admin call refused", "method", r.Method, "path", r.URL.Path, "caller", s.caller(r),
				"reason", why, "remote", r.RemoteAddr, "request_id", r.Header.Get("X-Request-Id"))
			openai.WriteError(w, http.StatusForbidden, "invalid_request_error", "cross_site_request",
				"llproxy refuses "+why+" on "+r.URL.Path+": send the key as Authorization: Bearer, or add "+adminHeader+": 1.")
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
	key := requestKey(r)
	how := "bearer"
	if _, _, basic := r.BasicAuth(); basic {
		how = "basic"
	} else if !strings.HasPrefix(strings.ToLower(r.Header.Get("Authorization")), "bearer ") && key != "" {
		how = "api-key"
	}
	if key == "" {
		return "open"
	}
	if i := hashIndex(key, s.adminHashes); i >= 0 {
		return "adminKeys[" + strconv.Itoa(i) + "] (" + how + ")"
	}
	if who, ok := s.dir.Identify(key); ok && s.dir.Keyed() {
		return "client " + who.Name + " (" + how + ")"
	}
	return "unknown key (" + how + ")"
}

// hashIndex is the index of key's hash in hashes, or -1, compared in
// constant time.
func hashIndex(key string, hashes [][sha256.Size]byte) int {
	h := sha256.Sum256([]byte(key))
	found := -1
	for i := range hashes {
		found = subtle.ConstantTimeSelect(subtle.ConstantTimeCompare(h[:], hashes[i][:]), i, found)
	}
	return found
}
