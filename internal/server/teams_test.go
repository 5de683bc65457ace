package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
)

const teamsConfig = `{
  "clients": {
    "search":  {"keys": ["search-key"], "weight": 3},
    "batch":   {"keys": ["batch-key-1", "batch-key-2"], "weight": 1,
                "limits": {"gpt-4o": {"tpm": 300, "maxConcurrent": 4, "maxQueueSize": 1000, "maxQueueWait": 600}}},
    "interns": {"keys": ["intern-key"], "routes": ["openai"],
                "limits": {"*": {"tpm": 5000, "tokensPerDay": 24}}}
  },
  "routes": {
    "openai": {"forward": "$UPSTREAM", "models": {
      "gpt-4o": {"rpm": 600, "tpm": 100000, "maxQueueSize": 50, "maxQueueWait": 60}}},
    "other": {"forward": "$UPSTREAM", "apiKey": "sk-upstream", "models": {
      "gpt-4o": {"rpm": 600, "tpm": 100000, "maxQueueSize": 50, "maxQueueWait": 60}}}
  }
}`

const teamBody = `{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`

func bearer(key string) []string { return []string{"Authorization", "Bearer " + key} }

func TestTeamsKeysRoutesAndNoKeyForwarded(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, teamsConfig, up.URL, nil)

	resp := g.post(t, "/openai/v1/chat/completions", teamBody, bearer("nobody")...)
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, "an unknown key")
	resp = g.post(t, "/openai/v1/chat/completions", teamBody)
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, "no key")

	for _, key := range []string{"search-key", "batch-key-1", "batch-key-2", "intern-key"} {
		resp = g.post(t, "/openai/v1/chat/completions", teamBody, bearer(key)...)
		assert.Equal(t, http.StatusOK, resp.StatusCode, key)
	}
	resp = g.post(t, "/openai/v1/chat/completions", teamBody, "api-key", "search-key")
	assert.Equal(t, http.StatusOK, resp.StatusCode, "api-key header")

	// interns may use "openai" only.
	resp = g.post(t, "/other/v1/chat/completions", teamBody, bearer("intern-key")...)
	require.Equal(t, http.StatusForbidden, resp.StatusCode)
	e := openAIError(t, resp)
	assert.Equal(t, "route_not_allowed", strOf(e.Code))
	assert.Contains(t, e.Message, "interns")
	resp = g.post(t, "/other/v1/chat/completions", teamBody, bearer("search-key")...)
	assert.Equal(t, http.StatusOK, resp.StatusCode)

	// No client key ever reaches the upstream: not on a route without an
	// apiKey, and on one with, only the route's key.
	seen := up.requests()
	require.Len(t, seen, 6, "the 401s and the 403 sent nothing")
	for _, s := range seen {
		for name, vals := range s.Header {
			for _, v := range vals {
				for _, key := range []string{"search-key", "batch-key", "intern-key"} {
					assert.NotContains(t, v, key, "header %s of %s", name, s.Path)
				}
			}
		}
	}
	assert.Equal(t, "Bearer sk-upstream", seen[5].Header.Get("Authorization"))
	assert.Empty(t, seen[0].Header.Get("Authorization"))

	// Who sent it is in every request line and in the metrics.
	g.waitLog(t, `"client":"interns"`)
	assert.Contains(t, g.logs.String(), `"client":"batch"`)
	m := metricsText(t, g)
	assert.Contains(t, m, `llproxy_client_requests_total{client="batch",outcome="admitted",route="openai"} 2`)
	assert.Contains(t, m, `llproxy_client_requests_total{client="interns",outcome="forbidden",route="other"} 1`)
	assert.Contains(t, m, `llproxy_client_tokens_used_total{client="search",route="openai"} 12`)
}

func TestClientKeysAreClientsOfTheirOwn(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"clientKeys": ["k1", "k2"], "routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"*": {"rpm": 100, "tpm": 10000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", teamBody, bearer("k2")...)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	g.waitLog(t, `"client":"key-2"`)
	assert.Empty(t, up.requests()[0].Header.Get("Authorization"), "a client key is the gateway's, never the upstream's")
}

func TestNoClientsIsOneAnonymousClient(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"*": {"rpm": 100, "tpm": 10000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", teamBody, bearer("sk-client-own")...)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	g.waitLog(t, `"client":"anonymous"`)
	assert.Equal(t, "Bearer sk-client-own", up.requests()[0].Header.Get("Authorization"),
		"without client keys the client's own key is the upstream's, as before")
}

func TestClientOwnLimitsAnswerForTheClient(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, teamsConfig, up.URL, nil)
	// batch's own tpm is 300: a request reserving 250 fits once, the next
	// would wait for batch's bucket (about 40 s, within its 600).
	big := `{"model":"gpt-4o","max_tokens":240,"messages":[{"role":"user","content":"hi"}]}`
	resp := g.post(t, "/openai/v1/chat/completions", big, bearer("batch-key-1")...)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "300", resp.Header.Get("X-Ratelimit-Limit-Tokens"), "batch sees its own, tighter, limit")
	// Too large for batch's bucket at all.
	huge := `{"model":"gpt-4o","max_tokens":400,"messages":[{"role":"user","content":"hi"}]}`
	resp = g.post(t, "/openai/v1/chat/completions", huge, bearer("batch-key-2")...)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	e := openAIError(t, resp)
	assert.Contains(t, e.Message, "for client batch on tokens per min (TPM): Limit 300")
	// search is not held by batch's limit.
	resp = g.post(t, "/openai/v1/chat/completions", huge, bearer("search-key")...)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "100000", resp.Header.Get("X-Ratelimit-Limit-Tokens"))
}

