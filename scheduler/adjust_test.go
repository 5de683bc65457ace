package scheduler

import (
	"context"
	"math"
	"math/rand/v2"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSettleRefundAdmitsTheHeadSooner(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600)) // 10 tokens/s
		first := acquire(t, q, 600)
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 300, start, out) // 30s without a refund
		time.Sleep(5 * time.Second)
		first.Settle(time.Now(), Request(300, 0)) // the drained request used half
		first.Settle(time.Now(), Request(0, 0))   // at most once in effect
		r := <-out
		require.NoError(t, r.err)
		assert.Equal(t, 5*time.Second, r.at.Round(time.Millisecond), "admitted the moment the refund arrived")
		assert.Equal(t, 50, q.State(time.Now()).Remaining[Tokens], "300 refunded + 50 refilled - 300 taken")
	})
}

func TestSettleOverrunIsChargedAsDebt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600))
		acquire(t, q, 600).Settle(time.Now(), Request(900, 0)) // the upstream counted 300 more
		assert.Equal(t, -300.0, q.Stats(time.Now()).Remaining[Tokens])
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 100, start, out)
		r := <-out
		require.NoError(t, r.err)
		assert.Equal(t, 40*time.Second, r.at.Round(time.Millisecond), "debt of 300 then 100: 40s at 10/s")
	})
}

func TestSettleNoChangeAndUnsend(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, time.Minute, 60, 600))
		adm := acquire(t, q, 500)
		adm.Settle(time.Now(), Request(500, 0))
		st := q.State(time.Now())
		assert.Equal(t, 100, st.Remaining[Tokens])
		assert.Equal(t, 59, st.Remaining[Requests])
		adm.Unsend(time.Now()) // never reached the upstream: all back
		adm.Unsend(time.Now()) // at most once in effect
		adm.Settle(time.Now(), Request(0, 0))
		st = q.State(time.Now())
		assert.Equal(t, 600, st.Remaining[Tokens])
		assert.Equal(t, 60, st.Remaining[Requests])
	})
}

func TestObserveLowersByWhatSomeoneElseSpent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, time.Minute, 60, 6000)) // 100 tokens/s
		tokens := func(v int) Upstream { return reported(Tokens, v) }

		a := acquire(t, q, 1000) // 5000 left
		assert.False(t, a.Observe(time.Now(), tokens(9000)), "never raised")
		assert.False(t, a.Observe(time.Now(), tokens(0)), "at most once per admission")
		assert.Equal(t, 5000, q.State(time.Now()).Remaining[Tokens])

		// The answer arrives 6 s later; both buckets refilled meanwhile. Its
		// headers describe the moment the upstream took the request.
		b := acquire(t, q, 1000) // 4000 left
		time.Sleep(6 * time.Second)
		assert.False(t, b.Observe(time.Now(), tokens(4000)), "stale but consistent: nothing to lower")
		assert.Equal(t, 4600, q.State(time.Now()).Remaining[Tokens])

		// Someone else had spent 2000 when the upstream took e and c.
		e := acquire(t, q, 100)  // 4500 left
		c := acquire(t, q, 1000) // 3500 left
		assert.True(t, c.Observe(time.Now(), tokens(1500)))
		assert.Equal(t, 1500, q.State(time.Now()).Remaining[Tokens])
		// An answer from before that correction does not lower twice.
		assert.False(t, e.Observe(time.Now(), tokens(2500)))
		assert.Equal(t, 1500, q.State(time.Now()).Remaining[Tokens])

		// Requests too; nothing reported, nothing changes.
		r := acquire(t, q, 0)
		assert.True(t, r.Observe(time.Now(), reported(Requests, 10)))
		assert.Equal(t, 10, q.State(time.Now()).Remaining[Requests])
		assert.False(t, acquire(t, q, 0).Observe(time.Now(), Upstream{}))
	})
}

// Requests the gateway admitted after a request may reach the upstream
// before it: what they paid is not someone else's spending.
func TestObserveIsRobustToReordering(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, time.Minute, 60, 6000))
		tokens := func(v int) Upstream { return reported(Tokens, v) }
		a := acquire(t, q, 1000) // 5000 left
		b := acquire(t, q, 500)  // 4500 left
		c := acquire(t, q, 200)  // 4300 left
		// The upstream took c, then b, then a (5800, 5300, 4300 left), and
		// answered them in that order.
		assert.False(t, c.Observe(time.Now(), tokens(5800)))
		assert.False(t, b.Observe(time.Now(), tokens(5300)))
		assert.False(t, a.Observe(time.Now(), tokens(4300)))
		assert.Equal(t, 4300, q.State(time.Now()).Remaining[Tokens], "nothing lowered")
		// Truncation by the upstream is not spending either.
		d := acquire(t, q, 300)
		assert.False(t, d.Observe(time.Now(), tokens(3999)))
	})
}

