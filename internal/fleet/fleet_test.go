package fleet

import (
	"context"
	"errors"
	"net/url"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/backends"
)

func TestSingleLeasesItsURL(t *testing.T) {
	u, _ := url.Parse("https://api.example.com")
	s := NewSingle(u)
	var req Request
	req.Reset("gpt-4o", nil, time.Time{})
	l, err := s.Lease(context.Background(), &req)
	require.NoError(t, err)
	assert.Equal(t, u, l.Target)
	assert.Empty(t, l.Model, "sent as the client named it")
	assert.True(t, l.SendKey)
	l.Failed(errors.New("x")) // nothing to avoid, nothing held
	l.Release()
	l.Release()
	assert.True(t, s.Knows("anything"))
}

func testFleet(t *testing.T, maxConcurrent int) *Fleet {
	t.Helper()
	cfg := backends.Config{Backends: []backends.BackendConfig{
		{Name: "a", URL: "http://127.0.0.1:1", Models: []string{"m"}, MaxConcurrent: maxConcurrent},
		{Name: "b", URL: "http://127.0.0.1:2", Models: []string{"m"}, MaxConcurrent: maxConcurrent},
	}}
	cfg.SetDefaults()
	f, err := New(cfg, Options{})
	require.NoError(t, err)
	return f
}

// A lease holds its backend until released, once; a failed send is
// avoided by the request's next one.
func TestFleetLeases(t *testing.T) {
	f := testFleet(t, 0)
	var req Request
	req.Reset("m", nil, time.Now().Add(time.Second))
	l, err := f.Lease(context.Background(), &req)
	require.NoError(t, err)
	first := l.Backend
	assert.Equal(t, "m", l.Model)
	inflight := func() (n int64) {
		for _, st := range f.Pool().Status() {
			n += st.InFlight
		}
		return n
	}
	assert.EqualValues(t, 1, inflight())
	l.Failed(errors.New("connection reset"))
	l.Release()
	l.Release() // at most once in effect
	assert.Zero(t, inflight())
	l2, err := f.Lease(context.Background(), &req)
	require.NoError(t, err)
	assert.NotEqual(t, first, l2.Backend, "the next send goes to the twin")
	l2.Release()
	_, err = f.Lease(context.Background(), &Request{Model: "nope"})
	assert.ErrorIs(t, err, backends.ErrUnknownModel)
}

// Every backend at its maxConcurrent: a lease waits for a free slot, up to
// the request's deadline, then fails with ErrBusy.
func TestFleetLeaseWaitsForASlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := testFleet(t, 1)
		var held []*Lease
		for range 2 {
			var r Request
			r.Reset("m", nil, time.Now().Add(time.Second))
			l, err := f.Lease(context.Background(), &r)
			require.NoError(t, err)
			held = append(held, l)
		}
		var req Request
		req.Reset("m", nil, time.Now().Add(10*time.Second))
		got := make(chan error, 1)
		go func() {
			l, err := f.Lease(context.Background(), &req)
			if err == nil {
				l.Release()
			}
			got <- err
		}()
		time.Sleep(5 * time.Second)
		held[0].Release() // a slot frees before the deadline
		assert.NoError(t, <-got)
		req.Reset("m", nil, time.Now().Add(10*time.Second))
		held[0], _ = f.Lease(context.Background(), &req)
		start := time.Now()
		_, err := f.Lease(context.Background(), &req)
		assert.ErrorIs(t, err, backends.ErrBusy)
		assert.Equal(t, 10*time.Second, time.Since(start), "waited to the deadline")
		for _, l := range held {
			l.Release()
		}
	})
}
