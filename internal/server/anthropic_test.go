package server

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// anthropicError decodes Anthropic's envelope and checks its shape.
func anthropicError(t *testing.T, r *http.Response) (typ, msg string) {
	t.Helper()
	body := readAll(t, r)
	var e struct {
		Type  string `json:"type"`
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
		RequestID string `json:"request_id"`
	}
	require.NoError(t, json.Unmarshal([]byte(body), &e), body)
	assert.Equal(t, "error", e.Type, body)
	assert.NotEmpty(t, e.RequestID, body)
	assert.Equal(t, e.RequestID, r.Header.Get("Request-Id"))
	return e.Error.Type, e.Error.Message
}

const claudeBody = `{"model":"claude-sonnet-4-5","max_tokens":%d,"messages":[{"role":"user","content":"Say hello to the team, please."}]%s}`

func TestAnthropicRouteSpeaksAnthropic(t *testing.T) {
	up := newClaudeUpstream(t, 50, 30000, 8000)
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	g := newGateway(t, fmt.Sprintf(claudeConfig, 50, 30000, 8000, 30), srv.URL, nil)

	// The client's key as x-api-key (the SDKs) or as Bearer (agents);
	// the route's key goes upstream as x-api-key, never a client key.
	for _, auth := range [][]string{{"X-Api-Key", "key-a"}, {"Authorization", "Bearer key-b"}} {
		resp := g.post(t, "/claude/v1/messages", fmt.Sprintf(claudeBody, 100, ""), auth[0], auth[1], "Anthropic-Version", "2023-06-01",
			"Anthropic-Beta", "prompt-caching-2024-07-31")
		body := readAll(t, resp)
		require.Equal(t, http.StatusOK, resp.StatusCode, body)
		h := resp.Header
		assert.Equal(t, "50", h.Get("Anthropic-Ratelimit-Requests-Limit"))
		assert.Equal(t, "8000", h.Get("Anthropic-Ratelimit-Output-Tokens-Limit"))
		out, err := strconv.Atoi(h.Get("Anthropic-Ratelimit-Output-Tokens-Remaining"))
		require.NoError(t, err)
		assert.Less(t, out, 8000, "the gateway's own bucket, exact: not rounded to thousands")
		reset, err := time.Parse(time.RFC3339, h.Get("Anthropic-Ratelimit-Input-Tokens-Reset"))
		require.NoError(t, err, "reset is RFC 3339")
		assert.WithinDuration(t, time.Now(), reset, time.Minute)
		assert.Empty(t, h.Get("X-Ratelimit-Limit-Requests"), "no OpenAI headers on an Anthropic route")
		assert.NotEmpty(t, h.Get("Request-Id"))
	}
	for _, seen := range up.headersSeen() {
		assert.Equal(t, "sk-ant-route", seen.Get("X-Api-Key"))
		assert.Empty(t, seen.Get("Authorization"))
		assert.Equal(t, "2023-06-01", seen.Get("Anthropic-Version"), "passes as sent")
		assert.Equal(t, "prompt-caching-2024-07-31", seen.Get("Anthropic-Beta"))
	}
	// Settled from the answer's usage: input as Claude counted it.
	g.waitLog(t, `"used_tokens":`)

	// A stream passes byte for byte and settles from message_start and the
	// last message_delta.
	resp := g.post(t, "/claude/v1/messages", fmt.Sprintf(claudeBody, 100, `,"stream":true`), "X-Api-Key", "key-a")
	stream := readAll(t, resp)
	assert.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	assert.Contains(t, stream, "event: message_start")
	assert.Contains(t, stream, `"usage":{"output_tokens":20}`)
	assert.NotContains(t, stream, "include_usage")

	// The models list passes through; an unknown path's model too.
	req, _ := http.NewRequest(http.MethodGet, g.URL+"/claude/v1/models", nil)
	req.Header.Set("X-Api-Key", "key-a")
	models, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	assert.Contains(t, readAll(t, models), "claude-sonnet-4-5")

	// The status page shows input and output apart.
	req, _ = http.NewRequest(http.MethodGet, g.URL+"/ui/state", nil)
	req.Header.Set("Authorization", "Bearer key-a")
	state, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	st := readAll(t, state)
	assert.Contains(t, st, `{"name":"input","remaining":`)
	assert.Contains(t, st, `"limit":30000},{"name":"output","remaining":`)

	// No key: 401 in Anthropic's shape.
	resp = g.post(t, "/claude/v1/messages", fmt.Sprintf(claudeBody, 100, ""))
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	typ, _ := anthropicError(t, resp)
	assert.Equal(t, "authentication_error", typ)
}

