package server

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestClientsOwnMaxQueueWaitLastsAfterAdmission: a team's own
// maxQueueWait, longer than the model's, is the deadline of everything the
// request waits for after admission too: an upstream 429 that asks for
// 100 ms is waited out, not answered with a 429.
func TestClientsOwnMaxQueueWaitLastsAfterAdmission(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		calls := 0
		srv, _ := newBubbleGateway(t, `{
		  "clients": {"batch": {"keys": ["bk"], "limits": {"gpt-4o": {"maxQueueWait": 60}}}},
		  "routes": {"openai": {"forward": "$UPSTREAM", "models": {
		    "gpt-4o": {"rpm": 2, "tpm": 100000, "maxQueueSize": 10, "maxQueueWait": 0.5}}}}}`,
			http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				mu.Lock()
				calls++
				n := calls
				mu.Unlock()
				if n == 3 {
					rateLimited(w, 100)
					return
				}
				openAILike(w, r, body)
			}))
		send := func() *httptest.ResponseRecorder {
			req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(chatBody))
			req.Header.Set("Authorization", "Bearer bk")
			rec := httptest.NewRecorder()
			srv.ServeHTTP(rec, req)
			return rec
		}
		require.Equal(t, http.StatusOK, send().Code)
		require.Equal(t, http.StatusOK, send().Code)
		start := time.Now()
		rec := send() // waits 30 s for the request bucket, then meets the upstream's 429
		assert.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		assert.GreaterOrEqual(t, time.Since(start), 30*time.Second, "it waited in the queue past the model's 0.5 s")
		assert.Equal(t, 4, calls, "the 429 was waited out and the request sent again")
	})
}

// TestUpstream429InThePastBacksOffAndIsBounded: an upstream that keeps
// answering 429 with a Retry-After date in the past gets 1 + retries sends
// of one request, each after the retry's backoff, and the client the
// gateway's own 429.
func TestUpstream429InThePastBacksOffAndIsBounded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var mu sync.Mutex
		var at []time.Time
		srv, reg := newBubbleGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "retries": 2, "retryBackoff": "250ms",
		  "models": {"gpt-4o": {"rpm": 600, "tpm": 100000, "maxQueueSize": 10, "maxQueueWait": 30}}}}}`,
			http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				at = append(at, time.Now())
				mu.Unlock()
				h := w.Header()
				h.Set("Content-Type", "application/json")
				h.Set("Retry-After", time.Now().Add(-time.Hour).UTC().Format(http.TimeFormat))
				w.WriteHeader(http.StatusTooManyRequests)
				io.WriteString(w, `{"error":{"message":"Rate limit reached in organization org-fake","type":"requests","param":null,"code":"rate_limit_exceeded"}}`)
			}))
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(chatBody)))
		require.Equal(t, http.StatusTooManyRequests, rec.Code)
		assert.NotContains(t, rec.Body.String(), "org-fake", "the gateway's own 429, not the upstream's")
		assert.NotEmpty(t, rec.Header().Get("Retry-After"))
		require.Len(t, at, 3, "1 + retries sends, whatever the headers say")
		assert.GreaterOrEqual(t, at[1].Sub(at[0]), 250*3/4*time.Millisecond, "the first retry backs off")
		assert.GreaterOrEqual(t, at[2].Sub(at[1]), 500*3/4*time.Millisecond, "the second backs off twice as long")
		assert.Contains(t, metricsText2(t, reg), `llproxy_requests_total{model="gpt-4o",outcome="rejected_upstream",route="openai"} 1`)
	})
}

// TestCancelledDuringARequeueIsCounted: a request whose client leaves
// while it waits again after an upstream 429 is counted as cancelled, once,
// where it is logged.
func TestCancelledDuringARequeueIsCounted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv, reg := newBubbleGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM",
		  "models": {"gpt-4o": {"rpm": 600, "tpm": 100000, "maxQueueSize": 10, "maxQueueWait": 30}}}}}`,
			http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { rateLimited(w, 10000) }))
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(chatBody)).WithContext(ctx)
			srv.ServeHTTP(httptest.NewRecorder(), req)
		}()
		time.Sleep(time.Second) // held 10 s by the upstream's 429: it waits at the head of the queue
		cancel()
		<-done
		m := metricsText2(t, reg)
		assert.Contains(t, m, `llproxy_requests_total{model="gpt-4o",outcome="cancelled",route="openai"} 1`)
		assert.Contains(t, m, `llproxy_requests_total{model="gpt-4o",outcome="admitted",route="openai"} 1`)
		assert.Contains(t, m, `llproxy_client_requests_total{client="anonymous",outcome="cancelled",route="openai"} 1`)
	})
}
