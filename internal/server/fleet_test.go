package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/porttest"
)

// localServer is a small OpenAI-compatible model server (llama.cpp-like):
// it lists its models and answers chat completions, recording which model
// id each request named.
type localServer struct {
	*httptest.Server
	name   string
	models []string
	mu     sync.Mutex
	got    []string // model ids of the chat requests it answered
	asked  []string // their last message
	// hold, if set, keeps each chat request open until it is closed.
	hold     chan struct{}
	inflight atomic.Int32
	peak     atomic.Int32
}

func newLocalServer(t *testing.T, ln net.Listener, name string, models ...string) *localServer {
	t.Helper()
	s := &localServer{name: name, models: models}
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	if ln != nil {
		s.Server.Listener.Close()
		s.Server.Listener = ln
	}
	s.Start()
	t.Cleanup(s.Close)
	return s
}

func (s *localServer) serve(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/v1/models":
		var data []map[string]any
		for _, id := range s.models {
			data = append(data, map[string]any{"id": id, "object": "model", "owned_by": s.name})
		}
		json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": data})
	case "/health":
		io.WriteString(w, `{"status":"ok"}`)
	case "/v1/chat/completions":
		var req struct {
			Model    string
			Messages []struct{ Content string }
		}
		json.NewDecoder(r.Body).Decode(&req)
		// In flight before it is seen: a test that sees it received finds
		// it counted.
		n := s.inflight.Add(1)
		defer s.inflight.Add(-1)
		for {
			p := s.peak.Load()
			if n <= p || s.peak.CompareAndSwap(p, n) {
				break
			}
		}
		s.mu.Lock()
		s.got = append(s.got, req.Model)
		if len(req.Messages) > 0 {
			s.asked = append(s.asked, req.Messages[len(req.Messages)-1].Content)
		}
		s.mu.Unlock()
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, `data: {"choices":[{"index":0,"delta":{"content":"`+s.name+`"}}]}`+"\n\n")
		w.(http.Flusher).Flush()
		if s.hold != nil {
			select {
			case <-s.hold:
			case <-r.Context().Done():
			}
		}
		io.WriteString(w, `data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}`+"\n\ndata: [DONE]\n\n")
	default:
		http.NotFound(w, r)
	}
}

func (s *localServer) received() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.got...)
}

