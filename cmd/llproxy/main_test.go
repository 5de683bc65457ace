package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// build compiles llproxy into a temporary directory.
func build(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "llproxy")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, string(out))
	return bin
}

// cleanEnv is the environment without the variables the example config
// reads, as on a fresh machine.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OPENAI_API_KEY=") && !strings.HasPrefix(kv, "LLPROXY_LISTEN=") {
			env = append(env, kv)
		}
	}
	return env
}

func TestCheck(t *testing.T) {
	bin := build(t)
	cmd := exec.Command(bin, "-check", "-config", "../../config-example.json")
	cmd.Env = cleanEnv()
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Contains(t, string(out), "is valid")

	bad := filepath.Join(t.TempDir(), "bad.json")
	require.NoError(t, os.WriteFile(bad, []byte(`{"routes":{"openai":{"forward":"https://x","models":{"gpt-4o":{"rpm":1,"tpm":0}}}}}`), 0o600))
	cmd = exec.Command(bin, "-check", "-config", bad)
	out, err = cmd.CombinedOutput()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 1, ee.ExitCode())
	assert.Contains(t, string(out), "routes.openai.models.gpt-4o.tpm: must be > 0, got 0")
}

// syncBuf is a log a process writes while the test reads it.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startExample runs the binary on the example config, as `go run
// ./cmd/llproxy` does, on a free port, and waits until it serves.
func startExample(t *testing.T) (*exec.Cmd, string, *syncBuf) {
	t.Helper()
	bin := build(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(bin, "-listen", addr)
	cmd.Dir = "../.." // where config-example.json is
	// Its state and usage ledger in the test's own directory, not the
	// checkout's.
	cmd.Env = append(cleanEnv(), "LLPROXY_STATE_FILE="+filepath.Join(t.TempDir(), "llproxy-state.json"))
	logs := &syncBuf{}
	cmd.Stderr = logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill() })
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 20*time.Second, 10*time.Millisecond)
	return cmd, addr, logs
}

// TestExampleConfigServesAndStopsOnSIGTERM runs the README's first command:
// the binary on the example config, with no key, serves the demo route and
// exits cleanly on SIGTERM.
func TestExampleConfigServesAndStopsOnSIGTERM(t *testing.T) {
	cmd, addr, logs := startExample(t)

	resp, err := http.Post("http://"+addr+"/demo/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"mock","messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "30", resp.Header.Get("X-Ratelimit-Limit-Requests"))

	// The response is counted in the request's deferred log step, after
	// its body reached the client: wait for it, as the server tests do.
	var body []byte
	require.Eventually(t, func() bool {
		m, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return false
		}
		body, _ = io.ReadAll(m.Body)
		m.Body.Close()
		return strings.Contains(string(body), `llproxy_http_responses_total{code="200",route="demo"} 1`)
	}, 10*time.Second, 5*time.Millisecond, "the 200 is counted")
	for _, want := range []string{`llproxy_build_info{goversion="go`, `process_start_time_seconds `} {
		assert.Contains(t, string(body), want)
	}

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, cmd.Wait(), logs.String())
	assert.Contains(t, logs.String(), `"msg":"shutting down"`)
	assert.Contains(t, logs.String(), `"route":"demo","model":"mock"`)
}

func TestCommandLine(t *testing.T) {
	bin := build(t)
	run := func(args ...string) (string, int) {
		cmd := exec.Command(bin, args...)
		cmd.Env = cleanEnv()
		cmd.Dir = "../.."
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return string(out), code
	}
	for _, args := range [][]string{{"-h"}, {"--help"}} {
		out, code := run(args...)
		assert.Zero(t, code, "%v", args)
		for _, sub := range []string{"mock-server", "version", "check"} {
			assert.Contains(t, out, sub)
		}
	}
	out, code := run("version")
	assert.Zero(t, code)
	assert.Regexp(t, `^llproxy \S+ \(go1\.`, out)
	out2, code := run("-version")
	assert.Zero(t, code)
	assert.Equal(t, out, out2)
	out, code = run("check", "-config", "config-example.json")
	assert.Zero(t, code, out)
	assert.Contains(t, out, "is valid")
	for _, args := range [][]string{{"serve"}, {"-check", "extra"}, {"version", "x"}, {"mock-server", "y"}, {"-nope"}} {
		out, code := run(args...)
		assert.Equal(t, 2, code, "%v: %s", args, out)
	}
	_, code = run("mock-server", "-h")
	assert.Zero(t, code)
}

// TestNoOrphansEvenWhenKilled starts a model server through llproxy, then
// kills llproxy with SIGKILL (no chance to clean up): the server must die
// with it.
func TestNoOrphansEvenWhenKilled(t *testing.T) {
	bin := build(t)
	free := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer ln.Close()
		return ln.Addr().String()
	}
	addr, backend := free(), free()
	cfg := filepath.Join(t.TempDir(), "config.json")
	require.NoError(t, os.WriteFile(cfg, []byte(`{"listen": "`+addr+`", "routes": {"local": {
	  "backends": [{"name": "m", "url": "http://`+backend+`", "models": ["m"], "cmd": ["`+bin+`", "mock-server", "-listen", "`+backend+`"]}],
	  "models": {"*": {"maxQueueSize": 1, "maxQueueWait": 30, "rpm": 60, "tpm": 100000}}}}}`), 0o600))
	cmd := exec.Command(bin, "-config", cfg)
	require.NoError(t, cmd.Start())
	defer cmd.Process.Kill()
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	}, 20*time.Second, 10*time.Millisecond)
	resp, err := http.Post("http://"+addr+"/local/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"m","messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var status struct{ Backends []struct{ PID int } }
	resp, err = http.Get("http://" + addr + "/status")
	require.NoError(t, err)
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&status))
	resp.Body.Close()
	pid := status.Backends[0].PID
	require.Positive(t, pid)

	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	cmd.Wait()
	require.Eventually(t, func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		return err != nil || strings.Contains(string(b), ") Z ")
	}, 10*time.Second, 10*time.Millisecond, "the model server outlived llproxy")
}

