package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/route"
	"github.com/llproxy/llproxy/scheduler"
	"github.com/llproxy/llproxy/tokenizer"
)

var (
	tokOnce sync.Once
	tok     *tokenizer.Tokenizer
)

func testTokenizer(t testing.TB) *tokenizer.Tokenizer {
	tokOnce.Do(func() {
		var err error
		tok, err = tokenizer.New(tokenizer.Config{})
		if err != nil {
			panic(err)
		}
	})
	return tok
}

// seen is one request as the fake upstream received it.
type seen struct {
	Method, Path, RawQuery string
	Header                 http.Header
	Body                   []byte
}

// upstream is an httptest server that behaves like OpenAI: JSON answers
// with usage and its own x-ratelimit headers, SSE when asked. A test may
// replace handle to script other behaviour.
type upstream struct {
	*httptest.Server
	mu     sync.Mutex
	seen   []seen
	handle func(w http.ResponseWriter, r *http.Request, body []byte)
}

func newUpstream(t *testing.T) *upstream {
	u := &upstream{}
	u.handle = openAILike
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		u.mu.Lock()
		u.seen = append(u.seen, seen{r.Method, r.URL.Path, r.URL.RawQuery, r.Header.Clone(), body})
		h := u.handle
		u.mu.Unlock()
		h(w, r, body)
	}))
	t.Cleanup(u.Close)
	return u
}

func (u *upstream) requests() []seen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seen(nil), u.seen...)
}

func (u *upstream) setHandler(h func(w http.ResponseWriter, r *http.Request, body []byte)) {
	u.mu.Lock()
	u.handle = h
	u.mu.Unlock()
}

func openAILike(w http.ResponseWriter, r *http.Request, body []byte) {
	if r.Method == http.MethodGet {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"object":"list","data":[{"id":"gpt-4o","object":"model"}]}`)
		return
	}
	var req struct {
		Model  string `json:"model"`
		Stream bool   `json:"stream"`
	}
	json.Unmarshal(body, &req)
	w.Header().Set("X-Ratelimit-Remaining-Requests", "upstream-value")
	if req.Stream {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range 3 {
			fmt.Fprintf(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"w%d\"}}]}\n\n", i)
			w.(http.Flusher).Flush()
		}
		io.WriteString(w, "data: [DONE]\n\n")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"id":"x","object":"chat.completion","model":%q,"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}`, req.Model)
}

// gateway is llproxy under test, with what it logged.
type gateway struct {
	*httptest.Server
	srv  *Server
	reg  *prometheus.Registry
	logs *syncBuffer
	busy atomic.Int64 // requests whose handler has not returned
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// newGateway starts llproxy on cfgJSON, where $UPSTREAM stands for url.
func newGateway(t *testing.T, cfgJSON, url string, env map[string]string) *gateway {
	t.Helper()
	cfgJSON = strings.ReplaceAll(cfgJSON, "$UPSTREAM", url)
	cfg, err := config.Parse([]byte(cfgJSON), func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	require.NoError(t, err)
	logs := &syncBuffer{}
	reg := prometheus.NewRegistry()
	srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(t), Registry: reg,
		Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	require.NoError(t, err)
	g := &gateway{srv: srv, reg: reg, logs: logs}
	g.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.busy.Add(1)
		defer g.busy.Add(-1)
		srv.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		g.Close()
		srv.StopBackends()
	})
	return g
}

// post sends a JSON body with optional headers (name, value pairs).
func (g *gateway) post(t *testing.T, path, body string, headers ...string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, g.URL+path, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func readAll(t *testing.T, r *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(r.Body)
	require.NoError(t, err)
	return string(b)
}

// openAIError decodes an error body and checks it has exactly OpenAI's keys.
// apiError is OpenAI's error object, as a client decodes it.
type apiError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func openAIError(t *testing.T, r *http.Response) apiError {
	t.Helper()
	var raw map[string]map[string]any
	body := readAll(t, r)
	require.NoError(t, json.Unmarshal([]byte(body), &raw), body)
	e, ok := raw["error"]
	require.True(t, ok, body)
	keys := []string{}
	for k := range e {
		keys = append(keys, k)
	}
	require.ElementsMatch(t, []string{"message", "type", "param", "code"}, keys, body)
	var out struct{ Error apiError }
	require.NoError(t, json.Unmarshal([]byte(body), &out))
	return out.Error
}

func strOf(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// settled waits (up to 5 s) until no handler is running: a request is
// settled, counted and logged after its answer reached the client.
func (g *gateway) settled() {
	for i := 0; i < 5000 && g.busy.Load() > 0; i++ {
		time.Sleep(time.Millisecond)
	}
}

// metricsText is what /metrics says once the requests answered so far
// are settled.
func metricsText(t *testing.T, g *gateway) string {
	t.Helper()
	g.settled()
	resp, err := http.Get(g.URL + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	return readAll(t, resp)
}

// waitLog waits until the gateway has logged a line containing want: the
// request's line is written after its response is sent.
func (g *gateway) waitLog(t *testing.T, want string) {
	t.Helper()
	require.Eventually(t, func() bool { return strings.Contains(g.logs.String(), want) },
		5*time.Second, time.Millisecond, "log line %s", want)
}

// runNode runs a script of testdata/<dir> with node against the gateway
// (GATEWAY_URL) and returns what it printed. The npm packages it uses must
// be installed: ./test.sh runs npm ci from the lockfile.
func runNode(t *testing.T, dir, pkg, script, gatewayURL string) []byte {
	t.Helper()
	dir = filepath.Join("testdata", dir)
	if _, err := os.Stat(filepath.Join(dir, "node_modules", pkg)); err != nil {
		t.Fatalf("the %s npm package is not installed: run `npm ci --prefix %s` (./test.sh does): %v", pkg, dir, err)
	}
	cmd := exec.Command("node", script)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GATEWAY_URL="+gatewayURL)
	out, err := cmd.Output()
	var stderr string
	if ee, ok := err.(*exec.ExitError); ok {
		stderr = string(ee.Stderr)
	}
	require.NoError(t, err, stderr)
	return out
}

// mustQueue is rt's queue of a model it lists.
func mustQueue(rt *route.Route, model string) *scheduler.Queue {
	q, ok := rt.Queue(model)
	if !ok {
		panic("no queue for " + model)
	}
	return q
}

// startBinary runs the built llproxy on the config at cfgPath, on a free
// port, waits until it serves, and kills it when the test ends. It returns
// its base URL, its process and what it logs.
func startBinary(t *testing.T, bin, cfgPath string) (string, *exec.Cmd, *syncBuffer) {
	t.Helper()
	addr := port(t)
	cmd := exec.Command(bin, "-config", cfgPath, "-listen", addr)
	logs := &syncBuffer{}
	cmd.Stderr = logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	base := "http://" + addr
	require.Eventually(t, func() bool {
		r, err := http.Get(base + "/healthz")
		if err == nil {
			r.Body.Close()
		}
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)
	return base, cmd, logs
}