// chatStatus is chat for goroutines other than the test's: it reports a
// failed request as status 0 instead of failing the test from there.
func chatStatus(url, model string) int {
	resp, err := http.Post(url, "application/json",
		strings.NewReader(`{"model":"`+model+`","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// chat sends a streamed chat request for model and returns the status and
// the body.
func chat(t *testing.T, url, model string) (int, string) {
	t.Helper()
	resp, err := http.Post(url, "application/json",
		strings.NewReader(`{"model":"`+model+`","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

const fleetModels = `"models": {"*": {"maxQueueSize": 20, "maxQueueWait": 30, "rpm": 6000, "tpm": 10000000}}`

func TestFleetRoutesByRuleListedModelAndDefault(t *testing.T) {
	qwq := newLocalServer(t, nil, "qwq", "qwq-32b-q4")
	coder := newLocalServer(t, nil, "coder", "Qwen2.5-Coder-7B")
	g := newGateway(t, `{"defaultRoute": "local", "routes": {"local": {
	  "backends": [{"name": "qwq", "url": "`+qwq.URL+`", "healthCheckPath": "/health"}, {"name": "coder", "url": "`+coder.URL+`"}],
	  "rules": [{"model": "QwQ-32B", "backend": "qwq"}],
	  "defaultBackend": "qwq", `+fleetModels+`}}}`, "", nil)
	g.srv.routes["local"].Fleet().Pool().CheckNow(context.Background())

	for _, tt := range []struct{ model, server string }{
		{"QwQ-32B", "qwq"},            // the rule
		{"Qwen2.5-Coder-7B", "coder"}, // the backend that lists it
		{"mistral-7b", "qwq"},         // the default
	} {
		status, body := chat(t, g.URL+"/local/v1/chat/completions", tt.model)
		assert.Equal(t, http.StatusOK, status, tt.model)
		assert.Contains(t, body, tt.server, tt.model)
	}
	assert.Equal(t, []string{"QwQ-32B", "mistral-7b"}, qwq.received())
	assert.Equal(t, []string{"Qwen2.5-Coder-7B"}, coder.received())

	// The default route also answers at the root, as local tools expect.
	status, body := chat(t, g.URL+"/v1/chat/completions", "Qwen2.5-Coder-7B")
	assert.Equal(t, http.StatusOK, status)
	assert.Contains(t, body, "coder")
	g.waitLog(t, `"used_tokens":6`)
}

func TestFleetUnknownModelWithoutDefault(t *testing.T) {
	a := newLocalServer(t, nil, "a", "llama-3")
	g := newGateway(t, `{"routes": {"local": {"backends": [{"name": "a", "url": "`+a.URL+`"}], `+fleetModels+`}}}`, "", nil)
	g.srv.routes["local"].Fleet().Pool().CheckNow(context.Background())
	resp := g.post(t, "/local/v1/chat/completions", `{"model":"nope","messages":[]}`)
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	e := openAIError(t, resp)
	assert.Equal(t, "model_not_found", strOf(e.Code))
	assert.Contains(t, e.Message, "llama-3")
	assert.Empty(t, a.received())
}

func TestFleetDiscoveryNamesTagsAndRewritesIDs(t *testing.T) {
	base, lns := porttest.Listen(t, 3)
	lns[2].Close()
	newLocalServer(t, lns[0], "gpu-a", "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf")
	b := newLocalServer(t, lns[1], "gpu-b", "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf", "phi-3.gguf")
	g := newGateway(t, fmt.Sprintf(`{"defaultRoute": "local", "routes": {"local": {
	  "discover": [{"host": "127.0.0.1", "portStart": %d, "portEnd": %d, "tags": ["gpu0"]}], %s}}}`, base, base+2, fleetModels), "", nil)
	pool := g.srv.routes["local"].Fleet().Pool()
	pool.Scan(context.Background(), pool.Config().Discover[0])

	status, _ := chat(t, g.URL+"/local/v1/chat/completions", "phi-3:gpu0")
	assert.Equal(t, http.StatusOK, status)
	assert.Equal(t, []string{"phi-3.gguf"}, b.received(), "the backend gets its own id")

	var list struct {
		Data []struct {
			ID         string
			UpstreamID string `json:"upstream_id"`
			Backends   []string
		}
	}
	resp, err := http.Get(g.URL + "/v1/models") // at the root: the default route's fleet
	require.NoError(t, err)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&list))
	resp.Body.Close()
	require.Len(t, list.Data, 2)
	assert.Equal(t, "Qwen2.5-7B-Instruct-Q4_K_M:gpu0", list.Data[0].ID)
	assert.Len(t, list.Data[0].Backends, 2, "served by both, listed once")
	assert.Equal(t, "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf", list.Data[0].UpstreamID)

	// A server started mid-test is found by the next scan.
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(base+2))
	require.NoError(t, err)
	newLocalServer(t, ln, "late", "mistral-7b.Q8_0.gguf")
	pool.Scan(context.Background(), pool.Config().Discover[0])
	status, body := chat(t, g.URL+"/v1/chat/completions", "mistral-7b.Q8_0:gpu0")
	assert.Equal(t, http.StatusOK, status)
	assert.Contains(t, body, "late")
}

func TestFleetFailoverHealthAndForceCheck(t *testing.T) {
	a := newLocalServer(t, nil, "a", "llama-3")
	b := newLocalServer(t, nil, "b", "llama-3")
	g := newGateway(t, `{"routes": {"local": {
	  "backends": [{"name": "a", "url": "`+a.URL+`"}, {"name": "b", "url": "`+b.URL+`"}],
	  "healthCheck": {"failureThreshold": 1}, "modelsCacheTTL": "1ms", `+fleetModels+`}}}`, "", nil)
	g.srv.routes["local"].Fleet().Pool().CheckNow(context.Background())

	a.Close() // killed mid-test
	for range 4 {
		status, body := chat(t, g.URL+"/local/v1/chat/completions", "llama-3")
		assert.Equal(t, http.StatusOK, status, "traffic moves to the twin")
		assert.Contains(t, body, `"content":"b"`)
	}

	resp, err := http.Get(g.URL + "/health")
	require.NoError(t, err)
	var rep healthReport
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&rep))
	resp.Body.Close()
	assert.Equal(t, "degraded", rep.Status)
	assert.Equal(t, 1, rep.Healthy)
	assert.Equal(t, 2, rep.Total)
	assert.False(t, rep.Backends[0].Healthy)
	assert.NotEmpty(t, rep.Backends[0].LastError)
	assert.Positive(t, rep.Backends[0].ErrorCount)

	resp, err = http.Get(g.URL + "/local/v1/models")
	require.NoError(t, err)
	models, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Contains(t, string(models), `"backends":["b"]`, "the dead server is not listed")

	b.Close()
	resp, err = http.Post(g.URL+"/health/force-check", "", nil)
	require.NoError(t, err)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&rep))
	resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, "down", rep.Status)
	assert.False(t, rep.Backends[1].LastCheck.IsZero())
	assert.Contains(t, metricsText(t, g), `llproxy_backend_healthy{backend="b",route="local"} 0`)
}

