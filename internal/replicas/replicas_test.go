package replicas

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/internal/redistest"
	"github.com/llproxy/llproxy/scheduler"
)

func replica(t *testing.T, url string) *State {
	t.Helper()
	s, err := New(Config{Redis: url, Timeout: duration.Duration(200 * time.Millisecond)},
		slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

var model = scheduler.Config{RPM: 60, TPM: 6000, MaxQueueSize: 10, MaxQueueWait: time.Minute}

func clientsOf(c scheduler.Config) []scheduler.Client {
	own := c.Client("own", 1)
	own.TPM = 100
	return []scheduler.Client{c.Client("a", 1), own}
}

func TestTakeSharesTheBucketsAcrossReplicas(t *testing.T) {
	r := redistest.Start(t)
	a := replica(t, r.URL()).Queue("openai", "gpt-4o", model, clientsOf(model))
	b := replica(t, r.URL()).Queue("openai", "gpt-4o", model, clientsOf(model))
	ctx := context.Background()
	ok := 0
	for i := range 70 {
		q := a
		if i%2 == 1 {
			q = b
		}
		took, err := q.Take(ctx, 0, scheduler.Request(10, 0), Ask{})
		require.NoError(t, err)
		if took.OK {
			ok++
			continue
		}
		assert.Equal(t, scheduler.Requests, took.Binding)
		assert.False(t, took.Own)
		assert.InDelta(t, float64(time.Second), float64(took.Wait), float64(100*time.Millisecond), "one request a second")
	}
	assert.InDelta(t, 60, ok, 1, "the key's 60, not 60 a replica")

	// The client's own bucket (100 tokens): shared too, and it says so.
	c := replica(t, r.URL()).Queue("openai", "gpt-4o-mini", model, clientsOf(model))
	took, err := c.Take(ctx, 1, scheduler.Request(80, 0), Ask{})
	require.NoError(t, err)
	require.True(t, took.OK)
	assert.InDelta(t, 20, took.Levels.Client[scheduler.Tokens], 0.5)
	took, err = replica(t, r.URL()).Queue("openai", "gpt-4o-mini", model, clientsOf(model)).Take(ctx, 1, scheduler.Request(80, 0), Ask{})
	require.NoError(t, err)
	assert.False(t, took.OK)
	assert.True(t, took.Own)
	assert.Equal(t, scheduler.Tokens, took.Binding)
	assert.InDelta(t, float64(36*time.Second), float64(took.Wait), float64(time.Second), "60 more at 100 a minute")

	// Adjust gives back, never above capacity, and charges.
	require.NoError(t, c.Adjust(ctx, 1, scheduler.Vector{scheduler.Tokens: 80}))
	took, err = c.Take(ctx, 1, scheduler.Request(80, 0), Ask{})
	require.NoError(t, err)
	assert.True(t, took.OK, "given back")
}

func TestLeasesCountAcrossReplicas(t *testing.T) {
	r := redistest.Start(t)
	m := model
	m.MaxConcurrent = 2
	a := replica(t, r.URL()).Queue("local", "llama", m, clientsOf(m))
	b := replica(t, r.URL()).Queue("local", "llama", m, clientsOf(m))
	ctx := context.Background()
	t1, err := a.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	t2, err := b.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	require.True(t, t1.OK && t2.OK)
	require.NotEmpty(t, t1.Lease)
	t3, err := a.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	assert.False(t, t3.OK)
	assert.Equal(t, scheduler.Slots, t3.Binding)
	assert.Negative(t, t3.Wait, "when a slot frees is not known")
	require.NoError(t, b.Release(ctx, 0, t2.Lease))
	t4, err := a.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	assert.True(t, t4.OK)
}

func TestRedisDownDegradesAndRecoversWithoutBurst(t *testing.T) {
	r := redistest.Start(t)
	s := replica(t, r.URL())
	reg := prometheus.NewRegistry()
	require.NoError(t, reg.Register(s.gauge))
	changes := make(chan bool, 4)
	s.OnChange(func(d bool) { changes <- d })
	q := s.Queue("openai", "gpt-4o", model, clientsOf(model))
	ctx := context.Background()
	s.beat(ctx)
	assert.Equal(t, 1, s.Live())

	r.Stop()
	start := time.Now()
	_, err := q.Take(ctx, 0, scheduler.Request(10, 0), Ask{})
	require.Error(t, err)
	assert.Less(t, time.Since(start), time.Second, "bounded by the timeout")
	assert.True(t, s.Degraded())
	assert.True(t, <-changes)
	assert.Equal(t, 1.0, testutil.ToFloat64(s.gauge.WithLabelValues("degraded")))
	assert.Equal(t, 1.0, s.LocalShare(), "one replica: all of it")
	// This replica admits on its own meanwhile; when Redis is back it says
	// what it estimates is left (10 requests), before anything is taken.
	s.OnRecover(func(ctx context.Context) error {
		return q.Cap(ctx, 0, levelsAll(10, -1))
	})
	var deferred int64
	s.Defer(func(ctx context.Context) error { deferred++; return nil })

	r.Restart() // empty: every key lost
	s.beat(ctx)
	assert.False(t, s.Degraded())
	assert.False(t, <-changes)
	assert.Equal(t, 1.0, testutil.ToFloat64(s.gauge.WithLabelValues("ok")))
	assert.Equal(t, int64(1), deferred, "the deferred write was made")
	// The shared buckets resume from what was spent, not from full (the
	// restart lost every key): 10 requests are left of 60.
	ok := 0
	for range 20 {
		took, err := q.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
		require.NoError(t, err)
		if took.OK {
			ok++
		}
	}
	assert.InDelta(t, 10, ok, 1)
}

func TestBudgets(t *testing.T) {
	r := redistest.Start(t)
	a, b := replica(t, r.URL()), replica(t, r.URL())
	ctx := context.Background()
	n, err := a.AddBudget(ctx, "interns", "gpt-4o", "2026-12-01", 40)
	require.NoError(t, err)
	assert.Equal(t, int64(40), n)
	n, err = b.AddBudget(ctx, "interns", "gpt-4o", "2026-12-01", 2)
	require.NoError(t, err)
	assert.Equal(t, int64(42), n)
	n, err = a.Budget(ctx, "interns", "gpt-4o", "2026-12-01")
	require.NoError(t, err)
	assert.Equal(t, int64(42), n)
	n, err = a.Budget(ctx, "interns", "gpt-4o", "2026-12-02")
	require.NoError(t, err)
	assert.Zero(t, n)
}

func TestConfigValidate(t *testing.T) {
	c := Config{Redis: "http://x", OnRedisDown: "maybe", Timeout: -1}
	err := c.Validate()
	require.Error(t, err)
	for _, want := range []string{"redis:", "timeout: must be > 0", `onRedisDown: must be split, deny or allow, got "maybe"`} {
		assert.Contains(t, err.Error(), want)
	}
	c = Config{Redis: "redis://127.0.0.1:6379/0"}
	c.SetDefaults()
	require.NoError(t, c.Validate())
	assert.Equal(t, Split, c.OnRedisDown)
	assert.Equal(t, DefaultPrefix, c.Prefix)
}

// TestAWrongTypedKeyIsThatKeysProblem: a bucket key that holds the wrong
// kind of value (SET over it) is replaced by the call that meets it; the
// shared limits never turn degraded, and every model (that one included)
// stays shared.
func TestAWrongTypedKeyIsThatKeysProblem(t *testing.T) {
	r := redistest.Start(t)
	s := replica(t, r.URL())
	bad := s.Queue("openai", "ok", model, clientsOf(model))
	good := s.Queue("openai", "gpt-4o", model, clientsOf(model))
	ctx := context.Background()
	for _, k := range []string{"llproxy:{openai/ok}:req", "llproxy:{openai/ok}:c:a:tok", "llproxy:replicas"} {
		require.NoError(t, s.rdb.Set(ctx, k, "x", 0).Err())
	}
	took, err := bad.Take(ctx, 0, scheduler.Request(10, 0), Ask{})
	require.NoError(t, err, "the bad keys are replaced and the take runs again")
	assert.True(t, took.OK)
	took, err = good.Take(ctx, 0, scheduler.Request(10, 0), Ask{})
	require.NoError(t, err)
	assert.True(t, took.OK)
	s.beat(ctx)
	assert.False(t, s.Degraded(), "Redis answers: nothing is degraded")
	typ, err := s.rdb.Type(ctx, "llproxy:{openai/ok}:req").Result()
	require.NoError(t, err)
	assert.Equal(t, "hash", typ)
	assert.Equal(t, 3.0, testutil.ToFloat64(s.repaired))
	require.NoError(t, bad.Cap(ctx, 0, levelsAll(-1, -1)), "the recovery call on the bad model")

	// A budget key, too.
	require.NoError(t, s.rdb.HSet(ctx, s.budgetKey("interns", "*", "2026-12-01"), "l", 1).Err())
	n, err := s.Budget(ctx, "interns", "*", "2026-12-01")
	require.NoError(t, err)
	assert.Zero(t, n)
	n, err = s.AddBudget(ctx, "interns", "*", "2026-12-01", 5)
	require.NoError(t, err)
	assert.Equal(t, int64(5), n)
	assert.False(t, s.Degraded())
}

// TestLeasesOutliveAFlushAndAReload: the concurrency slots of requests in
// flight are re-asserted by the heartbeat after Redis loses its data, and
// the buckets a reload replaced keep their leases until they end.
func TestLeasesOutliveAFlushAndAReload(t *testing.T) {
	r := redistest.Start(t)
	s := replica(t, r.URL())
	two := model
	two.MaxConcurrent = 2
	b := s.Queue("openai", "gpt-4o", two, clientsOf(two))
	ctx := context.Background()
	var leases []string
	for range 2 {
		took, err := b.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
		require.NoError(t, err)
		require.True(t, took.OK)
		leases = append(leases, took.Lease)
	}
	took, err := b.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	require.False(t, took.OK, "two slots, two in flight")

	require.NoError(t, s.rdb.FlushAll(ctx).Err()) // Redis restarted without its data
	s.beat(ctx)
	took, err = b.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	assert.False(t, took.OK, "the two in flight hold their slots again")
	assert.Equal(t, scheduler.Slots, took.Binding)

	// A reload replaces the buckets: the old ones keep their leases alive
	// until their requests end.
	b.Close()
	nb := s.Queue("openai", "gpt-4o", two, clientsOf(two))
	require.NoError(t, s.rdb.FlushAll(ctx).Err())
	s.beat(ctx)
	took, err = nb.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	assert.False(t, took.OK, "the old buckets' requests still hold both slots")
	for _, l := range leases {
		require.NoError(t, b.Release(ctx, 0, l))
	}
	s.beat(ctx)
	s.mu.Lock()
	assert.NotContains(t, s.queues, b, "forgotten once its leases ended")
	s.mu.Unlock()
	took, err = nb.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
	require.NoError(t, err)
	assert.True(t, took.OK)
}

// levelsAll caps the model's request bucket at requests and leaves every
// other bucket (-1).
func levelsAll(requests float64, rest float64) scheduler.Levels {
	var lv scheduler.Levels
	for r := range scheduler.NumBuckets {
		lv.Model[r], lv.Client[r] = rest, rest
	}
	lv.Model[scheduler.Requests] = requests
	return lv
}

// Input and output tokens as buckets of their own (Anthropic's limits):
// shared like any other, and the one that binds is named.
func TestInputAndOutputBucketsAreShared(t *testing.T) {
	r := redistest.Start(t)
	m := scheduler.Config{RPM: 100, ITPM: 10000, OTPM: 1000, MaxQueueSize: 10, MaxQueueWait: time.Minute}
	a := replica(t, r.URL()).Queue("claude", "claude-sonnet-4-5", m, clientsOf(m))
	b := replica(t, r.URL()).Queue("claude", "claude-sonnet-4-5", m, clientsOf(m))
	ctx := context.Background()
	took, err := a.Take(ctx, 0, scheduler.Request(100, 900), Ask{})
	require.NoError(t, err)
	require.True(t, took.OK)
	assert.InDelta(t, 100, took.Levels.Model[scheduler.OutputTokens], 1)
	assert.InDelta(t, 9900, took.Levels.Model[scheduler.InputTokens], 1)
	took, err = b.Take(ctx, 0, scheduler.Request(10, 200), Ask{})
	require.NoError(t, err)
	assert.False(t, took.OK, "the other replica sees the output spent")
	assert.Equal(t, scheduler.OutputTokens, took.Binding)
	// Settled to what it used: 850 of the output go back.
	require.NoError(t, a.Adjust(ctx, 0, scheduler.Vector{scheduler.OutputTokens: 850}))
	took, err = b.Take(ctx, 0, scheduler.Request(10, 200), Ask{})
	require.NoError(t, err)
	assert.True(t, took.OK)
}

// The upstream's headers lower the key's shared buckets once, however
// many replicas hear the same discrepancy: two replicas each send a
// request, and both answers say the key has 1,000 tokens less than the
// shared bucket thinks (another user of the key spent them). The bucket
// is lowered by 1,000, not 2,000; a replica that hears nothing new
// lowers nothing; a refused request's answer is compared with the bucket
// before it paid.
func TestTheUpstreamIsHeardOnceAcrossReplicas(t *testing.T) {
	r := redistest.Start(t)
	big := scheduler.Config{RPM: 1000, TPM: 600_000, MaxQueueSize: 10, MaxQueueWait: time.Minute} // 10,000 tokens a second
	a := replica(t, r.URL()).Queue("openai", "gpt-4o", big, clientsOf(big))
	b := replica(t, r.URL()).Queue("openai", "gpt-4o", big, clientsOf(big))
	ctx := context.Background()
	start := time.Now()
	// A level is at least what is expected and at most that plus the
	// refill since the start (600,000 a minute).
	within := func(want, got float64, msg string) {
		t.Helper()
		assert.GreaterOrEqual(t, got, want-1, msg)
		// Redis keeps a bucket's time in whole milliseconds: up to 2 ms more.
		assert.LessOrEqual(t, got, want+600_000*(time.Since(start)+2*time.Millisecond).Minutes()+1, msg)
	}
	tookA, err := a.Take(ctx, 0, scheduler.Request(100_000, 0), Ask{})
	require.NoError(t, err)
	require.True(t, tookA.OK)
	tookB, err := b.Take(ctx, 0, scheduler.Request(100_000, 0), Ask{})
	require.NoError(t, err)
	require.True(t, tookB.OK)
	within(400_000, tookB.Levels.Model[scheduler.Tokens], "two paid")

	// What the upstream says after each request: 1,000 fewer than the
	// bucket held after it paid.
	heard := func(mark Mark) scheduler.Upstream {
		var u scheduler.Upstream
		u.Reported[scheduler.Tokens] = true
		u.Remaining[scheduler.Tokens] = int(mark.Level[scheduler.Tokens]) - 1000
		return u
	}
	lowA, err := a.Observe(ctx, 0, tookA.Mark, scheduler.Vector{}, heard(tookA.Mark))
	require.NoError(t, err)
	lowB, err := b.Observe(ctx, 0, tookB.Mark, scheduler.Vector{}, heard(tookB.Mark))
	require.NoError(t, err)
	assert.InDelta(t, 1000, lowA+lowB, 1, "the same 1,000 heard twice is lowered once")
	level := func() float64 {
		took, err := a.Take(ctx, 0, scheduler.Request(1, 0), Ask{})
		require.NoError(t, err)
		return took.Levels.Model[scheduler.Tokens] + 1
	}
	within(399_000, level(), "lowered by 1,000 in all")

	// An answer that says what the bucket thinks lowers nothing (and asks
	// Redis nothing).
	took, err := b.Take(ctx, 0, scheduler.Request(1000, 0), Ask{})
	require.NoError(t, err)
	var same scheduler.Upstream
	same.Reported[scheduler.Tokens], same.Remaining[scheduler.Tokens] = true, int(took.Mark.Level[scheduler.Tokens])+5
	low, err := b.Observe(ctx, 0, took.Mark, scheduler.Vector{}, same)
	require.NoError(t, err)
	assert.Zero(t, low)

	// A request the upstream refused (its cost given back) is compared
	// with the bucket as it was before it paid.
	took, err = a.Take(ctx, 0, scheduler.Request(5000, 0), Ask{})
	require.NoError(t, err)
	cost := scheduler.Request(5000, 0)
	require.NoError(t, a.Adjust(ctx, 0, cost))
	var refused scheduler.Upstream
	refused.Reported[scheduler.Tokens] = true
	refused.Remaining[scheduler.Tokens] = int(took.Mark.Level[scheduler.Tokens]) + 5000
	low, err = a.Observe(ctx, 0, took.Mark, cost, refused)
	require.NoError(t, err)
	assert.Zero(t, low, "the refusal's remaining still includes what the request gave back")
}

// Far from the limit a replica borrows a slice and admits from it: one
// round trip serves at least ten requests. The slices are paid when taken
// (the other replica sees them spent), and what is left goes back when
// the lease ends: the shared buckets are then exactly what the requests
// used.
func TestLeasedSlicesServeManyAndGoBack(t *testing.T) {
	r := redistest.Start(t)
	big := scheduler.Config{RPM: 100_000, TPM: 100_000_000, MaxQueueSize: 10, MaxQueueWait: time.Minute}
	st := replica(t, r.URL())
	a := st.Queue("openai", "gpt-4o", big, clientsOf(big))
	other := replica(t, r.URL()).Queue("openai", "gpt-4o", big, clientsOf(big))
	ctx := context.Background()
	// The buckets refill while the test runs (capacity per minute): a
	// level is at least what is expected, and at most that plus what
	// the time since the start refilled.
	start := time.Now()
	within := func(want, got, capacity float64, msg string) {
		t.Helper()
		// Redis keeps a bucket's time in whole milliseconds: up to 2 ms more.
		refill := capacity * (time.Since(start) + 2*time.Millisecond).Minutes()
		assert.GreaterOrEqual(t, got, want-1, msg)
		assert.LessOrEqual(t, got, want+refill+1, msg)
	}
	for range 500 {
		took, err := a.Take(ctx, 0, scheduler.Request(100, 10), Ask{})
		require.NoError(t, err)
		require.True(t, took.OK)
	}
	trips, local := testutil.ToFloat64(st.trips), testutil.ToFloat64(st.local)
	assert.Equal(t, 500.0, trips+local)
	assert.LessOrEqual(t, trips, 50.0, "at least ten requests a round trip")
	held := a.quota[0].have
	assert.Positive(t, held[scheduler.Requests], "a slice is held")
	assert.LessOrEqual(t, held[scheduler.Requests], int(maxSliceShare*100_000))

	// Paid when taken: the other replica sees the slice spent.
	seen, err := other.Take(ctx, 0, scheduler.Request(0, 0), Ask{})
	require.NoError(t, err)
	within(100_000-500-float64(held[scheduler.Requests])-1, seen.Levels.Model[scheduler.Requests], 100_000, "the slice is spent")

	// Settlements go to the slice while the lease lasts.
	require.NoError(t, a.Adjust(ctx, 0, scheduler.Vector{scheduler.Tokens: 7}))
	assert.Equal(t, held[scheduler.Tokens]+7, a.quota[0].have[scheduler.Tokens])

	// The lease ends: what the slice held goes back.
	require.NoError(t, a.settle(ctx, time.Now().Add(leaseLen), false))
	assert.Zero(t, a.quota[0].have)
	seen, err = other.Take(ctx, 0, scheduler.Request(0, 0), Ask{})
	require.NoError(t, err)
	within(100_000-502, seen.Levels.Model[scheduler.Requests], 100_000, "only what the requests used")
	within(100_000_000-500*110+7, seen.Levels.Model[scheduler.Tokens], 100_000_000, "only what the requests used")

	// A client quiet for a lease borrows nothing at its next take.
	took, err := a.quota[0].take(ctx, a, 0, scheduler.Request(100, 10), Ask{}, time.Now().Add(2*leaseLen))
	require.NoError(t, err)
	require.True(t, took.OK)
	assert.Zero(t, a.quota[0].have, "no slice after a quiet lease")
}

// On a Redis Cluster of three masters the shared limits hold as on one
// Redis: each call's keys share a hash tag, so the scripts run on the
// master of the (route, model)'s slot; models on different masters each
// admit their own limit, across two replicas.
func TestRedisClusterKeepsTheLimits(t *testing.T) {
	c := redistest.StartCluster(t, 3)
	cluster := func() *State {
		s, err := New(Config{Redis: c.URL(), Cluster: true, Timeout: duration.Duration(time.Second)},
			slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
		require.NoError(t, err)
		t.Cleanup(func() { s.Close() })
		return s
	}
	ra, rb := cluster(), cluster()
	ctx := context.Background()
	slots := map[string]bool{}
	for _, name := range []string{"gpt-4o", "gpt-4o-mini", "o4-mini", "claude-sonnet-4-5", "gpt-4.1", "gpt-5"} {
		a, b := ra.Queue("openai", name, model, clientsOf(model)), rb.Queue("openai", name, model, clientsOf(model))
		ok := 0
		for i := range 70 {
			q := a
			if i%2 == 1 {
				q = b
			}
			took, err := q.Take(ctx, 0, scheduler.Request(10, 0), Ask{})
			require.NoError(t, err, name)
			if took.OK {
				ok++
			}
		}
		assert.InDelta(t, 60, ok, 1, "%s: the key's 60, not 60 a replica", name)
		node, err := ra.rdb.(*redis.ClusterClient).MasterForKey(ctx, a.keys[0][0])
		require.NoError(t, err)
		slots[node.Options().Addr] = true
	}
	assert.Greater(t, len(slots), 1, "the models live on more than one master")
	ra.beat(ctx) // the heartbeat and the leases' refresh work on a cluster too
	assert.False(t, ra.Degraded())
}

// Budget additions settled at once share a round trip: 300 concurrent
// additions to one budget and 100 to another are written in a few
// pipelines, and every one learns a total that counts it; a replica that
// closes writes what it still holds.
func TestBudgetWritesAreCoalesced(t *testing.T) {
	r := redistest.Start(t)
	st := replica(t, r.URL())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go st.Run(ctx)
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[string]int64{}
	for i := range 400 {
		model := "gpt-4o"
		if i%4 == 0 {
			model = "$usd/month"
		}
		wg.Add(1)
		go st.AddBudgetLater("a", model, "2026-12", 3, func(total int64, err error) {
			defer wg.Done()
			assert.NoError(t, err)
			mu.Lock()
			seen[model] = max(seen[model], total)
			mu.Unlock()
		})
	}
	wg.Wait()
	assert.Equal(t, map[string]int64{"gpt-4o": 900, "$usd/month": 300}, seen)
	n, err := st.Budget(context.Background(), "a", "gpt-4o", "2026-12")
	require.NoError(t, err)
	assert.Equal(t, int64(900), n)
	pipelines := testutil.ToFloat64(st.pipelines)
	t.Logf("400 additions in %.0f pipelines", pipelines)
	assert.Positive(t, pipelines)
	assert.LessOrEqual(t, pipelines, 40.0, "at least ten requests a round trip")
	ttl, err := redis.NewClient(&redis.Options{Addr: "127.0.0.1:" + strconv.Itoa(r.Port)}).
		TTL(context.Background(), st.budgetKey("a", "$usd/month", "2026-12")).Result()
	require.NoError(t, err)
	assert.Greater(t, ttl, 30*24*time.Hour, "a month's spend outlives two quiet days")

	// Without Run, Close writes what is queued.
	other := replica(t, r.URL())
	other.AddBudgetLater("b", "gpt-4o", "2026-12", 5, nil)
	require.NoError(t, other.Close())
	n, err = st.Budget(context.Background(), "b", "gpt-4o", "2026-12")
	require.NoError(t, err)
	assert.Equal(t, int64(5), n)
}

// A queue with slots leases nothing (a slot is a request's own), so each
// request takes, gives back what it reserved beyond its use, and frees
// its slot: the give-backs and the releases of concurrent requests share
// pipelines, and every one lands (the slots are all free and the bucket
// holds what the requests did not use).
func TestGiveBacksAndReleasesAreCoalesced(t *testing.T) {
	r := redistest.Start(t)
	m := scheduler.Config{RPM: 1000000, TPM: 60000, MaxConcurrent: 8, MaxQueueSize: 10, MaxQueueWait: time.Minute}
	st := replica(t, r.URL())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go st.Run(ctx)
	q := st.Queue("local", "llama", m, clientsOf(m))
	var wg sync.WaitGroup
	var admitted atomic.Int64
	start := time.Now()
	for range 8 {
		wg.Go(func() {
			for range 25 {
				took, err := q.Take(ctx, 0, scheduler.Request(20, 0), Ask{})
				if !assert.NoError(t, err) {
					return
				}
				if !took.OK {
					time.Sleep(time.Millisecond) // a slot not yet freed
					continue
				}
				admitted.Add(1)
				assert.NoError(t, q.Adjust(ctx, 0, scheduler.Vector{scheduler.Tokens: 15}))
				assert.NoError(t, q.Release(ctx, 0, took.Lease))
			}
		})
	}
	wg.Wait()
	taken := testutil.ToFloat64(st.trips)
	cancel()
	require.NoError(t, st.Close()) // writes what is still queued
	elapsed := time.Since(start)
	pipelines := testutil.ToFloat64(st.pipelines)
	t.Logf("%.0f takes, their give-backs and releases in %.0f pipelines", taken, pipelines)
	assert.Positive(t, pipelines, "written in pipelines")
	assert.Less(t, pipelines, taken, "fewer pipelines than requests")

	// Every slot free, every give-back in the bucket.
	other := replica(t, r.URL()).Queue("local", "llama", m, clientsOf(m))
	for i := range 8 {
		took, err := other.Take(context.Background(), 0, scheduler.Request(0, 0), Ask{})
		require.NoError(t, err)
		require.True(t, took.OK, "slot %d free", i)
		if i == 7 {
			spent := 5 * float64(admitted.Load())                     // each took 20 tokens and gave 15 back
			refill := (elapsed + 2*time.Millisecond).Seconds() * 1000 // Redis counts in whole ms
			assert.LessOrEqual(t, took.Levels.Model[scheduler.Tokens], 60000-spent+refill+1)
			assert.GreaterOrEqual(t, took.Levels.Model[scheduler.Tokens], 60000-spent-1)
		}
	}
}

// Each take says what its replica's queue has waiting, and learns what
// the other replicas' queues have (fresh within a second): a replica
// whose queue emptied says so with its next take.
func TestTakesTellTheOtherReplicasBacklogs(t *testing.T) {
	r := redistest.Start(t)
	m := model
	m.MaxConcurrent = 100 // every take a round trip (slots lease no slices)
	a := replica(t, r.URL()).Queue("openai", "gpt-4o", m, clientsOf(m))
	b := replica(t, r.URL()).Queue("openai", "gpt-4o", m, clientsOf(m))
	c := replica(t, r.URL()).Queue("openai", "gpt-4o", m, clientsOf(m))
	var waitingB, waitingC bool
	b.Queued(func() bool { return waitingB })
	c.Queued(func() bool { return waitingC })
	ctx := context.Background()
	take := func(q *Buckets) Took {
		took, err := q.Take(ctx, 0, scheduler.Request(10, 0), Ask{})
		require.NoError(t, err)
		return took
	}
	assert.Zero(t, take(a).Others, "nobody waits")
	waitingB = true
	waitingC = true
	take(b)
	took := take(c)
	assert.Equal(t, 1, took.Others, "c hears b")
	took = take(a)
	assert.Equal(t, 2, took.Others, "a hears both")
	waitingB = false
	take(b)
	took = take(a)
	assert.Equal(t, 1, took.Others, "b's queue emptied")
}

// Earliest deadline first across replicas, for one client's requests
// while the buckets are contended: a take that can wait longer than the
// client's most urgent request waiting at another replica lets it go
// first; one more urgent goes; a replica whose queue emptied holds nobody.
func TestTheMostUrgentRequestGoesFirstAcrossReplicas(t *testing.T) {
	r := redistest.Start(t)
	m := model
	m.MaxConcurrent = 100 // every take a round trip
	a := replica(t, r.URL()).Queue("openai", "gpt-4o", m, clientsOf(m))
	b := replica(t, r.URL()).Queue("openai", "gpt-4o", m, clientsOf(m))
	ctx := context.Background()
	take := func(q *Buckets, ask Ask) Took {
		took, err := q.Take(ctx, 0, scheduler.Request(10, 0), ask)
		require.NoError(t, err)
		return took
	}
	for range 35 { // 60 rpm: below half, contended
		require.True(t, take(a, Ask{}).OK)
	}
	now := time.Now()
	require.True(t, take(a, Ask{Deadline: now.Add(10 * time.Second), Next: now.Add(time.Second)}).OK,
		"nobody else waits; a's next request must be admitted within a second")
	took := take(b, Ask{Deadline: now.Add(5 * time.Second)})
	assert.False(t, took.OK, "b's request can wait longer than a's next")
	assert.True(t, took.Fair)
	assert.Equal(t, fairRetry, took.Wait)
	assert.True(t, take(b, Ask{Deadline: now.Add(900 * time.Millisecond)}).OK, "more urgent than a's next: it goes")
	require.True(t, take(a, Ask{Deadline: now.Add(time.Second)}).OK, "a's next, and a's queue is empty after it")
	assert.True(t, take(b, Ask{Deadline: now.Add(5 * time.Second)}).OK, "nobody more urgent waits")
}
