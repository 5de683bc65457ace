package server

import (
	"encoding/json"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestAnthropicNodeSDK points the official @anthropic-ai/sdk (installed by
// ./test.sh from the lockfile in testdata/anthropic) at the gateway in
// front of an Anthropic-like upstream: create, stream, count_tokens,
// models, the root base URL with a bearer token, a team's batch that does
// not starve another team, a 429 the SDK retries after retry-after, and a
// too-large request it does not retry.
func TestAnthropicNodeSDK(t *testing.T) {
	up := newClaudeUpstream(t, 1000, 1000000, 1000000)
	up.delay = 200 * time.Millisecond
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	g := newGateway(t, `{
	  "clients": {"a": {"keys": ["key-a"]}, "b": {"keys": ["key-b"]}},
	  "routes": {"claude": {"forward": "$UPSTREAM", "provider": "anthropic", "apiKey": "sk-ant-route", "models": {
	    "claude-sonnet-4-5": {"rpm": 1000, "itpm": 1000000, "otpm": 1000000, "maxQueueSize": 10, "maxQueueWait": 30},
	    "claude-fair":       {"rpm": 1000, "itpm": 1000000, "otpm": 1200, "maxQueueSize": 10, "maxQueueWait": 60},
	    "claude-tight":      {"rpm": 1000, "itpm": 1000000, "otpm": 600, "maxQueueSize": 0, "maxQueueWait": 0}}}}}`, srv.URL, nil)

	outb := runNode(t, "anthropic", "@anthropic-ai/sdk", "anthropic.mjs", g.URL)
	var out struct {
		Create struct {
			Text  string
			Usage map[string]any
		}
		Stream struct {
			Text  int
			Usage map[string]any
		}
		Count    int
		Models   []string
		Root     int
		Fairness int
		Retried  struct {
			Ms          float64
			OK          string
			OutputLimit string
		}
		TooLarge struct {
			Status  int
			Type    string
			Retried string
		}
	}
	require.NoError(t, json.Unmarshal(outb, &out), string(outb))
	assert.Equal(t, "tok", out.Create.Text)
	assert.EqualValues(t, 20, out.Create.Usage["output_tokens"])
	assert.Equal(t, 20, out.Stream.Text)
	assert.EqualValues(t, 20, out.Stream.Usage["output_tokens"])
	assert.Positive(t, out.Count)
	assert.Equal(t, []string{"claude-sonnet-4-5"}, out.Models)
	assert.Equal(t, 20, out.Root)
	assert.Less(t, out.Fairness, 8, "team b's one request is not behind team a's whole batch (it would be last, 8, in one FIFO)")
	assert.Equal(t, "message", out.Retried.OK)
	assert.GreaterOrEqual(t, out.Retried.Ms, 900.0, "the SDK waited the gateway's retry-after")
	assert.Equal(t, "600", out.Retried.OutputLimit)
	assert.Equal(t, 429, out.TooLarge.Status)
	assert.Equal(t, "rate_limit_error", out.TooLarge.Type)
	assert.Equal(t, "false", out.TooLarge.Retried)
	refused, _, overrun := up.stats()
	assert.Zero(t, refused, "the upstream never refused")
	assert.False(t, overrun)
	for _, h := range up.headersSeen() {
		assert.Equal(t, "sk-ant-route", h.Get("X-Api-Key"), "never a client key")
		assert.Empty(t, h.Get("Authorization"))
	}
}
