package backends

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/internal/porttest"
)

// fakeServer is a small OpenAI-compatible server listing its own models.
type fakeServer struct {
	*httptest.Server
	models  atomic.Value // []string
	healthy atomic.Bool
	hits    atomic.Int64
}

func newFakeServer(t *testing.T, ln net.Listener, models ...string) *fakeServer {
	t.Helper()
	f := &fakeServer{}
	f.models.Store(models)
	f.healthy.Store(true)
	f.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !f.healthy.Load() {
			http.Error(w, "sick", http.StatusServiceUnavailable)
			return
		}
		switch r.URL.Path {
		case "/v1/models":
			var data []map[string]any
			for _, id := range f.models.Load().([]string) {
				data = append(data, map[string]any{"id": id, "object": "model", "owned_by": "llamacpp", "meta": map[string]any{"n_ctx": 4096}})
			}
			json.NewEncoder(w).Encode(map[string]any{"object": "list", "data": data})
		case "/health":
			io.WriteString(w, `{"status":"ok"}`)
		default:
			f.hits.Add(1)
			io.WriteString(w, `{}`)
		}
	}))
	if ln != nil {
		f.Server.Listener.Close()
		f.Server.Listener = ln
	}
	f.Start()
	t.Cleanup(f.Close)
	return f
}

func pool(t *testing.T, cfg Config, now func() time.Time) *Pool {
	t.Helper()
	cfg.SetDefaults()
	p, err := New(cfg, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Now: now})
	require.NoError(t, err)
	return p
}

func TestDisplayName(t *testing.T) {
	for id, want := range map[[2]string]string{
		{"/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf", ""}:     "Qwen2.5-7B-Instruct-Q4_K_M",
		{"/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf", "gpu0"}: "Qwen2.5-7B-Instruct-Q4_K_M:gpu0",
		{"C:\\models\\phi-3.safetensors", "cpu"}:            "phi-3:cpu",
		{"Qwen/Qwen2.5-Coder-32B-Instruct", ""}:             "Qwen2.5-Coder-32B-Instruct",
		{"meta-llama-3.1-8b", "a"}:                          "meta-llama-3.1-8b:a",
		{"gpt-4o", ""}:                                      "gpt-4o",
	} {
		assert.Equal(t, want, DisplayName(id[0], id[1]), id[0])
	}
}

func TestPickOrder(t *testing.T) {
	a := newFakeServer(t, nil, "llama-3", "shared")
	b := newFakeServer(t, nil, "coder", "shared")
	p := pool(t, Config{
		Backends:       []BackendConfig{{Name: "a", URL: a.URL}, {Name: "b", URL: b.URL}},
		Rules:          []Rule{{Model: "QwQ-32B", Backend: "b"}},
		DefaultBackend: "a",
	}, nil)
	p.CheckNow(context.Background())

	be, id, err := p.Pick("QwQ-32B", nil)
	require.NoError(t, err)
	assert.Equal(t, "b", be.Name, "a rule first")
	assert.Equal(t, "QwQ-32B", id)
	p.Done(be)

	be, _, err = p.Pick("coder", nil)
	require.NoError(t, err)
	assert.Equal(t, "b", be.Name, "then who lists the model")
	p.Done(be)

	be, id, err = p.Pick("anything", nil)
	require.NoError(t, err)
	assert.Equal(t, "a", be.Name, "then the default")
	assert.Equal(t, "anything", id)
	p.Done(be)

	// Two serve "shared": the least outstanding gets it.
	first, _, _ := p.Pick("shared", nil)
	second, _, _ := p.Pick("shared", nil)
	assert.NotEqual(t, first.Name, second.Name, "balanced by outstanding requests")
	third, _, _ := p.Pick("shared", []*Backend{first})
	assert.Equal(t, second.Name, third.Name, "excluded backends are skipped")
	p.Done(first)
	p.Done(second)
	p.Done(third)

	noDefault := pool(t, Config{Backends: []BackendConfig{{Name: "a", URL: a.URL}}}, nil)
	noDefault.CheckNow(context.Background())
	_, _, err = noDefault.Pick("nope", nil)
	assert.ErrorIs(t, err, ErrUnknownModel)
	assert.Equal(t, []string{"llama-3", "shared"}, noDefault.Models())
}

