package server

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/redistest"
)

// replicaProc is one llproxy process of a test.
type replicaProc struct {
	url  string
	cmd  *exec.Cmd
	logs *syncBuffer
}

// startReplicas runs n llproxy binaries on cfgJSON ($UPSTREAM and $REDIS
// replaced), each with its own directory (state file); env[i], if any, is
// replica i's extra environment.
func startReplicas(t *testing.T, n int, cfgJSON, upstream, redisURL string, env ...[]string) []*replicaProc {
	t.Helper()
	bin := llproxyBinary(t)
	cfgJSON = strings.ReplaceAll(strings.ReplaceAll(cfgJSON, "$UPSTREAM", upstream), "$REDIS", redisURL)
	var out []*replicaProc
	for i := range n {
		dir := t.TempDir()
		path := filepath.Join(dir, "config.json")
		require.NoError(t, os.WriteFile(path, []byte(cfgJSON), 0o600))
		addr := port(t)
		p := &replicaProc{url: "http://" + addr, logs: &syncBuffer{}}
		p.cmd = exec.Command(bin, "-config", path, "-listen", addr)
		p.cmd.Stderr = p.logs
		if i < len(env) {
			p.cmd.Env = append(os.Environ(), env[i]...)
		}
		require.NoError(t, p.cmd.Start())
		t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
		require.Eventually(t, func() bool {
			r, err := http.Get(p.url + "/healthz")
			if err == nil {
				r.Body.Close()
			}
			return err == nil
		}, 10*time.Second, 10*time.Millisecond)
		out = append(out, p)
	}
	return out
}

