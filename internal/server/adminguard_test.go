package server

import (
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestAdminEndpointsRefuseOtherSites: a mutating admin endpoint takes only
// requests a cross-site form cannot make, and every admin call is logged
// with its caller.
func TestAdminEndpointsRefuseOtherSites(t *testing.T) {
	g := newGateway(t, `{"adminKeys": ["adm-key"], "clients": {"team": {"keys": ["team-key"]}},
	  "routes": {"demo": {"provider": "mock", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, "", nil)
	post := func(path string, set func(h http.Header), basic bool) int {
		req, _ := http.NewRequest(http.MethodPost, g.URL+path, strings.NewReader("a=b"))
		if basic {
			req.SetBasicAuth("admin", "adm-key")
		}
		set(req.Header)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	form := func(h http.Header) { h.Set("Content-Type", "application/x-www-form-urlencoded") }
	for _, path := range []string{"/unload", "/unload/mock", "/health/force-check"} {
		assert.Equal(t, http.StatusForbidden, post(path, form, true), "%s: a form with the browser's saved login", path)
		assert.Equal(t, http.StatusForbidden, post(path, func(h http.Header) { h.Set("Content-Type", "text/plain") }, true), path)
		assert.Equal(t, http.StatusOK, post(path, func(h http.Header) { h.Set("X-Llproxy-Admin", "1") }, true), "%s: the page's own header", path)
		assert.Equal(t, http.StatusOK, post(path, func(h http.Header) { h.Set("Content-Type", "application/json") }, true), path)
		assert.Equal(t, http.StatusOK, post(path, func(h http.Header) { h.Set("Authorization", "Bearer adm-key") }, false), "%s: scripts keep working", path)
		assert.Equal(t, http.StatusForbidden, post(path, func(h http.Header) {
			h.Set("Authorization", "Bearer adm-key")
			h.Set("Sec-Fetch-Site", "cross-site")
		}, false), path)
		assert.Equal(t, http.StatusForbidden, post(path, func(h http.Header) {
			h.Set("Authorization", "Bearer adm-key")
			h.Set("Origin", "https://evil.example")
		}, false), path)
		assert.Equal(t, http.StatusOK, post(path, func(h http.Header) {
			h.Set("Authorization", "Bearer adm-key")
			h.Set("Origin", g.URL)
			h.Set("Sec-Fetch-Site", "same-origin")
		}, false), "%s: the gateway's own page", path)
	}
	g.waitLog(t, `"msg":"admin call","method":"POST","path":"/unload","caller":"adminKeys[0] (bearer)"`)
	assert.Contains(t, g.logs.String(), `"msg":"admin call refused"`)
	assert.NotContains(t, g.logs.String(), "adm-key")

	req, _ := http.NewRequest(http.MethodGet, g.URL+"/ui", nil)
	req.Header.Set("Authorization", "Bearer adm-key")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	csp := resp.Header.Get("Content-Security-Policy")
	assert.Contains(t, csp, "script-src 'self';")
	assert.NotContains(t, csp, "script-src 'self' 'unsafe-inline'")
	assert.Contains(t, csp, "frame-ancestors 'none'")
}
