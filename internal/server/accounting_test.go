package server

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/provider/mock"
	"github.com/llproxy/llproxy/scheduler"
)

// streamLikeOpenAI renders the chat stream OpenAI sends for words: with
// include_usage, every chunk carries "usage":null and a last chunk with
// empty choices carries the usage.
func streamLikeOpenAI(words []string, includeUsage bool) string {
	var b strings.Builder
	for i, w := range words {
		fmt.Fprintf(&b, `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp","choices":[{"index":0,"delta":{"content":%q},"logprobs":null,"finish_reason":null}]`, w)
		if includeUsage {
			b.WriteString(`,"usage":null`)
		}
		b.WriteString("}\n\n")
		if i == len(words)-1 {
			b.WriteString(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]`)
			if includeUsage {
				b.WriteString(`,"usage":null`)
			}
			b.WriteString("}\n\n")
		}
	}
	if includeUsage {
		b.WriteString(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","system_fingerprint":"fp","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}` + "\n\n")
	}
	b.WriteString("data: [DONE]\n\n")
	return b.String()
}

// openAIStreamer answers streams as OpenAI does, honouring include_usage,
// and JSON completions with a usage of 11 + 3.
func openAIStreamer(w http.ResponseWriter, r *http.Request, body []byte) {
	var req struct {
		Stream        bool
		StreamOptions struct {
			IncludeUsage bool `json:"include_usage"`
		} `json:"stream_options"`
	}
	json.Unmarshal(body, &req)
	if !req.Stream {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"a b c"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}`)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	for _, part := range strings.SplitAfter(streamLikeOpenAI([]string{"a", " b", " c"}, req.StreamOptions.IncludeUsage), "\n\n") {
		io.WriteString(w, part)
		w.(http.Flusher).Flush()
	}
}

const settleConfig = `{"routes": {"openai": {"forward": "$UPSTREAM", "settle": "%s",
  "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 5, "rpm": 100, "tpm": 100000}}}}}`

const streamBody = `{"model":"gpt-4o","stream":true,"max_tokens":1000,"messages":[{"role":"user","content":"hello world"}]}`

func remainingTokens(g *gateway) int {
	return mustQueue(g.srv.routes["openai"], "gpt-4o").State(time.Now()).Remaining[scheduler.Tokens]
}

func TestStreamUsageIsInjectedAndStrippedByteForByte(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(openAIStreamer)
	g := newGateway(t, fmt.Sprintf(settleConfig, "actual"), up.URL, nil)

	resp := g.post(t, "/openai/v1/chat/completions", streamBody)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	got := readAll(t, resp)
	assert.Equal(t, streamLikeOpenAI([]string{"a", " b", " c"}, false), got,
		"exactly what the client would have received without the gateway")
	sent := up.requests()[0].Body
	assert.Equal(t, strings.TrimSuffix(streamBody, "}")+`,"stream_options":{"include_usage":true}}`, string(sent),
		"the request changed by one member only")

	// Settled on the reported 14 tokens rather than the 1009 reserved.
	g.waitLog(t, `"used_tokens":14`)
	m := metricsText(t, g)
	assert.Contains(t, m, `llproxy_tokens_settled_total{direction="refund",model="gpt-4o",route="openai"} 995`)
	assert.GreaterOrEqual(t, remainingTokens(g), 100000-14)
	assert.Contains(t, m, `llproxy_tokens_used_total{kind="completion",model="gpt-4o",route="openai"} 3`)
	assert.Contains(t, m, `llproxy_tokens_used_total{kind="prompt",model="gpt-4o",route="openai"} 11`)
	assert.Contains(t, m, `llproxy_prompt_estimate_error_ratio_count{model="gpt-4o",route="openai"} 1`)
}

func TestStreamUsageTheClientAskedForPassesThrough(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(openAIStreamer)
	g := newGateway(t, fmt.Sprintf(settleConfig, "actual"), up.URL, nil)
	body := strings.TrimSuffix(streamBody, "}") + `,"stream_options":{"include_usage":true}}`
	resp := g.post(t, "/openai/v1/chat/completions", body)
	assert.Equal(t, streamLikeOpenAI([]string{"a", " b", " c"}, true), readAll(t, resp))
	assert.Equal(t, body, string(up.requests()[0].Body), "unchanged")
	g.waitLog(t, `"used_tokens":14`)
}

// newBubbleGateway builds the gateway on cfgJSON (with $UPSTREAM) over an
// upstream served in process, for tests inside a synctest bubble, where
// time stands still unless every goroutine waits: bucket levels are exact.
func newBubbleGateway(t *testing.T, cfgJSON string, up http.Handler) (*Server, *prometheus.Registry) {
	t.Helper()
	cfg, err := config.Parse([]byte(strings.ReplaceAll(cfgJSON, "$UPSTREAM", "http://upstream.invalid")), nil)
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(t), Registry: reg,
		Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Transport: mock.HandlerTransport{Handler: up}})
	require.NoError(t, err)
	return srv, reg
}

// bubbleRemaining is the gpt-4o bucket's tokens at the bubble's now.
func bubbleRemaining(srv *Server) int {
	return mustQueue(srv.routes["openai"], "gpt-4o").State(time.Now()).Remaining[scheduler.Tokens]
}

func TestSettleModes(t *testing.T) {
	const reserved = (3 + 1 + 2 + 3) + 1000 // prompt + max_tokens
	for mode, refund := range map[string]int{"actual": reserved - 14, "reserved": 0} {
		t.Run(mode, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				srv, reg := newBubbleGateway(t, fmt.Sprintf(settleConfig, mode), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					body, _ := io.ReadAll(r.Body)
					openAIStreamer(w, r, body)
				}))
				rec := httptest.NewRecorder()
				srv.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions",
					strings.NewReader(strings.Replace(streamBody, `"stream":true,`, "", 1))))
				require.Equal(t, http.StatusOK, rec.Code)
				assert.Equal(t, 100000-reserved+refund, bubbleRemaining(srv), "exactly: no time passed")
				assert.Contains(t, metricsText2(t, reg),
					fmt.Sprintf(`llproxy_tokens_settled_total{direction="refund",model="gpt-4o",route="openai"} %d`, refund))
			})
		})
	}
}

