package server

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestOllamaLoadAndUnloadAreTheClientsToAsk: loading, unloading and
// pinning a model server through the Ollama API is inference-scoped (the
// client's routes), a non-admin's pin is clamped to the configured idle
// time, and its unload of a model another client is using is refused.
func TestOllamaLoadAndUnloadAreTheClientsToAsk(t *testing.T) {
	bin := llproxyBinary(t)
	pa := port(t)
	cmd := mockServerCmd(bin, pa, "-chunks", "40", "-chunk-delay", "25ms")
	g := newGateway(t, `{
	  "adminKeys": ["admin-key"],
	  "clients": {
	    "interns": {"keys": ["intern-key"], "routes": ["demo"]},
	    "team": {"keys": ["team-key"]},
	    "other": {"keys": ["other-key"]}},
	  "routes": {
	    "demo": {"provider": "mock", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}},
	    "local": {"backends": [{"name": "a", "url": "http://`+pa+`", "cmd": `+cmd+`, "models": ["a-model"], "unloadAfter": "10m"}],
	      `+fleetModels+`}}}`, "", nil)
	call := func(key, path, body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, g.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	state := func() managed {
		req, _ := http.NewRequest(http.MethodGet, g.URL+"/status", nil)
		req.Header.Set("Authorization", "Bearer admin-key")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		var out struct {
			Backends []struct {
				managed
				UnloadAt time.Time
			}
		}
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
		require.Len(t, out.Backends, 1)
		m := out.Backends[0].managed
		if !out.Backends[0].UnloadAt.IsZero() {
			m.Error = out.Backends[0].UnloadAt.Format(time.RFC3339Nano) // carried for the pin check below
		}
		return m
	}

	// interns may not use "local": no load, no pin, no unload.
	for _, body := range []string{`{"model":"a-model","stream":false}`, `{"model":"a-model","keep_alive":-1,"stream":false}`} {
		status, text := call("intern-key", "/api/generate", body)
		assert.Equal(t, http.StatusForbidden, status, text)
		status, text = call("intern-key", "/api/chat", strings.Replace(body, `"stream"`, `"messages":[],"stream"`, 1))
		assert.Equal(t, http.StatusForbidden, status, text)
	}
	assert.Equal(t, "stopped", state().State, "interns started nothing")

	// team may load it; its pin (-1) is clamped to the idle time (10m).
	status, text := call("team-key", "/api/generate", `{"model":"a-model","keep_alive":-1,"stream":false}`)
	require.Equal(t, http.StatusOK, status, text)
	st := state()
	require.Equal(t, "ready", st.State)
	unloadAt, err := time.Parse(time.RFC3339Nano, st.Error)
	require.NoError(t, err, "a timer is set: not pinned")
	assert.WithinDuration(t, time.Now().Add(10*time.Minute), unloadAt, time.Minute)
	status, _ = call("intern-key", "/api/generate", `{"model":"a-model","keep_alive":0,"stream":false}`)
	assert.Equal(t, http.StatusForbidden, status)
	assert.Equal(t, "ready", state().State, "interns unloaded nothing")

	// other streams from it; team's unload is refused while it does.
	done := make(chan struct{})
	go func() {
		defer close(done)
		req, _ := http.NewRequest(http.MethodPost, g.URL+"/local/v1/chat/completions",
			strings.NewReader(`{"model":"a-model","stream":true,"messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer other-key")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	require.Eventually(t, func() bool { return state().InFlight == 1 }, 10*time.Second, 5*time.Millisecond)
	status, text = call("team-key", "/api/generate", `{"model":"a-model","keep_alive":0,"stream":false}`)
	assert.Equal(t, http.StatusForbidden, status, text)
	assert.Contains(t, text, "admin")
	<-done
	assert.Equal(t, "ready", state().State, "not unloaded after the other's stream either")

	// Alone, team's unload goes through.
	status, text = call("team-key", "/api/generate", `{"model":"a-model","keep_alive":0,"stream":false}`)
	assert.Equal(t, http.StatusOK, status, text)
	require.Eventually(t, func() bool { return state().State == "stopped" }, 20*time.Second, 10*time.Millisecond)
	g.waitLog(t, `"msg":"ollama unload"`)
}
