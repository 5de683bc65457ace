package replicas

import (
	"context"
	"testing"
	"time"

	"github.com/llproxy/llproxy/internal/duration"
	"github.com/llproxy/llproxy/internal/redistest"
	"github.com/llproxy/llproxy/scheduler"
)

// BenchmarkTake is one admission through Redis on loopback: the take
// script across the model's and the client's buckets, one round trip.
func BenchmarkTake(b *testing.B) {
	r := redistest.Start(b)
	m := scheduler.Config{RPM: 1 << 30, TPM: 1 << 40, MaxQueueSize: 10, MaxQueueWait: time.Minute}
	own := m.Client("own", 1)
	own.TPM = 1 << 40
	s, err := New(Config{Redis: r.URL(), Timeout: duration.Duration(time.Second)}, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	q := s.Queue("bench", "m", m, []scheduler.Client{m.Client("a", 1), own})
	ctx := context.Background()
	for _, c := range []struct {
		name   string
		client int
	}{{"model buckets", 0}, {"model and client buckets", 1}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if took, err := q.Take(ctx, c.client, scheduler.Request(500, 0), Ask{}); err != nil || !took.OK {
					b.Fatal(err, took)
				}
			}
		})
		b.Run(c.name+", parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if took, err := q.Take(ctx, c.client, scheduler.Request(500, 0), Ask{}); err != nil || !took.OK {
						b.Fatal(err, took)
					}
				}
			})
		})
	}
}
