package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type fakeQueues []QueueStats

func (f fakeQueues) BackendStats(yield func(BackendStats)) {}
func (f fakeQueues) ClientStats(yield func(ClientStats))   {}
func (f fakeQueues) BudgetStats(yield func(BudgetStats))   {}

func (f fakeQueues) QueueStats(yield func(QueueStats)) {
	for _, s := range f {
		yield(s)
	}
}

func TestQueueCollectorReadsAtScrape(t *testing.T) {
	reg := prometheus.NewRegistry()
	src := fakeQueues{{Route: "openai", Model: "gpt-4o", Depth: 3, QueuedTokens: 900,
		Classes: []ClassStats{{Class: "interactive", Depth: 1}, {Class: "batch", Depth: 2}}, Buckets: []BucketStats{
			{Resource: "requests", Remaining: 12.5, Limit: 200}, {Resource: "tokens", Remaining: 100, Limit: 40000}}}}
	_, err := New(reg, src)
	require.NoError(t, err)
	err = testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP llproxy_queue_depth Requests waiting in the (route, model) queue, by class (interactive, batch).
# TYPE llproxy_queue_depth gauge
llproxy_queue_depth{class="batch",model="gpt-4o",route="openai"} 2
llproxy_queue_depth{class="interactive",model="gpt-4o",route="openai"} 1
# HELP llproxy_bucket_remaining What the gateway's bucket holds now, by resource (requests, tokens, input_tokens, output_tokens).
# TYPE llproxy_bucket_remaining gauge
llproxy_bucket_remaining{model="gpt-4o",resource="requests",route="openai"} 12.5
llproxy_bucket_remaining{model="gpt-4o",resource="tokens",route="openai"} 100
`), "llproxy_queue_depth", "llproxy_bucket_remaining")
	assert.NoError(t, err)
}

func TestModelCounters(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg, nil)
	require.NoError(t, err)
	mm := m.Model("openai", "gpt-4o")
	mm.Admitted(2*time.Second, 100, 1124)
	mm.Outcome(OutcomeRejectWait)
	mm.Outcome(OutcomeRejectWait)
	mm.Upstream(200, time.Millisecond)
	mm.Upstream(503, time.Millisecond)
	mm.Upstream(0, 0)
	assert.Equal(t, 1.0, testutil.ToFloat64(m.requests.WithLabelValues("openai", "gpt-4o", OutcomeAdmitted)))
	assert.Equal(t, 2.0, testutil.ToFloat64(m.requests.WithLabelValues("openai", "gpt-4o", OutcomeRejectWait)))
	assert.Equal(t, 1124.0, testutil.ToFloat64(m.tokensReserved.WithLabelValues("openai", "gpt-4o")))
	for _, code := range []string{"200", "503", "error"} {
		assert.Equal(t, 1.0, testutil.ToFloat64(m.upstreamStatus.WithLabelValues("openai", "gpt-4o", code)), code)
	}
	// A second gateway on the same registry is an error, not a panic.
	_, err = New(reg, nil)
	assert.Error(t, err)
}
