package scheduler

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// flood keeps n requests of client waiting in q until ctx ends, each of
// tokens (or what cost returns), adding up what is admitted in *got.
func flood(ctx context.Context, q *Queue, client, n int, cost func() int, mu *sync.Mutex, got *int) {
	for range n {
		go func() {
			for ctx.Err() == nil {
				c := cost()
				adm, err := q.Acquire(ctx, Cost{Amount: Request(c, 0), Client: client})
				if err != nil {
					if ctx.Err() == nil {
						panic(err)
					}
					return
				}
				adm.Release(time.Now())
				mu.Lock()
				*got += c
				mu.Unlock()
			}
		}()
	}
}

func TestWeightsShareTheBucketInTokens(t *testing.T) {
	// A (weight 3) and B (weight 1) both permanently backlogged for 10
	// minutes, with costs of every size: 3:1 in tokens within 5%, and no
	// capacity lost to fairness (within 2% of the model's limit).
	synctest.Test(t, func(t *testing.T) {
		const tpm = 60000
		c := Config{MaxQueueSize: 100, MaxQueueWait: time.Hour, RPM: 100000, TPM: tpm}
		q := NewQueue("m", c, c.Client("a", 3), c.Client("b", 1))
		rng := rand.New(rand.NewPCG(3, 4))
		var mu sync.Mutex
		cost := func() int { mu.Lock(); defer mu.Unlock(); return 50 + rng.IntN(2000) }
		ctx, cancel := context.WithCancel(context.Background())
		var a, b int
		flood(ctx, q, 0, 20, cost, &mu, &a)
		flood(ctx, q, 1, 20, cost, &mu, &b)
		// Whoever comes first has the full bucket; from the first
		// request that waits, both are backlogged.
		time.Sleep(time.Second)
		mu.Lock()
		a0, b0 := a, b
		mu.Unlock()
		time.Sleep(10 * time.Minute)
		mu.Lock()
		ga, gb := a-a0, b-b0
		mu.Unlock()
		cancel()
		synctest.Wait()
		assert.InDelta(t, 3.0, float64(ga)/float64(gb), 3*0.05, "a %d b %d", ga, gb)
		capacity := float64(tpm * 10)
		assert.InDelta(t, capacity, float64(ga+gb), capacity*0.02, "a+b %d", ga+gb)
	})
}

func TestSmallClientIsNotStarvedByABacklog(t *testing.T) {
	// A has 1,000 requests queued; B (same weight) sends one small request
	// every 10 s. Each of B's is admitted within the time its own cost
	// takes at half the model's rate, plus one of A's requests.
	synctest.Test(t, func(t *testing.T) {
		const tpm, aCost, bCost = 60000, 900, 300
		c := Config{MaxQueueSize: 2000, MaxQueueWait: 2 * time.Hour, RPM: 100000, TPM: tpm}
		q := NewQueue("m", c, c.Client("a", 1), c.Client("b", 1))
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		for range 1000 {
			go q.Acquire(ctx, Cost{Amount: Request(aCost, 0), Client: 0})
		}
		synctest.Wait()
		perSec := float64(tpm) / 60
		bound := time.Duration((2*bCost + aCost) / perSec * float64(time.Second))
		for i := range 30 {
			time.Sleep(10 * time.Second)
			start := time.Now()
			adm, err := q.Acquire(ctx, Cost{Amount: Request(bCost, 0), Client: 1})
			require.NoError(t, err, "request %d", i)
			assert.LessOrEqual(t, time.Since(start), bound, "request %d", i)
			assert.Equal(t, time.Since(start), adm.Wait)
		}
		assert.Greater(t, q.Stats(time.Now()).Depth, 500, "A is still backlogged")
	})
}

func TestCancelledRequestsGiveTheirShareBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const tpm = 6000 // 100 tokens a second
		c := Config{MaxQueueSize: 100, MaxQueueWait: time.Hour, RPM: 100000, TPM: tpm}
		q := NewQueue("m", c, c.Client("a", 1), c.Client("b", 1))
		drain(t, q, tpm)
		start := time.Now()
		ctxB, cancelB := context.WithCancel(context.Background())
		outA := make(chan result, 10)
		outB := make(chan result, 10)
		for i := range 10 {
			go func() {
				adm, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0), Client: 0})
				outA <- result{id: i, at: time.Since(start), adm: adm, err: err}
			}()
			go func() {
				adm, err := q.Acquire(ctxB, Cost{Amount: Request(100, 0), Client: 1})
				outB <- result{id: i, at: time.Since(start), adm: adm, err: err}
			}()
			synctest.Wait()
		}
		// Shared: one of A's and one of B's every two seconds.
		time.Sleep(4*time.Second + time.Millisecond)
		synctest.Wait()
		assert.Len(t, outA, 2)
		assert.Len(t, outB, 2)
		cancelB()
		synctest.Wait()
		for range 2 {
			require.NoError(t, (<-outB).err)
		}
		for range 8 {
			assert.ErrorIs(t, (<-outB).err, context.Canceled)
		}
		// A alone: one a second from now on.
		time.Sleep(8 * time.Second)
		synctest.Wait()
		assert.Len(t, outA, 10, "A got the whole rate back at once")
	})
}

func TestClientLimits(t *testing.T) {
	c := Config{MaxQueueSize: 5, MaxQueueWait: time.Minute, RPM: 1000, TPM: 60000}
	batch := c.Client("batch", 1)
	batch.TPM = 6000 // 100 tokens a second
	t.Run("own bucket binds and says so", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			batch := batch
			batch.MaxQueueWait = 30 * time.Second
			q := NewQueue("m", c, batch, c.Client("search", 1))
			_, err := q.Acquire(context.Background(), Cost{Amount: Request(6000, 0), Client: 0})
			require.NoError(t, err)
			_, err = q.Acquire(context.Background(), Cost{Amount: Request(6000, 0), Client: 1})
			require.NoError(t, err, "search is not held by batch's limit")
			// batch's next waits 31 s for its own bucket: over its 30.
			_, err = q.Acquire(context.Background(), Cost{Amount: Request(3100, 0), Client: 0})
			var re *RejectError
			require.ErrorAs(t, err, &re)
			assert.ErrorIs(t, err, ErrWaitTooLong)
			assert.Equal(t, "batch", re.Client)
			assert.Equal(t, Tokens, re.Resource)
			assert.Equal(t, 6000, re.Limit)
			assert.Equal(t, 31*time.Second, re.RetryAfter.Round(time.Millisecond))
			assert.Equal(t, 6000, re.State.Limit[Tokens], "the headers are batch's own")
			assert.Equal(t, 0, re.State.Remaining[Tokens])
			// Too large for its own bucket: never.
			_, err = q.Acquire(context.Background(), Cost{Amount: Request(7000, 0), Client: 0})
			require.ErrorAs(t, err, &re)
			assert.ErrorIs(t, err, ErrTooLarge)
			assert.Equal(t, "batch", re.Client)
		})
	})
	t.Run("a client held by its own limit lets the others through", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			q := NewQueue("m", c, batch, c.Client("search", 1))
			start := time.Now()
			out := make(chan result, 10)
			acquireAsync(context.Background(), q, 1, 6000, start, out) // at once
			acquireAsync(context.Background(), q, 2, 3000, start, out) // batch's own bucket: 30 s
			acquireAsync(context.Background(), q, 3, 3000, start, out) // 60 s
			for i := range 5 {
				go func() {
					adm, err := q.Acquire(context.Background(), Cost{Amount: Request(10000, 0), Client: 1})
					out <- result{id: 10 + i, at: time.Since(start), adm: adm, err: err}
				}()
			}
			synctest.Wait()
			got := map[int]time.Duration{}
			for range 8 {
				r := <-out
				require.NoError(t, r.err)
				got[r.id] = r.at.Round(time.Millisecond)
			}
			assert.Equal(t, 30*time.Second, got[2])
			assert.Equal(t, 60*time.Second, got[3])
			// The model's 60,000 a minute: search's 5 x 10,000 fit beside
			// batch's 12,000 within the first minute and a bit.
			var last time.Duration
			for i := range 5 {
				last = max(last, got[10+i])
			}
			assert.LessOrEqual(t, last, 3*time.Second, "search used what batch could not")
		})
	})
	t.Run("queue size counts per client", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			q := NewQueue("m", c, c.Client("a", 1), c.Client("b", 1))
			drain(t, q, 60000)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			for range 5 {
				go q.Acquire(ctx, Cost{Amount: Request(100, 0), Client: 0})
			}
			synctest.Wait()
			_, err := q.Acquire(ctx, Cost{Amount: Request(100, 0), Client: 0})
			assert.ErrorIs(t, err, ErrQueueFull, "a's sixth")
			done := make(chan error, 1)
			go func() { _, err := q.Acquire(ctx, Cost{Amount: Request(100, 0), Client: 1}); done <- err }()
			synctest.Wait()
			assert.Empty(t, done, "b waits: a's backlog is not b's")
			cancel()
			synctest.Wait()
		})
	})
	t.Run("max concurrent per client", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			one := c.Client("one", 1)
			one.MaxConcurrent = 1
			q := NewQueue("m", c, one, c.Client("other", 1))
			first, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 0})
			require.NoError(t, err)
			done := make(chan *Admission, 1)
			go func() { a, _ := q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 0}); done <- a }()
			synctest.Wait()
			assert.Empty(t, done, "its second waits for its slot")
			_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 1})
			require.NoError(t, err, "another client's does not")
			time.Sleep(time.Second)
			first.Release(time.Now())
			synctest.Wait()
			assert.Len(t, done, 1)
			var st []ClientStats
			q.Clients(func(_ int, s ClientStats) { st = append(st, s) })
			assert.Equal(t, []ClientStats{{Name: "one", InFlight: 1}, {Name: "other", InFlight: 1}}, st)
		})
	})
	t.Run("unknown client", func(t *testing.T) {
		q := NewQueue("m", c)
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 1})
		assert.ErrorIs(t, err, ErrUnknownClient)
	})
}