// TestHostileRequestsDoNotKillTheProcess: requests that once crashed or
// confused the binary on the example config get clear answers, and the
// process stays up (SIGHUP included, which it ignores).
func TestHostileRequestsDoNotKillTheProcess(t *testing.T) {
	cmd, addr, logs := startExample(t)
	base := "http://" + addr

	for _, tc := range []struct {
		name, method, path, ctype, body string
		want                            int
	}{
		{"empty POST", "POST", "/demo/v1/chat/completions", "", "", 400},
		{"empty JSON POST", "POST", "/demo/v1/completions", "application/json", "", 400},
		{"multipart claim on a JSON body", "POST", "/demo/v1/embeddings", "multipart/form-data; boundary=x", `{"model":"mock","input":"hi"}`, 200},
		{"huge n", "POST", "/demo/v1/chat/completions", "application/json", `{"model":"mock","n":9223372036854775807,"max_tokens":1000000,"messages":[]}`, 400},
		{"wrapping n", "POST", "/demo/v1/chat/completions", "application/json", `{"model":"mock","n":4294967296,"max_completion_tokens":4294967296,"messages":[]}`, 400},
		{"duplicate model", "POST", "/demo/v1/chat/completions", "application/json", `{"model":"mock","max_tokens":1,"model":"gpt-4o-mini","max_tokens":100000,"messages":[]}`, 400},
		{"invalid UTF-8 model", "POST", "/demo/v1/chat/completions", "application/json", "{\"model\":\"m\xff\xfe\",\"messages\":[]}", 400},
		{"no model", "POST", "/demo/v1/chat/completions", "application/json", `{"messages":[]}`, 400},
		{"dot segments", "POST", "/demo/v1/../../admin", "application/json", `{}`, 400},
		{"GET unload", "GET", "/unload", "", "", 405},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, base+tc.path, strings.NewReader(tc.body))
			require.NoError(t, err)
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err, "the process is still there")
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			assert.Equal(t, tc.want, resp.StatusCode, string(b))
			if tc.want >= 400 {
				assert.Contains(t, string(b), `"error":{`, "OpenAI's error shape")
			}
		})
	}
	resp, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "metrics still render")
	assert.NotContains(t, string(b), "\xff")

	require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
	resp, err = http.Get(base + "/healthz")
	require.NoError(t, err, "SIGHUP does not end the process")
	resp.Body.Close()
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, cmd.Wait(), logs.String())
	assert.NotContains(t, logs.String(), "panic")
}

// yamlBomb is 9 levels of aliases, each naming the one before 9 times:
// 9^9 (387 million) values once expanded, from a few hundred bytes.
func yamlBomb() string {
	var b strings.Builder
	b.WriteString("a0: &a0 [x, x, x, x, x, x, x, x, x]\n")
	for i := 1; i <= 9; i++ {
		fmt.Fprintf(&b, "a%d: &a%d [", i, i)
		for j := range 9 {
			if j > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "*a%d", i-1)
		}
		b.WriteString("]\n")
	}
	return b.String()
}

// TestYAMLAliasBombNeverKillsTheProcess: a config of nested aliases is
// refused at start and at a reload (SIGHUP), with a clear error and in
// bounded memory; the running gateway goes on serving.
func TestYAMLAliasBombNeverKillsTheProcess(t *testing.T) {
	bin := build(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	bomb := yamlBomb()
	require.Less(t, len(bomb), 600)
	require.NoError(t, os.WriteFile(path, []byte(bomb), 0o600))
	out, err := exec.Command(bin, "-check", "-config", path).CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "aliases are expanded")

	good := "routes:\n  demo:\n    provider: mock\n    models:\n      \"*\": {rpm: 30, tpm: 20000, maxQueueSize: 5, maxQueueWait: 2}\n"
	require.NoError(t, os.WriteFile(path, []byte(good), 0o600))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(bin, "-config", path, "-listen", addr)
	logs := &syncBuf{}
	cmd.Stderr = logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	healthy := func() bool {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	require.Eventually(t, healthy, 20*time.Second, 10*time.Millisecond)

	require.NoError(t, os.WriteFile(path, []byte(bomb+good), 0o600))
	require.NoError(t, cmd.Process.Signal(syscall.SIGHUP))
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "aliases are expanded") },
		20*time.Second, 10*time.Millisecond, logs.String())
	assert.True(t, healthy(), "still serving on the current config")
	resp, err := http.Post("http://"+addr+"/demo/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"mock","messages":[{"role":"user","content":"hi"}]}`))
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	rss, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/status")
	require.NoError(t, err)
	for _, line := range strings.Split(string(rss), "\n") {
		if strings.HasPrefix(line, "VmHWM:") { // peak RSS
			kb, _ := strconv.Atoi(strings.Fields(line)[1])
			assert.Less(t, kb, 200<<10, "peak RSS %d KiB: the bomb was never expanded", kb)
		}
	}
}