func TestStreamCutShortKeepsItsReservation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv, reg := newBubbleGateway(t, fmt.Sprintf(settleConfig, "actual"), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, `data: {"choices":[{"delta":{"content":"a"}}],"usage":null}`+"\n\n")
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler) // the upstream dies mid-stream
		}))
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(streamBody)))
		const reserved = (3 + 1 + 2 + 3) + 1000
		assert.Equal(t, 100000-reserved, bubbleRemaining(srv), "no usage: the reservation stands, exactly")
		assert.Contains(t, metricsText2(t, reg), `llproxy_tokens_settled_total{direction="refund",model="gpt-4o",route="openai"} 0`)
	})
}

func TestNeverSentGivesEverythingBack(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "retries": 0,
	  "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 5, "rpm": 100, "tpm": 100000}}}}}`, up.URL, nil)
	up.Close()
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusBadGateway, resp.StatusCode)
	g.waitLog(t, `"status":502`)
	st := mustQueue(g.srv.routes["openai"], "gpt-4o").State(time.Now())
	assert.Equal(t, 100000, st.Remaining[scheduler.Tokens])
	assert.Equal(t, 100, st.Remaining[scheduler.Requests])
	assert.Contains(t, metricsText(t, g), `llproxy_tokens_settled_total{direction="unsent",model="gpt-4o",route="openai"} 19`)
}

func TestServerErrorIsRetriedBeforeAnyByte(t *testing.T) {
	up := newUpstream(t)
	var calls atomic.Int32
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		if calls.Add(1) == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `{"error":{"message":"overloaded","type":"server_error"}}`)
			return
		}
		openAILike(w, r, body)
	})
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "retryBackoff": "10ms",
	  "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 5, "rpm": 100, "tpm": 100000}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Len(t, up.requests(), 2)
	assert.Contains(t, metricsText(t, g), `llproxy_upstream_retries_total{model="gpt-4o",reason="server_error",route="openai"} 1`)

	// Out of retries, the client gets the upstream's own answer.
	calls.Store(-100)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, `{"error":{"message":"boom","type":"server_error"}}`)
	})
	resp = g.post(t, "/openai/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusInternalServerError, resp.StatusCode)
	assert.Contains(t, readAll(t, resp), "boom")
	assert.Len(t, up.requests(), 2+3, "one send and two retries")
}

// rateLimited answers like OpenAI over its limit.
func rateLimited(w http.ResponseWriter, retryMs int) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Retry-After-Ms", strconv.Itoa(retryMs))
	h.Set("Retry-After", strconv.Itoa((retryMs+999)/1000))
	h.Set("X-Ratelimit-Remaining-Requests", "0")
	h.Set("X-Ratelimit-Remaining-Tokens", "0")
	w.WriteHeader(http.StatusTooManyRequests)
	io.WriteString(w, `{"error":{"message":"Rate limit reached for gpt-4o in organization org-fake on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.","type":"requests","param":null,"code":"rate_limit_exceeded"}}`)
}