// TestFairQueueProperties drives random arrivals of 3 to 5 clients with
// random weights and costs and checks: FIFO within a client; shares
// within 5% while backlogged; a request admitted later than predicted only
// when a request that arrived after it was admitted first (another
// client's fair share cut in); and no token admitted beyond the bucket.
func TestFairQueueProperties(t *testing.T) {
	for seed := range uint64(6) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { testFairQueueProperties(t, seed) })
	}
}

func testFairQueueProperties(t *testing.T, seed uint64) {
	synctest.Test(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(seed, 99))
		const tpm = 60000
		c := Config{MaxQueueSize: 1000, MaxQueueWait: time.Hour, RPM: 1 << 20, TPM: tpm}
		n := 3 + rng.IntN(3)
		clients := make([]Client, n)
		for i := range clients {
			clients[i] = c.Client(fmt.Sprint("c", i), 1+rng.IntN(9))
		}
		q := NewQueue("m", c, clients...)
		type rec struct {
			client, n         int
			tokens            int
			arrived, admitted time.Time
			predicted         time.Time
		}
		var (
			mu   sync.Mutex
			recs []*rec
			wg   sync.WaitGroup
		)
		start := time.Now()
		sent := make([]int, n)
		// Phase 1: random arrivals for two minutes.
		for time.Since(start) < 2*time.Minute {
			time.Sleep(time.Duration(rng.IntN(1500)) * time.Millisecond)
			client := rng.IntN(n)
			r := &rec{client: client, n: sent[client], tokens: 1 + rng.IntN(3000), arrived: time.Now()}
			sent[client]++
			q.mu.Lock()
			w, adm, err := q.enqueue(r.arrived, Cost{Amount: Request(r.tokens, 0), Client: client}, nil)
			q.mu.Unlock()
			require.NoError(t, err)
			mu.Lock()
			recs = append(recs, r)
			mu.Unlock()
			if adm != nil {
				r.admitted, r.predicted = r.arrived, r.arrived
				continue
			}
			r.predicted = w.predicted
			wg.Go(func() {
				<-w.ready
				mu.Lock()
				r.admitted = time.Now()
				mu.Unlock()
			})
		}
		wg.Wait()
		// Phase 2: every client backlogged with equal costs for five minutes.
		ctx, cancel := context.WithCancel(context.Background())
		got := make([]int, n)
		var gmu sync.Mutex
		for i := range n {
			flood(ctx, q, i, 10, func() int { return 500 }, &gmu, &got[i])
		}
		time.Sleep(time.Second) // the full bucket goes to whoever is first
		gmu.Lock()
		got0 := append([]int(nil), got...)
		gmu.Unlock()
		time.Sleep(5 * time.Minute)
		gmu.Lock()
		shares := append([]int(nil), got...)
		gmu.Unlock()
		for i := range shares {
			shares[i] -= got0[i]
		}
		cancel()
		synctest.Wait()

		// FIFO within a client, and predictions.
		last := map[int]*rec{}
		total := 0
		for _, r := range recs {
			total += r.tokens
			if p := last[r.client]; p != nil {
				assert.False(t, r.admitted.Before(p.admitted), "client %d: request %d before %d", r.client, r.n, p.n)
			}
			last[r.client] = r
			if r.admitted.After(r.predicted.Add(time.Microsecond)) {
				overtaken := false
				for _, x := range recs {
					overtaken = overtaken || (x.arrived.After(r.arrived) && !x.admitted.After(r.admitted) && x.client != r.client)
				}
				assert.True(t, overtaken, "client %d request %d admitted %s after its prediction, and nobody who came later went first",
					r.client, r.n, r.admitted.Sub(r.predicted))
			}
		}
		// Never beyond the bucket: the full bucket plus refill.
		var lastAdmit time.Time
		for _, r := range recs {
			if r.admitted.After(lastAdmit) {
				lastAdmit = r.admitted
			}
		}
		assert.LessOrEqual(t, float64(total), tpm+lastAdmit.Sub(start).Minutes()*tpm+1)
		// Shares while all are backlogged.
		weights, sum := 0, 0
		for i, cl := range clients {
			weights += cl.Weight
			sum += shares[i]
		}
		for i, cl := range clients {
			want := float64(sum) * float64(cl.Weight) / float64(weights)
			assert.InDelta(t, want, float64(shares[i]), want*0.05, "client %d weight %d", i, cl.Weight)
		}
	})
}

