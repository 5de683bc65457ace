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

func cfg(size int, wait time.Duration, rpm, tpm int) Config {
	return Config{MaxQueueSize: size, MaxQueueWait: wait, RPM: rpm, TPM: tpm}
}

// drain takes every token of q at its clock's now, so that later requests
// wait for refill.
func drain(t *testing.T, q *Queue, tokens int) {
	t.Helper()
	acquire(t, q, tokens)
}

// acquire admits a request of tokens at once.
func acquire(t *testing.T, q *Queue, tokens int) *Admission {
	t.Helper()
	adm, err := q.Acquire(context.Background(), Cost{Amount: Request(tokens, 0)})
	require.NoError(t, err)
	require.Zero(t, adm.Wait)
	return adm
}

// reported is what an upstream says it has left of one resource.
func reported(r Resource, remaining int) Upstream {
	var u Upstream
	u.Remaining[r], u.Reported[r] = remaining, true
	return u
}

// result is what a goroutine that called Acquire saw.
type result struct {
	id  int
	at  time.Duration // since the test's start
	adm *Admission
	err error
}

// acquireAsync starts Acquire in a goroutine and waits (in the bubble) until
// it has either returned or blocked in the queue.
func acquireAsync(ctx context.Context, q *Queue, id, tokens int, start time.Time, out chan<- result) {
	go func() {
		adm, err := q.Acquire(ctx, Cost{Amount: Request(tokens, 0)})
		out <- result{id: id, at: time.Since(start), adm: adm, err: err}
	}()
	synctest.Wait()
}

func TestFastPathAndHeaders(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, 5*time.Second, 60, 6000))
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(600, 0)})
		require.NoError(t, err)
		assert.Zero(t, adm.Wait)
		assert.Equal(t, RateState{
			Limit: Vector{Requests: 60, Tokens: 6000}, Remaining: Vector{Requests: 59, Tokens: 5400},
			Reset: [NumBuckets]time.Duration{Requests: time.Second, Tokens: 6 * time.Second},
		}, adm.State)
	})
}

func TestRefillOverTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, 0, 60, 600))
		drain(t, q, 600)
		assert.Equal(t, 0, q.State(time.Now()).Remaining[Tokens])
		time.Sleep(30 * time.Second)
		st := q.State(time.Now())
		assert.Equal(t, 300, st.Remaining[Tokens])
		assert.Equal(t, 30*time.Second, st.Reset[Tokens])
		time.Sleep(time.Hour)
		assert.Equal(t, 600, q.State(time.Now()).Remaining[Tokens], "a bucket never fills past its capacity")
	})
}

func TestStrictFIFONoOvertaking(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Minute, 600, 600)) // 10 tokens/s
		drain(t, q, 600)
		out := make(chan result, 3)
		acquireAsync(context.Background(), q, 1, 300, start, out) // ready at 30s
		acquireAsync(context.Background(), q, 2, 10, start, out)  // small, but behind: 31s
		acquireAsync(context.Background(), q, 3, 100, start, out) // 41s
		var got []result
		for range 3 {
			got = append(got, <-out)
		}
		for i, want := range []time.Duration{30 * time.Second, 31 * time.Second, 41 * time.Second} {
			require.NoError(t, got[i].err)
			assert.Equal(t, i+1, got[i].id, "admission order")
			assert.Equal(t, want, got[i].at.Round(time.Millisecond), "request %d", i+1)
			assert.Equal(t, want, got[i].adm.Wait.Round(time.Millisecond))
		}
	})
}

func TestRejectWhenPredictedWaitTooLong(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("gpt-4o", cfg(10, 20*time.Second, 600, 600))
		drain(t, q, 600)
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 150, start, out) // 15s: queued
		// 150 + 100 = 25s > 20s: rejected at once, not after waiting.
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrWaitTooLong)
		assert.Equal(t, Tokens, re.Resource)
		assert.Equal(t, 25*time.Second, re.RetryAfter)
		assert.Equal(t, 600, re.Limit)
		assert.Equal(t, 750, re.Used, "spent 600 plus 150 promised to the queue")
		assert.Equal(t, 100, re.Requested)
		assert.Equal(t, 1, re.QueueLen)
		assert.Zero(t, time.Since(start), "the no came without waiting")
		// Honest retry: waiting RetryAfter and retrying alone is admitted at once.
		<-out
		time.Sleep(re.RetryAfter - time.Since(start))
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
		require.NoError(t, err)
		assert.Zero(t, adm.Wait)
	})
}

