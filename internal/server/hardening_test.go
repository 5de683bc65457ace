package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/internal/porttest"
	"github.com/llproxy/llproxy/provider/mock"
	"github.com/llproxy/llproxy/scheduler"
)

// A panic in a goroutine the gateway starts (here the in-process upstream's)
// is answered with a 500 in OpenAI's shape, logged with its stack, and the
// gateway goes on.
func TestPanicInTheInProcessUpstreamIsA500(t *testing.T) {
	cfg, err := config.Parse([]byte(`{"routes": {"openai": {"forward": "http://upstream.invalid",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 5, "rpm": 60, "tpm": 100000, "maxConcurrent": 1}}}}}`), nil)
	require.NoError(t, err)
	logs := &syncBuffer{}
	boom := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m map[string]int
		m["x"]++ // a nil map write: the kind of bug that used to take the process down
	})
	srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(t), Registry: prometheus.NewRegistry(),
		Logger: slog.New(slog.NewJSONHandler(logs, nil)), Transport: mock.HandlerTransport{Handler: boom, Log: slog.New(slog.NewJSONHandler(logs, nil))}})
	require.NoError(t, err)
	g := httptest.NewServer(srv)
	defer g.Close()
	for range 3 { // the slot of maxConcurrent 1 comes back each time
		resp, err := http.Post(g.URL+"/openai/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`))
		require.NoError(t, err)
		e := openAIError(t, resp)
		resp.Body.Close()
		assert.Equal(t, http.StatusInternalServerError, resp.StatusCode)
		assert.Equal(t, "server_error", e.Type)
	}
	assert.Contains(t, logs.String(), "panic in the in-process upstream")
	assert.Contains(t, logs.String(), "goroutine", "with its stack")
}

// breakingBackend streams two chunks and then drops the connection, as a
// crashing server (or a client's reset, on the other side) does.
func breakingBackend(t *testing.T, model string) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/models" {
			fmt.Fprintf(w, `{"object":"list","data":[{"id":%q}]}`, model)
			return
		}
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n")
		w.(http.Flusher).Flush()
		io.WriteString(w, "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n")
		w.(http.Flusher).Flush()
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	}))
	t.Cleanup(s.Close)
	return s
}