// A client that was away starts level with the others: its tag starts at
// the virtual time, not where it left off, so its arrival is no burst of
// credit for the time it did not wait (charge's max(vtime, finish)).
func TestNoCreditForTimeAway(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const tpm = 6000 // 100 tokens a second: one request a second
		c := Config{MaxQueueSize: 100, MaxQueueWait: time.Hour, RPM: 100000, TPM: tpm}
		q := NewQueue("m", c, c.Client("a", 1), c.Client("b", 1))
		drain(t, q, tpm)
		ctx, cancel := context.WithCancel(context.Background())
		var mu sync.Mutex
		var order []int
		take := func(client int) {
			adm, err := q.Acquire(ctx, Cost{Amount: Request(100, 0), Client: client})
			if err == nil {
				mu.Lock()
				order = append(order, client)
				mu.Unlock()
				adm.Release(time.Now())
			}
		}
		for range 40 {
			go take(0)
			synctest.Wait()
		}
		time.Sleep(20*time.Second + time.Millisecond) // A alone: 20 of its requests
		for range 10 {
			go take(1)
			synctest.Wait()
		}
		time.Sleep(10 * time.Second)
		cancel()
		synctest.Wait()
		mu.Lock()
		defer mu.Unlock()
		require.GreaterOrEqual(t, len(order), 30)
		next := order[20:30]
		a := 0
		for _, c := range next {
			if c == 0 {
				a++
			}
		}
		assert.InDelta(t, 5, a, 1, "A and B share the 10 s after B arrives, as %v", next)
	})
}

