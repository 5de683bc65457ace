package server

import (
	"fmt"
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

	"github.com/llproxy/llproxy/internal/models"
)

// claudeFactor is the learned factor of the claude route's model.
func claudeFactor(srv *Server, model string) float64 {
	f := 0.0
	srv.routes["claude"].Models(func(ms *models.Model) {
		if ms.Queue.Model() == model && ms.Factor != nil {
			f = ms.Factor.Value()
		}
	})
	return f
}

// sendClaude posts a Messages body into srv as client key and returns the
// recorded answer.
func sendClaude(srv *Server, key, path, body string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
	req.Header.Set("X-Api-Key", key)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Anthropic-Version", "2023-06-01")
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	return rec
}

// words is a prompt of n distinct-ish words.
func words(n, seed int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "w%d ", (i*7+seed)%97)
	}
	return b.String()
}

// Three buckets, a mixed workload (small and large prompts, streams and
// not, two teams), slow answers and concurrent admissions: the upstream's
// buckets are never overrun; the factor converges to Claude's ratio
// within 5% within the first 20 answers, and from then on the upstream
// refuses nothing.
func TestThreeBucketsAreNeverOverrun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newClaudeUpstream(t, 60, 12000, 3000)
		up.ratio, up.output, up.delay = 1.35, 150, 3*time.Second
		srv, _ := newBubbleGateway(t, fmt.Sprintf(claudeConfig, 60, 12000, 3000, 3600), up)
		var wg sync.WaitGroup
		var mu sync.Mutex
		codes := map[int]int{}
		send := func(i int) {
			defer wg.Done()
			key := []string{"key-a", "key-b"}[i%2]
			stream := ""
			if i%3 == 0 {
				stream = `,"stream":true`
			}
			body := fmt.Sprintf(`{"model":"claude-sonnet-4-5","max_tokens":%d,"messages":[{"role":"user","content":%q}]%s}`,
				200+i%4*50, words(100+i%5*300, i), stream)
			rec := sendClaude(srv, key, "/claude/v1/messages", body)
			io.Copy(io.Discard, rec.Body)
			mu.Lock()
			codes[rec.Code]++
			mu.Unlock()
		}
		// The first 20, one after another: the factor learns.
		for i := range 20 {
			wg.Add(1)
			send(i)
		}
		assert.InDelta(t, 1.35, claudeFactor(srv, "claude-sonnet-4-5"), 1.35*0.05, "converged in 20 answers")
		refusedBefore, _, _ := up.stats()
		// Then 80 at once.
		for i := 20; i < 100; i++ {
			wg.Add(1)
			go send(i)
		}
		wg.Wait()
		refused, answered, overrun := up.stats()
		assert.False(t, overrun, "no bucket of the upstream went below zero")
		assert.Equal(t, refusedBefore, refused, "no upstream 429 once the factor converged")
		assert.Equal(t, map[int]int{http.StatusOK: 100}, codes)
		assert.Equal(t, 100, answered)
	})
}

// A prompt whose system block is cached costs its cached part once: the
// gateway learns the prefix from the first answer, and the next requests,
// reading it from the cache, are admitted at the rate the uncached rest
// allows, not as if they paid for the whole prompt each.
func TestCachedPromptsAreAdmittedAtTheirUncachedRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newClaudeUpstream(t, 600, 30000, 100000)
		up.ratio, up.output, up.delay = 1.2, 10, 10*time.Second
		srv, _ := newBubbleGateway(t, fmt.Sprintf(claudeConfig, 600, 30000, 100000, 3600), up)
		system := words(3500, 1)
		body := func(i int) string {
			return fmt.Sprintf(`{"model":"claude-sonnet-4-5","max_tokens":10,"system":[{"type":"text","text":%q,"cache_control":{"type":"ephemeral"}}],`+
				`"messages":[{"role":"user","content":"question %d: what is in the text?"}]}`, system, i)
		}
		require.Equal(t, http.StatusOK, sendClaude(srv, "key-a", "/claude/v1/messages", body(0)).Code)
		start := time.Now()
		var wg sync.WaitGroup
		for i := 1; i <= 30; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				assert.Equal(t, http.StatusOK, sendClaude(srv, "key-b", "/claude/v1/messages", body(i)).Code)
			}()
		}
		wg.Wait()
		assert.Equal(t, 10*time.Second, time.Since(start), "all 30 ran at once: each reserved only its uncached part")
		refused, _, overrun := up.stats()
		assert.Zero(t, refused)
		assert.False(t, overrun)
	})
}