// A stream cut mid-way gives back everything its request held: the
// backend's in-flight count, the model's concurrency slot. After several
// cuts, a backend with maxConcurrent 1 still serves.
func TestCutStreamsLeakNothing(t *testing.T) {
	be := breakingBackend(t, "m")
	ok := newLocalServer(t, nil, "ok", "n")
	g := newGateway(t, `{"routes": {"local": {
	  "backends": [{"name": "broken", "url": "`+be.URL+`", "models": ["m"], "maxConcurrent": 1},
	               {"name": "ok", "url": "`+ok.URL+`", "models": ["n"], "maxConcurrent": 1}],
	  "models": {"*": {"maxQueueSize": 4, "maxQueueWait": 2, "rpm": 600, "tpm": 1000000, "maxConcurrent": 1}}}}}`, "", nil)
	for range 3 {
		resp := g.post(t, "/local/v1/chat/completions", `{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}`)
		b, err := io.ReadAll(resp.Body)
		assert.Error(t, err, "the client sees the stream cut, not a clean end: %d %s %v", resp.StatusCode, b, resp.Header)
	}
	g.waitLog(t, `"outcome":"aborted"`)
	for _, st := range g.srv.routes["local"].Fleet().Pool().Status() {
		assert.Zero(t, st.InFlight, "backend %s", st.Name)
	}
	q, ok2 := g.srv.routes["local"].Queue("m")
	require.True(t, ok2)
	assert.Zero(t, q.Stats(time.Now()).InFlight, "the model's slot is free")
	// And a client that resets mid-stream: the same.
	slow := newLocalServer(t, nil, "slow", "s")
	slow.hold = make(chan struct{})
	g2 := newGateway(t, `{"routes": {"local": {
	  "backends": [{"name": "slow", "url": "`+slow.URL+`", "models": ["s"], "maxConcurrent": 1}],
	  "models": {"*": {"maxQueueSize": 4, "maxQueueWait": 2, "rpm": 600, "tpm": 1000000, "maxConcurrent": 1}}}}}`, "", nil)
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g2.URL+"/local/v1/chat/completions",
		strings.NewReader(`{"model":"s","messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req) // the first chunk comes, then the server holds
	require.NoError(t, err)
	require.Eventually(t, func() bool { return slow.inflight.Load() == 1 }, 5*time.Second, time.Millisecond)
	cancel() // the client gives up mid-answer
	io.ReadAll(resp.Body)
	resp.Body.Close()
	close(slow.hold)
	require.Eventually(t, func() bool {
		st := g2.srv.routes["local"].Fleet().Pool().Status()
		return st[0].InFlight == 0
	}, 5*time.Second, time.Millisecond, "the backend's in-flight count comes back")
	status, _ := chat(t, g2.URL+"/local/v1/chat/completions", "s")
	assert.Equal(t, http.StatusOK, status)
}

// Admin endpoints: an admin key when adminKeys are set, else a client key;
// mutating ones only on POST; /metrics behind metricsKey; an unknown route
// named to nobody unauthenticated.
func TestAdminEndpointsAreAuthenticated(t *testing.T) {
	up := newUpstream(t)
	cfg := `{"clientKeys": ["team-key"], %s "routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 60, "tpm": 100000}}}}}`
	do := func(g *gateway, method, path, key string) int {
		req, _ := http.NewRequest(method, g.URL+path, nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	g := newGateway(t, fmt.Sprintf(cfg, ""), up.URL, nil)
	for _, p := range []string{"/status", "/health"} {
		assert.Equal(t, 401, do(g, "GET", p, ""), p)
		assert.Equal(t, 200, do(g, "GET", p, "team-key"), p)
	}
	for _, p := range []string{"/unload", "/unload/gpt-4o", "/health/force-check"} {
		assert.Equal(t, 401, do(g, "POST", p, ""), p)
		assert.Equal(t, 405, do(g, "GET", p, "team-key"), "%s: no GET side effects", p)
		assert.Equal(t, 200, do(g, "POST", p, "team-key"), p)
	}
	assert.Equal(t, 200, do(g, "GET", "/healthz", ""), "liveness stays open")
	assert.Equal(t, 200, do(g, "GET", "/metrics", ""), "no metricsKey: open")

	resp, err := http.Get(g.URL + "/nope/v1/chat/completions")
	require.NoError(t, err)
	body := readAll(t, resp)
	assert.Equal(t, 404, resp.StatusCode)
	assert.NotContains(t, body, "openai", "route names are not told to strangers")

	g = newGateway(t, fmt.Sprintf(cfg, `"adminKeys": ["admin-key"], "metricsKey": "scrape-key",`), up.URL, nil)
	assert.Equal(t, 401, do(g, "GET", "/status", "team-key"), "a client key is not an admin key")
	assert.Equal(t, 200, do(g, "GET", "/status", "admin-key"))
	assert.Equal(t, 200, do(g, "POST", "/unload", "admin-key"))
	assert.Equal(t, 401, do(g, "GET", "/metrics", ""))
	assert.Equal(t, 200, do(g, "GET", "/metrics", "scrape-key"))
	g.waitLog(t, `"status":401`)
}

// A client that stops reading a stream is cut off at writeTimeout and its
// slot goes back; one that trickles its body gets 408 at bodyIdleTimeout.
func TestSlowClientsHoldNothing(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Content-Type", "text/event-stream")
		chunk := "data: {\"choices\":[{\"delta\":{\"content\":\"" + strings.Repeat("x", 16<<10) + "\"}}]}\n\n"
		for r.Context().Err() == nil {
			if _, err := io.WriteString(w, chunk); err != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	})
	g := newGateway(t, `{"writeTimeout": "300ms", "bodyIdleTimeout": "300ms", "routes": {"openai": {"forward": "$UPSTREAM",
	  "injectStreamUsage": false, "models": {"*": {"maxQueueSize": 4, "maxQueueWait": 30, "rpm": 600, "tpm": 1000000, "maxConcurrent": 1}}}}}`, up.URL, nil)
	addr := strings.TrimPrefix(g.URL, "http://")
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer conn.Close()
	body := `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`
	fmt.Fprintf(conn, "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	// It reads nothing more. Once the socket buffers are full the
	// gateway's write blocks, times out, and the slot comes back.
	q := func() int {
		qq, ok := g.srv.routes["openai"].Queue("gpt-4o")
		if !ok {
			return -1
		}
		return qq.Stats(time.Now()).InFlight
	}
	require.Eventually(t, func() bool { return q() == 1 }, 5*time.Second, time.Millisecond)
	require.Eventually(t, func() bool { return q() == 0 }, 20*time.Second, 10*time.Millisecond,
		"the stalled reader's slot is released")

	// A body that trickles: headers, a few bytes, then nothing.
	c2, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer c2.Close()
	fmt.Fprintf(c2, "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
	c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c2), nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusRequestTimeout, resp.StatusCode)
	resp.Body.Close()
}

// A request that fails authentication is answered before its body is read,
// and its connection is closed: a client trickling a body without a key
// cannot hold a goroutine and a connection.
func TestUnauthenticatedBodiesAreNotRead(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"clientKeys": ["k"], "routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	conn, err := net.Dial("tcp", strings.TrimPrefix(g.URL, "http://"))
	require.NoError(t, err)
	defer conn.Close()
	fmt.Fprintf(conn, "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mo")
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	require.NoError(t, err)
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	_, err = br.ReadByte()
	assert.ErrorIs(t, err, io.EOF, "the gateway closed the connection instead of waiting for the body")
}

// The gateway reads a request as the upstream will, or refuses it.
func TestTheGatewayReadsWhatTheUpstreamReads(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	for _, tc := range []struct {
		name, body, ctype string
		status            int
		code              string
	}{
		{"duplicate keys", `{"model":"cheap","max_tokens":1,"model":"expensive","max_tokens":100000,"messages":[]}`, "application/json", 400, ""},
		{"nested duplicate", `{"model":"m","messages":[{"role":"user","content":"a","content":"bbbbbbbbbb"}]}`, "application/json", 400, ""},
		{"1e5 is 100000", `{"model":"m","max_tokens":1e5,"messages":[]}`, "application/json", 429, "rate_limit_exceeded"},
		{"100000.0 is 100000", `{"model":"m","max_completion_tokens":100000.0,"messages":[]}`, "application/json", 429, "rate_limit_exceeded"},
		{"fractional", `{"model":"m","max_tokens":1.5,"messages":[]}`, "application/json", 400, ""},
		{"string number", `{"model":"m","max_tokens":"5","messages":[]}`, "application/json", 400, ""},
		{"n above 128", `{"model":"m","n":129,"messages":[]}`, "application/json", 400, ""},
		{"absurd max output", `{"model":"m","max_tokens":4294967296,"messages":[]}`, "application/json", 400, ""},
		{"multipart claim, JSON body, too large", `{"model":"m","max_tokens":100000,"messages":[]}`, "multipart/form-data; boundary=x", 429, "rate_limit_exceeded"},
		{"text/plain claim, not JSON", `model=m`, "text/plain", 400, ""},
		{"invalid UTF-8 model", "{\"model\":\"a\xffb\",\"messages\":[]}", "application/json", 400, ""},
		{"control character in model", `{"model":"a\u0001b","messages":[]}`, "application/json", 400, ""},
		{"no model", `{"messages":[]}`, "application/json", 400, ""},
		{"negative max_tokens", `{"model":"m","max_tokens":-1,"messages":[]}`, "application/json", 400, ""},
		{"zero max_completion_tokens", `{"model":"m","max_completion_tokens":0,"messages":[]}`, "application/json", 400, ""},
		{"negative max_output_tokens", `{"model":"m","max_output_tokens":-5,"input":"hi"}`, "application/json", 400, ""},
		{"escaped lone surrogate in model", `{"model":"gpt-4o\ud800","messages":[]}`, "application/json", 400, ""},
		{"escaped lone low surrogate in model", `{"model":"gpt-4o\udc00x","messages":[]}`, "application/json", 400, ""},
		{"escaped high surrogate before a letter", `{"model":"gpt-4o\ud800\u0041","messages":[]}`, "application/json", 400, ""},
		{"valid", `{"model":"m","max_tokens":7,"messages":[]}`, "application/json", 200, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := g.post(t, "/openai/v1/chat/completions", tc.body, "Content-Type", tc.ctype)
			if tc.status == 200 {
				assert.Equal(t, 200, resp.StatusCode, readAll(t, resp))
				return
			}
			e := openAIError(t, resp)
			assert.Equal(t, tc.status, resp.StatusCode, e.Message)
			assert.Equal(t, tc.code, strOf(e.Code))
		})
	}
	for _, r := range up.requests() {
		assert.Contains(t, string(r.Body), `"max_tokens":7`, "only the valid request reached the upstream: %s", r.Body)
	}
	assert.Len(t, up.requests(), 1)
	assert.NotContains(t, metricsText(t, g), "\\xff", "metrics still render")
	g.waitLog(t, `"msg":"admitted"`) // logLevel debug says what the scheduler decided
	g.waitLog(t, `"outcome":"bad_request"`)
}

// Dot segments cannot walk out of the forward URL's base path.
func TestDotSegmentsAreRejected(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM/base", "apiKey": "sk-up",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	for _, p := range []string{"/openai/../../admin", "/openai/v1/%2e%2e/%2e%2e/admin", "/openai/v1/..%2f..%2fadmin", "/openai/./v1/models"} {
		req, err := http.NewRequest(http.MethodGet, g.URL+"/x", nil)
		require.NoError(t, err)
		req.URL.Opaque = p // sent as it is, not cleaned by the client
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode, p)
	}
	assert.Empty(t, up.requests(), "nothing reached the upstream with the key")
}

