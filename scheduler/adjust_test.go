package scheduler

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSettleRefundAdmitsTheHeadSooner(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600), nil) // 10 tokens/s
		drain(t, q, 600)
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 300, start, out) // 30s without a refund
		time.Sleep(5 * time.Second)
		q.Settle(time.Now(), 600, 300) // the drained request used half
		r := <-out
		require.NoError(t, r.err)
		assert.Equal(t, 5*time.Second, r.at.Round(time.Millisecond), "admitted the moment the refund arrived")
		assert.Equal(t, 50, q.State(time.Now()).RemainingTokens, "300 refunded + 50 refilled - 300 taken")
	})
}

func TestSettleOverrunIsChargedAsDebt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600), nil)
		drain(t, q, 600)
		q.Settle(time.Now(), 600, 900) // the upstream counted 300 more
		assert.Equal(t, -300.0, q.Stats(time.Now()).RemainingTokens)
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 100, start, out)
		r := <-out
		require.NoError(t, r.err)
		assert.Equal(t, 40*time.Second, r.at.Round(time.Millisecond), "debt of 300 then 100: 40s at 10/s")
	})
}

func TestSettleNoChangeAndUnsend(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, time.Minute, 60, 600), nil)
		drain(t, q, 500)
		q.Settle(time.Now(), 500, 500)
		st := q.State(time.Now())
		assert.Equal(t, 100, st.RemainingTokens)
		assert.Equal(t, 59, st.RemainingRequests)
		q.Unsend(time.Now(), Admission{}, 500) // never reached the upstream: all back
		st = q.State(time.Now())
		assert.Equal(t, 600, st.RemainingTokens)
		assert.Equal(t, 60, st.RemainingRequests)
	})
}

func TestObserveLowersByWhatSomeoneElseSpent(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, time.Minute, 60, 6000), nil) // 100 tokens/s
		adm, err := q.Acquire(context.Background(), Cost{Tokens: 1000})
		require.NoError(t, err)
		tokens := func(v int) Upstream { return Upstream{RemainingTokens: v, HasRemainingTokens: true} }

		assert.False(t, q.Observe(time.Now(), adm.Mark, tokens(5000)), "the upstream saw what we saw")
		assert.False(t, q.Observe(time.Now(), adm.Mark, tokens(9000)), "never raised")
		assert.Equal(t, 5000, q.State(time.Now()).RemainingTokens)

		// The answer arrives 6 s later; both buckets refilled meanwhile. Its
		// headers describe the moment the upstream took the request.
		time.Sleep(6 * time.Second)
		assert.False(t, q.Observe(time.Now(), adm.Mark, tokens(5000)), "stale but consistent: nothing to lower")
		assert.Equal(t, 5600, q.State(time.Now()).RemainingTokens)

		// Someone else had spent 2000 when the upstream took it.
		assert.True(t, q.Observe(time.Now(), adm.Mark, tokens(3000)))
		assert.Equal(t, 3600, q.State(time.Now()).RemainingTokens)
		// A second answer from before that correction does not lower twice.
		assert.False(t, q.Observe(time.Now(), adm.Mark, tokens(3000)))
		assert.Equal(t, 3600, q.State(time.Now()).RemainingTokens)

		// Requests too; nothing reported, nothing changes.
		assert.True(t, q.Observe(time.Now(), adm.Mark, Upstream{RemainingRequests: 10, HasRemainingRequests: true}))
		assert.Equal(t, 11, q.State(time.Now()).RemainingRequests, "59 at the mark and full again since; 49 spent elsewhere")
		assert.False(t, q.Observe(time.Now(), adm.Mark, Upstream{}))
	})
}

func TestObserveDelaysTheHead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600), nil)
		adm, err := q.Acquire(context.Background(), Cost{Tokens: 500}) // 100 left
		require.NoError(t, err)
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 200, start, out) // 10s
		q.Observe(time.Now(), adm.Mark, Upstream{RemainingTokens: 0, HasRemainingTokens: true})
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
		q := NewQueue("m", cfg(100, time.Hour, 6000, 6000), nil) // 100 tokens/s
		upstream, last := 6000.0, time.Now()
		drain := 50.0
		refused := 0
		step := func(until time.Duration) {
			end := time.Now().Add(until)
			for time.Now().Before(end) {
				adm, err := q.Acquire(context.Background(), Cost{Tokens: 200})
				require.NoError(t, err)
				now := time.Now()
				upstream = min(6000, upstream+now.Sub(last).Seconds()*(100-drain))
				last = now
				if upstream < 200 { // the upstream refuses: what the gateway does with a 429
					refused++
					q.Unsend(now, adm, 200)
					q.Observe(now, adm.Mark.Unpaid(Cost{Tokens: 200}), Upstream{RemainingTokens: int(upstream), HasRemainingTokens: true})
					q.Hold(now, now.Add(time.Duration((200-upstream)/(100-drain)*float64(time.Second))))
					continue
				}
				upstream -= 200
				q.Observe(now, adm.Mark, Upstream{RemainingTokens: int(upstream), HasRemainingTokens: true})
			}
		}
		step(5 * time.Minute)
		q.mu.Lock()
		others := q.tok.others
		q.mu.Unlock()
		assert.InEpsilon(t, 50, others, 0.1, "estimated others' use, tokens/s")
		t.Logf("upstream refusals while others drained: %d", refused)
		drain = 0
		step(5 * time.Minute)
		q.mu.Lock()
		others = q.tok.others
		q.mu.Unlock()
		assert.Less(t, others, 5.0, "they stopped; the rate recovers")
	})
}

func TestUnpaidMark(t *testing.T) {
	m := Mark{Requests: 5, Tokens: 100}.Unpaid(Cost{Tokens: 50})
	assert.Equal(t, Mark{Requests: 6, Tokens: 150}, m)
}

func TestHoldDelaysAndIsPredicted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, 3*time.Second, 600, 600), nil)
		q.Hold(time.Now(), time.Now().Add(5*time.Second))
		_, err := q.Acquire(context.Background(), Cost{Tokens: 10})
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
		q := NewQueue("m", cfg(1, time.Minute, 600, 600), nil)
		drain(t, q, 600)
		out := make(chan result, 2)
		acquireAsync(context.Background(), q, 1, 100, start, out) // 10s, and the queue is full
		go func() {
			adm, err := q.Requeue(context.Background(), Cost{Tokens: 100}, start.Add(15*time.Second))
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
		_, err := q.Requeue(context.Background(), Cost{Tokens: 100}, time.Now().Add(5*time.Second))
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrWaitTooLong)
		assert.Equal(t, 20*time.Second, re.RetryAfter, "behind the one still queued")
		<-out
	})
}
