package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
)

const budgetConfig = `{
  "clients": {"interns": {"keys": ["ik"], "limits": {"*": {"tokensPerDay": %d}}}},
  "routes": {"openai": {"forward": "$UPSTREAM", "models": {
    "*": {"rpm": 6000, "tpm": 100000000, "maxQueueSize": 50, "maxQueueWait": 60}}}}
}`

// budgetUsed is the client's use of its "*" budget, as /metrics says.
func budgetUsed(t *testing.T, g *gateway, client string) int {
	t.Helper()
	m := regexp.MustCompile(`llproxy_client_budget_used_tokens\{client="` + client + `",model="\*"\} (\d+)`).
		FindStringSubmatch(metricsText(t, g))
	require.NotNil(t, m, "no budget series for %s", client)
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestCutStreamChargesWhatWasRelayed: a client that cuts a stream just
// before its end is charged its counted prompt plus the output relayed so
// far, not nothing.
func TestCutStreamChargesWhatWasRelayed(t *testing.T) {
	const chunks = 10
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Content-Type", "text/event-stream")
		for i := range chunks {
			fmt.Fprintf(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"w%d\"}}],\"usage\":null}\n\n", i)
			w.(http.Flusher).Flush()
		}
		<-r.Context().Done() // the usage chunk and [DONE] never come: the client leaves first
	})
	g := newGateway(t, fmt.Sprintf(budgetConfig, 1_000_000), up.URL, nil)
	const streams = 5
	for range streams {
		ctx, cancel := context.WithCancel(context.Background())
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, g.URL+"/openai/v1/chat/completions",
			strings.NewReader(`{"model":"gpt-4o","stream":true,"max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer ik")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		br := bufio.NewReader(resp.Body)
		for seen := 0; seen < chunks-1; { // 90% of the stream, then gone
			line, err := br.ReadString('\n')
			require.NoError(t, err)
			if strings.HasPrefix(line, "data:") {
				seen++
			}
		}
		cancel()
		resp.Body.Close()
	}
	require.Eventually(t, func() bool { return strings.Count(g.logs.String(), `"outcome":"aborted"`) == streams },
		5*time.Second, time.Millisecond)
	prompt := 8 // the chat above, counted as the log says
	require.Contains(t, g.logs.String(), `"prompt_tokens":8`)
	used := budgetUsed(t, g, "interns")
	assert.GreaterOrEqual(t, used, streams*(prompt+chunks-1), "each cut stream is charged its prompt and what it got")
	assert.LessOrEqual(t, used, streams*(prompt+chunks), "and not its reservation")
}

// TestOneRequestCannotSpendBeyondTheBudget: a request whose reservation
// does not fit the budget is refused before anything is sent; one that
// fits only once requests in flight settle gets a retryable 429.
func TestOneRequestCannotSpendBeyondTheBudget(t *testing.T) {
	up := newUpstream(t)
	release := make(chan struct{})
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		if strings.Contains(string(body), `"slow"`) {
			<-release
		}
		openAILike(w, r, body)
	})
	g := newGateway(t, fmt.Sprintf(budgetConfig, 1000), up.URL, nil)
	resp := g.post(t, "/openai/v1/chat/completions",
		`{"model":"gpt-4o","max_tokens":999000,"n":10,"messages":[{"role":"user","content":"hi"}]}`, bearer("ik")...)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "false", resp.Header.Get("X-Should-Retry"))
	e := openAIError(t, resp)
	assert.Equal(t, "insufficient_quota", strOf(e.Code))
	assert.Contains(t, e.Message, "interns")
	assert.Empty(t, up.requests(), "nothing forwarded")

	// 600 held by a request in flight; 500 more would fit the budget
	// but not beside it.
	done := make(chan *http.Response)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, g.URL+"/openai/v1/chat/completions",
			strings.NewReader(`{"model":"gpt-4o","user":"slow","max_tokens":592,"messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer ik")
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			panic(err)
		}
		done <- r
	}()
	require.Eventually(t, func() bool { return len(up.requests()) == 1 }, 5*time.Second, time.Millisecond)
	resp = g.post(t, "/openai/v1/chat/completions",
		`{"model":"gpt-4o","max_tokens":492,"messages":[{"role":"user","content":"hi"}]}`, bearer("ik")...)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "1", resp.Header.Get("Retry-After"))
	assert.NotEqual(t, "false", resp.Header.Get("X-Should-Retry"))
	e = openAIError(t, resp)
	assert.Equal(t, "budget_reserved", strOf(e.Code))
	close(release)
	r := <-done
	r.Body.Close()
	require.Equal(t, http.StatusOK, r.StatusCode)
	// It settled for 6: now the 500 fits.
	require.Eventually(t, func() bool { return budgetUsed(t, g, "interns") == 6 }, 5*time.Second, time.Millisecond)
	resp = g.post(t, "/openai/v1/chat/completions",
		`{"model":"gpt-4o","max_tokens":492,"messages":[{"role":"user","content":"hi"}]}`, bearer("ik")...)
	assert.Equal(t, http.StatusOK, resp.StatusCode)
}

// TestWildcardBudgetCoversEveryModelOnce: a "*" budget is one budget
// across every model it covers; a new model name is not a fresh budget.
func TestWildcardBudgetCoversEveryModelOnce(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, fmt.Sprintf(budgetConfig, 40), up.URL, nil)
	ok := 0
	for i := range 6 {
		body := fmt.Sprintf(`{"model":"alias-%d","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`, i)
		resp := g.post(t, "/openai/v1/chat/completions", body, bearer("ik")...)
		if resp.StatusCode == http.StatusOK {
			ok++
			continue
		}
		require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
		assert.Equal(t, "insufficient_quota", strOf(openAIError(t, resp).Code))
	}
	// Each uses 6 and reserves 13: 0, 6, 12, 18, 24 fit (+13 <= 40); 30 does not.
	assert.Equal(t, 5, ok)
	assert.Equal(t, 30, budgetUsed(t, g, "interns"), "one total over six model names")
	assert.Len(t, up.requests(), 5)
}

// TestStateFileTroubleShowsInHealthz: a state file that can no longer be
// written is reported by /healthz (today's use would not survive a
// restart), and a second gateway on the same file does not start.
func TestStateFileTroubleShowsInHealthz(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	require.NoError(t, os.MkdirAll(dir, 0o700))
	cfg := strings.Replace(fmt.Sprintf(budgetConfig, 1000), `"clients"`, `"stateFile": "`+filepath.Join(dir, "state.json")+`", "clients"`, 1)
	g := newGateway(t, cfg, "http://127.0.0.1:1", nil)
	health := func() (int, string) {
		resp, err := http.Get(g.URL + "/healthz")
		require.NoError(t, err)
		defer resp.Body.Close()
		return resp.StatusCode, readAll(t, resp)
	}
	_, body := health()
	assert.Contains(t, body, `"ok"`)

	parsed, err := config.Parse([]byte(strings.ReplaceAll(cfg, "$UPSTREAM", "http://127.0.0.1:1")), nil)
	require.NoError(t, err)
	_, err = New(Options{Config: parsed, Tokenizer: testTokenizer(t), Registry: prometheus.NewRegistry(),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.Error(t, err, "a second gateway on the same state file")
	assert.Contains(t, err.Error(), "another llproxy")

	require.NoError(t, os.RemoveAll(dir))
	g.srv.SaveState()
	status, body := health()
	assert.Equal(t, http.StatusOK, status, "still serving")
	assert.Contains(t, body, `"status":"degraded"`)
	assert.Contains(t, body, `"stateFile"`)
}
