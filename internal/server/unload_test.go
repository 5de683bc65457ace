package server

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestUnloadTellsIdleFromBusy: POST /unload stops the idle managed servers
// and answers once their processes are gone; a busy one is listed apart,
// with its requests in flight, and stops when its last request ends.
func TestUnloadTellsIdleFromBusy(t *testing.T) {
	bin := llproxyBinary(t)
	pa, pb := port(t), port(t)
	cmd := func(addr string, extra ...string) string { return mockServerCmd(bin, addr, extra...) }
	g := newGateway(t, `{"routes": {"local": {"backends": [
	    {"name": "busy-srv", "url": "http://`+pa+`", "cmd": `+cmd(pa, "-chunks", "40", "-chunk-delay", "25ms")+`, "models": ["busy-model"]},
	    {"name": "idle-srv", "url": "http://`+pb+`", "cmd": `+cmd(pb)+`, "models": ["idle-model"]}],
	  `+fleetModels+`}}}`, "", nil)
	status, _ := ask(t, g, "/local/v1/chat/completions", `{"model":"idle-model","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := http.Post(g.URL+"/local/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"busy-model","stream":true,"messages":[{"role":"user","content":"hi"}]}`)); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	require.Eventually(t, func() bool { return statusOf(t, g)["busy-srv"].InFlight == 1 }, 20*time.Second, 5*time.Millisecond)
	pidIdle := statusOf(t, g)["idle-srv"].PID

	status, body := ask(t, g, "/unload", ``)
	require.Equal(t, http.StatusOK, status)
	assert.JSONEq(t, `{"unloaded":["idle-srv"],"deferred":[{"name":"busy-srv","inFlight":1}]}`, body)
	st := statusOf(t, g)
	assert.Equal(t, "stopped", st["idle-srv"].State, "answered once the process is gone, not while stopping")
	assert.False(t, serving(pidIdle, pb))
	assert.Equal(t, "ready", st["busy-srv"].State, "still streaming")
	<-done
	waitStatus(t, g, "busy-srv", "stopped")

	// /unload/{model} of a ready idle server: stopped when it answers.
	status, _ = ask(t, g, "/local/v1/chat/completions", `{"model":"idle-model","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)
	status, body = ask(t, g, "/unload/idle-model", ``)
	require.Equal(t, http.StatusOK, status)
	assert.JSONEq(t, `{"unloaded":["idle-srv"],"deferred":[]}`, body)
	assert.Equal(t, "stopped", statusOf(t, g)["idle-srv"].State)
}
