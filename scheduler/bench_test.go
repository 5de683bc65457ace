package scheduler

import (
	"context"
	"testing"
	"time"
)

// BenchmarkAcquire measures the admission path when the buckets have room
// (the common case): one queue shared by all goroutines, and one queue per
// goroutine (no shared lock).
func BenchmarkAcquire(b *testing.B) {
	big := Config{MaxQueueSize: 100, MaxQueueWait: Duration(time.Minute), RPM: 1 << 30, TPM: 1 << 40}
	b.Run("one queue", func(b *testing.B) {
		q := NewQueue("m", big)
		ctx := context.Background()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := q.Acquire(ctx, Cost{Tokens: 500}); err != nil {
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
				if _, err := q.Acquire(ctx, Cost{Tokens: 500}); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("reject predicted", func(b *testing.B) {
		q := NewQueue("m", Config{MaxQueueSize: 100, MaxQueueWait: 0, RPM: 60, TPM: 1000})
		ctx := context.Background()
		q.Acquire(ctx, Cost{Tokens: 1000})
		b.ReportAllocs()
		for b.Loop() {
			if _, err := q.Acquire(ctx, Cost{Tokens: 500}); err == nil {
				b.Fatal("admitted")
			}
		}
	})
}

// BenchmarkSettle is the reconciliation after a response: a refund of the
// unused reservation (and Observe, the upstream headers' correction).
func BenchmarkSettle(b *testing.B) {
	big := Config{MaxQueueSize: 100, MaxQueueWait: Duration(time.Minute), RPM: 1 << 30, TPM: 1 << 40}
	q := NewQueue("m", big)
	ctx := context.Background()
	b.Run("settle", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			adm, _ := q.Acquire(ctx, Cost{Tokens: 1000})
			adm.Settle(time.Now(), 300)
		}
	})
	b.Run("acquire only", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			q.Acquire(ctx, Cost{Tokens: 1000})
		}
	})
	b.Run("observe", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			adm, _ := q.Acquire(ctx, Cost{Tokens: 1000})
			adm.Observe(time.Now(), Upstream{RemainingTokens: 1 << 40, HasRemainingTokens: true,
				RemainingRequests: 1 << 30, HasRemainingRequests: true})
		}
	})
}
