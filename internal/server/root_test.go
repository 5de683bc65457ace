package server

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestOneBaseURLRoutesByModel(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {
	  "demo":   {"provider": "mock", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}},
	  "openai": {"forward": "$UPSTREAM", "models": {"gpt-4o-mini": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}},
	  "spare":  {"forward": "$UPSTREAM", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}
	}}`, up.URL, nil)
	// A listed name beats a "*" listed before it.
	resp := g.post(t, "/v1/chat/completions", `{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Len(t, up.requests(), 1, "to openai, not the demo mock")
	assert.Equal(t, "/v1/chat/completions", up.requests()[0].Path)
	// Anything else: the first route, in the config's order, whose "*" takes it.
	resp = g.post(t, "/v1/chat/completions", `{"model":"llama-3","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Len(t, up.requests(), 1, "demo's mock answered")
	g.waitLog(t, `"route":"demo","model":"llama-3"`)
	// An inference call without a model is a 400, sent nowhere.
	resp = g.post(t, "/v1/chat/completions", `{"messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	e := openAIError(t, resp)
	assert.Equal(t, "model", strOf(e.Param))
	assert.Contains(t, e.Message, "'model' is required")
	assert.Len(t, up.requests(), 1)
	// Every model of every route, once.
	r, err := http.Get(g.URL + "/v1/models")
	require.NoError(t, err)
	var list struct {
		Data []struct {
			ID      string `json:"id"`
			OwnedBy string `json:"owned_by"`
		}
	}
	require.NoError(t, json.NewDecoder(r.Body).Decode(&list))
	r.Body.Close()
	ids := map[string]string{}
	for _, m := range list.Data {
		ids[m.ID] = m.OwnedBy
	}
	assert.Equal(t, map[string]string{"gpt-4o-mini": "llproxy/openai", "mock": "llproxy/demo"}, ids)
}

func TestDefaultRouteBreaksTies(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"defaultRoute": "spare", "routes": {
	  "demo":  {"provider": "mock", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}},
	  "spare": {"forward": "$UPSTREAM", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}
	}}`, up.URL, nil)
	resp := g.post(t, "/v1/chat/completions", `{"model":"llama-3","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Len(t, up.requests(), 1, "both take any model: the default route wins")
}

func TestOllamaFacadeResolvesLikeTheRoot(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {
	  "demo":   {"provider": "mock", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}},
	  "openai": {"forward": "$UPSTREAM", "models": {"gpt-4o-mini": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}
	}}`, up.URL, nil)
	resp, err := http.Post(g.URL+"/api/chat", "application/json",
		strings.NewReader(`{"model":"gpt-4o-mini","stream":false,"messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Len(t, up.requests(), 1, "gpt-4o-mini is openai's, not the mock's")
}
