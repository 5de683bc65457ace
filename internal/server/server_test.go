package server

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const chatBody = `{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}],"max_tokens":10}`

const keyedConfig = `{
  "clientKeys": ["${TEAM_KEY}"],
  "routes": {"openai": {"forward": "$UPSTREAM", "apiKey": "${OPENAI_API_KEY}",
    "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 30, "rpm": 100, "tpm": 100000}}}}}`

var keyedEnv = map[string]string{"TEAM_KEY": "team-key-a", "OPENAI_API_KEY": "sk-upstream-secret-xyz"}

func TestForwardInjectsKeyKeepsPathAndBody(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, keyedConfig, up.URL, keyedEnv)
	resp := g.post(t, "/openai/v1/chat/completions?api-version=1", chatBody, "Authorization", "Bearer team-key-a")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, readAll(t, resp), `"usage"`)

	got := up.requests()
	require.Len(t, got, 1)
	assert.Equal(t, "/v1/chat/completions", got[0].Path)
	assert.Equal(t, "api-version=1", got[0].RawQuery)
	assert.Equal(t, "Bearer sk-upstream-secret-xyz", got[0].Header.Get("Authorization"))
	assert.Equal(t, chatBody, string(got[0].Body), "body forwarded byte for byte")

	// The gateway's buckets, not the upstream's, in the headers.
	assert.Equal(t, "100", resp.Header.Get("X-Ratelimit-Limit-Requests"))
	assert.Equal(t, "99", resp.Header.Get("X-Ratelimit-Remaining-Requests"))
	assert.Equal(t, "100000", resp.Header.Get("X-Ratelimit-Limit-Tokens"))
	remaining, err := strconv.Atoi(resp.Header.Get("X-Ratelimit-Remaining-Tokens"))
	require.NoError(t, err)
	assert.Equal(t, 100000-(3+1+2+3)-10, remaining, "cost = counted prompt (9) + max_tokens (10)")
	for _, h := range []string{"X-Ratelimit-Reset-Requests", "X-Ratelimit-Reset-Tokens"} {
		_, err := time.ParseDuration(resp.Header.Get(h))
		assert.NoError(t, err, h)
	}
	assert.Len(t, resp.Header.Values("X-Ratelimit-Remaining-Requests"), 1)
}

func TestClientKeys(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, keyedConfig, up.URL, keyedEnv)
	for name, headers := range map[string][]string{
		"none":         nil,
		"wrong bearer": {"Authorization", "Bearer nope"},
		"wrong scheme": {"Authorization", "Basic team-key-a"},
	} {
		t.Run(name, func(t *testing.T) {
			resp := g.post(t, "/openai/v1/chat/completions", chatBody, headers...)
			assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
			assert.Equal(t, "invalid_api_key", strOf(openAIError(t, resp).Code))
		})
	}
	resp := g.post(t, "/openai/v1/chat/completions", chatBody, "api-key", "team-key-a")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	got := up.requests()
	require.Len(t, got, 1, "rejected requests never reach the upstream")
	assert.Empty(t, got[0].Header.Get("Api-Key"), "the team key is not forwarded")
}

func TestClientAuthorizationPassesThroughWithoutAPIKey(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "apiKey": "${OPENAI_API_KEY:-}",
		"models": {"*": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 10, "tpm": 10000}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody, "Authorization", "Bearer sk-client-own")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "Bearer sk-client-own", up.requests()[0].Header.Get("Authorization"))
}

func TestNoKeyLeakOnUpstreamFailure(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, keyedConfig, up.URL, keyedEnv)
	up.Close() // connection refused from now on
	resp := g.post(t, "/openai/v1/chat/completions", chatBody, "Authorization", "Bearer team-key-a")
	assert.Equal(t, http.StatusBadGateway, resp.StatusCode)
	e := openAIError(t, resp)
	assert.Equal(t, "upstream_error", e.Type)
	for where, text := range map[string]string{"error": e.Message, "logs": g.logs.String(), "metrics": metricsText(t, g)} {
		assert.NotContains(t, text, "sk-upstream-secret-xyz", where)
		assert.NotContains(t, text, "team-key-a", where)
	}
	assert.Contains(t, metricsText(t, g), `llproxy_upstream_responses_total{code="error",model="gpt-4o",route="openai"} 1`)
}

