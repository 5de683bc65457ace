package scheduler

import (
	"context"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConfirmedAndRefusedAdmissionsLearnTheSharedLevels(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := cfg(10, 20*time.Second, 60, 6000)
		own := c.Client("b", 1)
		own.TPM = 600
		q := NewQueue("m", c, c.Client("a", 1), own)
		q.ConfirmAdmissions()
		// Two admissions go to the shared store at once; the first is
		// confirmed while the second is still pending.
		first, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0), Client: 1})
		require.NoError(t, err)
		second, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0), Client: 1})
		require.NoError(t, err)
		first.Confirm(time.Now(), &Levels{Model: [NumBuckets]float64{31, 300}, Client: [NumBuckets]float64{0, 150}})
		st := q.State(time.Now())
		assert.Equal(t, 30, st.Remaining[Requests], "the store's 31, less the one still pending")
		assert.Equal(t, 200, st.Remaining[Tokens])
		// The store refuses the second: it goes back, and the store's
		// levels (which never counted it) stand.
		second.Refused(time.Now(), Levels{Model: [NumBuckets]float64{31, 300}, Client: [NumBuckets]float64{0, 150}})
		st = q.State(time.Now())
		assert.Equal(t, 31, st.Remaining[Requests])
		assert.Equal(t, 300, st.Remaining[Tokens])
		second.Release(time.Now())
		// 400 tokens: 1 s at 100 a second for the model's shared level,
		// 25 s at 10 a second for b's own 150: over b's 20.
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(400, 0), Client: 1})
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.Equal(t, "b", re.Client)
		assert.Equal(t, 25*time.Second, re.RetryAfter.Round(time.Millisecond))
		// a has no bucket of its own: the model's 1 s.
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(400, 0), Client: 0})
		require.NoError(t, err)
		assert.Equal(t, time.Second, adm.Wait.Round(time.Millisecond))
	})
}

func TestShareSplitsEveryLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := Config{MaxQueueSize: 10, MaxQueueWait: 0, RPM: 60, TPM: 6000, MaxConcurrent: 3}
		q := NewQueue("m", c)
		q.Share(time.Now(), 1.0/3)
		st := q.State(time.Now())
		assert.Equal(t, 20, st.Limit[Requests])
		assert.Equal(t, 2000, st.Limit[Tokens])
		assert.Equal(t, 2000, st.Remaining[Tokens], "and its share of what is left")
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		require.NoError(t, err)
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		assert.Error(t, err, "one slot of three")
		q.Share(time.Now(), 1)
		assert.Equal(t, 6000, q.State(time.Now()).Limit[Tokens])
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0)})
		assert.NoError(t, err, "the slots are back")
	})
}

func TestShareCountsThePendingAdmissionsAsShared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", Config{MaxQueueSize: 10, MaxQueueWait: 0, RPM: 60, TPM: 6000})
		q.ConfirmAdmissions()
		for range 20 { // 20 requests and 2,000 tokens spent, confirmed
			adm, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
			require.NoError(t, err)
			adm.Confirm(time.Now(), nil)
		}
		a, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
		require.NoError(t, err)
		b, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0)})
		require.NoError(t, err)
		// The store goes away while both are pending: half of what is
		// left, the two included, is this replica's.
		q.Share(time.Now(), 0.5)
		a.Unsend(time.Now())
		b.Unsend(time.Now())
		st := q.State(time.Now())
		assert.Equal(t, 20, st.Remaining[Requests])
		assert.Equal(t, 2000, st.Remaining[Tokens])
	})
}

func TestReconfigureKeepsEveryoneInOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := cfg(10, time.Hour, 60, 6000) // 100 tokens a second
		q := NewQueue("m", c, c.Client("a", 1), c.Client("gone", 1))
		drain(t, q, 6000)
		start := time.Now()
		out := make(chan result, 8)
		for i := range 3 {
			acquireAsync(context.Background(), q, i, 100, start, out) // a's: 1 s, 2 s, 3 s
		}
		go func() {
			adm, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 0), Client: 1})
			out <- result{id: 9, at: time.Since(start), adm: adm, err: err}
		}()
		synctest.Wait()
		// Ten times the rate, a new client first, "gone" removed: the
		// waiters stay, in order, and go at the new rate.
		c2 := cfg(10, time.Hour, 600, 60000) // 1,000 tokens a second
		q.Reconfigure(time.Now(), c2, c2.Client("new", 1), c2.Client("a", 2))
		var ids []int
		for range 4 {
			r := <-out
			require.NoError(t, r.err)
			assert.Less(t, r.at, time.Second, "request %d goes at the new rate", r.id)
			ids = append(ids, r.id)
		}
		aOrder := []int{}
		for _, id := range ids {
			if id < 9 {
				aOrder = append(aOrder, id)
			}
		}
		assert.Equal(t, []int{0, 1, 2}, aOrder, "a's in order")
		assert.Contains(t, ids, 9, "the gone client's waiter was admitted, not dropped")
		assert.Equal(t, 60000, q.Config().TPM)
		// The new client is number 0 now.
		_, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 0})
		assert.NoError(t, err)
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 2})
		assert.ErrorIs(t, err, ErrUnknownClient, "only the new clients are addressable... and the drained one is gone")
	})
}

// TestRenumberedClientWaitsInItsOwnLane: a reload that adds a client
// renumbers the others; a request counted with its old index, admitted
// after the queue was reconfigured, still waits in its own client's lane.
func TestRenumberedClientWaitsInItsOwnLane(t *testing.T) {
	cfg := Config{RPM: 60, TPM: 100000, MaxQueueSize: 10, MaxQueueWait: time.Second}
	q := NewQueue("m", cfg, cfg.Client("a", 1), cfg.Client("c", 1))
	// b is added: c moves from index 1 to 2, and only b has a limit.
	b := cfg.Client("b", 1)
	b.RPM = 1
	q.Reconfigure(time.Now(), cfg, cfg.Client("a", 1), b, cfg.Client("c", 1))
	for range 3 {
		adm, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 1, Name: "c"})
		require.NoError(t, err, "c's request, counted before the reload: not b's one-a-minute lane")
		adm.Release(time.Now())
	}
	_, err := q.Acquire(context.Background(), Cost{Amount: Request(1, 0), Client: 5, Name: "gone"})
	assert.ErrorIs(t, err, ErrUnknownClient)
}

// Other gateways' waiting requests lengthen the wait this queue predicts
// (they share the refill): a request that fits alone is refused at once
// when they are told, with a Retry-After that counts them; told nothing
// for a second, the queue predicts alone again.
func TestOthersLengthenThePrediction(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", Config{MaxQueueSize: 100, MaxQueueWait: 5 * time.Second, RPM: 60})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		for range 60 { // the minute's 60: one request a second from now
			a, err := q.Acquire(ctx, Cost{Amount: Request(1, 0)})
			require.NoError(t, err)
			a.Release(time.Now())
		}
		queued := func() {
			go func() {
				if a, err := q.Acquire(ctx, Cost{Amount: Request(1, 0)}); err == nil {
					a.Release(time.Now())
				}
			}()
			synctest.Wait()
		}
		// Two other gateways have requests waiting: three share the refill.
		q.Others(time.Now(), 2)
		queued() // 1 s alone, 3 s with them: it waits
		assert.Equal(t, 1, q.Depth())
		_, err := q.Acquire(ctx, Cost{Amount: Request(1, 0)})
		var re *RejectError
		require.ErrorAs(t, err, &re, "2 s alone, 6 s with them: refused at once")
		assert.Equal(t, ErrWaitTooLong, re.Reason)
		assert.Equal(t, 6*time.Second, re.RetryAfter.Round(time.Millisecond))

		// Told nothing for a second, the queue predicts alone again.
		time.Sleep(othersFor)
		queued()
		assert.Equal(t, 1, q.Depth(), "the first admitted; 1 s alone, the next waits")
		// Told none, at once.
		q.Others(time.Now(), 2)
		q.Others(time.Now(), 0)
		queued()
		assert.Equal(t, 2, q.Depth())
	})
}

// However long the wait and however many gateways, the prediction stays a
// wait (no overflow into a negative one), bounded by a day.
func TestOthersNeverOverflow(t *testing.T) {
	q := NewQueue("m", Config{MaxQueueSize: 1, MaxQueueWait: time.Minute, RPM: 1})
	now := time.Now()
	q.Others(now, 1<<20)
	q.mu.Lock()
	defer q.mu.Unlock()
	assert.Equal(t, 24*time.Hour, q.withOthers(now, 1000*time.Hour))
	q.oth.n = 2
	assert.Equal(t, 3*time.Second, q.withOthers(now, time.Second))
}
