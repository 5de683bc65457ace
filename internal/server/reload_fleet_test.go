package server

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestReloadHandsAFleetsServersOver: a SIGHUP that changes a fleet never
// runs two copies of a model server. An unchanged server (same command and
// port) keeps its process; a changed one finishes its stream in flight,
// stops, and only then does its successor start on the same port.
func TestReloadHandsAFleetsServersOver(t *testing.T) {
	bin := llproxyBinary(t)
	pa := port(t)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	write := func(interval string, extra ...string) {
		args := mockServerCmd(bin, pa, append([]string{"-chunks", "40", "-chunk-delay", "25ms"}, extra...)...)
		require.NoError(t, os.WriteFile(cfgPath, []byte(fmt.Sprintf(`{"routes": {"local": {
		  "healthCheck": {"interval": %q},
		  "backends": [{"name": "a", "url": "http://%s", "cmd": %s, "models": ["a-model"], "group": "gpu", "unloadAfter": "1h"}],
		  %s}}}`, interval, pa, args, fleetModels)), 0o600))
	}
	write("30s")
	base, cmd, logs := startBinary(t, bin, cfgPath)
	status := func() []managed {
		resp, err := http.Get(base + "/status")
		require.NoError(t, err)
		defer resp.Body.Close()
		var out struct{ Backends []managed }
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
		return out.Backends
	}
	chat := func(stream bool) (int, string) {
		resp, err := http.Post(base+"/local/v1/chat/completions", "application/json",
			strings.NewReader(fmt.Sprintf(`{"model":"a-model","stream":%t,"messages":[{"role":"user","content":"hi"}]}`, stream)))
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	reload := func() {
		n := strings.Count(logs.String(), `"msg":"config reloaded"`)
		require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
		require.Eventually(t, func() bool { return strings.Count(logs.String(), `"msg":"config reloaded"`) > n },
			10*time.Second, 5*time.Millisecond, logs.String())
	}
	code, _ := chat(false)
	require.Equal(t, http.StatusOK, code)
	first := status()
	require.Len(t, first, 1)
	require.Equal(t, "ready", first[0].State)

	// Only the health checks change: the same process serves on.
	write("20s")
	reload()
	code, _ = chat(false)
	require.Equal(t, http.StatusOK, code)
	st := status()
	require.Len(t, st, 1)
	assert.Equal(t, first[0].PID, st[0].PID, "same command and port: the process is kept")

	// The command changes while a stream is in flight.
	streamed := make(chan string, 1)
	go func() { _, body := chat(true); streamed <- body }()
	require.Eventually(t, func() bool { s := status(); return len(s) == 1 && s[0].InFlight == 1 }, 10*time.Second, 5*time.Millisecond)
	write("20s", "-latency", "1ms")
	reload()
	next := make(chan int, 1)
	go func() { code, _ := chat(false); next <- code }()
	body := <-streamed
	assert.Contains(t, body, "[DONE]", "the stream in flight finished on the old server")
	assert.Equal(t, http.StatusOK, <-next, "the new one started once the old one was gone")
	st = status()
	require.Len(t, st, 1, "one server: the retired one is gone")
	assert.Equal(t, "ready", st[0].State)
	assert.NotEqual(t, first[0].PID, st[0].PID)
	assert.NotContains(t, logs.String(), "address already in use")
	assert.Contains(t, logs.String(), `"msg":"backend retired by a reload"`)
}
