package server

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/provider/mock"
)

// fuzzUpstream records what reached it; the gateway's log tells which
// requests were admitted.
type fuzzUpstream struct {
	mu   sync.Mutex
	hits []string
}

func (u *fuzzUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body []byte
	if r.Body != nil {
		body, _ = io.ReadAll(r.Body)
	}
	u.mu.Lock()
	u.hits = append(u.hits, r.Method+" "+r.URL.Path+" "+string(body))
	u.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, `{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}`)
}

// FuzzHandler runs the whole handler in-process on arbitrary bodies,
// headers and paths. It fails on any panic that escapes, on any inference
// request that reaches the upstream without being admitted, and on any
// negative or absurd cost.
func FuzzHandler(f *testing.F) {
	for _, seed := range []struct{ method, path, ctype, body string }{
		{"POST", "/openai/v1/chat/completions", "application/json", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`},
		{"POST", "/openai/v1/chat/completions", "", ``},
		{"POST", "/openai/v1/chat/completions", "multipart/form-data", `{"model":"m","n":9223372036854775807,"max_tokens":1000000}`},
		{"POST", "/openai/v1/completions", "application/json", `{"model":"m","n":4294967296,"max_completion_tokens":4294967296}`},
		{"POST", "/openai/v1/embeddings", "application/json", `{"model":"m","input":["a",1,{"x":null}]}`},
		{"POST", "/openai/v1/responses", "application/json", `{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"data:image/png;base64,AAAA"}]}]}`},
		{"POST", "/openai/v1/chat/completions", "application/json", `{"model":"a","model":"b","max_tokens":1e5,"stream":true}`},
		{"POST", "/openai/../admin", "text/plain", `x`},
		{"GET", "/openai/v1/models", "", ``},
		{"POST", "/api/chat", "application/json", `{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}`},
		{"POST", "/unload/m", "", ``},
		{"POST", "/claude/v1/messages", "application/json", `{"model":"m","max_tokens":5,"system":[{"type":"text","text":"s","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","data":"AAAA"}},{"type":"tool_result","content":[{"type":"text","text":"x"}]}]}],"tools":[{"name":"t","input_schema":{"type":"object"}}]}`},
		{"POST", "/claude/v1/messages", "application/json", `{"model":"m","messages":[],"stream":true}`},
		{"POST", "/claude/v1/messages/count_tokens", "application/json", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`},
		{"POST", "/v1/messages", "application/json", `{"model":"m","max_tokens":1e9}`},
		{"POST", "/azure/openai/deployments/d/chat/completions", "application/json", `{"messages":[]}`},
		{"POST", "/azure/openai/deployments/x/chat/completions", "application/json", `{"messages":[]}`},
	} {
		f.Add(seed.method, seed.path, seed.ctype, []byte(seed.body))
	}
	cfg, err := config.Parse([]byte(`{"routes": {"openai": {"forward": "http://upstream.invalid", "retries": 0,
	  "models": {"*": {"maxQueueSize": 0, "maxQueueWait": 0, "rpm": 1000000000, "tpm": 1000000000, "maxConcurrent": 0}}},
	  "claude": {"forward": "http://upstream.invalid", "provider": "anthropic", "retries": 0,
	  "models": {"*": {"maxQueueSize": 0, "maxQueueWait": 0, "rpm": 1000000000, "itpm": 1000000000, "otpm": 1000000000, "countTokensRpm": 1000000}}},
	  "azure": {"forward": "http://upstream.invalid", "provider": "azure", "retries": 0, "deployments": {"d": "m"},
	  "models": {"*": {"maxQueueSize": 0, "maxQueueWait": 0, "rpm": 1000000000, "tpm": 1000000000}}}}}`), nil)
	require.NoError(f, err)
	up := &fuzzUpstream{}
	logs := &syncBuffer{}
	srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(f), Registry: prometheus.NewRegistry(),
		Logger: slog.New(slog.NewJSONHandler(logs, nil)), Transport: mock.HandlerTransport{Handler: up}})
	require.NoError(f, err)
	f.Fuzz(func(t *testing.T, method, path, ctype string, body []byte) {
		if !validMethod(method) || !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " \r\n\t#?") {
			return // not a request net/http would hand a handler
		}
		req := httptest.NewRequest(http.MethodGet, "/", bytes.NewReader(body))
		req.Method = method
		req.URL.Path, req.URL.RawPath, req.RequestURI = path, "", path
		if ctype != "" {
			req.Header.Set("Content-Type", strings.Map(func(r rune) rune {
				if r < 0x20 || r == 0x7f {
					return -1
				}
				return r
			}, ctype))
		}
		up.mu.Lock()
		up.hits = nil
		up.mu.Unlock()
		logs.mu.Lock()
		logs.b.Reset()
		logs.mu.Unlock()
		rec := httptest.NewRecorder()
		func() {
			defer func() {
				if p := recover(); p != nil && p != http.ErrAbortHandler {
					t.Fatalf("panic: %v", p)
				}
			}()
			srv.ServeHTTP(rec, req)
		}()
		up.mu.Lock()
		hits := up.hits
		up.mu.Unlock()
		inference := method == http.MethodPost && (strings.HasSuffix(path, "/completions") ||
			strings.HasSuffix(path, "/embeddings") || strings.HasSuffix(path, "/responses") || strings.HasSuffix(path, "/v1/messages"))
		if inference && len(hits) > 0 && rec.Code == http.StatusOK {
			// It reached the upstream: it must have been admitted, at a
			// sane cost.
			line := lastLine(logs.String())
			if !strings.Contains(line, `"outcome":"admitted"`) {
				t.Fatalf("reached the upstream unscheduled: %s", line)
			}
			if strings.Contains(line, `"cost_tokens":-`) {
				t.Fatalf("negative cost: %s", line)
			}
		}
		if rec.Code >= 400 && rec.Code != 404 && !bytes.Contains(rec.Body.Bytes(), []byte(`"error"`)) {
			t.Fatalf("an error without an error body: %d %q", rec.Code, rec.Body.String())
		}
	})
}

func validMethod(m string) bool {
	switch m {
	case "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS":
		return true
	}
	return false
}

func lastLine(s string) string {
	s = strings.TrimRight(s, "\n")
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