func TestAnthropicBadInputAndRejections(t *testing.T) {
	up := newClaudeUpstream(t, 50, 30000, 8000)
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	g := newGateway(t, fmt.Sprintf(claudeConfig, 50, 30000, 8000, 0), srv.URL, nil)
	key := []string{"X-Api-Key", "key-a"}

	for body, want := range map[string]string{
		`{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}`:                 "max_tokens",
		`{"model":"claude-sonnet-4-5","max_tokens":0,"messages":[{"role":"user","content":"hi"}]}`:  "max_tokens",
		`{"model":"claude-sonnet-4-5","max_tokens":-5,"messages":[{"role":"user","content":"hi"}]}`: "max_tokens",
		`{"model":"claude-sonnet-4-5","max_tokens":5,"max_tokens":9,"messages":[]}`:                 "",
		`not json`: "",
		`{"model":"claude-sonnet-4-5","max_tokens":10,"system":[{"type":"text","text":"s"}],"messages":[{"role":"user","content":[{"type":"mystery","x":1},{"type":"image","source":{"type":"url","url":"https://x/y.png"}}]}],"tools":[{"name":"t","input_schema":{"type":"object"}}]}`: "ok",
	} {
		resp := g.post(t, "/claude/v1/messages", body, key...)
		if want == "ok" {
			assert.Equal(t, http.StatusOK, resp.StatusCode, "odd blocks are counted and admitted: %s", readAll(t, resp))
			continue
		}
		require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
		typ, msg := anthropicError(t, resp)
		assert.Equal(t, "invalid_request_error", typ)
		assert.Contains(t, msg, want)
	}

	// No bucket can ever hold it: max_tokens above otpm, a prompt above
	// itpm. 429, never retried, never forwarded.
	before := len(up.headersSeen())
	resp := g.post(t, "/claude/v1/messages", fmt.Sprintf(claudeBody, 9000, ""), key...)
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "false", resp.Header.Get("X-Should-Retry"))
	typ, msg := anthropicError(t, resp)
	assert.Equal(t, "rate_limit_error", typ)
	assert.Contains(t, msg, "output tokens per min (OTPM)")
	huge := strings.Repeat("word ", 40000)
	resp = g.post(t, "/claude/v1/messages", `{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"`+huge+`"}]}`, key...)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "%v", resp.Header)
	_, msg = anthropicError(t, resp)
	assert.Contains(t, msg, "input tokens per min (ITPM)")
	assert.Equal(t, before, len(up.headersSeen()), "nothing forwarded")

	// A wait the queue may not take (maxQueueWait 0): the gateway's own
	// 429, naming the bucket that binds, with a whole-second retry-after.
	up.mu.Lock()
	up.output = 4000 // answers use all they reserved: nothing is refunded
	up.mu.Unlock()
	for range 2 {
		g.post(t, "/claude/v1/messages", fmt.Sprintf(claudeBody, 4000, ""), key...)
	}
	resp = g.post(t, "/claude/v1/messages", fmt.Sprintf(claudeBody, 4000, ""), key...)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	retry, err := strconv.Atoi(resp.Header.Get("Retry-After"))
	require.NoError(t, err)
	assert.Positive(t, retry)
	_, msg = anthropicError(t, resp)
	assert.Contains(t, msg, "output tokens per min (OTPM)")
	left, err := strconv.Atoi(resp.Header.Get("Anthropic-Ratelimit-Output-Tokens-Remaining"))
	require.NoError(t, err)
	assert.Less(t, left, 4000, "the headers of the rejection: less than it asks for")
	refused, _, _ := up.stats()
	assert.Zero(t, refused, "the upstream never refused: the gateway did first")
}

// The upstream's anthropic-ratelimit-* headers lower the gateway's buckets
// when someone else spent the key's limit; the client sees the gateway's
// buckets, never the upstream's headers.
func TestAnthropicHeadersLowerTheBuckets(t *testing.T) {
	up := newClaudeUpstream(t, 50, 30000, 8000)
	up.in = 6000 // another user of the key spent 24,000 input tokens
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	g := newGateway(t, fmt.Sprintf(claudeConfig, 50, 30000, 8000, 30), srv.URL, nil)
	resp := g.post(t, "/claude/v1/messages", fmt.Sprintf(claudeBody, 100, ""), "X-Api-Key", "key-a")
	require.Equal(t, http.StatusOK, resp.StatusCode, readAll(t, resp))
	assert.Empty(t, resp.Header.Get("Anthropic-Ratelimit-Tokens-Limit"), "no combined bucket: none of the upstream's")
	left := mustQueue(g.srv.routes["claude"], "claude-sonnet-4-5").State(time.Now()).Remaining[2]
	assert.Less(t, left, 8000, "lowered to what the upstream said is left (rounded to thousands)")
	assert.Contains(t, metricsText(t, g), `llproxy_bucket_lowered_total{model="claude-sonnet-4-5",route="claude"} 1`)
	assert.Contains(t, metricsText(t, g), `llproxy_upstream_ratelimit{field="remaining",model="claude-sonnet-4-5",resource="input_tokens",route="claude"} 6000`)
}
