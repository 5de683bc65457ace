package ticket

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/clients"
	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/fleet"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/models"
	"github.com/llproxy/llproxy/scheduler"
)

// lessor records what each lease asked for.
type lessor struct{ asked []fleet.Request }

func (l *lessor) Lease(_ context.Context, req *fleet.Request) (*fleet.Lease, error) {
	l.asked = append(l.asked, *req)
	return nil, fleet.ErrBusy
}

// world is one route's models and clients, as the route builds them.
type world struct {
	gate    *Gate
	lessor  *lessor
	clients *clients.Directory
	model   *models.Model
}

// newWorld builds a route "r" with model m (rpm 60, tpm 6000, one slot,
// maxQueueWait 30s) and clients fast (its own maxQueueWait 2s) and
// budgeted (100 tokens a day).
func newWorld(t *testing.T) *world {
	t.Helper()
	cfg, err := config.Parse([]byte(`{
	  "clients": {
	    "fast": {"keys": ["f1"], "limits": {"m": {"maxQueueWait": 2}}},
	    "budgeted": {"keys": ["b1"], "limits": {"*": {"tokensPerDay": 100}}}
	  },
	  "routes": {"r": {"forward": "http://x", "models": {"m": {"rpm": 60, "tpm": 6000, "maxConcurrent": 1,
	    "maxQueueSize": 5, "maxQueueWait": 30}, "big": {"rpm": 1000000, "tpm": 100000000}}}}
	}`), nil)
	require.NoError(t, err)
	m, err := metrics.New(prometheus.NewRegistry(), nil)
	require.NoError(t, err)
	dir := clients.New(cfg)
	reg, err := models.New("r", cfg.Routes["r"], m, dir.Queue, nil, nil)
	require.NoError(t, err)
	ms, err := reg.For("m")
	require.NoError(t, err)
	w := &world{lessor: &lessor{}, clients: dir, model: ms}
	w.gate = &Gate{Models: reg, Lessor: w.lessor, SettleActual: true}
	return w
}

func (w *world) client(t *testing.T, key string) *clients.Client {
	c, ok := w.clients.Identify(key)
	require.True(t, ok)
	return c
}

func (w *world) ask(c *clients.Client, tokens int) Ask {
	return Ask{Client: c, Model: w.model, Name: "m", Cost: scheduler.Request(tokens, 0)}
}

// The ticket's deadline is its client's maxQueueWait (2 s, not the
// model's 30 s), and every later wait uses it: the fleet lease, and a
// requeue after an upstream 429 whose hold outlasts it.
func TestTheTicketOwnsItsDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := newWorld(t)
		start := time.Now()
		tk, err := w.gate.Admit(context.Background(), w.ask(w.client(t, "f1"), 10))
		require.NoError(t, err)
		defer tk.Release(time.Now())
		assert.Equal(t, start.Add(2*time.Second), tk.Deadline())

		_, err = tk.Lease(context.Background())
		require.ErrorIs(t, err, fleet.ErrBusy)
		require.Len(t, w.lessor.asked, 1)
		assert.Equal(t, tk.Deadline(), w.lessor.asked[0].Deadline, "the fleet waits until the ticket's deadline")
		assert.Equal(t, "m", w.lessor.asked[0].Model)

		// The upstream refused it and asked for 5 s: past the deadline,
		// so the requeue is refused at once, without waiting.
		time.Sleep(500 * time.Millisecond)
		tk.Refused(time.Now(), scheduler.Upstream{}, time.Now().Add(5*time.Second))
		err = tk.Requeue(context.Background(), true)
		var re *scheduler.RejectError
		require.ErrorAs(t, err, &re)
		assert.ErrorIs(t, err, scheduler.ErrWaitTooLong)
		assert.Equal(t, 500*time.Millisecond, time.Since(start), "refused at once")
		_, ok := tk.Rate()
		assert.False(t, ok, "the rejection's headers are its own")
	})
}