func TestUpstream429WithinBudgetIsRetriedTransparently(t *testing.T) {
	up := newUpstream(t)
	var calls atomic.Int32
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		if calls.Add(1) == 1 {
			rateLimited(w, 200)
			return
		}
		openAILike(w, r, body)
	})
	g := newGateway(t, fmt.Sprintf(settleConfig, "reserved"), up.URL, nil)
	start := time.Now()
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusOK, resp.StatusCode, "the client never sees the upstream's 429")
	assert.GreaterOrEqual(t, time.Since(start), 200*time.Millisecond, "it waited as the upstream asked")
	assert.Len(t, up.requests(), 2)
	m := metricsText(t, g)
	assert.Contains(t, m, `llproxy_upstream_retries_total{model="gpt-4o",reason="rate_limited",route="openai"} 1`)
	assert.Contains(t, m, `llproxy_bucket_lowered_total{model="gpt-4o",route="openai"} 1`, "remaining 0 lowered the buckets")
	assert.Contains(t, m, `llproxy_upstream_ratelimit{field="remaining",model="gpt-4o",resource="tokens",route="openai"} 0`)
	assert.False(t, mustQueue(g.srv.routes["openai"], "gpt-4o").HeldUntil().IsZero(), "the queue was held")
}

func TestUpstream429BeyondBudgetGetsTheGatewaysHonest429(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) { rateLimited(w, 5000) })
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
	  "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 1, "rpm": 100, "tpm": 100000}}}}}`, up.URL, nil)
	start := time.Now()
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Less(t, time.Since(start), time.Second, "answered at once, not after waiting the budget out")
	e := openAIError(t, resp)
	assert.Regexp(t, rateLimitMessage, e.Message)
	assert.NotContains(t, e.Message, "org-fake", "the gateway's own 429")
	ms, _ := strconv.Atoi(resp.Header.Get("Retry-After-Ms"))
	assert.GreaterOrEqual(t, ms, 4900, "honest: not before the upstream's hold ends")
	assert.NotEmpty(t, resp.Header.Get("X-Ratelimit-Remaining-Tokens"))
	assert.Len(t, up.requests(), 1)
	assert.Contains(t, metricsText(t, g), `llproxy_requests_total{model="gpt-4o",outcome="rejected_upstream",route="openai"} 1`)
}

func TestInsufficientQuotaPassesThroughAtOnce(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		io.WriteString(w, `{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}`)
	})
	g := newGateway(t, fmt.Sprintf(settleConfig, "reserved"), up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "insufficient_quota", strOf(openAIError(t, resp).Code))
	assert.Len(t, up.requests(), 1)
}

func TestUpstreamRemainingLowersTheBucket(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		h := w.Header()
		h.Set("X-Ratelimit-Limit-Tokens", "100000")
		h.Set("X-Ratelimit-Remaining-Tokens", "500")
		h.Set("X-Ratelimit-Reset-Tokens", "59.7s")
		openAILike(w, r, body)
	})
	g := newGateway(t, fmt.Sprintf(settleConfig, "reserved"), up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	left := remainingTokens(g)
	assert.GreaterOrEqual(t, left, 500, "another user of the key spent the rest")
	assert.Less(t, left, 5000, "(give or take the refill of the test's own time)")
	m := metricsText(t, g)
	assert.Contains(t, m, `llproxy_upstream_ratelimit{field="remaining",model="gpt-4o",resource="tokens",route="openai"} 500`)
	assert.Contains(t, m, `llproxy_upstream_ratelimit{field="reset_seconds",model="gpt-4o",resource="tokens",route="openai"} 59.7`)
}

func TestDroppedConnectionIsRetried(t *testing.T) {
	up := newUpstream(t)
	var calls atomic.Int32
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		if calls.Add(1) == 1 {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				conn.Close() // the connection breaks before any response
			}
			return
		}
		openAILike(w, r, body)
	})
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "retryBackoff": "10ms",
	  "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 5, "rpm": 100, "tpm": 100000}}}}}`, up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, int32(2), calls.Load())
	assert.Contains(t, metricsText(t, g), `llproxy_upstream_retries_total{model="gpt-4o",reason="connect_error",route="openai"} 1`)
	g.waitLog(t, `"tries":2`)
}

// TestStalePooledConnectionIsSentAgain: a POST that meets a pooled
// connection the upstream closed as idle ("server closed idle
// connection") is sent again on a fresh one, not answered with a 502.
func TestStalePooledConnectionIsSentAgain(t *testing.T) {
	up := newUpstream(t)
	var calls atomic.Int32
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		if calls.Add(1) == 2 {
			// The second request arrives on the first one's pooled
			// connection: closed as idle, with nothing answered.
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.Close()
			}
			return
		}
		openAILike(w, r, body)
	})
	g := newGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "retries": 0,
	  "models": {"gpt-4o": {"maxQueueSize": 10, "maxQueueWait": 5, "rpm": 100, "tpm": 100000}}}}}`, up.URL, nil)
	require.Equal(t, http.StatusOK, g.post(t, "/openai/v1/chat/completions", chatBody).StatusCode)
	resp := g.post(t, "/openai/v1/chat/completions", chatBody)
	assert.Equal(t, http.StatusOK, resp.StatusCode, readAll(t, resp))
	assert.Equal(t, int32(3), calls.Load(), "sent again on a fresh connection")
	for _, s := range up.requests() {
		assert.NotContains(t, s.Header, "X-Idempotency-Key", "the mark is not sent")
	}
}
