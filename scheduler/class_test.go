package scheduler

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// batchCost is a batch request of tokens for client.
func batchCost(tokens, client int) Cost {
	return Cost{Amount: Request(tokens, 0), Client: client, Class: Batch}
}

// An interactive request behind a 1,000-deep batch backlog is admitted as
// soon as the buckets hold its own cost: within one batch request's
// service time, not after the backlog.
func TestInteractiveGoesBeforeABatchBacklog(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 10, MaxQueueWait: time.Minute, RPM: 100000, TPM: 60000, BatchHeadroom: 0.1}
		q := NewQueue("m", c, c.Client("search", 1), c.Client("evals", 1))
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		for range 1000 {
			go q.Acquire(ctx, batchCost(1000, 1)) // a second of refill each
		}
		time.Sleep(30 * time.Second)
		synctest.Wait()
		st := q.Stats(time.Now())
		require.Greater(t, st.DepthBy[Batch], 900, "the batch backlog waits")
		start := time.Now()
		adm, err := q.Acquire(ctx, Cost{Amount: Request(1000, 0), Client: 0})
		require.NoError(t, err)
		assert.LessOrEqual(t, time.Since(start), time.Second, "within one batch request's service time")
		assert.Equal(t, Interactive, adm.Class)
	})
}

// Batch alone uses the whole key but the headroom: it never takes the
// last tenth of a bucket, which an interactive request then finds at once.
func TestBatchKeepsTheHeadroom(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 10, MaxQueueWait: time.Minute, RPM: 100000, TPM: 60000, BatchHeadroom: 0.2}
		q := NewQueue("m", c, c.Client("search", 1), c.Client("evals", 1))
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var mu sync.Mutex
		got := 0
		for range 100 {
			go func() {
				for ctx.Err() == nil {
					if _, err := q.Acquire(ctx, batchCost(500, 1)); err != nil {
						return
					}
					mu.Lock()
					got += 500
					mu.Unlock()
				}
			}()
		}
		for range 600 { // ten minutes, checked every second
			time.Sleep(time.Second)
			synctest.Wait()
			assert.GreaterOrEqual(t, q.Stats(time.Now()).Remaining[Tokens], 0.2*60000-500,
				"batch never takes the headroom (less than one of its requests of refill)")
		}
		mu.Lock()
		total := got
		mu.Unlock()
		// The key's 10 minutes are 600,000 tokens; batch started with the
		// full bucket less the headroom.
		assert.InDelta(t, 600000+0.8*60000, float64(total), 1000, "work-conserving: the whole refill")
		start := time.Now()
		_, err := q.Acquire(ctx, Cost{Amount: Request(10000, 0), Client: 0})
		require.NoError(t, err)
		assert.Zero(t, time.Since(start), "the headroom is there for the next person")
	})
}

// With batchHeadroom 0 batch may use everything.
func TestNoHeadroom(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 10, MaxQueueWait: time.Minute, RPM: 100000, TPM: 6000}
		q := NewQueue("m", c)
		_, err := q.Acquire(context.Background(), batchCost(6000, 0))
		require.NoError(t, err)
		assert.Zero(t, q.Stats(time.Now()).Remaining[Tokens])
	})
}

// A saturating interactive stream cannot hold a batch request forever: it
// is admitted, as interactive, once it has waited batchMaxAge.
func TestStarvationBound(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 1000, MaxQueueWait: time.Hour, RPM: 100000, TPM: 60000, BatchHeadroom: 0.1,
			BatchMaxAge: 2 * time.Minute}
		q := NewQueue("m", c, c.Client("search", 1), c.Client("evals", 1))
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		for range 50 { // interactive demand far beyond the key
			go func() {
				for ctx.Err() == nil {
					q.Acquire(ctx, Cost{Amount: Request(1000, 0), Client: 0})
				}
			}()
		}
		time.Sleep(time.Second)
		start := time.Now()
		adm, err := q.Acquire(ctx, batchCost(1000, 1))
		require.NoError(t, err)
		waited := time.Since(start)
		assert.GreaterOrEqual(t, waited, 2*time.Minute, "not before its age: interactive demand went first")
		assert.LessOrEqual(t, waited, 2*time.Minute+5*time.Second, "then promptly, among the interactive lanes by its weight")
		assert.True(t, adm.Promoted)
		assert.Equal(t, uint64(1), q.Stats(time.Now()).Promoted)
	})
}

// Between batch requests of several clients, weights share as they do
// between interactive ones.
func TestWeightsShareWithinBatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 100, MaxQueueWait: time.Hour, RPM: 100000, TPM: 60000, BatchHeadroom: 0.1}
		q := NewQueue("m", c, c.Client("a", 3), c.Client("b", 1))
		ctx, cancel := context.WithCancel(context.Background())
		var mu sync.Mutex
		got := [2]int{}
		for client := range 2 {
			for range 20 {
				go func() {
					for ctx.Err() == nil {
						if _, err := q.Acquire(ctx, batchCost(700, client)); err != nil {
							return
						}
						mu.Lock()
						got[client] += 700
						mu.Unlock()
					}
				}()
			}
		}
		time.Sleep(time.Second)
		mu.Lock()
		a0, b0 := got[0], got[1]
		mu.Unlock()
		time.Sleep(10 * time.Minute)
		mu.Lock()
		ga, gb := got[0]-a0, got[1]-b0
		mu.Unlock()
		cancel()
		synctest.Wait()
		assert.InDelta(t, 3.0, float64(ga)/float64(gb), 3*0.05, "a %d b %d", ga, gb)
	})
}