func TestZeroMaxQueueWaitAdmitsNowOrRejects(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", cfg(10, 0, 600, 600))
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(600, 0)})
		require.NoError(t, err)
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		assert.ErrorIs(t, err, ErrWaitTooLong)
		time.Sleep(100 * time.Millisecond) // one token refilled
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		assert.NoError(t, err)
	})
}

func TestQueueFull(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(2, time.Hour, 600, 600))
		drain(t, q, 600)
		out := make(chan result, 2)
		acquireAsync(context.Background(), q, 1, 100, start, out)
		acquireAsync(context.Background(), q, 2, 100, start, out)
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrQueueFull)
		assert.Equal(t, 30*time.Second, re.RetryAfter, "it would be admitted after the two ahead")
		assert.Equal(t, 2, re.QueueLen)
		<-out
		<-out
	})
}

func TestTooLargeNeverRuns(t *testing.T) {
	q := NewQueue("gpt-4o", cfg(10, time.Hour, 60, 1000))
	_, err := q.Acquire(context.Background(), Cost{Amount: Request(1001, 0)})
	var re *RejectError
	require.ErrorAs(t, err, &re)
	assert.ErrorIs(t, err, ErrTooLarge)
	assert.Equal(t, Tokens, re.Resource)
	assert.Equal(t, 1000, re.Limit)
	assert.Equal(t, 1001, re.Requested)
	assert.Zero(t, re.RetryAfter)
}

func TestCancelledRequestLeavesAndPaysNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Hour, 600, 600))
		drain(t, q, 600)
		ctx, cancel := context.WithCancel(context.Background())
		out := make(chan result, 3)
		acquireAsync(ctx, q, 1, 300, start, out)                  // would be 30s
		acquireAsync(context.Background(), q, 2, 300, start, out) // would be 60s
		time.Sleep(10 * time.Second)
		cancel()
		r := <-out
		assert.Equal(t, 1, r.id)
		assert.ErrorIs(t, r.err, context.Canceled)
		assert.Equal(t, 1, q.Stats(time.Now()).Depth)
		// The one behind moves up: it needs 300 tokens, there at 30s.
		r = <-out
		require.NoError(t, r.err)
		assert.Equal(t, 30*time.Second, r.at.Round(time.Millisecond))
		// A later request does not pay for the one that left: 100 more at 40s.
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
		require.NoError(t, err)
		assert.Equal(t, 10*time.Second, adm.Wait.Round(time.Millisecond))
	})
}

func TestCancelInTheMiddleRecomputesPrediction(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, 45*time.Second, 600, 600))
		drain(t, q, 600)
		ctx, cancel := context.WithCancel(context.Background())
		out := make(chan result, 3)
		acquireAsync(context.Background(), q, 1, 100, start, out) // 10s
		acquireAsync(ctx, q, 2, 300, start, out)                  // 40s
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
		assert.ErrorIs(t, err, ErrWaitTooLong, "50s predicted while 2 waits")
		cancel()
		assert.ErrorIs(t, (<-out).err, context.Canceled)
		acquireAsync(context.Background(), q, 3, 100, start, out) // now 20s
		for _, want := range []time.Duration{10 * time.Second, 20 * time.Second} {
			r := <-out
			require.NoError(t, r.err)
			assert.Equal(t, want, r.at.Round(time.Millisecond))
		}
	})
}

func TestAdmittedWhileCancelledGivesBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", Config{MaxQueueSize: 10, MaxQueueWait: time.Hour, RPM: 600, TPM: 600, MaxConcurrent: 1})
		acquire(t, q, 600).Release(time.Now())
		ctx, cancel := context.WithCancel(context.Background())
		q.mu.Lock()
		w, _, err := q.enqueue(time.Now(), Cost{Amount: Request(100, 0)}, nil)
		q.mu.Unlock()
		require.NoError(t, err)
		time.Sleep(10 * time.Second)
		synctest.Wait()
		q.mu.Lock()
		require.True(t, w.done, "admitted by the timer")
		q.mu.Unlock()
		cancel() // the client left the same instant: wait sees both
		adm, err := q.wait(ctx, w)
		assert.Nil(t, adm)
		assert.ErrorIs(t, err, context.Canceled)
		st := q.Stats(time.Now())
		assert.Zero(t, st.InFlight, "its slot is free")
		assert.InDelta(t, 100, st.Remaining[Tokens], 1e-6, "its tokens are back")
		assert.InDelta(t, 600, st.Remaining[Requests], 1e-6, "and its request")
	})
}

