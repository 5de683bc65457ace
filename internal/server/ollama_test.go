package server

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestOllamaClient points the official ollama npm client (installed by
// ./test.sh from the lockfile in testdata/ollama) at llproxy's Ollama API
// in front of an OpenAI-compatible upstream: version, list, show, chat,
// streamed chat, generate, streamed generate, load and unload, an error.
func TestOllamaClient(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(openAIStreamer)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"llama3:8b": {"maxQueueSize": 10, "maxQueueWait": 30, "rpm": 100, "tpm": 100000}}}}}`, up.URL, nil)

	outb := runNode(t, "ollama", "ollama", "ollama.mjs", g.URL)
	var out struct {
		Version string
		List    []string
		Show    []string
		Chat    struct {
			Content, Reason string
			Done, Total     bool
			Prompt, Eval    int
		}
		ChatStream struct {
			Text, Reason string
			Done         bool
			Eval         int
		}
		Generate struct {
			Response string
			Done     bool
			Prompt   int
		}
		GenerateStream struct {
			Text string
			Done bool
		}
		Load, Unload, ChatLoad string
		Error                  struct {
			Status  int
			Message string
		}
	}
	require.NoError(t, json.Unmarshal(outb, &out), string(outb))
	assert.NotEmpty(t, out.Version)
	assert.Equal(t, []string{"llama3:8b"}, out.List)
	assert.Contains(t, out.Show, "completion")
	assert.Equal(t, "a b c", out.Chat.Content)
	assert.True(t, out.Chat.Done)
	assert.Equal(t, "stop", out.Chat.Reason)
	assert.Equal(t, 11, out.Chat.Prompt, "prompt_eval_count from the upstream's usage")
	assert.Equal(t, 3, out.Chat.Eval)
	assert.True(t, out.Chat.Total)
	assert.Equal(t, "a b c", out.ChatStream.Text)
	assert.True(t, out.ChatStream.Done)
	assert.Equal(t, 3, out.ChatStream.Eval)
	assert.Equal(t, "a b c", out.Generate.Response)
	assert.True(t, out.Generate.Done)
	assert.Equal(t, "a b c", out.GenerateStream.Text)
	assert.True(t, out.GenerateStream.Done)
	assert.Equal(t, "load", out.Load)
	assert.Equal(t, "unload", out.Unload)
	assert.Equal(t, "load", out.ChatLoad)
	assert.Equal(t, 404, out.Error.Status)
	assert.Contains(t, out.Error.Message, "not found")

	// What the upstream received: OpenAI requests, translated.
	var sawSystem, sawMaxTokens bool
	for _, s := range up.requests() {
		assert.Equal(t, "/v1/chat/completions", s.Path)
		assert.NotContains(t, string(s.Body), "keep_alive")
		sawSystem = sawSystem || strings.Contains(string(s.Body), `{"content":"be brief","role":"system"}`)
		sawMaxTokens = sawMaxTokens || strings.Contains(string(s.Body), `"max_tokens":50`)
	}
	assert.True(t, sawSystem, "generate's system became a system message")
	assert.True(t, sawMaxTokens, "num_predict became max_tokens")
	assert.Len(t, up.requests(), 4, "load and unload requests do not reach the upstream")
}

func TestOllamaErrorsAndRoot(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"llama3:8b": {"maxQueueSize": 0, "maxQueueWait": 0, "rpm": 1, "tpm": 100000}}}}}`, up.URL, nil)
	resp, err := http.Get(g.URL + "/")
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, "Ollama is running", string(b))

	chat := func() *http.Response {
		resp, err := http.Post(g.URL+"/api/chat", "application/json",
			strings.NewReader(`{"model":"llama3:8b","stream":false,"messages":[{"role":"user","content":"hi"}]}`))
		require.NoError(t, err)
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	assert.Equal(t, http.StatusOK, chat().StatusCode)
	resp = chat() // rpm 1, no queue: the gateway says no
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode, "Ollama's status for a full queue")
	var e map[string]string
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&e))
	assert.Contains(t, e["error"], "Rate limit reached")
	assert.NotEmpty(t, resp.Header.Get("Retry-After"))

	resp, err = http.Post(g.URL+"/api/chat", "application/json", strings.NewReader(`{"model":`))
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
}