func TestHealthThresholdAndRecovery(t *testing.T) {
	a := newFakeServer(t, nil, "m")
	b := newFakeServer(t, nil, "m")
	p := pool(t, Config{Backends: []BackendConfig{{Name: "a", URL: a.URL, HealthCheckPath: "/health"}, {Name: "b", URL: b.URL}},
		HealthCheck: HealthConfig{FailureThreshold: 2}}, nil)
	ctx := context.Background()
	p.CheckNow(ctx)
	a.healthy.Store(false)
	p.CheckNow(ctx)
	st := p.Status()
	assert.True(t, st[0].Healthy, "one failure is below the threshold")
	assert.Equal(t, 1, st[0].ErrorCount)
	assert.Contains(t, st[0].LastError, "503")
	p.CheckNow(ctx)
	assert.False(t, p.Status()[0].Healthy)
	for range 5 {
		be, _, err := p.Pick("m", nil)
		require.NoError(t, err)
		assert.Equal(t, "b", be.Name, "no traffic to an unhealthy backend")
		p.Done(be)
	}
	a.healthy.Store(true)
	p.CheckNow(ctx)
	assert.True(t, p.Status()[0].Healthy)
	assert.Zero(t, p.Status()[0].ErrorCount)

	// Passive: connection failures count too.
	be, _, _ := p.Pick("m", nil)
	p.Failed(be, fmt.Errorf("dial tcp: connection refused"))
	p.Failed(be, fmt.Errorf("dial tcp: connection refused"))
	p.Done(be)
	assert.False(t, p.Status()[indexOf(p, be.Name)].Healthy)
}

func indexOf(p *Pool, name string) int {
	for i, s := range p.Status() {
		if s.Name == name {
			return i
		}
	}
	return -1
}

func TestModelsAggregatedDedupedAndCached(t *testing.T) {
	a := newFakeServer(t, nil, "llama-3", "shared")
	b := newFakeServer(t, nil, "shared", "coder")
	now := time.Unix(1000, 0)
	p := pool(t, Config{Backends: []BackendConfig{{Name: "a", URL: a.URL}, {Name: "b", URL: b.URL, Models: []string{"extra"}}},
		ModelsCacheTTL: duration.Duration(30 * time.Second)}, func() time.Time { return now })
	var list struct {
		Data []struct {
			ID       string
			OwnedBy  string `json:"owned_by"`
			Backends []string
			Meta     map[string]any
		}
	}
	require.NoError(t, json.Unmarshal(p.ModelsJSON(context.Background()), &list))
	var ids []string
	for _, m := range list.Data {
		ids = append(ids, m.ID)
	}
	assert.Equal(t, []string{"coder", "extra", "llama-3", "shared"}, ids)
	assert.Equal(t, []string{"a", "b"}, list.Data[3].Backends, "one entry, both backends")
	assert.Equal(t, "llamacpp", list.Data[0].OwnedBy, "the backend's own fields kept")
	assert.EqualValues(t, 4096, list.Data[0].Meta["n_ctx"])

	a.models.Store([]string{"llama-3", "shared", "new-one"})
	assert.NotContains(t, string(p.ModelsJSON(context.Background())), "new-one", "served from cache within the TTL")
	now = now.Add(31 * time.Second)
	assert.Contains(t, string(p.ModelsJSON(context.Background())), "new-one", "refetched after it")

	b.healthy.Store(false)
	for range 3 {
		p.CheckNow(context.Background())
	}
	assert.NotContains(t, string(p.ModelsJSON(context.Background())), "coder", "unhealthy backends are not listed")
}

