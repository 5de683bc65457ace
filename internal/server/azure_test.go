package server

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
)

// azureUpstream behaves like an Azure OpenAI resource: deployments in the
// path, api-version in the query, api-key (never Authorization), remaining
// values in x-ratelimit-remaining-*, OpenAI's answers.
type azureUpstream struct {
	*httptest.Server
	mu   sync.Mutex
	seen []*http.Request
}

func newAzureUpstream(t *testing.T) *azureUpstream {
	a := &azureUpstream{}
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		a.mu.Lock()
		a.seen = append(a.seen, r.Clone(r.Context()))
		a.mu.Unlock()
		if r.Header.Get("Api-Key") != "az-route-key" || r.Header.Get("Authorization") != "" {
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"error":{"code":"401","message":"Access denied due to invalid subscription key."}}`)
			return
		}
		v1 := strings.HasPrefix(r.URL.Path, "/openai/v1/")
		if !v1 && r.URL.Query().Get("api-version") == "" {
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, `{"error":{"code":"404","message":"Resource not found"}}`)
			return
		}
		var req struct {
			Model  string `json:"model"`
			Stream bool   `json:"stream"`
		}
		json.Unmarshal(body, &req)
		w.Header().Set("X-Ratelimit-Remaining-Requests", "299")
		w.Header().Set("X-Ratelimit-Remaining-Tokens", "-1")
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"x","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}`)
	}))
	t.Cleanup(a.Close)
	return a
}

func (a *azureUpstream) requests() []*http.Request {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]*http.Request(nil), a.seen...)
}

const azureConfig = `{
  "clientKeys": ["team-key"],
  "routes": {"azure": {"forward": "$UPSTREAM", "provider": "azure", "apiKey": "az-route-key",
    "deployments": {"gpt4o-eu": "gpt-4o", "mini": "gpt-4o-mini"},
    "models": {"gpt-4o": {"rpm": 300, "tpm": 50000, "maxQueueSize": 5, "maxQueueWait": 0},
               "gpt-4o-mini": {"rpm": 600, "tpm": 100000}}}}
}`

func TestAzureDeployments(t *testing.T) {
	up := newAzureUpstream(t)
	g := newGateway(t, azureConfig, up.URL, nil)
	const body = `{"messages":[{"role":"user","content":"hello"}],"max_tokens":100}`

	// The deployment in the path is the queue of its model; the query and
	// the path pass; the route's key goes as api-key.
	resp := g.post(t, "/azure/openai/deployments/gpt4o-eu/chat/completions?api-version=2024-10-21", body, "Api-Key", "team-key")
	require.Equal(t, http.StatusOK, resp.StatusCode, readAll(t, resp))
	seen := up.requests()[0]
	assert.Equal(t, "/openai/deployments/gpt4o-eu/chat/completions", seen.URL.Path)
	assert.Equal(t, "api-version=2024-10-21", seen.URL.RawQuery)
	assert.Equal(t, "az-route-key", seen.Header.Get("Api-Key"))
	assert.Empty(t, seen.Header.Get("Authorization"))

	// Azure refunds nothing: the bucket keeps prompt + max_tokens.
	st := mustQueue(g.srv.routes["azure"], "gpt-4o").State(time.Now())
	assert.Less(t, st.Remaining[1], 50000-100, "charged prompt + max_tokens")
	assert.Greater(t, st.Remaining[1], 50000-200)
	assert.Equal(t, "50000", resp.Header.Get("X-Ratelimit-Limit-Tokens"))

	// The v1 surface: the body names the deployment.
	resp = g.post(t, "/azure/openai/v1/chat/completions", `{"model":"mini","messages":[]}`, "Authorization", "Bearer team-key")
	require.Equal(t, http.StatusOK, resp.StatusCode, readAll(t, resp))
	_, ok := g.srv.routes["azure"].Queue("gpt-4o-mini")
	assert.True(t, ok, "queued as gpt-4o-mini")

	// An unknown deployment: 404 in Azure's shape, nothing forwarded.
	n := len(up.requests())
	resp = g.post(t, "/azure/openai/deployments/nope/chat/completions?api-version=2024-10-21", body, "Api-Key", "team-key")
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	var e struct {
		Error map[string]any `json:"error"`
	}
	require.NoError(t, json.Unmarshal([]byte(readAll(t, resp)), &e))
	assert.Equal(t, "DeploymentNotFound", e.Error["code"])
	assert.Len(t, up.requests(), n)

	// The gateway's own 429: Azure's shape, code "429" as a string, and
	// retry-after-ms.
	resp = g.post(t, "/azure/openai/deployments/gpt4o-eu/chat/completions?api-version=2024-10-21",
		`{"messages":[],"max_tokens":60000}`, "Api-Key", "team-key")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	raw := readAll(t, resp)
	require.NoError(t, json.Unmarshal([]byte(raw), &e), raw)
	assert.Equal(t, "429", e.Error["code"], raw)
	assert.NotContains(t, e.Error, "type")
	resp = g.post(t, "/azure/openai/deployments/gpt4o-eu/chat/completions?api-version=2024-10-21",
		`{"messages":[],"max_tokens":49800}`, "Api-Key", "team-key")
	// What is left (about 100 tokens) refills at 833 a second: a request
	// of 20,000 would wait half a minute, however slow the machine is.
	resp = g.post(t, "/azure/openai/deployments/gpt4o-eu/chat/completions?api-version=2024-10-21",
		`{"messages":[],"max_tokens":20000}`, "Api-Key", "team-key")
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.NotEmpty(t, resp.Header.Get("Retry-After-Ms"))
}

func TestAzureConfigIsChecked(t *testing.T) {
	for cfg, want := range map[string]string{
		`{"routes":{"azure":{"forward":"https://x.openai.azure.com","provider":"azure","settle":"actual","models":{"m":{"rpm":1,"tpm":1}}}}}`:           "routes.azure.settle",
		`{"routes":{"azure":{"forward":"https://x.openai.azure.com","provider":"azure","deployments":{"d":"other"},"models":{"m":{"rpm":1,"tpm":1}}}}}`: "routes.azure.deployments.d",
		`{"routes":{"o":{"forward":"https://x","deployments":{"d":"m"},"models":{"m":{"rpm":1,"tpm":1}}}}}`:                                             "routes.o.deployments",
	} {
		_, err := config.Parse([]byte(cfg), nil)
		require.Error(t, err, cfg)
		assert.Contains(t, err.Error(), want)
	}
}

// TestAzureOpenAINodeSDK: the openai npm package's AzureOpenAI class works
// unchanged against the gateway.
func TestAzureOpenAINodeSDK(t *testing.T) {
	up := newAzureUpstream(t)
	g := newGateway(t, azureConfig, up.URL, nil)
	outb := runNode(t, "sdk", "openai", "azure.mjs", g.URL)
	var out struct {
		Chat     string
		TooLarge struct {
			Status int
			Code   string
		}
	}
	require.NoError(t, json.Unmarshal(outb, &out), string(outb))
	assert.Equal(t, "hi", out.Chat)
	assert.Equal(t, 429, out.TooLarge.Status)
	assert.Equal(t, "429", out.TooLarge.Code)
	seen := up.requests()
	require.Len(t, seen, 1)
	assert.Equal(t, "/openai/deployments/gpt4o-eu/chat/completions", seen[0].URL.Path)
	assert.Equal(t, "2024-10-21", seen[0].URL.Query().Get("api-version"))
	assert.Equal(t, "az-route-key", seen[0].Header.Get("Api-Key"))
}
