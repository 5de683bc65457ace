package ollama

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestChatRequestTranslation(t *testing.T) {
	png := base64.StdEncoding.EncodeToString([]byte("\x89PNG\r\n\x1a\n0000000000000000"))
	in := `{"model":"m","stream":false,"keep_alive":"10m","format":{"type":"object"},
	  "options":{"num_predict":64,"temperature":0.2,"top_k":40,"stop":["\n"],"seed":7,"num_ctx":8192},
	  "tools":[{"type":"function","function":{"name":"weather","parameters":{"type":"object"}}}],
	  "messages":[{"role":"system","content":"be brief"},
	    {"role":"user","content":"what is this?","images":["` + png + `"]},
	    {"role":"assistant","content":"","tool_calls":[{"function":{"name":"weather","arguments":{"city":"Paris"}}}]},
	    {"role":"tool","content":"sunny","tool_name":"weather"}]}`
	var req request
	require.NoError(t, json.Unmarshal([]byte(in), &req))
	body, err := req.openAI(false)
	require.NoError(t, err)
	var got map[string]any
	require.NoError(t, json.Unmarshal(body, &got))
	assert.EqualValues(t, 64, got["max_tokens"])
	assert.EqualValues(t, 0.2, got["temperature"])
	assert.EqualValues(t, 40, got["top_k"])
	assert.EqualValues(t, 7, got["seed"])
	assert.NotContains(t, got, "num_ctx")
	assert.EqualValues(t, 600, got["keep_alive"], "for the gateway's lifecycle, which strips it before forwarding")
	assert.Equal(t, true, got["stream"], "streamed from the upstream even for a client that wants one object: only the text is held")
	assert.Equal(t, "json_schema", got["response_format"].(map[string]any)["type"])
	msgs := got["messages"].([]any)
	require.Len(t, msgs, 4)
	parts := msgs[1].(map[string]any)["content"].([]any)
	assert.Equal(t, "data:image/png;base64,"+png, parts[1].(map[string]any)["image_url"].(map[string]any)["url"])
	call := msgs[2].(map[string]any)["tool_calls"].([]any)[0].(map[string]any)
	assert.Equal(t, `{"city":"Paris"}`, call["function"].(map[string]any)["arguments"], "arguments as a JSON string")
	assert.Equal(t, call["id"], msgs[3].(map[string]any)["tool_call_id"], "the tool result answers that call")

	var gen request
	require.NoError(t, json.Unmarshal([]byte(`{"model":"m","prompt":"hi","format":"json"}`), &gen))
	body, err = gen.openAI(true)
	require.NoError(t, err)
	assert.Contains(t, string(body), `"stream":true`, "Ollama streams by default")
	assert.Contains(t, string(body), `"include_usage":true`)
	assert.Contains(t, string(body), `"response_format":{"type":"json_object"}`)

	var bad request
	require.NoError(t, json.Unmarshal([]byte(`{"model":"m","prompt":"x","format":"yaml"}`), &bad))
	_, err = bad.openAI(true)
	assert.Error(t, err)
}

// fakeGateway answers every chat with a canned OpenAI response.
type fakeGateway struct {
	status      int
	contentType string
	body        string
}

func (f fakeGateway) ServeChat(w http.ResponseWriter, r *http.Request, model string, body []byte) {
	w.Header().Set("Content-Type", f.contentType)
	w.WriteHeader(f.status)
	for _, part := range strings.SplitAfter(f.body, "\n\n") {
		io.WriteString(w, part)
		w.(http.Flusher).Flush()
	}
}
func (fakeGateway) Models() []string                                 { return []string{"m"} }
func (fakeGateway) Known(model string) bool                          { return model == "m" }
func (fakeGateway) Load(*http.Request, string, *time.Duration) error { return nil }
func (fakeGateway) Unload(*http.Request, string) error               { return nil }

func post(h http.Handler, path, body string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, path, strings.NewReader(body)))
	return w
}

func ndjson(t *testing.T, body string) []map[string]any {
	t.Helper()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		var v map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &v), sc.Text())
		out = append(out, v)
	}
	return out
}

func TestStreamedToolCallsAndDoneLine(t *testing.T) {
	sse := `data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Let me check."}}]}` + "\n\n" +
		`data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"weather","arguments":"{\"ci"}}]}}]}` + "\n\n" +
		`data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]},"finish_reason":"tool_calls"}]}` + "\n\n" +
		`data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}` + "\n\n" +
		"data: [DONE]\n\n"
	h := New(fakeGateway{200, "text/event-stream", sse})
	w := post(h, "/api/chat", `{"model":"m","messages":[{"role":"user","content":"weather?"}]}`)
	assert.Equal(t, "application/x-ndjson", w.Header().Get("Content-Type"))
	lines := ndjson(t, w.Body.String())
	require.Len(t, lines, 3)
	assert.Equal(t, "Let me check.", lines[0]["message"].(map[string]any)["content"])
	calls := lines[1]["message"].(map[string]any)["tool_calls"].([]any)
	assert.Equal(t, map[string]any{"function": map[string]any{"name": "weather", "arguments": map[string]any{"city": "Paris"}}}, calls[0])
	last := lines[2]
	assert.Equal(t, true, last["done"])
	assert.Equal(t, "stop", last["done_reason"])
	assert.EqualValues(t, 12, last["prompt_eval_count"])
	assert.EqualValues(t, 8, last["eval_count"])
	for _, k := range []string{"total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "created_at"} {
		assert.Contains(t, last, k)
	}
}

func TestStreamCutShortEndsWithAnErrorLine(t *testing.T) {
	h := New(fakeGateway{200, "text/event-stream", `data: {"choices":[{"index":0,"delta":{"content":"a"}}]}` + "\n\n"})
	lines := ndjson(t, post(h, "/api/generate", `{"model":"m","prompt":"x"}`).Body.String())
	require.Len(t, lines, 2)
	assert.Equal(t, "a", lines[0]["response"])
	assert.Contains(t, lines[1]["error"], "ended early", "ollama clients throw on an error line")
}

func TestGatewayErrorsBecomeOllamaErrors(t *testing.T) {
	for _, tt := range []struct {
		status, want int
	}{{429, 503}, {404, 404}, {400, 400}, {502, 500}} {
		h := New(fakeGateway{tt.status, "application/json", `{"error":{"message":"nope","type":"x"}}`})
		w := post(h, "/api/chat", `{"model":"m","stream":false,"messages":[{"role":"user","content":"x"}]}`)
		assert.Equal(t, tt.want, w.Code)
		assert.JSONEq(t, `{"error":"nope"}`, w.Body.String())
	}
	h := New(fakeGateway{})
	w := post(h, "/api/show", `{"model":"other"}`)
	assert.Equal(t, http.StatusNotFound, w.Code)
	assert.JSONEq(t, `{"error":"model 'other' not found"}`, w.Body.String())
	assert.Equal(t, http.StatusNotFound, post(h, "/api/pull", `{}`).Code)
}

func TestTagsPsVersion(t *testing.T) {
	h := New(fakeGateway{})
	for path, key := range map[string]string{"/api/tags": "models", "/api/ps": "models", "/api/version": "version"} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, path, nil))
		assert.Equal(t, http.StatusOK, w.Code, path)
		var v map[string]any
		require.NoError(t, json.Unmarshal(w.Body.Bytes(), &v))
		assert.Contains(t, v, key)
	}
}

func (fakeGateway) Running() []Loaded { return []Loaded{{Name: "m"}} }
