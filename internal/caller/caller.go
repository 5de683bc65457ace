// Package caller is how a request says who sends it: the key it carries
// (Authorization: Bearer, api-key, or a browser's Basic login), matched in
// constant time against the hashes of the keys the gateway knows, and,
// for the mutating admin endpoints, whether a browser sent it on another
// site's behalf.
//
// It exists so that the front (package server) asks these questions one
// way everywhere, and so that no key is ever compared, logged or kept
// but as its hash.
package caller

import (
	"crypto/sha256"
	"crypto/subtle"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// Key is the key r carries: Authorization: Bearer, else api-key or
// x-api-key (Azure's and Anthropic's SDKs send those); a
// browser's Basic login gives its password (or, without one, its user
// name: the status page's login prompt takes the key either way).
func Key(r *http.Request) string {
	key := r.Header.Get("Api-Key")
	if key == "" {
		key = r.Header.Get("X-Api-Key") // Anthropic's
	}
	if auth := r.Header.Get("Authorization"); auth != "" {
		if len(auth) > 7 && strings.EqualFold(auth[:7], "bearer ") {
			key = strings.TrimSpace(auth[7:])
		} else if user, pass, ok := r.BasicAuth(); ok {
			key = pass
			if key == "" {
				key = user
			}
		}
	}
	return key
}

// How names how r carries its key: "bearer", "basic" or "api-key".
func How(r *http.Request) string {
	if _, _, basic := r.BasicAuth(); basic {
		return "basic"
	}
	if !strings.HasPrefix(strings.ToLower(r.Header.Get("Authorization")), "bearer ") {
		if r.Header.Get("Api-Key") != "" {
			return "api-key"
		}
		if r.Header.Get("X-Api-Key") != "" {
			return "x-api-key"
		}
	}
	return "bearer"
}

// Keys are the hashes of a set of keys.
type Keys [][sha256.Size]byte

// Hash hashes keys.
func Hash(keys ...string) Keys {
	out := make(Keys, 0, len(keys))
	for _, k := range keys {
		out = append(out, sha256.Sum256([]byte(k)))
	}
	return out
}

// Match reports whether key is one of the keys, in constant time: both
// sides are hashed to equal length and every hash is compared. The empty
// key matches none.
func (k Keys) Match(key string) bool {
	if key == "" {
		return false
	}
	h := sha256.Sum256([]byte(key))
	ok := 0
	for i := range k {
		ok |= subtle.ConstantTimeCompare(h[:], k[i][:])
	}
	return ok == 1
}

// Index is the index of key among the keys, or -1, in constant time.
func (k Keys) Index(key string) int {
	h := sha256.Sum256([]byte(key))
	found := -1
	for i := range k {
		found = subtle.ConstantTimeSelect(subtle.ConstantTimeCompare(h[:], k[i][:]), i, found)
	}
	return found
}

// The admin endpoints' guard against other sites. A browser that opened
// /ui re-sends its saved Basic login with any request to the gateway, a
// form POST from another site included; so a mutating admin endpoint
// takes only requests no form can make: a key in a header a page cannot
// set on a cross-site form (Authorization: Bearer, api-key), or, with a
// browser's Basic login, Content-Type: application/json or the status
// page's own header x-llproxy-admin: 1. Whatever the credentials, it
// refuses what a browser marks as another site's: Sec-Fetch-Site:
// cross-site, and an Origin that is not the gateway's own.

// AdminHeader is the header the status page sends with its calls.
const AdminHeader = "X-Llproxy-Admin"

// CrossSite says why r may be another site's request to a mutating admin
// endpoint, or "" if it is not.
func CrossSite(r *http.Request) string {
	if strings.EqualFold(r.Header.Get("Sec-Fetch-Site"), "cross-site") {
		return "a cross-site request (Sec-Fetch-Site: cross-site)"
	}
	if o := r.Header.Get("Origin"); o != "" && !sameOrigin(o, r.Host) {
		return "a request from another origin (" + strconv.Quote(o) + ")"
	}
	if _, _, basic := r.BasicAuth(); basic {
		ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
		if ct != "application/json" && r.Header.Get(AdminHeader) != "1" {
			return "a browser login without Content-Type: application/json or " + AdminHeader + ": 1 (a form could send it)"
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
