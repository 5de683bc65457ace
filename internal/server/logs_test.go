package server

import (
	"bufio"
	"context"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRequestIDsAndWhoIsLogged(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"clientKeys": ["k"], "routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`,
		"Authorization", "Bearer k", "X-Request-Id", "abc-123")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "abc-123", resp.Header.Get("X-Request-Id"))
	assert.Equal(t, "abc-123", up.requests()[0].Header.Get("X-Request-Id"), "it goes upstream too")
	g.waitLog(t, `"request_id":"abc-123"`)
	assert.Regexp(t, `"request_id":"abc-123".*"client":"key-1".*"remote":"127\.0\.0\.1:\d+"`, g.logs.String())

	// Without one (or with a bad one), the gateway makes one.
	resp = g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`,
		"Authorization", "Bearer wrong", "X-Request-Id", strings.Repeat("x", 200))
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	id := resp.Header.Get("X-Request-Id")
	assert.Regexp(t, `^[0-9a-f]{16}$`, id)
	g.waitLog(t, `"request_id":"`+id+`"`)
	assert.Regexp(t, regexp.QuoteMeta(`"request_id":"`+id+`"`)+`.*"status":401`, g.logs.String(), "401s are logged")
}

func TestAbortedStreamIsLoggedAsAborted(t *testing.T) {
	g := newGateway(t, `{"routes": {"demo": {"provider": "mock", "mock": {"chunks": 200, "chunkDelay": "20ms"},
	  "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, "", nil)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/demo/v1/chat/completions",
		strings.NewReader(`{"model":"mock","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	require.NoError(t, err)
	assert.Contains(t, line, "data:")
	cancel() // the client goes away mid-stream
	resp.Body.Close()
	g.waitLog(t, `"outcome":"aborted"`)
	assert.NotContains(t, g.logs.String(), `"outcome":"admitted"`)
}

func TestCORS(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"clientKeys": ["k"], "cors": {"allowOrigins": ["https://app.example.com"]},
	  "routes": {"openai": {"forward": "$UPSTREAM", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, up.URL, nil)
	pre := func(origin string) *http.Response {
		req, _ := http.NewRequest(http.MethodOptions, g.URL+"/openai/v1/chat/completions", nil)
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "authorization, content-type")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp
	}
	resp := pre("https://app.example.com")
	assert.Equal(t, http.StatusNoContent, resp.StatusCode, "answered without a key")
	assert.Equal(t, "https://app.example.com", resp.Header.Get("Access-Control-Allow-Origin"))
	assert.Equal(t, "authorization, content-type", resp.Header.Get("Access-Control-Allow-Headers"))
	assert.Contains(t, resp.Header.Get("Access-Control-Allow-Methods"), "POST")
	assert.Equal(t, http.StatusForbidden, pre("https://evil.example").StatusCode)
	assert.Empty(t, up.requests(), "preflights are never forwarded")

	resp = g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`,
		"Authorization", "Bearer k", "Origin", "https://app.example.com")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "https://app.example.com", resp.Header.Get("Access-Control-Allow-Origin"))
	assert.Contains(t, resp.Header.Get("Access-Control-Expose-Headers"), "X-Ratelimit-Remaining-Tokens")
	resp = g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`,
		"Authorization", "Bearer k", "Origin", "https://evil.example")
	assert.Empty(t, resp.Header.Get("Access-Control-Allow-Origin"))
}