// chat posts a small chat request with key to a replica.
func chatAt(ctx context.Context, url, key string) (*http.Response, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/openai/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}`))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	return http.DefaultClient.Do(req)
}

// drive sends requests from c goroutines, spread over the replicas, until
// ctx ends, and counts the answers by status.
func drive(ctx context.Context, replicas []*replicaProc, c int, key string) *sync.Map {
	counts := &sync.Map{}
	var wg sync.WaitGroup
	for i := range c {
		wg.Go(func() {
			for n := 0; ctx.Err() == nil; n++ {
				resp, err := chatAt(ctx, replicas[(i+n)%len(replicas)].url, key)
				if ctx.Err() != nil {
					if err == nil {
						resp.Body.Close()
					}
					return
				}
				status := "error"
				if err == nil {
					status = strconv.Itoa(resp.StatusCode)
					if resp.Header.Get("X-Llproxy-Limits") == "local" {
						status += " local"
					}
					resp.Body.Close()
				}
				v, _ := counts.LoadOrStore(status, new(atomic.Int64))
				v.(*atomic.Int64).Add(1)
				if err == nil && resp.StatusCode == http.StatusTooManyRequests {
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	go func() { <-ctx.Done(); wg.Wait(); counts.Store("done", nil) }()
	return counts
}

func count(m *sync.Map, status string) int64 {
	if v, ok := m.Load(status); ok && v != nil {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

func waitDone(t *testing.T, m *sync.Map) {
	require.Eventually(t, func() bool { _, ok := m.Load("done"); return ok }, 20*time.Second, 10*time.Millisecond,
		"no request hangs")
}

const replicasConfig = `{
  "clients": {"a": {"keys": ["ka"]}, "interns": {"keys": ["ki"], "limits": {"*": {"tokensPerDay": 48}}}},
  "shared": {"redis": "$REDIS", "timeout": "1s"},
  "routes": {"openai": {"forward": "$UPSTREAM", "models": {
    "gpt-4o": {"rpm": 600, "tpm": 100000000, "maxQueueSize": 200, "maxQueueWait": 30}}}}
}`

// TestReplicasKeepTheKeysLimits: three replicas (one with its clock 30 s
// ahead) driven above the key's limit admit the key's limit between them,
// within 2%, and the upstream, with the same limits, never says 429.
func TestReplicasKeepTheKeysLimits(t *testing.T) {
	r := redistest.Start(t)
	fake, up := fakeUpstream(t, 600)
	replicas := startReplicas(t, 3, replicasConfig, up.URL, r.URL(), nil, nil, []string{"LLPROXY_CLOCK_OFFSET=30s"})
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	counts := drive(ctx, replicas, 30, "ka")
	<-ctx.Done()
	waitDone(t, counts)
	elapsed := time.Since(start)
	served, limited := fake.counts()
	assert.Zero(t, limited, "the upstream never had to say no")
	// The key's 600 a minute: its full bucket, then 10 a second.
	want := 600 + 10*elapsed.Seconds()
	assert.InEpsilon(t, want, float64(served), 0.02, "admitted %d in %s, the key allows %.0f", served, elapsed, want)
	// Every answer the upstream gave reached its client as a 200, but for
	// those in flight when the drive stopped.
	assert.LessOrEqual(t, count(counts, "200"), int64(served))
	assert.GreaterOrEqual(t, count(counts, "200"), int64(served-30))
	for _, p := range replicas {
		assert.Contains(t, p.logs.String(), `"client":"a"`)
		assert.NotContains(t, p.logs.String(), "degraded")
	}
}

// TestReplicasRedisDownAndBack: Redis dies mid-run. Every replica says so
// (a log line, the metric, x-llproxy-limits: local), enforces half the
// limit, hangs no request; Redis comes back empty and the replicas resume
// from what was spent: the upstream never says 429.
func TestReplicasRedisDownAndBack(t *testing.T) {
	r := redistest.Start(t)
	fake, up := fakeUpstream(t, 600)
	replicas := startReplicas(t, 2, replicasConfig, up.URL, r.URL())
	time.Sleep(1500 * time.Millisecond) // both have said they are alive

	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Second)
	defer cancel()
	counts := drive(ctx, replicas, 10, "ka")
	start := time.Now()
	time.Sleep(2 * time.Second)
	r.Stop()
	stopped := time.Since(start)
	allShow(t, replicas, `llproxy_shared_state{state="degraded"} 1`, "both degraded")
	time.Sleep(2 * time.Second)
	assert.Positive(t, count(counts, "200 local"), "answered with this replica's share, and said so")
	r.Restart()
	restarted := time.Since(start)
	allShow(t, replicas, `llproxy_shared_state{state="ok"} 1`, "both back")
	<-ctx.Done()
	waitDone(t, counts)
	_, limited := fake.counts()
	if !assert.Zero(t, limited, "no burst above the limit, down or back") {
		t.Logf("Redis stopped at %s, restarted at %s", stopped, restarted)
		for _, at := range fake.limitedAt {
			t.Log("upstream 429 at", at.Sub(start))
		}
		for _, p := range replicas {
			for _, l := range strings.Split(p.logs.String(), "\n") {
				if strings.Contains(l, "shared limits") {
					t.Log(l)
				}
			}
		}
	}

	assert.Zero(t, count(counts, "error"), "no request failed or hung")
	for _, p := range replicas {
		assert.Contains(t, p.logs.String(), "shared limits degraded")
		assert.Contains(t, p.logs.String(), "shared limits ok")
	}
}

// allShow waits until every replica's metrics show want.
func allShow(t *testing.T, replicas []*replicaProc, want, what string) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, p := range replicas {
			if !strings.Contains(metricsOf(t, p.url), want) {
				return false
			}
		}
		return true
	}, 5*time.Second, 50*time.Millisecond, what)
}

func metricsOf(t *testing.T, url string) string {
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	return readAll(t, resp)
}

// TestReplicasBudgetAndRetryAfter: a budget spent at one replica is spent
// at the other; a client refused by one replica and retrying after its
// retry-after-ms at another is admitted.
func TestReplicasBudgetAndRetryAfter(t *testing.T) {
	r := redistest.Start(t)
	fake, up := fakeUpstream(t, 600)
	cfg := strings.Replace(replicasConfig, `"rpm": 600, "tpm": 100000000, "maxQueueSize": 200, "maxQueueWait": 30`,
		`"rpm": 60, "tpm": 100000000, "maxQueueSize": 200, "maxQueueWait": 0.5`, 1)
	replicas := startReplicas(t, 2, cfg, up.URL, r.URL())
	a, b := replicas[0].url, replicas[1].url
	ctx := context.Background()

	// Budget: 48 tokens a day; each request reserves 18 and uses 13.
	for range 3 {
		resp, err := chatAt(ctx, a, "ki")
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	// Each settlement reaches Redis just after its answer reached the
	// client: wait for the third.
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(r.Port)})
	defer rdb.Close()
	key := "llproxy:budget:{interns}:*:" + time.Now().UTC().Format("2006-01-02")
	require.Eventually(t, func() bool { n, _ := rdb.Get(ctx, key).Int(); return n == 39 }, 5*time.Second, 5*time.Millisecond)
	resp, err := chatAt(ctx, b, "ki")
	require.NoError(t, err)
	e := openAIError(t, resp)
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	assert.Equal(t, "insufficient_quota", strOf(e.Code), "spent at the other replica")

	// The key's 60 requests (3 went already) at replica a, then a's 429.
	for range 57 {
		resp, err := chatAt(ctx, a, "ka")
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	resp, err = chatAt(ctx, a, "ka")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	retry, err := strconv.Atoi(resp.Header.Get("Retry-After-Ms"))
	require.NoError(t, err)
	assert.InDelta(t, 1000, retry, 200, "one request a second")
	// Replica b has seen none of that, yet answers the same.
	resp, err = chatAt(ctx, b, "ka")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusTooManyRequests, resp.StatusCode, "b learns the shared level")
	bRetry, _ := strconv.Atoi(resp.Header.Get("Retry-After-Ms"))
	assert.InDelta(t, retry, bRetry, 200)
	time.Sleep(time.Duration(bRetry) * time.Millisecond)
	resp, err = chatAt(ctx, b, "ka")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "retried after retry-after-ms at the other replica: admitted")
	_, limited := fake.counts()
	assert.Zero(t, limited)
}

// fakeUpstream is an OpenAI-like upstream limited to rpm requests a minute.
func fakeUpstream(t *testing.T, rpm int) (*fakeOpenAI, *httptest.Server) {
	testTokenizer(t) // the fake counts with it
	fake := newFakeOpenAI(rpm, 100000000, 0)
	// Real processes on a busy machine: requests leave each replica paced
	// exactly by the shared bucket and reach the upstream up to tens of
	// milliseconds apart from that pace. An upstream bucket a few requests
	// deep absorbs it (the limit, the refill, the total are the same).
	fake.slack = 3
	up := httptest.NewServer(fake)
	t.Cleanup(up.Close)
	return fake, up
}

// TestReplicaDeniesWhileRedisIsDown: onRedisDown deny answers 503 in
// OpenAI's shape, says the limits are local, and nothing goes upstream.
func TestReplicaDeniesWhileRedisIsDown(t *testing.T) {
	r := redistest.Start(t)
	fake, up := fakeUpstream(t, 600)
	cfg := strings.Replace(replicasConfig, `"timeout": "1s"`, `"timeout": "1s", "onRedisDown": "deny"`, 1)
	p := startReplicas(t, 1, cfg, up.URL, r.URL())[0]
	resp, err := chatAt(context.Background(), p.url, "ka")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	r.Stop()
	require.Eventually(t, func() bool {
		return strings.Contains(metricsOf(t, p.url), `llproxy_shared_state{state="degraded"} 1`)
	}, 5*time.Second, 20*time.Millisecond)
	resp, err = chatAt(context.Background(), p.url, "ka")
	require.NoError(t, err)
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, "local", resp.Header.Get("X-Llproxy-Limits"))
	e := openAIError(t, resp)
	assert.Equal(t, "limits_unavailable", strOf(e.Code))
	served, _ := fake.counts()
	assert.Equal(t, 1, served)
}

// TestReplicasHearTheUpstreamOnce: two replicas share a key that someone
// else also uses: the upstream's x-ratelimit-remaining-requests says 100
// fewer than llproxy's shared bucket. Twenty requests are in flight at
// once, half through each replica, so every answer is heard after every
// request paid; the shared bucket is lowered by those 100 once (not once
// per replica, nor once per answer).
func TestReplicasHearTheUpstreamOnce(t *testing.T) {
	r := redistest.Start(t)
	var received atomic.Int64
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		n := received.Add(1)
		time.Sleep(300 * time.Millisecond) // all twenty are in flight
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Ratelimit-Limit-Requests", "600")
		w.Header().Set("X-Ratelimit-Remaining-Requests", strconv.FormatInt(600-100-n, 10))
		w.Header().Set("X-Ratelimit-Reset-Requests", "100ms")
		w.Write([]byte(`{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}`))
	}))
	t.Cleanup(up.Close)
	replicas := startReplicas(t, 2, replicasConfig, up.URL, r.URL())
	start := time.Now()
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			resp, err := chatAt(context.Background(), replicas[i%2].url, "ka")
			if assert.NoError(t, err) {
				resp.Body.Close()
				assert.Equal(t, http.StatusOK, resp.StatusCode)
			}
		})
	}
	wg.Wait()
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(r.Port)})
	defer rdb.Close()
	lowered, err := rdb.HGet(context.Background(), "llproxy:{openai/gpt-4o}:req", "w").Float64()
	require.NoError(t, err, "the shared bucket was lowered")
	t.Logf("lowered %.1f", lowered)
	// At most 100 and the bucket's refill while the requests ran (the
	// upstream here never refills; the bucket does, 10 a second); at
	// least 100 less what the other replica's slice held unsent (the
	// observation cannot tell those from requests sent: at most 5% of
	// the bucket), which later answers lower.
	assert.GreaterOrEqual(t, lowered, 100-0.05*600-1, "lowered for the 100 the key's other user spent")
	assert.LessOrEqual(t, lowered, 100+10*time.Since(start).Seconds()+1, "lowered once, not once per replica or answer")
}

// TestReplicasShareByWeight: team heavy (weight 3) sends only to one
// replica and team light (weight 1) only to the other, both backlogged
// beyond the key's 600 rpm. Once the bucket is drained, the upstream
// receives heavy's and light's requests 3:1 (within 10%), not 1:1 as
// their replicas' asking would split it.
func TestReplicasShareByWeight(t *testing.T) {
	r := redistest.Start(t)
	var mu sync.Mutex
	type arrival struct {
		at    time.Time
		heavy bool
	}
	var arrivals []arrival
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		mu.Lock()
		arrivals = append(arrivals, arrival{time.Now(), strings.Contains(string(body), "heavy")})
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}`))
	}))
	t.Cleanup(up.Close)
	cfg := `{
  "clients": {"heavy": {"keys": ["kh"], "weight": 3}, "light": {"keys": ["kl"], "weight": 1}},
  "shared": {"redis": "$REDIS", "timeout": "1s"},
  "routes": {"openai": {"forward": "$UPSTREAM", "models": {
    "gpt-4o": {"rpm": 600, "tpm": 100000000, "maxQueueSize": 200, "maxQueueWait": 60}}}}
}`
	replicas := startReplicas(t, 2, cfg, up.URL, r.URL())
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for i := range 16 {
		url, key, who := replicas[0].url, "kh", "heavy"
		if i%2 == 1 {
			url, key, who = replicas[1].url, "kl", "light"
		}
		wg.Go(func() {
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url+"/openai/v1/chat/completions",
					strings.NewReader(`{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"`+who+`"}]}`))
				req.Header.Set("Authorization", "Bearer "+key)
				resp, err := http.DefaultClient.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		})
	}
	// The first 600 are the full bucket's; then 10 a second, shared.
	start := time.Now()
	time.Sleep(9 * time.Second)
	cancel()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	require.Greater(t, len(arrivals), 600)
	heavy, all := 0, 0
	for _, a := range arrivals[600:] {
		if a.at.Sub(start) < 2*time.Second {
			continue // the burst's tail
		}
		all++
		if a.heavy {
			heavy++
		}
	}
	require.Greater(t, all, 40, "the key's 10 a second after the burst")
	share := float64(heavy) / float64(all)
	t.Logf("after the burst: %d requests, heavy's share %.3f", all, share)
	assert.InDelta(t, 0.75, share, 0.075, "3:1 by weight")
}