func TestUpstreamHeaderTimeoutIs504(t *testing.T) {
	up := newUpstream(t)
	release := make(chan struct{})
	defer close(release)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, _ []byte) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "responseHeaderTimeout": "50ms",
		"models": {"gpt-4o": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 10, "tpm": 10000}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusGatewayTimeout, resp.StatusCode)
	assert.Equal(t, "upstream_error", openAIError(t, resp).Type)
}

func TestStreamingIsNotBuffered(t *testing.T) {
	up := newUpstream(t)
	next := make(chan struct{})
	const first, second = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n", "data: [DONE]\n\n"
	up.setHandler(func(w http.ResponseWriter, r *http.Request, _ []byte) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, first)
		w.(http.Flusher).Flush()
		<-next // the upstream is not done until the client has the first chunk
		io.WriteString(w, second)
	})
	g := newGateway(t, keyedConfig, up.URL, keyedEnv)
	resp := g.post(t, "/openai/v1/chat/completions",
		`{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}`, "Authorization", "Bearer team-key-a")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "no", resp.Header.Get("X-Accel-Buffering"))
	assert.NotEmpty(t, resp.Header.Get("X-Ratelimit-Remaining-Tokens"))
	br := bufio.NewReader(resp.Body)
	got := make([]byte, len(first))
	_, err := io.ReadFull(br, got)
	require.NoError(t, err)
	assert.Equal(t, first, string(got), "first chunk arrived while the upstream was still sending")
	close(next)
	rest, err := io.ReadAll(br)
	require.NoError(t, err)
	assert.Equal(t, second, string(rest), "bytes unchanged")
}

func TestBadInputNeverReachesUpstream(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"maxBodyBytes": 1000, "routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"gpt-4o": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 10, "tpm": 10000},
		           "gpt-4o-mini": {"maxQueueSize": 1, "maxQueueWait": 1, "rpm": 10, "tpm": 10000}}}}}`, up.URL, nil)
	tests := []struct {
		name, path, body string
		status           int
		typ, code        string
		msg              string
	}{
		{"malformed json", "/openai/v1/chat/completions", `{"model": "gpt-4o",`, 400, "invalid_request_error", "", "could not parse the JSON"},
		{"model not a string", "/openai/v1/chat/completions", `{"model": 4}`, 400, "invalid_request_error", "", "'model' must be a string"},
		{"model name too long", "/openai/v1/chat/completions", `{"model":"` + strings.Repeat("m", 300) + `"}`, 400, "invalid_request_error", "", "at most 256 bytes"},
		{"body too large", "/openai/v1/chat/completions", `{"model":"gpt-4o","x":"` + strings.Repeat("a", 2000) + `"}`, 413, "invalid_request_error", "request_too_large", "limit is 1000 bytes"},
		{"unknown route", "/anthropic/v1/messages", chatBody, 404, "invalid_request_error", "unknown_route", "/openai/"},
		{"unknown model", "/openai/v1/chat/completions", `{"model":"gpt-5"}`, 404, "invalid_request_error", "model_not_found", "serves: gpt-4o, gpt-4o-mini"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := g.post(t, tt.path, tt.body)
			assert.Equal(t, tt.status, resp.StatusCode)
			e := openAIError(t, resp)
			assert.Equal(t, tt.typ, e.Type)
			assert.Equal(t, tt.code, strOf(e.Code))
			assert.Contains(t, e.Message, tt.msg)
		})
	}
	assert.Empty(t, up.requests())
}

// rateLimitMessage is the regular expression of openai-semantics.md 1.4.
var rateLimitMessage = regexp.MustCompile(`^Rate limit reached for (\S+) .*on (tokens|requests) per (min|day) \((TPM|RPM|TPD|RPD)\): Limit \d+, Used \d+, Requested \d+\. Please try again in ((\d+h)?(\d+m)?[\d.]+m?s)\.`)

func TestRateLimitedRequestGetsOpenAIs429(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"gpt-4o": {"maxQueueSize": 5, "maxQueueWait": 2, "rpm": 1, "tpm": 100000}}}}}`, up.URL, nil)
	require.Equal(t, http.StatusOK, g.post(t, "/openai/v1/chat/completions", chatBody).StatusCode)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	e := openAIError(t, resp)
	assert.Equal(t, "requests", e.Type)
	assert.Equal(t, "rate_limit_exceeded", strOf(e.Code))
	assert.Nil(t, e.Param)
	m := rateLimitMessage.FindStringSubmatch(e.Message)
	require.NotNil(t, m, e.Message)
	assert.Equal(t, "gpt-4o", m[1])
	assert.Equal(t, "RPM", m[4])
	ms, err := strconv.Atoi(resp.Header.Get("Retry-After-Ms"))
	require.NoError(t, err)
	assert.InDelta(t, 60000, ms, 1000, "one request per minute: back in a minute")
	assert.Equal(t, "60", resp.Header.Get("Retry-After"))
	assert.Equal(t, "0", resp.Header.Get("X-Ratelimit-Remaining-Requests"))
	assert.Empty(t, resp.Header.Get("X-Should-Retry"))
	assert.Len(t, up.requests(), 1)
	assert.Contains(t, metricsText(t, g), `llproxy_requests_total{model="gpt-4o",outcome="rejected_wait",route="openai"} 1`)
}

