package mock

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/llproxy/llproxy/provider"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func post(t *testing.T, h http.Handler, path, body string) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, path, strings.NewReader(body)))
	return w
}

func TestMockChatCompletion(t *testing.T) {
	m := New(Config{Chunks: 5}, nil)
	w := post(t, m, "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, 200, w.Code)
	var resp struct {
		Object  string
		Model   string
		Choices []struct {
			Message      struct{ Role, Content string }
			FinishReason string `json:"finish_reason"`
		}
		Usage struct{ PromptTokens, CompletionTokens, TotalTokens int } `json:"usage"`
	}
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &resp))
	assert.Equal(t, "chat.completion", resp.Object)
	assert.Equal(t, "m", resp.Model)
	assert.Equal(t, "assistant", resp.Choices[0].Message.Role)
	assert.Len(t, strings.Fields(resp.Choices[0].Message.Content), 5)
	assert.Equal(t, "stop", resp.Choices[0].FinishReason)

	// Deterministic: the same request gets the same text.
	w2 := post(t, m, "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`)
	assert.Contains(t, w2.Body.String(), resp.Choices[0].Message.Content)

	w = post(t, m, "/chat/completions", `{"model":"m","messages":[],"max_tokens":2}`)
	assert.Contains(t, w.Body.String(), `"finish_reason":"length"`)
	assert.Contains(t, w.Body.String(), `"completion_tokens":2`)
}

// sseEvents splits an SSE body into its data payloads.
func sseEvents(t *testing.T, body string) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			out = append(out, d)
		}
	}
	return out
}

func TestMockStreamFollowsOpenAIsUsageRules(t *testing.T) {
	m := New(Config{Chunks: 3}, nil)
	w := post(t, m, "/v1/chat/completions", `{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}`)
	assert.Equal(t, "text/event-stream", w.Header().Get("Content-Type"))
	ev := sseEvents(t, w.Body.String())
	require.Len(t, ev, 3+1+1+1, "3 words, the finish chunk, the usage chunk, [DONE]")
	assert.Equal(t, "[DONE]", ev[len(ev)-1])
	for _, e := range ev[:4] {
		assert.Contains(t, e, `"usage":null`)
	}
	var last struct {
		Choices []any
		Usage   *struct{ CompletionTokens int } `json:"usage"`
	}
	require.NoError(t, json.Unmarshal([]byte(ev[4]), &last))
	assert.Empty(t, last.Choices)
	require.NotNil(t, last.Usage)

	w = post(t, m, "/v1/chat/completions", `{"model":"m","stream":true,"messages":[]}`)
	ev = sseEvents(t, w.Body.String())
	require.Len(t, ev, 3+1+1)
	for _, e := range ev {
		assert.NotContains(t, e, `"usage"`, "no usage key unless asked")
	}
	assert.Contains(t, ev[3], `"finish_reason":"stop"`)
}

func TestMockCompletionsEmbeddingsModels(t *testing.T) {
	m := New(Config{Models: []string{"a", "b\"c"}}, nil)
	w := post(t, m, "/v1/completions", `{"model":"m","prompt":"x","max_tokens":3}`)
	assert.Contains(t, w.Body.String(), `"object":"text_completion"`)
	w = post(t, m, "/v1/embeddings", `{"model":"e","input":["a","b"]}`)
	var emb struct {
		Data []struct{ Embedding []float64 }
	}
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &emb))
	assert.Len(t, emb.Data, 2)
	r := httptest.NewRecorder()
	m.ServeHTTP(r, httptest.NewRequest(http.MethodGet, "/v1/models", nil))
	var models struct{ Data []struct{ ID string } }
	require.NoError(t, json.Unmarshal(r.Body.Bytes(), &models))
	assert.Equal(t, "b\"c", models.Data[1].ID)
}

func TestMockErrors(t *testing.T) {
	m := New(Config{}, nil)
	assert.Equal(t, 400, post(t, m, "/v1/chat/completions", `{"model":`).Code)
	w := post(t, m, "/v1/nope", `{}`)
	assert.Equal(t, 404, w.Code)
	assert.Contains(t, w.Body.String(), `"type":"invalid_request_error"`)
}

func TestMockLatencyRespectsCancellation(t *testing.T) {
	m := New(Config{Latency: time.Hour}, nil)
	req := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(`{"model":"m"}`))
	ctx, cancel := context.WithCancel(req.Context())
	cancel()
	w := httptest.NewRecorder()
	m.ServeHTTP(w, req.WithContext(ctx))
	assert.Empty(t, w.Body.String(), "a client that left gets nothing, and the handler returns")
}

func TestConfigValidate(t *testing.T) {
	assert.NoError(t, Config{}.Validate())
	err := Config{Chunks: -1, Latency: -1}.Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "chunks")
	assert.Contains(t, err.Error(), "latency")
}

func TestMockBase64EmbeddingsAndResponses(t *testing.T) {
	m := New(Config{Chunks: 3}, nil)
	do := func(path, body string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		m.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, strings.NewReader(body)))
		return rec
	}
	var emb struct {
		Data []struct {
			Embedding string `json:"embedding"`
		} `json:"data"`
	}
	rec := do("/v1/embeddings", `{"model":"m","input":"hi","encoding_format":"base64"}`)
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &emb), rec.Body.String())
	raw, err := base64.StdEncoding.DecodeString(emb.Data[0].Embedding)
	require.NoError(t, err)
	assert.Len(t, raw, 8*4, "8 little-endian float32s, as the SDKs decode them")

	var resp struct {
		Object string `json:"object"`
		Output []struct {
			Content []struct{ Text string } `json:"content"`
		} `json:"output"`
		Usage struct {
			OutputTokens int `json:"output_tokens"`
		} `json:"usage"`
	}
	rec = do("/v1/responses", `{"model":"m","input":"hi","max_output_tokens":2}`)
	require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &resp), rec.Body.String())
	assert.Equal(t, "response", resp.Object)
	assert.NotEmpty(t, resp.Output[0].Content[0].Text)
	assert.Equal(t, 2, resp.Usage.OutputTokens)

	rec = do("/v1/responses", `{"model":"m","input":"hi","stream":true}`)
	body := rec.Body.String()
	assert.Equal(t, 3, strings.Count(body, "event: response.output_text.delta"))
	assert.Contains(t, body, "event: response.completed")
	u, ok := provider.FindUsage([]byte(body))
	assert.True(t, ok)
	assert.Equal(t, 3, u.Completion)
}
