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
		q.Unsend(time.Now(), 500) // never reached the upstream: all back
		st = q.State(time.Now())
		assert.Equal(t, 600, st.RemainingTokens)
		assert.Equal(t, 60, st.RemainingRequests)
	})
}

func TestObserveLowersNeverRaises(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, time.Minute, 60, 6000), nil)
		assert.False(t, q.Observe(time.Now(), Upstream{RemainingTokens: 9000, HasRemainingTokens: true}))
		assert.Equal(t, 6000, q.State(time.Now()).RemainingTokens, "never above the configured limit")
		assert.True(t, q.Observe(time.Now(), Upstream{RemainingTokens: 1000, HasRemainingTokens: true,
			RemainingRequests: 5, HasRemainingRequests: true}))
		st := q.State(time.Now())
		assert.Equal(t, 1000, st.RemainingTokens)
		assert.Equal(t, 5, st.RemainingRequests)
		assert.False(t, q.Observe(time.Now(), Upstream{}), "nothing reported, nothing changes")
		// Refill goes on from the lowered level.
		time.Sleep(6 * time.Second)
		assert.Equal(t, 1600, q.State(time.Now()).RemainingTokens)
	})
}

func TestObserveWakesNoOneEarlyAndDelaysTheHead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600), nil)
		drain(t, q, 500) // 100 left
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 200, start, out) // 10s
		q.Observe(time.Now(), Upstream{RemainingTokens: 0, HasRemainingTokens: true})
		r := <-out
		require.NoError(t, r.err)
		assert.Equal(t, 20*time.Second, r.at.Round(time.Millisecond), "the upstream had nothing left: 200 at 10/s")
	})
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