func TestTooLargeIsNotRetryable(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"gpt-4o": {"maxQueueSize": 5, "maxQueueWait": 2, "rpm": 10, "tpm": 1000}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[],"max_tokens":5000}`)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "false", resp.Header.Get("X-Should-Retry"))
	assert.Empty(t, resp.Header.Get("Retry-After"))
	e := openAIError(t, resp)
	assert.Equal(t, "tokens", e.Type)
	assert.Regexp(t, `^Request too large for gpt-4o .* on tokens per min \(TPM\): Limit 1000, Requested 5003\. The input or output tokens must be reduced`, e.Message)
	assert.Empty(t, up.requests())
}

func TestDefaultMaxTokensAndN(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"gpt-4o": {"maxQueueSize": 5, "maxQueueWait": 2, "rpm": 10, "tpm": 100000, "defaultMaxTokens": 700}}}}}`, up.URL, nil)
	for _, tt := range []struct{ body, want string }{
		{`{"model":"gpt-4o","messages":[]}`, `"prompt_tokens":3,"cost_tokens":703`},                                          // reply priming + default
		{`{"model":"gpt-4o","messages":[],"max_completion_tokens":50,"max_tokens":9}`, `"prompt_tokens":3,"cost_tokens":53`}, // the newer field wins
		{`{"model":"gpt-4o","messages":[],"max_tokens":10,"n":3}`, `"prompt_tokens":3,"cost_tokens":33`},                     // n choices
		{`{"model":"gpt-4o","input":"hello world"}`, `"prompt_tokens":2,"cost_tokens":2`},                                    // embeddings: no output
	} {
		path := "/openai/v1/chat/completions"
		if strings.Contains(tt.body, "input") {
			path = "/openai/v1/embeddings"
		}
		resp := g.post(t, path, tt.body)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		g.waitLog(t, tt.want)
	}
}

