package server

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestSIGHUPReloadsWithoutDroppingAnyone runs the binary: while requests
// wait in a queue, SIGHUP applies a new config (other limits, a new client,
// a new route, a fleet's backend replaced); every waiting request is still
// answered, and the new config serves. A config that does not validate
// changes nothing and says why.
func TestSIGHUPReloadsWithoutDroppingAnyone(t *testing.T) {
	bin := llproxyBinary(t)
	u1, u2 := newUpstream(t), newUpstream(t)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	write := func(maxConcurrent int, extra, backend string) {
		cfg := fmt.Sprintf(`{"clients": {"a": {"keys": ["ka"]}%s},
		  "routes": {
		    "slow": {"provider": "mock", "mock": {"latency": "1s", "models": ["m"]},
		      "models": {"m": {"rpm": 1000, "tpm": 1000000, "maxQueueSize": 50, "maxQueueWait": 30, "maxConcurrent": %d}}},
		    "local": {"backends": [{"name": "b", "url": %q, "models": ["gpt-4o"]}],
		      "models": {"*": {"rpm": 1000, "tpm": 1000000, "maxQueueSize": 5, "maxQueueWait": 5}}}%s}}`,
			map[bool]string{true: `, "b": {"keys": ["kb"]}`}[extra != ""], maxConcurrent, backend, extra)
		require.NoError(t, os.WriteFile(cfgPath, []byte(cfg), 0o600))
	}
	write(1, "", u1.URL)
	base, cmd, logs := startBinary(t, bin, cfgPath)
	send := func(path, key, model string) (int, error) {
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, base+path,
			strings.NewReader(`{"model":"`+model+`","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	status, err := send("/local/v1/chat/completions", "ka", "gpt-4o")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, status)
	require.Equal(t, 1, posts(u1))

	// Eight requests: one at a time, a second each; most wait in the queue.
	var wg sync.WaitGroup
	codes := make(chan int, 8)
	for range 8 {
		wg.Go(func() {
			c, _ := send("/slow/v1/chat/completions", "ka", "m")
			codes <- c
		})
	}
	require.Eventually(t, func() bool {
		return strings.Contains(metricsOf(t, base), `llproxy_queue_depth{class="interactive",model="m",route="slow"} `) &&
			!strings.Contains(metricsOf(t, base), `llproxy_queue_depth{class="interactive",model="m",route="slow"} 0`)
	}, 5*time.Second, 10*time.Millisecond,
		"requests wait")

	write(4, `, "extra": {"provider": "mock", "models": {"*": {"rpm": 10, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}`, u2.URL)
	require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), `"msg":"config reloaded"`) }, 10*time.Second, 10*time.Millisecond)
	// The waiting requests are the new gateway's, under its limits: four
	// in flight at once now, where the old config allowed one.
	require.Eventually(t, func() bool {
		return strings.Contains(metricsOf(t, base), `llproxy_client_inflight_requests{client="a",model="m",route="slow"} 4`)
	}, 5*time.Second, 10*time.Millisecond, "the queue kept its waiters and took the new limit")

	wg.Wait()
	close(codes)
	for c := range codes {
		assert.Equal(t, http.StatusOK, c, "nobody waiting was dropped")
	}
	// The new config: a new client, a new route, the fleet's new backend.
	status, err = send("/slow/v1/chat/completions", "kb", "m")
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, status, "the new client")
	status, err = send("/extra/v1/chat/completions", "ka", "mock")
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, status, "the new route")
	status, err = send("/local/v1/chat/completions", "ka", "gpt-4o")
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, status)
	assert.Equal(t, 1, posts(u1), "the old backend is out")
	assert.Equal(t, 1, posts(u2), "the new one is in")
	assert.Contains(t, metricsOf(t, base), `llproxy_bucket_limit{model="m",resource="requests",route="slow"} 1000`)

	// A bad config: every error logged, nothing changes.
	require.NoError(t, os.WriteFile(cfgPath, []byte(`{"routes": {"slow": {"provider": "mock", "models": {"m": {"rpm": 1, "tpm": 0}}}}}`), 0o600))
	require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "routes.slow.models.m.tpm: must be > 0") },
		10*time.Second, 10*time.Millisecond)
	assert.Contains(t, logs.String(), "the current one stays")
	status, err = send("/extra/v1/chat/completions", "kb", "mock")
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, status, "the last good config serves")

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, cmd.Wait())
	assert.NotContains(t, logs.String(), "panic")
}

// posts counts the chat requests an upstream got (health checks aside).
func posts(u *upstream) int {
	n := 0
	for _, r := range u.requests() {
		if r.Method == http.MethodPost {
			n++
		}
	}
	return n
}
