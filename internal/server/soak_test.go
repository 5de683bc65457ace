//go:build soak

package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestSoak drives a fleet (two mock servers, one managed server, one that
// breaks its streams) with mixed traffic for LLPROXY_SOAK (default 3m):
// whole answers, streams read to the end, streams the client abandons
// mid-way, cut streams, junk bodies, unknown models, unloads. Afterwards
// every in-flight count, slot and queue is back to zero, and the
// goroutines are back to where they started.
//
//	go test -tags soak -run TestSoak -v ./internal/server/
func TestSoak(t *testing.T) {
	d := 3 * time.Minute
	if v := os.Getenv("LLPROXY_SOAK"); v != "" {
		var err error
		d, err = time.ParseDuration(v)
		require.NoError(t, err)
	}
	bin := llproxyBinary(t)
	var servers []*exec.Cmd
	mock := func() string {
		addr := port(t)
		cmd := exec.Command(bin, "mock-server", "-listen", addr, "-chunks", "20", "-chunk-delay", "2ms")
		require.NoError(t, cmd.Start())
		servers = append(servers, cmd)
		return addr
	}
	m1, m2 := mock(), mock()
	defer func() {
		for _, c := range servers {
			c.Process.Kill()
			c.Wait()
		}
	}()
	be := breakingBackend(t, "x")
	managedAddr := port(t)
	g := newGateway(t, fmt.Sprintf(`{"routes": {"local": {
	  "backends": [
	    {"name": "m1", "url": "http://%s", "models": ["m"], "maxConcurrent": 2},
	    {"name": "m2", "url": "http://%s", "models": ["m"], "maxConcurrent": 2},
	    {"name": "broken", "url": "%s", "models": ["x"]},
	    {"name": "a", "url": "http://%s", "models": ["a"], "cmd": ["%s", "mock-server", "-listen", "%s", "-chunks", "10"], "unloadAfter": "2s"}],
	  "models": {"*": {"maxQueueSize": 20, "maxQueueWait": 5, "rpm": 100000, "tpm": 100000000, "maxConcurrent": 3}}}}}`,
		m1, m2, be.URL, managedAddr, bin, managedAddr), "", nil)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	before := runtime.NumGoroutine()

	var counts sync.Map
	count := func(k string) {
		v, _ := counts.LoadOrStore(k, new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
	}
	end := time.Now().Add(d)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for time.Now().Before(end) {
				kind := rand.IntN(8)
				model := [...]string{"m", "m", "m", "a", "x", "m", "nope", "m"}[kind]
				body := `{"model":"` + model + `","stream":true,"messages":[{"role":"user","content":"hi"}]}`
				if kind == 5 {
					body = `{"model":"m","n":1e400,"messages":[` // junk
				}
				ctx, cancel := context.WithCancel(context.Background())
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/local/v1/chat/completions", strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				if err != nil {
					count("error")
					cancel()
					continue
				}
				if kind == 7 { // the client abandons the stream after its first bytes
					buf := make([]byte, 64)
					resp.Body.Read(buf)
					cancel()
					count("abandoned")
				} else if _, err := io.Copy(io.Discard, resp.Body); err != nil {
					count("cut")
				} else {
					count(fmt.Sprint(resp.StatusCode))
				}
				resp.Body.Close()
				cancel()
				if rand.IntN(200) == 0 {
					r, err := client.Post(g.URL+"/unload/a", "", nil)
					if err == nil {
						r.Body.Close()
					}
				}
			}
		})
	}
	wg.Wait()
	client.CloseIdleConnections()

	rt := g.srv.routes["local"]
	require.Eventually(t, func() bool {
		for _, st := range rt.Fleet().Pool().Status() {
			if st.InFlight != 0 {
				return false
			}
		}
		return true
	}, 10*time.Second, 10*time.Millisecond, "backend in-flight counts back to zero: %+v", rt.Fleet().Pool().Status())
	for _, m := range []string{"m", "a", "x"} {
		q, ok := rt.Queue(m)
		require.True(t, ok)
		st := q.Stats(time.Now())
		assert.Zero(t, st.InFlight, "%s: slots", m)
		assert.Zero(t, st.Depth, "%s: queue", m)
	}
	for _, st := range rt.Fleet().Servers() {
		assert.Zero(t, st.InFlight, "managed %s", st.Name)
	}
	// What is left by design: the upstream transports' idle connections
	// and the managed server. Close them, then count.
	rt.Transport().(*http.Transport).CloseIdleConnections()
	rt.Fleet().Unload("")
	ok := assert.Eventually(t, func() bool { return runtime.NumGoroutine() <= before+2 }, 20*time.Second, 50*time.Millisecond,
		"goroutines back: %d now, %d before", runtime.NumGoroutine(), before)
	if !ok {
		pprof.Lookup("goroutine").WriteTo(os.Stderr, 1)
	}
	out := map[string]int64{}
	counts.Range(func(k, v any) bool { out[k.(string)] = v.(*atomic.Int64).Load(); return true })
	b, _ := json.Marshal(out)
	t.Logf("%s of traffic: %s; goroutines %d before, %d after", d, b, before, runtime.NumGoroutine())
}
