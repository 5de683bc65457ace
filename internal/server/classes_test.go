package server

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// classesConfig: search (interactive) and evals (batch) share gpt-4o,
// whose interactive requests may not wait (maxQueueWait 0) while batch
// ones wait up to an hour.
const classesConfig = `{
  "clients": {"search": {"keys": ["sk"], "weight": 3}, "evals": {"keys": ["ek"], "class": "batch"}},
  "routes": {"openai": {"forward": "$UPSTREAM", "settle": "reserved", "models": {
    "gpt-4o": {"rpm": 100000, "tpm": 6000, "maxQueueSize": 10, "maxQueueWait": %s, "batchHeadroom": 0.2}}}}}`

// sendAs posts a chat request of about cost tokens into srv as key, with
// extra headers.
func sendAs(srv http.Handler, key string, maxTokens int, headers ...string) *httptest.ResponseRecorder {
	body := fmt.Sprintf(`{"model":"gpt-4o","max_tokens":%d,"messages":[{"role":"user","content":"hi"}]}`, maxTokens)
	req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	return rec
}

// A batch client's requests wait for what interactive ones leave: with
// the bucket drained by a batch backlog, an interactive request finds the
// headroom at once; a request lowered to batch by its header waits with
// the batch ones instead of getting the interactive 429; a batch client
// cannot raise itself; an unknown class is a 400.
func TestClassesEndToEnd(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv, reg := newBubbleGateway(t, fmt.Sprintf(classesConfig, "0"), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			openAILike(w, r, nil)
		}))
		var wg sync.WaitGroup
		codes := make(chan int, 20)
		for range 20 { // 20 × ~1000 tokens: 20 s of refill beyond the bucket
			wg.Add(1)
			go func() {
				defer wg.Done()
				codes <- sendAs(srv, "ek", 1000).Code
			}()
		}
		time.Sleep(time.Second)
		st := mustQueue(srv.routes["openai"], "gpt-4o").Stats(time.Now())
		assert.Positive(t, st.DepthBy[1], "batch requests wait")
		assert.GreaterOrEqual(t, st.Remaining[1], 0.2*6000-1000, "and leave the headroom")

		rec := sendAs(srv, "sk", 500)
		assert.Equal(t, http.StatusOK, rec.Code, "the interactive request finds the headroom at once: %s", rec.Body.String())

		rec = sendAs(srv, "sk", 5000)
		assert.Equal(t, http.StatusTooManyRequests, rec.Code, "interactive may not wait here")
		assert.Contains(t, rec.Body.String(), "the model's maxQueueWait (0s)")

		start := time.Now()
		rec = sendAs(srv, "sk", 1000, "X-Llproxy-Class", "Batch")
		assert.Equal(t, http.StatusOK, rec.Code, "lowered to batch: it waits with them")
		assert.Greater(t, time.Since(start), time.Second)

		rec = sendAs(srv, "ek", 10, "X-Llproxy-Class", "interactive")
		assert.Equal(t, http.StatusOK, rec.Code)
		rec = sendAs(srv, "sk", 10, "X-Llproxy-Class", "urgent")
		assert.Equal(t, http.StatusBadRequest, rec.Code)
		assert.Contains(t, rec.Body.String(), "use interactive or batch")

		wg.Wait()
		close(codes)
		for c := range codes {
			assert.Equal(t, http.StatusOK, c)
		}
		state := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodGet, "/ui/state", nil)
		req.Header.Set("Authorization", "Bearer sk")
		srv.ServeHTTP(state, req)
		assert.Contains(t, state.Body.String(), `{"class":"batch","waiting":0,"admittedPerSecond":`)
		assert.Contains(t, state.Body.String(), `"batchHeadroom":0.2`)
		m := metricsText2(t, reg)
		assert.Contains(t, m, `llproxy_class_admitted_total{class="batch",model="gpt-4o",route="openai"} 22`,
			"20 of evals, one lowered, one evals that asked to be interactive")
		assert.Contains(t, m, `llproxy_class_admitted_total{class="interactive",model="gpt-4o",route="openai"} 1`)
		assert.Contains(t, m, `llproxy_queue_depth{class="batch",model="gpt-4o",route="openai"} 0`)
	})
}

