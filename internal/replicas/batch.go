package replicas

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/llproxy/llproxy/internal/safe"
	"github.com/llproxy/llproxy/scheduler"
)

// Writes coalesced: what a request writes to Redis after its admission
// and needs no answer to go on — its addition to a shared budget (tokens
// per day, money per day and month), what it gives back to the shared
// buckets at settlement, the concurrency slots it frees — is queued, and
// what is queued is written in one pipeline (a tick later for budgets;
// at once, with what gathered meanwhile, for the rest), so that
// concurrent requests share one round trip: several requests of one client and
// budget are one INCRBY, the give-backs of one client of one model one
// call. What is written late only ever holds capacity a little longer:
// a charge beyond a reservation is written at once (Buckets.Adjust).

// batchTick is how long a write waits for others to join it.
const batchTick = 5 * time.Millisecond

// adds are the writes waiting for the next pipeline.
type adds struct {
	mu       sync.Mutex
	pending  map[string]*budgetAdd // by key
	gives    map[giveKey]*scheduler.Vector
	releases []slotRelease
	kick     chan struct{}
	running  atomic.Bool // the writer runs: writes may wait for it
}

// giveKey is whose give-backs add up: one client of one model's buckets.
type giveKey struct {
	b      *Buckets
	client int
}

// slotRelease is a lease whose slots are to be freed.
type slotRelease struct {
	b      *Buckets
	client int
	lease  string
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
	s.kick()
}

// kick wakes the writer.
func (s *State) kick() {
	select {
	case s.adds.kick <- struct{}{}:
	default:
	}
}

// giveLater queues delta (no part of it negative) for client's buckets of
// b; it reports false, queuing nothing, when no writer runs.
func (s *State) giveLater(b *Buckets, client int, delta scheduler.Vector) bool {
	if !s.adds.running.Load() {
		return false
	}
	k := giveKey{b, client}
	s.adds.mu.Lock()
	if s.adds.gives == nil {
		s.adds.gives = map[giveKey]*scheduler.Vector{}
	}
	if v := s.adds.gives[k]; v != nil {
		for r := range v {
			v[r] += delta[r]
		}
	} else {
		s.adds.gives[k] = &delta
	}
	s.adds.mu.Unlock()
	s.kick()
	return true
}

// releaseLater queues the freeing of a lease's slots; it reports false,
// queuing nothing, when no writer runs.
func (s *State) releaseLater(b *Buckets, client int, lease string) bool {
	if !s.adds.running.Load() {
		return false
	}
	s.adds.mu.Lock()
	s.adds.releases = append(s.adds.releases, slotRelease{b, client, lease})
	s.adds.mu.Unlock()
	s.kick()
	return true
}

// writeAdds writes what is queued until ctx ends (then once more): budget
// additions a tick after the first arrives; give-backs and slot releases
// at once, with whatever else is queued, and those that arrive while a
// pipeline is out go together in the next (so a freed slot is not held
// a tick longer: a batch is what gathers during one round trip).
func (s *State) writeAdds(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			s.flushAdds(context.Background())
			return
		case <-s.adds.kick:
		}
		s.adds.mu.Lock()
		urgent := len(s.adds.gives) > 0 || len(s.adds.releases) > 0
		s.adds.mu.Unlock()
		if !urgent {
			t := time.NewTimer(batchTick)
			select {
			case <-ctx.Done():
				t.Stop()
			case <-t.C:
			}
		}
		s.flushAdds(ctx)
	}
}

// flushAdds writes what is queued in one pipeline. A key of the wrong
// type, or a script Redis no longer has, is written again alone
// (AddBudget replaces the key; eval loads the script).
func (s *State) flushAdds(parent context.Context) {
	s.adds.mu.Lock()
	pending, gives, releases := s.adds.pending, s.adds.gives, s.adds.releases
	s.adds.pending, s.adds.gives, s.adds.releases = nil, nil, nil
	s.adds.mu.Unlock()
	if len(pending) == 0 && len(gives) == 0 && len(releases) == 0 {
		return
	}
	ctx, cancel := s.ctx(parent)
	defer cancel()
	type write struct {
		a   *budgetAdd
		cmd *redis.IntCmd
	}
	type call struct {
		redo func() error // the call alone
		cmd  *redis.Cmd
	}
	writes := make([]write, 0, len(pending))
	calls := make([]call, 0, len(gives)+len(releases))
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for key, a := range pending {
			writes = append(writes, write{a, p.IncrBy(ctx, key, a.n)})
			p.Expire(ctx, key, budgetTTL(a.model))
		}
		for k, delta := range gives {
			keys := k.b.keys[k.client][:modelSlots]
			args := k.b.args(k.client, delta)
			calls = append(calls, call{func() error { return k.b.adjust(parent, k.client, *delta) },
				adjustScript.EvalSha(ctx, p, keys, args...)})
		}
		for _, r := range releases {
			calls = append(calls, call{func() error { return r.b.release(parent, r.client, r.lease) },
				releaseScript.EvalSha(ctx, p, r.b.keys[r.client][modelSlots:fairKey], r.lease)})
		}
		return nil
	})
	s.pipelines.Inc()
	down := false
	for _, c := range calls {
		if cerr := c.cmd.Err(); cerr != nil && (keyTrouble(cerr) || redis.HasErrorPrefix(cerr, "NOSCRIPT")) {
			c.redo()
		} else if cerr != nil {
			down = true
		}
	}
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
	s.adds.running.Store(true)
	safe.Go(s.log, "shared writer", func() {
		defer s.adds.running.Store(false)
		s.writeAdds(ctx)
	})
}
