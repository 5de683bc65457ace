package server

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The scenarios run the gateway in front of fakeOpenAI inside a synctest
// bubble: the upstream is served in-process (handlerTransport), so minutes
// of traffic take milliseconds and every timer is exact.

// scenario is one run's tally, as the clients saw it.
type scenario struct {
	mu             sync.Mutex
	ok             []time.Duration // when each success completed, since start
	gatewayLimited int             // the gateway's own 429s (queueing said no)
	upstreamLeaked int             // upstream 429s that reached a client
}

// scenarioRequest costs about 100 prompt tokens + 100 max_tokens.
var scenarioRequest = `{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"` +
	strings.Repeat("The quick brown fox jumps over the lazy dog. ", 9) + `"}]}`

func newScenarioGateway(t *testing.T, up http.Handler, model string) *Server {
	t.Helper()
	srv, _ := newScenarioGatewayReg(t, up, model)
	return srv
}

func newScenarioGatewayReg(t *testing.T, up http.Handler, model string) (*Server, *prometheus.Registry) {
	t.Helper()
	return newBubbleGateway(t, `{"routes": {"openai": {"forward": "$UPSTREAM", "settle": "reserved",
	  "models": {"gpt-4o": `+model+`}}}}`, up)
}

// client sends requests back to back until end, waiting out every 429 as
// the SDKs do (retry-after-ms), and tallies what it saw.
func (sc *scenario) client(srv *Server, start, end time.Time) {
	for time.Now().Before(end) {
		req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(scenarioRequest))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		sc.mu.Lock()
		switch rec.Code {
		case http.StatusOK:
			sc.ok = append(sc.ok, time.Since(start))
		case http.StatusTooManyRequests:
			if strings.Contains(rec.Body.String(), "org-fake") {
				sc.upstreamLeaked++
			} else {
				sc.gatewayLimited++
			}
		}
		sc.mu.Unlock()
		if rec.Code == http.StatusTooManyRequests {
			ms, _ := strconv.Atoi(rec.Header().Get("Retry-After-Ms"))
			time.Sleep(time.Duration(ms) * time.Millisecond)
		}
	}
}

// clients starts n clients that run until end; wait with wg.
func (sc *scenario) clients(wg *sync.WaitGroup, n int, srv *Server, start, end time.Time) {
	for range n {
		wg.Go(func() { sc.client(srv, start, end) })
	}
}

// rate is the successes per minute completed in [from, to).
func (sc *scenario) rate(from, to time.Duration) float64 {
	n := 0
	for _, at := range sc.ok {
		if at >= from && at < to {
			n++
		}
	}
	return float64(n) / (to - from).Minutes()
}

// TestScenarioAloneWithMatchingLimits: the gateway alone in front of the
// upstream, configured with the upstream's own limits. No upstream 429
// reaches a client, and the admitted throughput stays within 5% of the
// limit (tpm 6000 at ~200 tokens a request: ~30 a minute).
func TestScenarioAloneWithMatchingLimits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newFakeOpenAI(60, 6000, 300*time.Millisecond)
		srv := newScenarioGateway(t, up, `{"maxQueueSize": 8, "maxQueueWait": 30, "rpm": 60, "tpm": 6000, "defaultMaxTokens": 100}`)
		start := time.Now()
		end := start.Add(10 * time.Minute)
		sc := &scenario{}
		var wg sync.WaitGroup
		sc.clients(&wg, 12, srv, start, end)
		wg.Wait()

		_, limited := up.counts()
		assert.Zero(t, sc.upstreamLeaked, "no upstream 429 reaches a client")
		assert.Zero(t, limited, "with matching limits the upstream never has to say no")
		perRequest := 6000.0 / float64(requestCostAtFake(t))
		got := sc.rate(2*time.Minute, 10*time.Minute)
		assert.InEpsilon(t, perRequest, got, 0.05, "steady-state throughput %.1f/min vs limit %.1f/min", got, perRequest)
		assert.Positive(t, sc.gatewayLimited, "the overload was turned away by the gateway, honestly")
	})
}