// Neither a client key nor a client's choice of organization reaches an
// upstream; a discovered server (whatever listens on the range) never gets
// the route's key unless the config says so.
func TestCredentialsStayInTheGateway(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"clientKeys": ["team-key"], "routes": {
	  "keyed": {"forward": "$UPSTREAM", "apiKey": "sk-up", "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}},
	  "open":  {"forward": "$UPSTREAM", "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	body := `{"model":"m","messages":[]}`
	resp := g.post(t, "/keyed/v1/chat/completions", body, "Authorization", "Bearer team-key", "OpenAI-Organization", "org-x", "OpenAI-Project", "p-x")
	require.Equal(t, 200, resp.StatusCode)
	resp = g.post(t, "/open/v1/chat/completions", body, "Api-Key", "team-key")
	require.Equal(t, 200, resp.StatusCode)
	reqs := up.requests()
	require.Len(t, reqs, 2)
	assert.Equal(t, "Bearer sk-up", reqs[0].Header.Get("Authorization"))
	assert.Empty(t, reqs[0].Header.Get("OpenAI-Organization"))
	assert.Empty(t, reqs[0].Header.Get("OpenAI-Project"))
	for _, r := range reqs {
		for k, v := range r.Header {
			assert.NotContains(t, strings.Join(v, " "), "team-key", "header %s", k)
		}
	}

	// Discovery with a route key: the discovered server gets no key.
	base, lns := porttest.Listen(t, 1)
	var auth []string
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/models" {
			io.WriteString(w, `{"data":[{"id":"d"}]}`)
			return
		}
		auth = append(auth, r.Header.Get("Authorization"))
		io.WriteString(w, `{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}`)
	})}
	go srv.Serve(lns[0])
	t.Cleanup(func() { srv.Close() })
	g = newGateway(t, fmt.Sprintf(`{"routes": {"local": {"apiKey": "sk-route",
	  "discover": [{"host": "127.0.0.1", "portStart": %d, "portEnd": %d}],
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, base, base), "", nil)
	pool := g.srv.routes["local"].Fleet().Pool()
	pool.Scan(context.Background(), pool.Config().Discover[0])
	status, _ := chat(t, g.URL+"/local/v1/chat/completions", "d")
	require.Equal(t, 200, status)
	assert.Equal(t, []string{""}, auth, "no route key for a discovered server")
}

// Passwords in backend URLs never show.
func TestBackendURLsAreRedacted(t *testing.T) {
	b := newLocalServer(t, nil, "b", "m")
	u, _ := url.Parse(b.URL)
	u.User = url.UserPassword("ops", "hunter2")
	g := newGateway(t, `{"routes": {"local": {"backends": [{"name": "b", "url": "`+u.String()+`", "models": ["m"]}],
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, "", nil)
	resp, err := http.Get(g.URL + "/health")
	require.NoError(t, err)
	body := readAll(t, resp)
	assert.NotContains(t, body, "hunter2")
	assert.Contains(t, body, "ops:xxxxx@")
	_, err = config.Parse([]byte(`{"routes": {"x": {"forward": "ftp://u:hunter2@h", "models": {"*": {"rpm": 1, "tpm": 1}}}}}`), nil)
	require.Error(t, err)
	assert.NotContains(t, err.Error(), "hunter2")
}

// Upstream answers are bounded: a 429 that asks for years holds the queue
// minutes at most and the client gets an honest, finite Retry-After; a
// negative usage neither panics nor credits the bucket.
func TestUpstreamAnswersAreBounded(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		io.WriteString(w, `{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}`)
	})
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "settle": "actual",
	  "models": {"*": {"maxQueueSize": 4, "maxQueueWait": 2, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	start := time.Now()
	resp := g.post(t, "/openai/v1/chat/completions", `{"model":"m","max_tokens":10,"messages":[]}`)
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	ra := resp.Header.Get("Retry-After")
	assert.NotContains(t, ra, "-", "Retry-After %q", ra)
	assert.Less(t, time.Since(start), 2*time.Second, "the client is answered at once, not after the upstream's wait")
	q, _ := g.srv.routes["openai"].Queue("m")
	assert.False(t, q.HeldUntil().After(time.Now().Add(5*time.Minute+time.Second)), "held %v", time.Until(q.HeldUntil()))

	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"choices":[],"usage":{"prompt_tokens":-5000,"completion_tokens":-9000,"total_tokens":-14000}}`)
	})
	g = newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "settle": "actual",
	  "models": {"*": {"maxQueueSize": 4, "maxQueueWait": 2, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	resp = g.post(t, "/openai/v1/chat/completions", `{"model":"m","max_tokens":10,"messages":[]}`)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	readAll(t, resp)
	q, _ = g.srv.routes["openai"].Queue("m")
	assert.LessOrEqual(t, q.Stats(time.Now()).Remaining[scheduler.Tokens], 50000.0, "never above capacity")
	assert.NotContains(t, metricsText(t, g), "NaN")
}

// Junk model names do not use up maxWildcardModels for good: a queue that
// sits idle with full buckets is retired to make room. And each name does
// not add series without end: past 100 per route they share model="other".
func TestWildcardModelsExpireAndFoldTheirLabels(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newFakeOpenAI(1000000, 100000000, 0)
		cfg, err := config.Parse([]byte(`{"routes": {"openai": {"forward": "http://upstream.invalid", "maxWildcardModels": 2,
		  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 100000}}}}}`), nil)
		require.NoError(t, err)
		reg := prometheus.NewRegistry()
		srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(t), Registry: reg,
			Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Transport: mock.HandlerTransport{Handler: up}})
		require.NoError(t, err)
		send := func(model string) int {
			rec := httptest.NewRecorder()
			req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions",
				strings.NewReader(`{"model":"`+model+`","max_tokens":5,"messages":[]}`))
			srv.ServeHTTP(rec, req)
			return rec.Code
		}
		assert.Equal(t, 200, send("junk-1"))
		assert.Equal(t, 200, send("junk-2"))
		assert.Equal(t, 503, send("real"), "both queues hold spent tokens")
		time.Sleep(61 * time.Second) // their buckets are full again
		assert.Equal(t, 200, send("real"), "an idle queue made room")
		assert.NotContains(t, metricsText2(t, reg), `model="junk-1"`, "and its series are gone")

		cfg, err = config.Parse([]byte(`{"routes": {"openai": {"forward": "http://upstream.invalid",
		  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 6000, "tpm": 10000000}}}}}`), nil)
		require.NoError(t, err)
		reg = prometheus.NewRegistry()
		srv, err = New(Options{Config: cfg, Tokenizer: testTokenizer(t), Registry: reg,
			Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Transport: mock.HandlerTransport{Handler: up}})
		require.NoError(t, err)
		for i := range 130 {
			require.Equal(t, 200, send(fmt.Sprintf("name-%d", i)))
		}
		labels := map[string]bool{}
		mfs, err := reg.Gather()
		require.NoError(t, err)
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "model" {
						labels[l.GetValue()] = true
					}
				}
			}
		}
		assert.Len(t, labels, models.MaxLabels+1, "100 names, then one \"other\"")
		assert.True(t, labels["other"])
	})
}

func metricsText2(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	return rec.Body.String()
}

// The Ollama façade applies maxBodyBytes before reading a body, and ends a
// stream the upstream cut with Ollama's final error line.
func TestOllamaBoundsBodiesAndEndsCutStreams(t *testing.T) {
	be := breakingBackend(t, "m")
	g := newGateway(t, `{"maxBodyBytes": 1000, "routes": {"local": {
	  "backends": [{"name": "broken", "url": "`+be.URL+`", "models": ["m"]}],
	  "models": {"*": {"maxQueueSize": 4, "maxQueueWait": 2, "rpm": 600, "tpm": 1000000}}}}}`, "", nil)
	resp, err := http.Post(g.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"m","messages":[{"role":"user","content":"`+strings.Repeat("x", 5000)+`"}]}`))
	require.NoError(t, err)
	body := readAll(t, resp)
	assert.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode, body)
	assert.Contains(t, body, `"error"`)

	resp, err = http.Post(g.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"m","messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	body = readAll(t, resp)
	lines := strings.Split(strings.TrimSpace(body), "\n")
	require.GreaterOrEqual(t, len(lines), 2, body)
	assert.Contains(t, lines[len(lines)-1], `"error"`, "the last line says the stream failed: %s", body)
}