// x-llproxy-max-wait lowers a request's wait limit and the 429 says it
// was the request's; a value above the limit is clamped to it; a bad one
// is a 400.
func TestRequestMaxWaitHeader(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv, _ := newBubbleGateway(t, fmt.Sprintf(classesConfig, "30"), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			openAILike(w, r, nil)
		}))
		require.Equal(t, http.StatusOK, sendAs(srv, "sk", 5900).Code) // drained
		rec := sendAs(srv, "sk", 1000, "X-Llproxy-Max-Wait", "2.5")
		assert.Equal(t, http.StatusTooManyRequests, rec.Code)
		assert.Contains(t, rec.Body.String(), "the request's x-llproxy-max-wait (2.5s)")
		rec = sendAs(srv, "sk", 5000, "X-Llproxy-Max-Wait", "10m")
		assert.Equal(t, http.StatusTooManyRequests, rec.Code)
		assert.Contains(t, rec.Body.String(), "the model's maxQueueWait (30s)", "clamped to the model's")
		start := time.Now()
		rec = sendAs(srv, "sk", 500, "X-Llproxy-Max-Wait", "20s")
		assert.Equal(t, http.StatusOK, rec.Code)
		assert.Greater(t, time.Since(start), time.Second, "it waited, within its 20 s")
		for _, bad := range []string{"-1", "soon", "NaN"} {
			rec = sendAs(srv, "sk", 10, "X-Llproxy-Max-Wait", bad)
			assert.Equal(t, http.StatusBadRequest, rec.Code, bad)
			assert.Contains(t, rec.Body.String(), "x-llproxy-max-wait")
		}
	})
}

// /clients shows each client's class and what it has waiting by class.
func TestClientsShowClasses(t *testing.T) {
	up := newUpstream(t)
	g := newGateway(t, fmt.Sprintf(classesConfig, "0"), up.URL, nil)
	req, _ := http.NewRequest(http.MethodGet, g.URL+"/clients", nil)
	req.Header.Set("Authorization", "Bearer sk")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	var out struct {
		Clients []struct {
			Name    string
			Class   string
			ByClass map[string]int `json:"waitingByClass"`
		}
	}
	require.NoError(t, json.Unmarshal([]byte(readAll(t, resp)), &out))
	classes := map[string]string{}
	for _, c := range out.Clients {
		classes[c.Name] = c.Class
		assert.Contains(t, c.ByClass, "batch")
	}
	assert.Equal(t, map[string]string{"evals": "batch", "search": "interactive"}, classes)
}

// The real binary, a batch job of 500 requests and interactive users at
// the same time: no interactive request waits longer than one batch
// request's service time (the refill of its cost) plus its own cost's,
// as the gateway measured and logged each wait.
func TestBatchJobAndInteractiveUsersOnTheBinary(t *testing.T) {
	bin := llproxyBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.json")
	// 25,000 tokens a second: a batch request (~1,000) is 40 ms of
	// refill, an interactive one (~200) 8 ms. No headroom: the bound is
	// the scheduling's alone.
	require.NoError(t, os.WriteFile(cfg, []byte(`{
	  "clients": {"users": {"keys": ["uk"]}, "job": {"keys": ["jk"], "class": "batch"}},
	  "routes": {"demo": {"provider": "mock", "mock": {"chunks": 4}, "settle": "reserved", "models": {"*": {
	    "rpm": 100000000, "tpm": 1500000, "maxQueueSize": 1000, "maxQueueWait": 60, "batchHeadroom": 0}}}}}`), 0o600))
	base, _, logs := startBinary(t, bin, cfg)
	post := func(key string, maxTokens int) int {
		body := fmt.Sprintf(`{"model":"mock","max_tokens":%d,"messages":[{"role":"user","content":"hi"}]}`, maxTokens)
		req, _ := http.NewRequest(http.MethodPost, base+"/demo/v1/chat/completions", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	// Drain the bucket, then the job: 500 requests at once.
	require.Equal(t, http.StatusOK, post("uk", 1499000))
	var wg sync.WaitGroup
	for range 500 {
		wg.Add(1)
		go func() { defer wg.Done(); post("jk", 990) }()
	}
	time.Sleep(200 * time.Millisecond)
	for range 40 { // users, one every 250 ms while the job runs (20 s)
		assert.Equal(t, http.StatusOK, post("uk", 190))
		time.Sleep(250 * time.Millisecond)
	}
	wg.Wait()
	var waits []float64
	for _, line := range strings.Split(logs.String(), "\n") {
		var l struct {
			Msg, Client, Class string
			Wait               float64 `json:"wait_ms"`
		}
		if json.Unmarshal([]byte(line), &l) == nil && l.Msg == "request" && l.Client == "users" {
			waits = append(waits, l.Wait)
		}
	}
	require.Len(t, waits, 41)
	sort.Float64s(waits)
	p99 := waits[len(waits)*99/100]
	t.Logf("interactive waits while the job ran: median %.2f ms, p99 %.2f ms, max %.2f ms", waits[len(waits)/2], p99, waits[len(waits)-1])
	// The bound is one batch request's refill plus its own, 48 ms; the
	// process's own scheduling on a loaded machine may add a little (the
	// waits are the gateway's, measured in the gateway, on the clock).
	assert.LessOrEqual(t, p99, 48.0+12.0, "interactive p99 wait %.1f ms: one batch request's refill plus its own", p99)
	assert.Contains(t, logs.String(), `"class":"batch"`, "the class is on every log line")
}