func TestPassthroughWithoutModel(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, keyedConfig, up.URL, keyedEnv)
	req, _ := http.NewRequest(http.MethodGet, g.URL+"/openai/v1/models", nil)
	req.Header.Set("Authorization", "Bearer team-key-a")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, readAll(t, resp), `"gpt-4o"`)
	assert.Empty(t, resp.Header.Get("X-Ratelimit-Limit-Tokens"), "not scheduled")
	assert.Equal(t, "Bearer sk-upstream-secret-xyz", up.requests()[0].Header.Get("Authorization"))
	assert.Contains(t, metricsText(t, g), `llproxy_passthrough_requests_total{route="openai"} 1`)
}

func TestClientLeavingTheQueueSendsNothing(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"gpt-4o": {"maxQueueSize": 5, "maxQueueWait": 120, "rpm": 1, "tpm": 100000}}}}}`, up.URL, nil)
	require.Equal(t, http.StatusOK, g.post(t, "/openai/v1/chat/completions", chatBody).StatusCode)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/openai/v1/chat/completions", strings.NewReader(chatBody))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	q := mustQueue(g.srv.routes["openai"], "gpt-4o")
	require.Eventually(t, func() bool { return q.Stats(time.Now()).Depth == 1 }, 5*time.Second, time.Millisecond)
	cancel()
	assert.Error(t, <-done)
	require.Eventually(t, func() bool {
		return strings.Contains(metricsText(t, g), `llproxy_requests_total{model="gpt-4o",outcome="cancelled",route="openai"} 1`)
	}, 5*time.Second, time.Millisecond)
	assert.Zero(t, q.Stats(time.Now()).Depth)
	assert.Len(t, up.requests(), 1, "the cancelled request was never sent")
	g.waitLog(t, `"status":499,"outcome":"cancelled"`)
}

func TestShutdownAnswersQueuedRequests(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
		"models": {"gpt-4o": {"maxQueueSize": 5, "maxQueueWait": 120, "rpm": 1, "tpm": 100000}}}}}`, up.URL, nil)
	require.Equal(t, http.StatusOK, g.post(t, "/openai/v1/chat/completions", chatBody).StatusCode)
	got := make(chan *http.Response, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, g.URL+"/openai/v1/chat/completions", strings.NewReader(chatBody))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			got <- resp
		}
		close(got)
	}()
	q := mustQueue(g.srv.routes["openai"], "gpt-4o")
	require.Eventually(t, func() bool { return q.Stats(time.Now()).Depth == 1 }, 5*time.Second, time.Millisecond)
	g.srv.BeginShutdown()
	resp := <-got
	require.NotNil(t, resp)
	defer resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, "service_unavailable", strOf(openAIError(t, resp).Code))
	h, err := http.Get(g.URL + "/healthz")
	require.NoError(t, err)
	h.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, h.StatusCode)
}

func TestHealthzAndQueueMetrics(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, keyedConfig, up.URL, keyedEnv)
	h, err := http.Get(g.URL + "/healthz")
	require.NoError(t, err)
	assert.Equal(t, http.StatusOK, h.StatusCode)
	h.Body.Close()
	m := metricsText(t, g)
	for _, want := range []string{
		`llproxy_queue_depth{class="interactive",model="gpt-4o",route="openai"} 0`,
		`llproxy_bucket_remaining{model="gpt-4o",resource="requests",route="openai"} 100`,
		`llproxy_bucket_limit{model="gpt-4o",resource="tokens",route="openai"} 100000`,
	} {
		assert.Contains(t, m, want)
	}
}

func TestMockRoute(t *testing.T) {
	g := newGateway(t, `{"routes": {"demo": {"provider": "mock", "mock": {"chunks": 4},
		"models": {"*": {"maxQueueSize": 5, "maxQueueWait": 2, "rpm": 30, "tpm": 20000}}}}}`, "", nil)
	resp := g.post(t, "/demo/v1/chat/completions", `{"model":"mock","messages":[{"role":"user","content":"hello world"}]}`)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body := readAll(t, resp)
	assert.Contains(t, body, `"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}`)
	assert.Equal(t, "29", resp.Header.Get("X-Ratelimit-Remaining-Requests"))
}