func TestFleetConcurrencySlotsFIFO(t *testing.T) {
	s := newLocalServer(t, nil, "slow", "m")
	s.hold = make(chan struct{})
	g := newGateway(t, `{"routes": {"local": {"backends": [{"name": "slow", "url": "`+s.URL+`"}],
	  "models": {"*": {"maxQueueSize": 20, "maxQueueWait": 60, "rpm": 6000, "tpm": 10000000, "maxConcurrent": 2}}}}}`, "", nil)
	g.srv.routes["local"].Fleet().Pool().CheckNow(context.Background())
	q := func() int {
		q, ok := g.srv.routes["local"].Queue("m")
		if !ok {
			return 0
		}
		return q.Stats(time.Now()).Depth
	}
	var wg sync.WaitGroup
	for i := range 5 {
		wg.Go(func() {
			body := fmt.Sprintf(`{"model":"m","stream":true,"messages":[{"role":"user","content":"request %d"}]}`, i)
			resp, err := http.Post(g.URL+"/local/v1/chat/completions", "application/json", strings.NewReader(body))
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
		// Let each arrive before the next: FIFO is about arrival order.
		require.Eventually(t, func() bool { return int(s.inflight.Load())+q() == i+1 }, 5*time.Second, time.Millisecond)
	}
	assert.EqualValues(t, 2, s.inflight.Load(), "two slots")
	assert.Equal(t, 3, q(), "the rest wait in the gateway, not at the server")
	// Finish one response at a time: each frees a slot for the next in line.
	for next := 2; next < 5; next++ {
		s.hold <- struct{}{}
		require.Eventually(t, func() bool { return len(s.received()) == next+1 }, 5*time.Second, time.Millisecond)
		assert.LessOrEqual(t, s.inflight.Load(), int32(2))
	}
	s.hold <- struct{}{}
	s.hold <- struct{}{}
	wg.Wait()
	assert.EqualValues(t, 2, s.peak.Load(), "never more than maxConcurrent at the server")
	s.mu.Lock()
	asked := s.asked
	s.mu.Unlock()
	assert.ElementsMatch(t, []string{"request 0", "request 1"}, asked[:2])
	assert.Equal(t, []string{"request 2", "request 3", "request 4"}, asked[2:], "FIFO")
	assert.Contains(t, metricsText(t, g), `llproxy_backend_inflight{backend="slow",route="local"} 0`)
}

func TestFleetPerBackendMaxConcurrent(t *testing.T) {
	s := newLocalServer(t, nil, "one-slot", "m")
	s.hold = make(chan struct{})
	g := newGateway(t, `{"routes": {"local": {"backends": [{"name": "one", "url": "`+s.URL+`", "maxConcurrent": 1}], `+fleetModels+`}}}`, "", nil)
	g.srv.routes["local"].Fleet().Pool().CheckNow(context.Background())
	var wg sync.WaitGroup
	statuses := make(chan int, 3)
	for range 3 {
		wg.Go(func() { statuses <- chatStatus(g.URL+"/local/v1/chat/completions", "m") })
	}
	for n := 1; n <= 3; n++ {
		require.Eventually(t, func() bool { return len(s.received()) == n }, 5*time.Second, time.Millisecond)
		assert.EqualValues(t, 1, s.inflight.Load(), "one at a time: the backend's own limit")
		s.hold <- struct{}{}
	}
	wg.Wait()
	close(statuses)
	for status := range statuses {
		assert.Equal(t, http.StatusOK, status)
	}
	assert.EqualValues(t, 1, s.peak.Load())
}