func TestRequestBucketCapBindsAfterTokenWait(t *testing.T) {
	// rpm 2: the request bucket holds at most 2, so after a long wait for
	// tokens only two requests can go at once; the third waits 30s for a
	// request token. A prediction that ignored the cap would say 0.
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Hour, 2, 600))
		drain(t, q, 600) // 1 request used too
		out := make(chan result, 3)
		acquireAsync(context.Background(), q, 1, 600, start, out) // 60s (tokens)
		acquireAsync(context.Background(), q, 2, 0, start, out)   // 60s (1 request left after refill cap)
		q.mu.Lock()
		next := q.probe(time.Now(), q.lanes[0], Cost{Amount: Request(0, 0)})
		q.mu.Unlock()
		assert.Equal(t, Requests, next.binding)
		assert.Equal(t, 90*time.Second, next.at.Sub(start).Round(time.Millisecond), "predicted with the cap")
		acquireAsync(context.Background(), q, 3, 0, start, out)
		for _, want := range []time.Duration{60 * time.Second, 60 * time.Second, 90 * time.Second} {
			r := <-out
			require.NoError(t, r.err)
			assert.Equal(t, want, r.at.Round(time.Millisecond), "request %d", r.id)
		}
	})
}

func TestCloseAnswersWaiters(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", cfg(10, time.Hour, 600, 600))
		drain(t, q, 600)
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 100, start, out)
		q.Close()
		assert.ErrorIs(t, (<-out).err, ErrClosed)
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		assert.ErrorIs(t, err, ErrClosed)
	})
}

// TestPredictionMatchesAdmission drives a random workload and checks three
// invariants: each queued request is admitted exactly when predicted at
// enqueue, in FIFO order, and the admitted tokens never exceed what the
// bucket can have supplied.
func TestPredictionMatchesAdmission(t *testing.T) {
	for _, limits := range []struct{ rpm, tpm int }{{120, 6000}, {30, 6000}, {10, 100000}} {
		t.Run(fmt.Sprintf("rpm %d tpm %d", limits.rpm, limits.tpm), func(t *testing.T) {
			testPredictionMatchesAdmission(t, limits.rpm, limits.tpm)
		})
	}
}

func testPredictionMatchesAdmission(t *testing.T, rpm, tpm int) {
	synctest.Test(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(1, 2))
		start := time.Now()
		q := NewQueue("m", cfg(50, 30*time.Second, rpm, tpm))
		type rec struct {
			id        int
			predicted time.Duration
			tokens    int
		}
		var (
			mu       sync.Mutex
			admitted []rec
			pending  sync.WaitGroup
		)
		admittedTokens := 0
		for id := range 300 {
			time.Sleep(time.Duration(rng.IntN(400)) * time.Millisecond)
			tokens := rng.IntN(400)
			now := time.Now()
			q.mu.Lock()
			w, _, err := q.enqueue(now, Cost{Amount: Request(tokens, 0)}, nil)
			var predicted time.Duration
			if w != nil {
				predicted = w.predicted.Sub(start)
			}
			q.mu.Unlock()
			if err != nil {
				continue
			}
			if w == nil {
				mu.Lock()
				admitted = append(admitted, rec{id, now.Sub(start), tokens})
				admittedTokens += tokens
				mu.Unlock()
				continue
			}
			pending.Go(func() {
				<-w.ready
				at := time.Since(start)
				assert.InDelta(t, predicted.Seconds(), at.Seconds(), 0.001, "request %d", id)
				mu.Lock()
				admitted = append(admitted, rec{id, at, tokens})
				admittedTokens += tokens
				mu.Unlock()
			})
		}
		pending.Wait()
		for i := 1; i < len(admitted); i++ {
			assert.Less(t, admitted[i-1].id, admitted[i].id, "FIFO")
		}
		elapsed := time.Since(start)
		assert.LessOrEqual(t, float64(admittedTokens), float64(tpm)+elapsed.Minutes()*float64(tpm)+1)
		assert.LessOrEqual(t, float64(len(admitted)), float64(rpm)+elapsed.Minutes()*float64(rpm)+1)
		assert.Greater(t, len(admitted), 20)
	})
}

func TestConfigValidate(t *testing.T) {
	err := Config{RPM: 0, TPM: -1, MaxQueueSize: -1}.Validate()
	require.Error(t, err)
	for _, want := range []string{"rpm: must be > 0", "tpm: must be > 0", "maxQueueSize: must be >= 0"} {
		assert.Contains(t, err.Error(), want)
	}
}