// An overloaded error in the middle of a stream reaches the client, ends
// its stream cleanly, and settles what was used: the input message_start
// reported, the output relayed.
func TestMidStreamErrorSettlesWhatWasUsed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newClaudeUpstream(t, 60, 30000, 8000)
		up.streamError = true
		srv, _ := newBubbleGateway(t, fmt.Sprintf(claudeConfig, 60, 30000, 8000, 60), up)
		rec := sendClaude(srv, "key-a", "/claude/v1/messages", fmt.Sprintf(claudeBody, 1000, `,"stream":true`))
		assert.Equal(t, http.StatusOK, rec.Code)
		assert.Contains(t, rec.Body.String(), "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"")
		q := mustQueue(srv.routes["claude"], "claude-sonnet-4-5")
		st := q.Stats(time.Now())
		assert.InDelta(t, 8000.0-1000, st.Remaining[3], 1, "the output bucket keeps the reservation")
		left := 0
		for _, c := range srv.dir.All() {
			if c.Name == "a" {
				for _, u := range c.Today(time.Now()) {
					left += int(u.Used)
				}
			}
		}
		assert.Positive(t, left, "the client's use counts the input and the output relayed")
		assert.Less(t, left, 1000, "not the whole reservation")
	})
}

// The upstream's 429 (retry-after) and 529 overloaded are retried within
// the client's deadline: the client gets the answer.
func TestUpstreamRefusalsAreRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newClaudeUpstream(t, 60, 30000, 8000)
		var mu sync.Mutex
		calls := 0
		srv, _ := newBubbleGateway(t, fmt.Sprintf(claudeConfig, 60, 30000, 8000, 60), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			calls++
			n := calls
			mu.Unlock()
			switch n {
			case 1:
				w.Header().Set("Retry-After", "2")
				claudeError(w, http.StatusTooManyRequests, "rate_limit_error", "slow down")
			case 2:
				claudeError(w, 529, "overloaded_error", "Overloaded")
			default:
				up.ServeHTTP(w, r)
			}
		}))
		start := time.Now()
		rec := sendClaude(srv, "key-a", "/claude/v1/messages", fmt.Sprintf(claudeBody, 100, ""))
		assert.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
		assert.Equal(t, 3, calls)
		assert.GreaterOrEqual(t, time.Since(start), 2*time.Second, "the retry-after was waited out")
	})
}

// count_tokens passes through, within its own limit (countTokensRpm 2,
// here with no wait allowed), and teaches the model's factor.
func TestCountTokensPassesAndTeaches(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newClaudeUpstream(t, 60, 30000, 8000)
		up.ratio = 1.5
		srv, reg := newBubbleGateway(t, fmt.Sprintf(claudeConfig, 60, 30000, 8000, 0), up)
		body := `{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"` + words(400, 3) + `"}]}`
		for range 2 {
			rec := sendClaude(srv, "key-a", "/claude/v1/messages/count_tokens", body)
			require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
			assert.Contains(t, rec.Body.String(), `"input_tokens":`)
		}
		assert.Greater(t, claudeFactor(srv, "claude-sonnet-4-5"), 1.4, "learned from the counts")
		rec := sendClaude(srv, "key-a", "/claude/v1/messages/count_tokens", body)
		assert.Equal(t, http.StatusTooManyRequests, rec.Code, "its own limit: 2 a minute")
		assert.Contains(t, rec.Body.String(), `"rate_limit_error"`)
		// The model's own buckets paid nothing for them.
		st := mustQueue(srv.routes["claude"], "claude-sonnet-4-5").State(time.Now())
		assert.Equal(t, 60, st.Remaining[0])
		assert.Contains(t, metricsText2(t, reg), `llproxy_estimate_factor{model="claude-sonnet-4-5",route="claude"}`)
	})
}

// At the root, /v1/messages goes to the route that speaks the Messages API
// for the body's model, even where an OpenAI route takes any model.
func TestRootRoutesMessagesToAnthropic(t *testing.T) {
	up := newClaudeUpstream(t, 50, 30000, 8000)
	claude := httptest.NewServer(up)
	t.Cleanup(claude.Close)
	openai := newUpstream(t)
	g := newGateway(t, `{
	  "clientKeys": ["k"],
	  "routes": {
	    "openai": {"forward": "`+openai.URL+`", "models": {"*": {"rpm": 100, "tpm": 100000}}},
	    "claude": {"forward": "$UPSTREAM", "provider": "anthropic", "apiKey": "sk-ant-route",
	      "models": {"*": {"rpm": 50, "itpm": 30000, "otpm": 8000}}}}}`, claude.URL, nil)
	resp := g.post(t, "/v1/messages", fmt.Sprintf(claudeBody, 50, ""), "X-Api-Key", "k")
	assert.Equal(t, http.StatusOK, resp.StatusCode, readAll(t, resp))
	assert.NotEmpty(t, resp.Header.Get("Anthropic-Ratelimit-Requests-Limit"))
	assert.Empty(t, openai.requests(), "not the OpenAI route")
	resp = g.post(t, "/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`, "Authorization", "Bearer k")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Len(t, openai.requests(), 1, "chat completions stay on the OpenAI route")
	resp = g.post(t, "/v1/messages", `{"max_tokens":5,"messages":[]}`, "X-Api-Key", "k")
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	typ, _ := anthropicError(t, resp)
	assert.Equal(t, "invalid_request_error", typ, "the root answers a Messages call in Anthropic's shape")
}
