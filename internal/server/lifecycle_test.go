package server

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/porttest"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// llproxyBinary builds llproxy once: its mock-server subcommand is the
// model server the lifecycle tests start and stop.
func llproxyBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "llproxy-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "llproxy")
		out, err := exec.Command("go", "build", "-o", binPath, "../../cmd/llproxy").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("%v: %s", err, out)
		}
	})
	require.NoError(t, binErr)
	return binPath
}

// mockServerCmd is a backend's "cmd", as JSON: the built llproxy serving
// the mock upstream on addr, with extra flags.
func mockServerCmd(bin, addr string, extra ...string) string {
	args, _ := json.Marshal(append([]string{bin, "mock-server", "-listen", addr}, extra...))
	return string(args)
}

func port(t *testing.T) string {
	p, lns := porttest.Listen(t, 1)
	lns[0].Close()
	return "127.0.0.1:" + strconv.Itoa(p)
}

type managed struct {
	Route, Name, State, Error string
	PID                       int
	InFlight                  int
}

func statusOf(t *testing.T, g *gateway) map[string]managed {
	t.Helper()
	resp, err := http.Get(g.URL + "/status")
	require.NoError(t, err)
	defer resp.Body.Close()
	var out struct{ Backends []managed }
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	m := map[string]managed{}
	for _, b := range out.Backends {
		m[b.Name] = b
	}
	return m
}

func waitStatus(t *testing.T, g *gateway, name, state string) {
	t.Helper()
	require.Eventually(t, func() bool { return statusOf(t, g)[name].State == state }, 20*time.Second, 10*time.Millisecond,
		"%s should be %s: %+v", name, state, statusOf(t, g)[name])
}