func TestClientWaitTooLongNamesTheClient(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"clients": {"batch": {"keys": ["b"], "limits": {"gpt-4o": {"tpm": 300, "maxQueueWait": 2}}}},
		"routes": {"openai": {"forward": "$UPSTREAM", "models": {
		"gpt-4o": {"rpm": 600, "tpm": 100000, "maxQueueSize": 50, "maxQueueWait": 60}}}}}`, up.URL, nil)
	big := `{"model":"gpt-4o","max_tokens":240,"messages":[{"role":"user","content":"hi"}]}`
	resp := g.post(t, "/openai/v1/chat/completions", big, bearer("b")...)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	resp = g.post(t, "/openai/v1/chat/completions", big, bearer("b")...)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	retry := resp.Header.Get("Retry-After")
	e := openAIError(t, resp)
	assert.Equal(t, "rate_limit_exceeded", strOf(e.Code))
	assert.Contains(t, e.Message, "for client batch on tokens per min (TPM): Limit 300")
	assert.Contains(t, e.Message, "its client's maxQueueWait")
	assert.Contains(t, []string{"39", "40"}, retry, "200 more tokens at 5 a second")
	assert.Equal(t, "300", resp.Header.Get("X-Ratelimit-Limit-Tokens"))
}

// TestTwoTeamsShareOneKey is the story, in real time: team A's
// batch of 45 requests floods a model at rpm 60 (one a second after the
// first burst of 20... here 60) with a queue of 50 and maxQueueWait 60;
// team B's one chat request, sent half a second later, is not refused and
// goes ahead of A's backlog.
func TestTwoTeamsShareOneKey(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"clients": {"a": {"keys": ["key-a"]}, "b": {"keys": ["key-b"]}},
		"routes": {"openai": {"forward": "$UPSTREAM", "models": {
		"gpt-4o": {"rpm": 20, "tpm": 1000000, "maxQueueSize": 50, "maxQueueWait": 60}}}}}`, up.URL, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for i := range 45 {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/openai/v1/chat/completions",
				strings.NewReader(fmt.Sprintf(`{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"a %d"}]}`, i)))
			req.Header.Set("Authorization", "Bearer key-a")
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		})
	}
	q := mustQueue(g.srv.routes["openai"], "gpt-4o")
	require.Eventually(t, func() bool { return q.Stats(time.Now()).Depth >= 20 }, 10*time.Second, time.Millisecond,
		"A's first 20 are admitted, the rest wait")
	time.Sleep(500 * time.Millisecond)
	resp := g.post(t, "/openai/v1/chat/completions",
		`{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"b"}]}`, bearer("key-b")...)
	require.Equal(t, http.StatusOK, resp.StatusCode, "B is not refused: A's backlog is A's")
	// B went ahead of A's backlog: at most one of A's queued requests
	// (the one whose turn it was) reached the upstream before it.
	seen := up.requests()
	pos := -1
	for i, s := range seen {
		if strings.Contains(string(s.Body), `"content":"b"`) {
			pos = i
		}
	}
	require.GreaterOrEqual(t, pos, 20)
	assert.LessOrEqual(t, pos, 21, "B was sent within one of A's queued requests")
	var st struct {
		Clients []struct {
			Name   string
			Depth  map[string]int `json:"queueDepth"`
			Queues []struct{ Route, Model string }
		}
	}
	req, _ := http.NewRequest(http.MethodGet, g.URL+"/clients", nil)
	req.Header.Set("Authorization", "Bearer key-b") // no adminKeys: a client key
	r, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, r.StatusCode)
	require.NoError(t, json.NewDecoder(r.Body).Decode(&st))
	r.Body.Close()
	require.Len(t, st.Clients, 2)
	assert.Equal(t, "a", st.Clients[0].Name)
	assert.Greater(t, st.Clients[0].Depth["gpt-4o"], 10, "A's backlog, A's alone")
	assert.Zero(t, st.Clients[1].Depth["gpt-4o"])
	cancel()
	wg.Wait()
}