// A requeue within the deadline waits for the hold, then holds a new
// admission, and Wait counts both waits.
func TestRequeueWaitsWithinTheDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := newWorld(t)
		tk, err := w.gate.Admit(context.Background(), w.ask(w.client(t, "f1"), 10))
		require.NoError(t, err)
		defer tk.Release(time.Now())
		now := time.Now()
		tk.Refused(now, scheduler.Upstream{}, now.Add(time.Second))
		require.NoError(t, tk.Requeue(context.Background(), true))
		assert.Equal(t, time.Second, time.Since(now))
		assert.Equal(t, time.Second, tk.Wait)
		st, ok := tk.Rate()
		require.True(t, ok)
		assert.Equal(t, 59, st.Remaining[scheduler.Requests], "its request given back (60, full), then paid again")
		// Out of tries (wait false): refused at once while the queue is held.
		now = time.Now()
		tk.Refused(now, scheduler.Upstream{}, now.Add(time.Second))
		require.ErrorIs(t, tk.Requeue(context.Background(), false), scheduler.ErrWaitTooLong)
	})
}

// Release gives everything back, once, whatever was called before: the
// slot (the model has one), the budget's reservation; a nil ticket does
// nothing.
func TestReleaseGivesEverythingBackOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := newWorld(t)
		b := w.client(t, "b1")
		tk, err := w.gate.Admit(context.Background(), w.ask(b, 60))
		require.NoError(t, err)
		// The budget holds 60 of 100: another 60 does not fit while it
		// is in flight.
		_, err = w.gate.Admit(context.Background(), w.ask(b, 60))
		var reserved *clients.Reserved
		require.ErrorAs(t, err, &reserved)
		assert.Zero(t, w.model.Queue.Depth(), "nothing queued")

		tk.Unsend(time.Now())
		tk.Release(time.Now())
		tk.Release(time.Now())
		tk.Settle(time.Now(), scheduler.Request(60, 0), 0, true) // after Release: nothing
		tk2, err := w.gate.Admit(context.Background(), w.ask(b, 60))
		require.NoError(t, err, "slot and budget are free again")
		assert.Zero(t, tk2.Wait)
		tk2.Settle(time.Now(), scheduler.Request(70, 0), 0, true)
		tk2.Release(time.Now())
		_, err = w.gate.Admit(context.Background(), w.ask(b, 40))
		var exhausted *clients.Exhausted
		require.ErrorAs(t, err, &exhausted, "70 spent: 40 more does not fit the 100")

		var none *Ticket
		none.Release(time.Now())
		none.Unsend(time.Now())
		none.Settle(time.Now(), scheduler.Vector{}, 0, true)
		assert.False(t, none.Observe(time.Now(), scheduler.Upstream{}))
		assert.True(t, errors.Is(none.Requeue(context.Background(), true), scheduler.ErrClosed))
	})
}

// A ticket pooled in its owner's state is admitted into again after
// Release, and starts afresh.
func TestAdmitIntoReusesAReleasedTicket(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := newWorld(t)
		var pooled Ticket
		c := w.client(t, "f1")
		for range 3 {
			tk, err := w.gate.AdmitInto(context.Background(), w.ask(c, 10), &pooled)
			require.NoError(t, err)
			assert.Same(t, &pooled, tk)
			assert.Zero(t, tk.Wait)
			tk.Release(time.Now())
			time.Sleep(time.Second)
		}
		big, err := w.gate.Models.For("big")
		require.NoError(t, err)
		ask := Ask{Client: c, Model: big, Name: "big", Cost: scheduler.Request(1, 0)}
		allocs := testing.AllocsPerRun(100, func() {
			tk, _ := w.gate.AdmitInto(context.Background(), ask, &pooled)
			tk.Release(time.Now())
		})
		assert.Zero(t, allocs, "admission into a pooled ticket allocates nothing")
	})
}
