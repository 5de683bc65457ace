package scheduler

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkAcquire measures the admission path when the buckets have room
// (the common case): one queue shared by all goroutines, and one queue per
// goroutine (no shared lock).
func BenchmarkAcquire(b *testing.B) {
	big := Config{MaxQueueSize: 100, MaxQueueWait: time.Minute, RPM: 1 << 30, TPM: 1 << 40}
	b.Run("one queue", func(b *testing.B) {
		q := NewQueue("m", big)
		ctx := context.Background()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := q.Acquire(ctx, Cost{Amount: Request(500, 0)}); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("queue per model", func(b *testing.B) {
		ctx := context.Background()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			q := NewQueue("m", big) // each goroutine its own model's queue
			for pb.Next() {
				if _, err := q.Acquire(ctx, Cost{Amount: Request(500, 0)}); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("pooled", func(b *testing.B) {
		// As the gateway admits: into its pooled admission, released
		// when the answer is done.
		q := NewQueue("m", big)
		ctx := context.Background()
		var into Admission
		b.ReportAllocs()
		for b.Loop() {
			adm, err := q.AcquireInto(ctx, Cost{Amount: Request(500, 0)}, &into)
			if err != nil {
				b.Fatal(err)
			}
			adm.Release(time.Now())
		}
	})
	b.Run("reject predicted", func(b *testing.B) {
		q := NewQueue("m", Config{MaxQueueSize: 100, MaxQueueWait: 0, RPM: 60, TPM: 1000})
		ctx := context.Background()
		q.Acquire(ctx, Cost{Amount: Request(1000, 0)})
		b.ReportAllocs()
		for b.Loop() {
			if _, err := q.Acquire(ctx, Cost{Amount: Request(500, 0)}); err == nil {
				b.Fatal("admitted")
			}
		}
	})
}

// BenchmarkSettle is the reconciliation after a response: a refund of the
// unused reservation (and Observe, the upstream headers' correction).
func BenchmarkSettle(b *testing.B) {
	big := Config{MaxQueueSize: 100, MaxQueueWait: time.Minute, RPM: 1 << 30, TPM: 1 << 40}
	q := NewQueue("m", big)
	ctx := context.Background()
	b.Run("settle", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			adm, _ := q.Acquire(ctx, Cost{Amount: Request(1000, 0)})
			adm.Settle(time.Now(), Request(300, 0))
		}
	})
	b.Run("acquire only", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			q.Acquire(ctx, Cost{Amount: Request(1000, 0)})
		}
	})
	b.Run("observe", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			adm, _ := q.Acquire(ctx, Cost{Amount: Request(1000, 0)})
			adm.Observe(time.Now(), Upstream{Remaining: Vector{Requests: 1 << 30, Tokens: 1 << 40},
				Reported: [NumBuckets]bool{Requests: true, Tokens: true}})
		}
	})
}

// BenchmarkFairShare measures admission with 1, 10 and 100 active
// clients: the fast path (the buckets have room; the admission is written
// into the caller's, as the gateway's pooled requests do), one admission
// from a backlog where every client waits (a heap step: O(log clients)),
// and the prediction for a newcomer when every client has 10 waiting (a
// replay of the requests ahead of it).
func BenchmarkFairShare(b *testing.B) {
	for _, n := range []int{1, 10, 100} {
		big := Config{MaxQueueSize: 1 << 20, MaxQueueWait: time.Hour, RPM: 1 << 30, TPM: 1 << 40}
		clients := make([]Client, n)
		for i := range clients {
			clients[i] = big.Client(fmt.Sprint(i), 1+i%7)
		}
		b.Run(fmt.Sprintf("fast path/%d clients", n), func(b *testing.B) {
			q := NewQueue("m", big, clients...)
			ctx := context.Background()
			var adm Admission
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, err := q.AcquireInto(ctx, Cost{Amount: Request(500, 0), Client: i % n}, &adm); err != nil {
					b.Fatal(err)
				}
				adm.Release(time.Now())
				i++
			}
		})
		b.Run(fmt.Sprintf("from backlog/%d clients", n), func(b *testing.B) {
			q, now := backlogged(clients)
			defer q.mu.Unlock()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				// One arrival, then exactly one admission's worth of tokens.
				q.push(now, q.lanes[i%n], Cost{Amount: Request(100, 0), Client: i % n}).ready = make(chan struct{})
				q.b[Tokens].give(now, 100)
				before := q.depth
				q.dispatch(now)
				if q.depth != before-1 {
					b.Fatalf("admitted %d", before-q.depth)
				}
				i++
			}
			q.disarm()
		})
		b.Run(fmt.Sprintf("predict/%d clients", n), func(b *testing.B) {
			q, now := backlogged(clients)
			defer q.mu.Unlock()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				q.probe(now, q.lanes[i%n], Cost{Amount: Request(100, 0), Client: i % n})
				i++
			}
		})
	}
}

// backlogged returns a queue of clients with an empty token bucket and 10
// requests of 100 tokens waiting for each client, locked.
func backlogged(clients []Client) (*Queue, time.Time) {
	n := len(clients)
	slow := Config{MaxQueueSize: 1 << 20, MaxQueueWait: time.Hour, RPM: 1 << 30, TPM: 6000}
	q := NewQueue("m", slow, clients...)
	now := time.Now()
	q.b[Tokens].take(now, 6000)
	q.mu.Lock()
	for i := range 10 * n {
		q.push(now, q.lanes[i%n], Cost{Amount: Request(100, 0), Client: i % n}).ready = make(chan struct{})
	}
	return q, now
}
