package scheduler

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func slotCfg(size int, wait time.Duration, slots int) Config {
	return Config{MaxQueueSize: size, MaxQueueWait: wait, RPM: 1000, TPM: 1000000, MaxConcurrent: slots}
}

// holdFor admits a request and releases it d later, in the background.
func holdFor(t *testing.T, q *Queue, d time.Duration) {
	t.Helper()
	adm, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
	require.NoError(t, err)
	go func() {
		time.Sleep(d)
		adm.Release(time.Now())
	}()
}

func TestSlotsQueueInFIFOOrderUntilReleased(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", slotCfg(10, time.Hour, 2))
		holdFor(t, q, 10*time.Second)
		holdFor(t, q, 20*time.Second)
		assert.Equal(t, 2, q.Stats(time.Now()).InFlight)
		out := make(chan result, 2)
		acquireAsync(context.Background(), q, 1, 1, start, out)
		acquireAsync(context.Background(), q, 2, 1, start, out)
		assert.Equal(t, 2, q.Stats(time.Now()).Depth, "both slots busy: they wait")
		first := <-out
		assert.Equal(t, 1, first.id)
		assert.Equal(t, 10*time.Second, first.at.Round(time.Millisecond), "the first free slot goes to the head")
		second := <-out
		assert.Equal(t, 2, second.id)
		assert.Equal(t, 20*time.Second, second.at.Round(time.Millisecond))
	})
}

func TestSlotWaitIsPredictedFromServiceTimes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", slotCfg(10, 15*time.Second, 2))
		// Learn that requests hold a slot for 10 s.
		holdFor(t, q, 10*time.Second)
		holdFor(t, q, 10*time.Second)
		time.Sleep(10 * time.Second)
		synctest.Wait()
		start := time.Now()
		holdFor(t, q, 10*time.Second)
		holdFor(t, q, 10*time.Second)
		out := make(chan result, 2)
		acquireAsync(context.Background(), q, 1, 1, start, out) // predicted at 10s
		acquireAsync(context.Background(), q, 2, 1, start, out) // predicted at 10s (the other slot)
		// A third would get a slot at about 20 s: past maxQueueWait.
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, ErrWaitTooLong)
		assert.Equal(t, Slots, re.Resource)
		assert.Equal(t, 20*time.Second, re.RetryAfter)
		assert.Equal(t, 2, re.Limit)
		assert.Equal(t, 4, re.Used, "two in flight, two waiting")
		for range 2 {
			r := <-out
			require.NoError(t, r.err)
			assert.Equal(t, 10*time.Second, r.at.Round(time.Millisecond), "as predicted")
			r.adm.Release(time.Now())
		}
	})
}

// The predicted slot wait follows how long requests hold their slots now,
// not the first hold it saw: the average moves (7/8 old, 1/8 new).
func TestSlotWaitFollowsChangingServiceTimes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", slotCfg(10, 12*time.Second, 2))
		holdFor(t, q, 10*time.Second) // the first hold sets the average: 10 s
		time.Sleep(10 * time.Second)
		synctest.Wait()
		holdFor(t, q, 20*time.Second) // 11.25 s
		holdFor(t, q, 20*time.Second) // 12.34375 s
		time.Sleep(20 * time.Second)
		synctest.Wait()
		a, b := acquire(t, q, 1), acquire(t, q, 1)
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		var re *RejectError
		require.ErrorAs(t, err, &re, "predicted past 12 s: the average learnt the longer holds")
		assert.Equal(t, Slots, re.Resource)
		assert.Equal(t, 12343750*time.Microsecond, re.RetryAfter)
		a.Release(time.Now())
		b.Release(time.Now())
	})
}

func TestUnsendFreesTheSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", slotCfg(10, time.Hour, 1))
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		require.NoError(t, err)
		adm.Unsend(time.Now())
		assert.Zero(t, q.Stats(time.Now()).InFlight)
		adm.Release(time.Now()) // already given back: nothing happens
		adm2, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		require.NoError(t, err)
		assert.Zero(t, adm2.Wait)
	})
}