func TestScanFindsNamesAndForgets(t *testing.T) {
	base, lns := porttest.Listen(t, 4)
	lns[2].Close() // a closed port in the range
	lns[3].Close()
	s0 := newFakeServer(t, lns[0], "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf")
	newFakeServer(t, lns[1], "coder.gguf")
	d := DiscoverConfig{Host: "127.0.0.1", PortStart: base, PortEnd: base + 3, Tags: []string{"gpu0", "fast"}}
	p := pool(t, Config{Discover: []DiscoverConfig{d}}, nil)
	p.Scan(context.Background(), p.cfg.Discover[0])
	assert.ElementsMatch(t, []string{"Qwen2.5-7B-Instruct-Q4_K_M:gpu0", "Qwen2.5-7B-Instruct-Q4_K_M:fast", "coder:gpu0", "coder:fast"}, p.Models())
	be, id, err := p.Pick("Qwen2.5-7B-Instruct-Q4_K_M:gpu0", nil)
	require.NoError(t, err)
	assert.Equal(t, "/models/Qwen2.5-7B-Instruct-Q4_K_M.gguf", id, "the backend's own id goes upstream")
	assert.Equal(t, "127.0.0.1:"+strconv.Itoa(base), be.Name)
	p.Done(be)

	// One vanishes, one appears.
	s0.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(base+3))
	require.NoError(t, err)
	newFakeServer(t, ln, "phi-3")
	p.Scan(context.Background(), p.cfg.Discover[0])
	assert.ElementsMatch(t, []string{"coder:gpu0", "coder:fast", "phi-3:gpu0", "phi-3:fast"}, p.Models())
}

// BenchmarkScanClosedPorts scans 1,000 loopback ports where nothing
// listens: refused connections must make this quick.
func BenchmarkScanClosedPorts(b *testing.B) {
	p, _ := New(Config{}, Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d := DiscoverConfig{Host: "127.0.0.1", PortStart: 1, PortEnd: 1000, Timeout: duration.Duration(time.Second)}
	for b.Loop() {
		p.Scan(context.Background(), d)
	}
	if n := len(p.Status()); n > 0 {
		b.Logf("note: %d servers answered in ports 1-1000", n)
	}
}

func TestPerBackendMaxConcurrent(t *testing.T) {
	a := newFakeServer(t, nil, "m")
	b := newFakeServer(t, nil, "m")
	p := pool(t, Config{Backends: []BackendConfig{{Name: "a", URL: a.URL, MaxConcurrent: 1}, {Name: "b", URL: b.URL, MaxConcurrent: 1}}}, nil)
	p.CheckNow(context.Background())
	first, _, err := p.Pick("m", nil)
	require.NoError(t, err)
	second, _, err := p.Pick("m", nil)
	require.NoError(t, err)
	assert.NotEqual(t, first.Name, second.Name)
	freed := p.Freed()
	_, _, err = p.Pick("m", nil)
	assert.ErrorIs(t, err, ErrBusy, "both at their one slot")
	p.Done(first)
	select {
	case <-freed:
	default:
		t.Fatal("Done must wake the waiters")
	}
	third, _, err := p.Pick("m", nil)
	require.NoError(t, err)
	assert.Equal(t, first.Name, third.Name)
	p.Done(second)
	p.Done(third)
}

// TestScanLogsOnlyChanges: a scan that finds what the last one found
// says nothing at info level.
func TestScanLogsOnlyChanges(t *testing.T) {
	base, lns := porttest.Listen(t, 2)
	newFakeServer(t, lns[0], "coder.gguf")
	lns[1].Close()
	d := DiscoverConfig{Host: "127.0.0.1", PortStart: base, PortEnd: base + 1}
	var logs bytes.Buffer
	p, err := New(Config{Discover: []DiscoverConfig{d}}, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	require.NoError(t, err)
	p.Scan(context.Background(), d)
	assert.Contains(t, logs.String(), "discovery scan", "the first scan finds a server")
	logs.Reset()
	p.Scan(context.Background(), d)
	p.Scan(context.Background(), d)
	assert.Empty(t, logs.String(), "nothing changed")
}