// An upstream that spaces its JSON as Python servers do still has the usage
// the gateway asked for stripped: the client gets no "usage" at all.
func TestStreamUsageStrippedWhateverTheSpacing(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Content-Type", "text/event-stream")
		for _, word := range []string{"a", "b"} {
			fmt.Fprintf(w, "data: {\"id\": \"x\", \"choices\": [{\"index\": 0, \"delta\": {\"content\": %q}}], \"usage\": null}\n\n", word)
		}
		io.WriteString(w, "data: {\"id\": \"x\", \"choices\": [], \"usage\": {\"prompt_tokens\": 5, \"completion_tokens\": 2, \"total_tokens\": 7}}\n\n")
		io.WriteString(w, "data: [DONE]\n\n")
	})
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "settle": "actual",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", `{"model":"m","stream":true,"messages":[]}`)
	body := readAll(t, resp)
	assert.NotContains(t, body, "usage", body)
	assert.Equal(t, 3, strings.Count(body, "data: "), "two chunks and [DONE]: %s", body)
	assert.Contains(t, string(up.requests()[0].Body), `"include_usage":true`)
	g.waitLog(t, `"used_tokens":7`)
}

// With shutdownDelay, /healthz answers 503 at once on SIGTERM while
// requests are still served, so a load balancer can take the instance out
// before the listener closes.
func TestShutdownDelayKeepsServingWithHealthzDown(t *testing.T) {
	up := newUpstream(t)
	cfg, err := config.Parse([]byte(strings.ReplaceAll(`{"shutdownDelay": "1h", "routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, "$UPSTREAM", up.URL)), nil)
	require.NoError(t, err)
	srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(t), Registry: prometheus.NewRegistry(),
		Logger: slog.New(slog.NewJSONHandler(io.Discard, nil))})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	hs := &http.Server{Handler: srv}
	go hs.Serve(ln)
	base := "http://" + ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Shutdown(ctx, hs, srv, 5*time.Second) }()
	require.Eventually(t, func() bool {
		resp, err := http.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable
	}, 5*time.Second, time.Millisecond)
	resp, err := http.Post(base+"/openai/v1/chat/completions", "application/json", strings.NewReader(`{"model":"m","messages":[]}`))
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "still serving during the delay")
	cancel() // the delay is over (here: cut short, which also stops waiting for connections)
	if err := <-done; err != nil {
		assert.ErrorIs(t, err, context.Canceled)
	}
	_, err = http.Get(base + "/healthz")
	assert.Error(t, err, "the listener is closed")
}

func TestOllamaPsListsAModelOnce(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {
	  "a": {"forward": "$UPSTREAM", "models": {"llama3:8b": {"maxQueueSize": 0, "maxQueueWait": 0, "rpm": 1, "tpm": 100000}}},
	  "b": {"forward": "$UPSTREAM", "models": {"llama3:8b": {"maxQueueSize": 0, "maxQueueWait": 0, "rpm": 1, "tpm": 100000}}}}}`, up.URL, nil)
	resp, err := http.Get(g.URL + "/api/ps")
	require.NoError(t, err)
	body := readAll(t, resp)
	assert.Equal(t, 1, strings.Count(body, `"name":"llama3:8b"`), body)
}

// Every request's log line has an outcome, 404s and 413s included.
func TestEveryLogLineHasAnOutcome(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"maxBodyBytes": 100, "routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"gpt-4o": {"maxQueueSize": 0, "maxQueueWait": 0, "rpm": 60, "tpm": 100000}}}}}`, up.URL, nil)
	g.post(t, "/openai/v1/chat/completions", `{"model":"nope","messages":[]}`)
	g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"`+strings.Repeat("x", 200)+`"}]}`)
	g.waitLog(t, `"status":404,"outcome":"not_found"`)
	g.waitLog(t, `"status":413,"outcome":"body_too_large"`)
	assert.NotContains(t, g.logs.String(), `"outcome":""`)
}

// TestJSONUnderAnyClaimIsScheduled: on a path that is not an inference
// call, a JSON body that names a model is scheduled whatever its content
// type claims (multipart included), and one behind a UTF-8 byte order mark
// is a 400: neither goes upstream unscheduled.
func TestJSONUnderAnyClaimIsScheduled(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 600, "tpm": 50000}}}}}`, up.URL, nil)
	for _, ctype := range []string{"multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "text/plain"} {
		resp := g.post(t, "/openai/v1/batches", `{"model":"m","max_tokens":100000}`, "Content-Type", ctype)
		assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode, ctype)
		assert.Equal(t, "rate_limit_exceeded", strOf(openAIError(t, resp).Code), ctype)
	}
	resp := g.post(t, "/openai/v1/batches", "\xef\xbb\xbf"+`{"model":"m","max_tokens":100000}`)
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Empty(t, up.requests(), "nothing went upstream unscheduled")
}