func TestClientsEndpointFollowsTheAdminRule(t *testing.T) {
	up := newUpstream(t)
	cfg := strings.Replace(teamsConfig, `"clients": {`, `"adminKeys": ["admin"], "clients": {`, 1)
	g := newGateway(t, cfg, up.URL, nil)
	get := func(key string) *http.Response {
		req, _ := http.NewRequest(http.MethodGet, g.URL+"/clients", nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	assert.Equal(t, http.StatusUnauthorized, get("").StatusCode)
	assert.Equal(t, http.StatusUnauthorized, get("search-key").StatusCode, "a client key is not an admin key")
	resp := get("admin")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body := readAll(t, resp)
	for _, key := range []string{"search-key", "batch-key", "intern-key", "admin"} {
		assert.NotContains(t, body, key)
	}
	assert.Contains(t, body, `"name": "interns"`)
	assert.Contains(t, body, `"tokensPerDay": 24`)
	assert.Contains(t, body, `"budgetLeft": {`)
}

func TestTeamsConfigErrors(t *testing.T) {
	_, err := config.Parse([]byte(`{
	  "clientKeys": ["shared"],
	  "adminKeys": ["b1"],
	  "clients": {
	    "a": {"keys": ["shared"], "weight": -1},
	    "b": {"keys": ["b1"], "weight": 1001, "routes": ["nope"],
	          "limits": {"gpt-4o": {"rpm": -1, "tokensPerDay": -5}}},
	    "c": {"keys": []}
	  },
	  "routes": {"openai": {"forward": "http://x", "models": {"*": {"rpm": 1, "tpm": 1}}}}
	}`), nil)
	require.Error(t, err)
	for _, want := range []string{
		"clientKeys[0]: the same key as clients.a.keys[0]",
		"adminKeys[0]: the same key as clients.b.keys[0]",
		"clients.b.weight: must be 1 to 1000, got 1001",
		`clients.b.routes[0]: no route named "nope"`,
		"clients.b.limits.gpt-4o.rpm: must be >= 0, got -1",
		"clients.b.limits.gpt-4o.tokensPerDay: must be >= 0, got -5",
		"clients.c.keys: a client needs at least one key",
		"clients.a.weight: must be 1 to 1000, got -1",
	} {
		assert.Contains(t, err.Error(), want)
	}
}

// TestBudgetsSurviveARestartOfTheBinary runs the real binary: interns'
// daily budget (12 tokens, each answer uses 6) is used up, the binary is
// stopped with SIGTERM and started again, and the budget is still used up.
func TestBudgetsSurviveARestartOfTheBinary(t *testing.T) {
	bin := llproxyBinary(t)
	up := newUpstream(t)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	require.NoError(t, os.WriteFile(cfgPath, []byte(strings.ReplaceAll(teamsConfig, "$UPSTREAM", up.URL)), 0o600))
	start := func() (string, *exec.Cmd) {
		addr := port(t)
		cmd := exec.Command(bin, "-config", cfgPath, "-listen", addr)
		cmd.Stderr = os.Stderr
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		require.Eventually(t, func() bool {
			r, err := http.Get("http://" + addr + "/healthz")
			if err == nil {
				r.Body.Close()
			}
			return err == nil
		}, 10*time.Second, 10*time.Millisecond)
		return "http://" + addr, cmd
	}
	send := func(base string) *http.Response {
		req, _ := http.NewRequest(http.MethodPost, base+"/openai/v1/chat/completions", strings.NewReader(teamBody))
		req.Header.Set("Authorization", "Bearer intern-key")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	base, cmd := start()
	assert.Equal(t, http.StatusOK, send(base).StatusCode)
	assert.Equal(t, http.StatusOK, send(base).StatusCode)
	resp := send(base)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "12 of 24 used, and this one reserves 13")
	assert.Equal(t, "false", resp.Header.Get("X-Should-Retry"))
	assert.NotEmpty(t, resp.Header.Get("Retry-After"))
	e := openAIError(t, resp)
	assert.Equal(t, "insufficient_quota", strOf(e.Code))
	assert.Equal(t, "insufficient_quota", e.Type)
	assert.Contains(t, e.Message, "interns")
	assert.Contains(t, e.Message, "T00:00:00Z")
	assert.Len(t, up.requests(), 2, "the refused one was not forwarded")
	mr, err := http.Get(base + "/metrics")
	require.NoError(t, err)
	m := readAll(t, mr)
	mr.Body.Close()
	for _, want := range []string{
		`llproxy_client_budget_left_tokens{client="interns",model="*"} 12`,
		`llproxy_client_budget_used_tokens{client="interns",model="*"} 12`,
		`llproxy_client_budget_tokens{client="interns",model="*"} 24`,
		`llproxy_client_tokens_used_today{client="interns"} 12`,
		`llproxy_client_requests_total{client="interns",outcome="rejected_budget",route="openai"} 1`,
	} {
		assert.Contains(t, m, want)
	}

	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, cmd.Wait())
	state, err := os.ReadFile(filepath.Join(dir, config.DefaultStateFile))
	require.NoError(t, err, "written next to the config")
	assert.Contains(t, string(state), `"*": 12`)

	base, cmd = start()
	resp = send(base)
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "still used up after the restart")
	assert.Equal(t, "insufficient_quota", strOf(openAIError(t, resp).Code))
	assert.Len(t, up.requests(), 2)
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, cmd.Wait())

	// A corrupt state file is a start-up error, not a fresh budget.
	require.NoError(t, os.WriteFile(filepath.Join(dir, config.DefaultStateFile), []byte(`{"version":1,"day":`), 0o600))
	out, err := exec.Command(bin, "-config", cfgPath, "-listen", port(t)).CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(out), "corrupt")
}
