package scheduler

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A client that leaves at the very instant its request is admitted must not
// keep the concurrency slot: on a maxConcurrent 1 model that would stall
// every later request.
func TestLeavingAsAdmittedFreesTheSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", Config{MaxQueueSize: 10, MaxQueueWait: time.Hour, RPM: 600, TPM: 600, MaxConcurrent: 1})
		for range 200 {
			time.Sleep(time.Minute) // full again
			acquire(t, q, 600).Release(time.Now())
			// Admitted when the bucket refills (60 s), the instant its client gives up.
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			adm, err := q.Acquire(ctx, Cost{Amount: Request(600, 0)})
			cancel()
			if err == nil {
				adm.Release(time.Now())
			}
			st := q.Stats(time.Now())
			assert.Zero(t, st.InFlight, "the slot of a request whose client left is free")
			if err != nil {
				assert.InDelta(t, 600, st.Remaining[Tokens], 1e-6, "and it paid nothing")
			}
			if t.Failed() {
				return
			}
		}
	})
}

// Two requests admitted in the same instant: giving one back (Unsend) and
// then releasing it as well must not free the other's slot.
func TestUnsendThenReleaseFreesOneSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", slotCfg(10, time.Hour, 2))
		h1, h2 := acquire(t, q, 1), acquire(t, q, 1)
		out := make(chan result, 2)
		acquireAsync(context.Background(), q, 1, 1, start, out)
		acquireAsync(context.Background(), q, 2, 1, start, out)
		time.Sleep(time.Second)
		h1.Release(time.Now()) // both waiters admitted at the same instant
		h2.Release(time.Now())
		a, b := <-out, <-out
		require.NoError(t, a.err)
		require.NoError(t, b.err)
		require.Equal(t, a.at, b.at)
		a.adm.Unsend(time.Now())
		a.adm.Release(time.Now())
		a.adm.Unsend(time.Now())
		assert.Equal(t, 1, q.Stats(time.Now()).InFlight, "b still holds its slot")
		acquireAsync(context.Background(), q, 3, 1, start, out)
		acquireAsync(context.Background(), q, 4, 1, start, out)
		c := <-out
		require.NoError(t, c.err)
		assert.Equal(t, 3, c.id)
		assert.Equal(t, 1, q.Stats(time.Now()).Depth, "never more than maxConcurrent in flight")
		b.adm.Release(time.Now())
		d := <-out
		require.NoError(t, d.err)
		assert.Equal(t, 4, d.id)
	})
}

// A request predicted to get a slot within maxQueueWait, behind requests
// that then hold their slots far longer, is turned away at maxQueueWait,
// not kept waiting.
func TestNoRequestWaitsPastMaxQueueWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", slotCfg(10, 30*time.Second, 1))
		held := acquire(t, q, 1) // holds its slot "forever": a client that stopped reading
		out := make(chan result, 1)
		acquireAsync(context.Background(), q, 1, 1, start, out)
		r := <-out
		var re *RejectError
		require.ErrorAs(t, r.err, &re)
		assert.ErrorIs(t, r.err, ErrWaitTooLong)
		assert.Equal(t, Slots, re.Resource)
		assert.Equal(t, 30*time.Second, r.at)
		assert.Zero(t, q.Stats(time.Now()).Depth)
		held.Release(time.Now())
		assert.Zero(t, acquire(t, q, 1).Wait, "the slot is free again")
	})
}