// A request's own wait limit lowers its client's, never raises it, and
// the rejection says whose limit it was.
func TestRequestsOwnWaitLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 10, MaxQueueWait: 30 * time.Second, RPM: 100000, TPM: 6000}
		q := NewQueue("m", c)
		drain(t, q, 6000)
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(600, 0), OwnWait: true, MaxWait: 2 * time.Second})
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.Equal(t, WaitRequest, re.WaitLimit)
		assert.Equal(t, 2*time.Second, re.MaxWait)
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(6000, 0), OwnWait: true, MaxWait: time.Hour})
		require.ErrorAs(t, err, &re)
		assert.Equal(t, WaitModel, re.WaitLimit, "an hour is clamped to the model's 30 s")
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(600, 0), OwnWait: true, MaxWait: 10 * time.Second})
		require.NoError(t, err)
		assert.Equal(t, 10*time.Second, adm.MaxQueueWait, "what the ticket's deadline is made of")
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0), OwnWait: true, MaxWait: 0})
		require.ErrorAs(t, err, &re, "0: admit now or refuse now")
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0), OwnWait: true, MaxWait: -1})
		assert.ErrorIs(t, err, ErrInvalidCost)
	})
}

// Batch requests have their own queue size and wait: 10,000 and an hour
// by default; a client's own override them.
func TestBatchWaitsAndSizes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 2, MaxQueueWait: time.Second, RPM: 100000, TPM: 6000}
		own := c.Client("evals", 1)
		own.BatchMaxQueueSize, own.BatchMaxQueueWait, own.OwnBatchWait = 3, 5*time.Minute, true
		q := NewQueue("m", c, c.Client("a", 1), own)
		drain(t, q, 6000)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		for range 65 { // 65 minutes of refill: beyond interactive's 1 s and size 2
			go q.Acquire(ctx, batchCost(6000, 0))
		}
		synctest.Wait()
		assert.Equal(t, 60, q.Stats(time.Now()).DepthBy[Batch], "the model's batch size and wait (an hour) let 60 wait")
		for range 3 {
			go q.Acquire(ctx, batchCost(600, 1))
		}
		synctest.Wait()
		_, err := q.Acquire(ctx, batchCost(600, 1))
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrQueueFull, "its own batchMaxQueueSize, 3")
		_, err = q.Acquire(ctx, batchCost(6000, 0))
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrWaitTooLong)
		assert.Equal(t, Batch, re.Class)
		assert.Equal(t, time.Hour, re.MaxWait, "the model's default batchMaxQueueWait")
	})
}

// The guarantee, with random arrivals of both classes: no request is
// admitted later than it was predicted to be, unless a request that
// arrived after it was admitted before it (an interactive request, or a
// fairer share, cut in).
func TestClassPredictionGuarantee(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { testClassPredictionGuarantee(t, seed) })
	}
}

func testClassPredictionGuarantee(t *testing.T, seed uint64) {
	synctest.Test(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(seed, 7))
		c := Config{MaxQueueSize: 1000, MaxQueueWait: time.Hour, RPM: 100000, TPM: 6000, BatchHeadroom: 0.2,
			BatchMaxAge: time.Hour}
		q := NewQueue("m", c, c.Client("a", 1), c.Client("b", 3), c.Client("c", 2))
		type rec struct {
			arrived, admitted, predicted time.Duration
			seq                          int
		}
		var mu sync.Mutex
		var recs []rec
		start := time.Now()
		n := 0
		for range 60 {
			time.Sleep(time.Duration(rng.IntN(3000)) * time.Millisecond)
			cost := Cost{Amount: Request(100+rng.IntN(1500), 0), Client: rng.IntN(3)}
			if rng.IntN(3) > 0 {
				cost.Class = Batch
			}
			n++
			seq := n
			go func() {
				arrived := time.Since(start)
				adm, err := q.Acquire(context.Background(), cost)
				if err != nil {
					panic(err)
				}
				mu.Lock()
				recs = append(recs, rec{arrived: arrived, admitted: time.Since(start), predicted: arrived + adm.Predicted, seq: seq})
				mu.Unlock()
			}()
			synctest.Wait()
		}
		time.Sleep(2 * time.Hour)
		synctest.Wait()
		require.Len(t, recs, 60)
		sort.Slice(recs, func(i, j int) bool { return recs[i].seq < recs[j].seq })
		for i, r := range recs {
			if r.admitted <= r.predicted+time.Millisecond || r.predicted == r.arrived {
				continue
			}
			cutIn := false
			for _, x := range recs[i+1:] {
				if x.admitted < r.admitted || (x.admitted == r.admitted && x.seq > r.seq) {
					cutIn = true
					break
				}
			}
			assert.True(t, cutIn, "request %d admitted at %s, predicted %s, and nobody later cut in", r.seq, r.admitted, r.predicted)
		}
	})
}