func ask(t *testing.T, g *gateway, path, body string) (int, string) {
	t.Helper()
	resp, err := http.Post(g.URL+path, "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestLifecycleOnDemandSwapKeepAliveAndUnload(t *testing.T) {
	bin := llproxyBinary(t)
	pa, pb := port(t), port(t)
	cmd := func(addr string, extra ...string) string { return mockServerCmd(bin, addr, extra...) }
	g := newGateway(t, `{"routes": {"local": {"backends": [
	    {"name": "a", "url": "http://`+pa+`", "cmd": `+cmd(pa, "-chunks", "20", "-chunk-delay", "25ms")+`, "models": ["a-model"], "group": "gpu", "unloadAfter": "1h"},
	    {"name": "b", "url": "http://`+pb+`", "cmd": `+cmd(pb)+`, "models": ["b-model"], "group": "gpu", "unloadAfter": "1h"},
	    {"name": "broken", "url": "http://`+port(t)+`", "cmd": ["sh", "-c", "echo no GPU >&2; exit 1"], "models": ["c-model"]}],
	  "maxSwapWait": "5s", `+fleetModels+`}}}`, "", nil)

	st := statusOf(t, g)
	assert.Equal(t, "stopped", st["a"].State, "nothing runs until asked for")
	assert.Equal(t, "stopped", st["b"].State)

	status, _ := ask(t, g, "/local/v1/chat/completions", `{"model":"a-model","messages":[{"role":"user","content":"hi"}]}`)
	assert.Equal(t, http.StatusOK, status, "started on demand")
	st = statusOf(t, g)
	require.Equal(t, "ready", st["a"].State)
	pidA := st["a"].PID

	status, _ = ask(t, g, "/local/v1/chat/completions", `{"model":"b-model","messages":[{"role":"user","content":"hi"}]}`)
	assert.Equal(t, http.StatusOK, status)
	st = statusOf(t, g)
	assert.Equal(t, "ready", st["b"].State)
	assert.Equal(t, "stopped", st["a"].State, "one model per group: a was swapped out")
	assert.False(t, serving(pidA, pa), "its process is gone")

	// keep_alive 0 on a stream: never unloaded while it streams, unloaded
	// right after.
	done := make(chan int, 1)
	go func() { // no require here: not the test's goroutine
		resp, err := http.Post(g.URL+"/local/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"a-model","stream":true,"keep_alive":0,"messages":[{"role":"user","content":"hi"}]}`))
		if err != nil {
			done <- 0
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	require.Eventually(t, func() bool { return statusOf(t, g)["a"].InFlight == 1 }, 20*time.Second, 5*time.Millisecond)
	assert.Equal(t, "ready", statusOf(t, g)["a"].State, "streaming: it stays")
	assert.Equal(t, http.StatusOK, <-done)
	waitStatus(t, g, "a", "stopped")

	// Ollama's load and unload.
	_, body := ask(t, g, "/api/generate", `{"model":"b-model","stream":false}`)
	assert.Contains(t, body, `"done_reason":"load"`)
	assert.Equal(t, "ready", statusOf(t, g)["b"].State)
	ps := func() string {
		resp, err := http.Get(g.URL + "/api/ps")
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	assert.Contains(t, ps(), `"name":"b-model"`, "loaded")
	assert.NotContains(t, ps(), `"name":"a-model"`, "not loaded")
	_, body = ask(t, g, "/api/generate", `{"model":"b-model","keep_alive":0,"stream":false}`)
	assert.Contains(t, body, `"done_reason":"unload"`)
	waitStatus(t, g, "b", "stopped")
	assert.NotContains(t, ps(), `"name":"b-model"`)

	// /unload/{model} stops the one serving it.
	status, _ = ask(t, g, "/local/v1/chat/completions", `{"model":"b-model","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)
	status, body = ask(t, g, "/unload/b-model", ``)
	assert.Equal(t, http.StatusOK, status)
	assert.JSONEq(t, `{"unloaded":["b"],"deferred":[]}`, body)
	waitStatus(t, g, "b", "stopped")

	// /unload stops what is idle.
	status, _ = ask(t, g, "/local/v1/chat/completions", `{"model":"b-model","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)
	resp, err := http.Get(g.URL + "/unload")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode, "a plain GET (a link, an image) unloads nothing")
	resp, err = http.Post(g.URL+"/unload", "", nil)
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.JSONEq(t, `{"unloaded":["b"],"deferred":[]}`, string(b))
	waitStatus(t, g, "b", "stopped")

	// A server that cannot start: a clear 503, not a hang.
	status, body = ask(t, g, "/local/v1/chat/completions", `{"model":"c-model","messages":[{"role":"user","content":"hi"}]}`)
	assert.Equal(t, http.StatusServiceUnavailable, status)
	assert.Contains(t, body, "could not start the backend")
	assert.Contains(t, body, "exited before it was ready")
	assert.Equal(t, "failed", statusOf(t, g)["broken"].State)
	g.waitLog(t, `"backend":"broken","line":"no GPU"`) // its output is in llproxy's log

	// Shutdown leaves no process behind.
	status, _ = ask(t, g, "/local/v1/chat/completions", `{"model":"a-model","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)
	pidA = statusOf(t, g)["a"].PID
	g.srv.StopBackends()
	assert.False(t, serving(pidA, pa))
}

func TestModelDefaultsAndSystemPrompt(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "models": {"gpt-4o": {
	  "maxQueueSize": 10, "maxQueueWait": 5, "rpm": 100, "tpm": 100000,
	  "defaults": {"temperature": 0.1, "top_p": 0.5}, "system": "Be terse. Now: {{now}}"}}}}}`, up.URL, nil)
	status, _ := ask(t, g, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)
	status, _ = ask(t, g, "/openai/v1/chat/completions", `{"model":"gpt-4o","temperature":0.9,"messages":[{"role":"system","content":"mine"},{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)

	var first, second struct {
		Messages []struct{ Role, Content string }
	}
	got := up.requests()
	require.NoError(t, json.Unmarshal(got[0].Body, &first))
	require.NoError(t, json.Unmarshal(got[1].Body, &second))
	var t0 map[string]any
	json.Unmarshal(got[0].Body, &t0)
	assert.EqualValues(t, 0.1, t0["temperature"], "the model's default")
	assert.EqualValues(t, 0.5, t0["top_p"])
	require.Len(t, first.Messages, 2)
	assert.Equal(t, "system", first.Messages[0].Role)
	assert.Contains(t, first.Messages[0].Content, "Be terse. Now: ")
	assert.NotContains(t, first.Messages[0].Content, "{{now}}")
	var t1 map[string]any
	json.Unmarshal(got[1].Body, &t1)
	assert.EqualValues(t, 0.9, t1["temperature"], "the request's value wins")
	require.Len(t, second.Messages, 2)
	assert.Equal(t, "mine", second.Messages[0].Content, "a system message in the request replaces the default")
	g.waitLog(t, `"prompt_tokens":13,`) // the second: its own short system message and "hi"
	assert.NotContains(t, g.logs.String(), `"prompt_tokens":8,`, "the first paid for the default system prompt, not just for \"hi\"")
}

func TestKeepAliveIsStrippedAndChecked(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 5, "rpm": 100, "tpm": 100000}}}}}`, up.URL, nil)
	status, _ := ask(t, g, "/openai/v1/chat/completions", `{"model":"gpt-4o","keep_alive":"10m","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)
	assert.NotContains(t, string(up.requests()[0].Body), "keep_alive", "removed before forwarding")
	status, body := ask(t, g, "/openai/v1/chat/completions", `{"model":"gpt-4o","keep_alive":"soon","messages":[]}`)
	assert.Equal(t, http.StatusBadRequest, status)
	assert.Contains(t, body, "keep_alive must be")
	assert.Len(t, up.requests(), 1)
}

// serving reports whether process pid is still the mock server listening on
// addr (a bare pid check could see the number reused by another process).
func serving(pid int, addr string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil || strings.Contains(string(st), ") Z ") {
		return false
	}
	return strings.Contains(string(b), addr)
}
