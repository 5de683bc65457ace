package replicas

import (
	"context"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/llproxy/llproxy/internal/safe"
)

// Budget writes coalesced: a settled request's addition to a shared
// budget (tokens per day, money per day and month) is queued, and what
// is queued is written in one pipeline a tick, so that concurrent
// requests share one round trip, and several requests of one client and
// budget are one INCRBY.

// batchTick is how long a write waits for others to join it.
const batchTick = 5 * time.Millisecond

// adds are the budget additions waiting for the next pipeline.
type adds struct {
	mu      sync.Mutex
	pending map[string]*budgetAdd // by key
	kick    chan struct{}
}

type budgetAdd struct {
	client, model, day string
	n                  int64
	done               []func(total int64, err error)
}

// AddBudgetLater adds tokens to client's use of model on day with the
// next pipeline (within a tick while Run runs, else at Close), and then
// calls done (if not nil) with the total or the error, outside any lock.
func (s *State) AddBudgetLater(client, model, day string, tokens int64, done func(total int64, err error)) {
	key := s.budgetKey(client, model, day)
	s.adds.mu.Lock()
	if s.adds.pending == nil {
		s.adds.pending = map[string]*budgetAdd{}
	}
	a := s.adds.pending[key]
	if a == nil {
		a = &budgetAdd{client: client, model: model, day: day}
		s.adds.pending[key] = a
	}
	a.n += tokens
	if done != nil {
		a.done = append(a.done, done)
	}
	s.adds.mu.Unlock()
	select {
	case s.adds.kick <- struct{}{}:
	default:
	}
}

// writeAdds writes the queued additions a tick after each one arrives,
// until ctx ends (then once more).
func (s *State) writeAdds(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			s.flushAdds(context.Background())
			return
		case <-s.adds.kick:
		}
		t := time.NewTimer(batchTick)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		s.flushAdds(ctx)
	}
}

// flushAdds writes what is queued in one pipeline. A key of the wrong
// type is written again alone (AddBudget replaces it).
func (s *State) flushAdds(parent context.Context) {
	s.adds.mu.Lock()
	pending := s.adds.pending
	s.adds.pending = nil
	s.adds.mu.Unlock()
	if len(pending) == 0 {
		return
	}
	ctx, cancel := s.ctx(parent)
	defer cancel()
	type write struct {
		a   *budgetAdd
		cmd *redis.IntCmd
	}
	writes := make([]write, 0, len(pending))
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for key, a := range pending {
			writes = append(writes, write{a, p.IncrBy(ctx, key, a.n)})
			p.Expire(ctx, key, budgetTTL(a.model))
		}
		return nil
	})
	s.pipelines.Inc()
	down := false
	for _, w := range writes {
		total, werr := w.cmd.Result()
		if keyTrouble(werr) {
			total, werr = s.AddBudget(parent, w.a.client, w.a.model, w.a.day, w.a.n)
		} else if werr != nil {
			down = true
		}
		for _, f := range w.a.done {
			f(total, werr)
		}
	}
	if down && err != nil {
		s.failed(err)
	}
}

// startWriter runs writeAdds for ctx's life.
func (s *State) startWriter(ctx context.Context) {
	safe.Go(s.log, "shared budget writer", func() { s.writeAdds(ctx) })
}