// TestScenarioAnotherUserDrainsTheKey: a second user spends half of the
// key's tokens (3000 a minute) behind the gateway's back. The gateway learns
// it from the upstream's headers (and the odd 429, which it waits out), so
// its clients see queueing, never the upstream's 429, and get the half that
// is left.
func TestScenarioAnotherUserDrainsTheKey(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newFakeOpenAI(60, 6000, 300*time.Millisecond)
		srv := newScenarioGateway(t, up, `{"maxQueueSize": 8, "maxQueueWait": 30, "rpm": 60, "tpm": 6000, "defaultMaxTokens": 100}`)
		start := time.Now()
		end := start.Add(10 * time.Minute)
		sc := &scenario{}
		var wg sync.WaitGroup
		sc.clients(&wg, 8, srv, start, end)
		wg.Go(func() {
			for time.Now().Before(end) {
				up.spend(200)
				time.Sleep(4 * time.Second)
			}
		})
		wg.Wait()

		served, limited := up.counts()
		assert.Zero(t, sc.upstreamLeaked, "the gateway's clients never see the upstream's 429")
		assert.Positive(t, sc.gatewayLimited, "they see the gateway's queueing instead")
		left := 3000.0 / float64(requestCostAtFake(t))
		got := sc.rate(2*time.Minute, 10*time.Minute)
		assert.InEpsilon(t, left, got, 0.1, "the gateway's clients get what the other user leaves: %.1f/min vs %.1f/min", got, left)
		late := up.limitedSince(start.Add(2 * time.Minute))
		assert.LessOrEqual(t, late, 3, "once it has learnt the drain, the gateway rarely meets an upstream 429")
		t.Logf("served %d, upstream 429s %d (%d after 2 min; all waited out by the gateway), gateway 429s %d",
			served, limited, late, sc.gatewayLimited)
	})
}

// requestCostAtFake is what the fake charges for scenarioRequest.
func requestCostAtFake(t *testing.T) int {
	testTokenizer(t)
	p, m := (&fakeOpenAI{}).estimate([]byte(scenarioRequest))
	return p + m
}

// TestScenarioUpstream429InsideTheBudget: the upstream says 429 with a
// retry-after-ms well inside maxQueueWait; the client gets a 200, later.
func TestScenarioUpstream429InsideTheBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newFakeOpenAI(60, 6000, 0)
		up.tokLevel = 0 // someone spent the key just before us
		srv := newScenarioGateway(t, up, `{"maxQueueSize": 8, "maxQueueWait": 30, "rpm": 60, "tpm": 6000}`)
		start := time.Now()
		req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(scenarioRequest))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		assert.Equal(t, http.StatusOK, rec.Code)
		_, limited := up.counts()
		assert.Equal(t, 1, limited)
		waited := time.Since(start)
		assert.InDelta(t, float64(requestCostAtFake(t))/100, waited.Seconds(), 0.05,
			"waited exactly the upstream's retry-after-ms (refill of its cost at 100 tokens/s)")
	})
}

// TestScenarioConcurrentClientsReorderedMatchingLimits: many clients at
// once, and requests reach the upstream in another order than the gateway
// admitted them (random network delay on the way in). The gateway must not
// take its own reordered requests for someone else's spending: once under
// way it never lowers its buckets and the upstream never refuses, and over
// the whole run it admits what the limit allows (the full bucket at the
// start, then the refill) within 2%.
//
// The first seconds are left out of "never": both buckets start full, and
// while the first requests are in transit the upstream's, still full, loses
// refill the gateway's does not. That difference (up to rate x delay, 25
// tokens here) is real, and a correction for it is right.
func TestScenarioConcurrentClientsReorderedMatchingLimits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up := newFakeOpenAI(60, 6000, 300*time.Millisecond)
		up.jitter = 250 * time.Millisecond
		srv, reg := newScenarioGatewayReg(t, up, `{"maxQueueSize": 32, "maxQueueWait": 60, "rpm": 60, "tpm": 6000, "defaultMaxTokens": 100}`)
		start := time.Now()
		const minutes = 10
		end := start.Add(minutes * time.Minute)
		sc := &scenario{}
		var wg sync.WaitGroup
		sc.clients(&wg, 16, srv, start, end)
		var warm float64
		wg.Go(func() {
			time.Sleep(30 * time.Second)
			warm = counterValue(t, reg, "llproxy_bucket_lowered_total")
		})
		wg.Wait()
		elapsed := time.Since(start) // the requests queued at the end were served too

		served, _ := up.counts()
		assert.Zero(t, up.limitedSince(start.Add(30*time.Second)), "under way, the upstream never had to say no")
		assert.Zero(t, sc.upstreamLeaked)
		possible := 6000 * (elapsed.Minutes() + 1) / float64(requestCostAtFake(t))
		assert.InEpsilon(t, possible, float64(served), 0.02, "served %d of %.1f possible", served, possible)
		assert.Equal(t, warm, counterValue(t, reg, "llproxy_bucket_lowered_total"), "under way, the gateway never lowered its own bucket")
	})
}

// counterValue sums a counter's series.
func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}