// A burst the upstream takes in one order and the gateway hears answered
// in another (any other): the gateway's own requests in flight never
// lower a bucket, whatever the order.
func TestObserveBurstInAnyOrderNeverLowers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 120
		q := NewQueue("m", cfg(200, time.Minute, 200, 1000000))
		adms := make([]*Admission, n)
		for i := range adms {
			adms[i] = acquire(t, q, 10)
		}
		rng := rand.New(rand.NewPCG(7, 17))
		arrival := rng.Perm(n) // the order the upstream took them
		remaining := make([]int, n)
		for k, i := range arrival {
			remaining[i] = 200 - (k + 1) // what it had left after each
		}
		for _, i := range rng.Perm(n) { // the order their answers are heard
			assert.False(t, adms[i].Observe(time.Now(), reported(Requests, remaining[i])), i)
		}
		assert.Equal(t, 200-n, q.State(time.Now()).Remaining[Requests], "nothing lowered")
		// Someone else's spending is still seen: 20 more than the burst.
		d := acquire(t, q, 10)
		assert.True(t, d.Observe(time.Now(), reported(Requests, 200-n-1-20)))
	})
}

func TestObserveDelaysTheHead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600))
		adm := acquire(t, q, 500) // 100 left
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 200, start, out) // 10s
		adm.Observe(time.Now(), reported(Tokens, 0))
		r := <-out
		require.NoError(t, r.err)
		// Nothing was left: 200 at 10/s. A first discrepancy is a burst,
		// not yet a rate: the refill rate stays.
		assert.Equal(t, 20*time.Second, r.at.Round(time.Millisecond))
	})
}

// TestRefillFollowsAnotherUsersSteadyDrain runs the gateway's bucket beside
// a model of the upstream's that someone else drains at 50 tokens/s: the
// gateway's refill rate converges to the 50/s left, and recovers when the
// other user stops.
func TestRefillFollowsAnotherUsersSteadyDrain(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(100, time.Hour, 6000, 6000)) // 100 tokens/s
		upstream, last := 6000.0, time.Now()
		drain := 50.0
		refused := 0
		step := func(until time.Duration) {
			end := time.Now().Add(until)
			for time.Now().Before(end) {
				adm, err := q.Acquire(context.Background(), Cost{Amount: Request(200, 0)})
				require.NoError(t, err)
				now := time.Now()
				upstream = min(6000, upstream+now.Sub(last).Seconds()*(100-drain))
				last = now
				if upstream < 200 { // the upstream refuses: what the gateway does with a 429
					refused++
					adm.Unsend(now)
					adm.Observe(now, reported(Tokens, int(upstream)))
					q.Hold(now, now.Add(time.Duration(math.Ceil((200-upstream)/(100-drain)*1000))*time.Millisecond))
					continue
				}
				upstream -= 200
				adm.Observe(now, reported(Tokens, int(upstream)))
			}
		}
		step(5 * time.Minute)
		q.mu.Lock()
		others := q.b[Tokens].others
		q.mu.Unlock()
		assert.InEpsilon(t, 50, others, 0.1, "estimated others' use, tokens/s")
		t.Logf("upstream refusals while others drained: %d", refused)
		drain = 0
		step(5 * time.Minute)
		q.mu.Lock()
		others = q.b[Tokens].others
		q.mu.Unlock()
		assert.Less(t, others, 5.0, "they stopped; the rate recovers")
	})
}

func TestHoldDelaysAndIsPredicted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, 3*time.Second, 600, 600))
		q.Hold(time.Now(), time.Now().Add(5*time.Second))
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(10, 0)})
		var re *RejectError
		require.ErrorAs(t, err, &re, "full buckets, but held 5s > maxQueueWait 3s")
		assert.Equal(t, 5*time.Second, re.RetryAfter)
		time.Sleep(3 * time.Second)
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 10, start, out)
		r := <-out
		require.NoError(t, r.err)
		assert.Equal(t, 5*time.Second, r.at.Round(time.Millisecond))
		assert.Equal(t, start.Add(5*time.Second), q.HeldUntil())
	})
}

func TestRequeueGoesToTheHeadWithinItsDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(1, time.Minute, 600, 600))
		drain(t, q, 600)
		out := make(chan result, 2)
		acquireAsync(context.Background(), q, 1, 100, start, out) // 10s, and the queue is full
		go func() {
			adm, err := q.Requeue(context.Background(), Cost{Amount: Request(100, 0)}, start.Add(15*time.Second), nil)
			out <- result{id: 2, at: time.Since(start), adm: adm, err: err}
		}()
		synctest.Wait()
		first, second := <-out, <-out
		require.NoError(t, first.err)
		require.NoError(t, second.err)
		assert.Equal(t, 2, first.id, "the requeued request goes first, despite the full queue")
		assert.Equal(t, 10*time.Second, first.at.Round(time.Millisecond))
		assert.Equal(t, 20*time.Second, second.at.Round(time.Millisecond))

		// Past its deadline: rejected at once, with the retry time of a newcomer.
		acquireAsync(context.Background(), q, 3, 100, start, out) // 30s
		_, err := q.Requeue(context.Background(), Cost{Amount: Request(100, 0)}, time.Now().Add(5*time.Second), nil)
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrWaitTooLong)
		assert.Equal(t, 20*time.Second, re.RetryAfter, "behind the one still queued")
		<-out
	})
}
