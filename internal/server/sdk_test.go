package server

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestOpenAINodeSDK points the official openai npm SDK (installed by
// ./test.sh from the lockfile in testdata/sdk) at the gateway: a chat call,
// a streamed chat call, a 429 the SDK retries by itself after retry-after-ms,
// and a too-large request it does not retry.
func TestOpenAINodeSDK(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{
	  "clientKeys": ["${TEAM_KEY}"],
	  "routes": {"openai": {"forward": "$UPSTREAM", "apiKey": "${OPENAI_API_KEY}", "models": {
	    "gpt-4o":      {"maxQueueSize": 10, "maxQueueWait": 30, "rpm": 100, "tpm": 100000},
	    "gpt-4o-mini": {"maxQueueSize": 0,  "maxQueueWait": 0,  "rpm": 100, "tpm": 6000}}}}}`, up.URL, keyedEnv)

	outb := runNode(t, "sdk", "openai", "sdk.mjs", g.URL)

	var out struct {
		Chat    string
		Stream  string
		Retried struct {
			Ms          float64
			Content     string
			LimitTokens string
		}
		TooLarge struct {
			Status int
			Code   string
			Type   string
		}
	}
	require.NoError(t, json.Unmarshal(outb, &out), string(outb))
	assert.Equal(t, "hi", out.Chat)
	assert.Equal(t, "w0w1w2", out.Stream)
	assert.Equal(t, "hi", out.Retried.Content)
	assert.Equal(t, "6000", out.Retried.LimitTokens)
	assert.Equal(t, 429, out.TooLarge.Status)
	assert.Equal(t, "rate_limit_exceeded", out.TooLarge.Code)

	// What the upstream saw: the retried call arrives once, as the SDK's
	// retry number 1 (its first attempt was the gateway's 429); the
	// too-large one never arrives.
	var mini []string
	for _, s := range up.requests() {
		if strings.Contains(string(s.Body), `"gpt-4o-mini"`) {
			mini = append(mini, s.Header.Get("X-Stainless-Retry-Count"))
		}
		assert.Equal(t, "Bearer sk-upstream-secret-xyz", s.Header.Get("Authorization"))
	}
	assert.Equal(t, []string{"0", "1"}, mini)
	m := metricsText(t, g)
	assert.Contains(t, m, `llproxy_requests_total{model="gpt-4o-mini",outcome="rejected_wait",route="openai"} 1`)
	assert.Contains(t, m, `llproxy_requests_total{model="gpt-4o-mini",outcome="rejected_too_large",route="openai"} 1`)
	// The SDK waited about the retry-after-ms it was told: (47-10) tokens at
	// 100 tokens/s, give or take its own jitter-free honouring.
	assert.GreaterOrEqual(t, out.Retried.Ms, 300.0)
}