// A request given back whole (Unsend: the upstream refused it) gives its
// client's place back too: requeued, it is admitted before the other
// client's next request, as it would have been.
func TestUnsendGivesTheTagBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const tpm = 6000
		c := Config{MaxQueueSize: 100, MaxQueueWait: time.Hour, RPM: 100000, TPM: tpm}
		q := NewQueue("m", c, c.Client("a", 1), c.Client("b", 1))
		drain(t, q, tpm)
		got := make(chan int, 100)
		for i := range 4 {
			for _, client := range []int{0, 1} {
				go func() {
					adm, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0), Client: client})
					if err != nil {
						return
					}
					if client == 0 && i == 0 {
						// A's first: refused upstream, given back whole,
						// and requeued at the head of A's FIFO.
						now := time.Now()
						adm.Unsend(now)
						adm, err = q.Requeue(context.Background(), Cost{Amount: Request(100, 0), Client: 0}, now.Add(time.Hour), adm)
						if err != nil {
							return
						}
					}
					got <- client
					adm.Release(time.Now())
				}()
				synctest.Wait()
			}
		}
		time.Sleep(8*time.Second + time.Millisecond)
		synctest.Wait()
		close(got)
		var order []int
		for c := range got {
			order = append(order, c)
		}
		require.Len(t, order, 8)
		// A's requeued request keeps A's place: the clients still take
		// turns, and A has its four by the end.
		for i := 0; i+1 < len(order); i += 2 {
			assert.NotEqual(t, order[i], order[i+1], "turns broken: %v", order)
		}
	})
}

// The newcomer's predicted wait (the metric, the status page) is a client's
// with no limits of its own, not the first configured client's.
func TestNewcomersWaitIsNotTheFirstClients(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 10, MaxQueueWait: time.Hour, RPM: 600, TPM: 100000}
		a := c.Client("a", 1)
		a.RPM = 1 // a's own limit: one a minute
		q := NewQueue("m", c, a, c.Client("b", 1))
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 0})
		require.NoError(t, err)
		adm.Release(time.Now())
		assert.Equal(t, time.Minute, q.StateFor(time.Now(), 0).Reset[Requests], "a waits for its own bucket")
		assert.Zero(t, q.Stats(time.Now()).PredictedWait, "a newcomer does not: the model has room")
	})
}

// deepBacklog is a queue of a model with maxQueueWait 5 s where 20
// clients whose own maxQueueWait is 10 h keep n requests waiting between
// them: a newcomer, admitted after one request of each, would wait 20 s.
func deepBacklog(ctx context.Context, n int) *Queue {
	c := Config{MaxQueueSize: 100000, MaxQueueWait: 5 * time.Second, RPM: 100000, TPM: 6000}
	var clients []Client
	for i := range 20 {
		cl := c.Client(fmt.Sprintf("c%d", i), 1)
		cl.MaxQueueWait = 10 * time.Hour
		clients = append(clients, cl)
	}
	q := NewQueue("m", c, clients...)
	q.mu.Lock()
	q.b[Tokens].take(time.Now(), 6000) // empty: everyone waits
	q.mu.Unlock()
	for i := range n {
		go q.Acquire(ctx, Cost{Amount: Request(100, 0), Client: i % 20})
	}
	return q
}

// The newcomer's predicted wait stops replaying just past maxQueueWait:
// a scrape does not replay the whole round of every waiting client under
// the lock.
func TestNewcomersWaitStopsAtTheDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		q := deepBacklog(ctx, 2000)
		synctest.Wait()
		require.Equal(t, 2000, q.Depth())
		w := q.Stats(time.Now()).PredictedWait
		assert.Greater(t, w, 5*time.Second, "beyond maxQueueWait")
		assert.Less(t, w, 7*time.Second, "reported just past it, not the 20 s of a whole round")
		cancel()
		synctest.Wait()
	})
}

// BenchmarkStatsDeepBacklog: a scrape of a queue 2,000 deep over 20
// clients.
func BenchmarkStatsDeepBacklog(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	q := deepBacklog(ctx, 2000)
	for q.Depth() < 2000 {
		time.Sleep(time.Millisecond)
	}
	b.ResetTimer()
	for b.Loop() {
		q.Stats(time.Now())
	}
}
