package models

import (
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llproxy/llproxy/scheduler"
)

// Set holds the queues of one route, one per model. Listed models have
// their queue from the start; each unlisted model gets its own queue with
// the wildcard limits when first seen. Lookups take no lock.
type Set struct {
	listed     map[string]*scheduler.Queue
	wildcard   *scheduler.Config
	dynamic    sync.Map // model -> *scheduler.Queue
	dynCount   atomic.Int64
	maxDynamic int64
	closed     atomic.Bool
	onRetire   func(*scheduler.Queue)
	clients    Clients
}

// Clients returns the clients of a queue of model with limits cfg, in the
// order of their IDs (see scheduler.NewQueue). Nil: one anonymous client.
type Clients func(model string, cfg scheduler.Config) []scheduler.Client

func (s *Set) newQueue(model string, cfg scheduler.Config) *scheduler.Queue {
	return scheduler.NewQueue(model, cfg, s.clientsOf(model, cfg)...)
}

// OnRetire sets a function Sweep calls with each queue it retires (to drop
// what the caller keeps about it). Call it before the Set is used.
func (s *Set) OnRetire(f func(*scheduler.Queue)) { s.onRetire = f }

// NewSet builds the queues of a route's models: the limits of each listed
// model, and of scheduler.Wildcard for every other; at most maxWildcard
// unlisted models have a queue at once (0 means 1000). Every limit must be
// valid. Each queue's clients are what clients says.
func NewSet(models map[string]scheduler.Config, maxWildcard int, clients Clients) (*Set, error) {
	for _, name := range slices.Sorted(maps.Keys(models)) {
		if err := models[name].Validate(); err != nil {
			return nil, fmt.Errorf("models.%s: %w", name, err)
		}
	}
	s := &Set{listed: make(map[string]*scheduler.Queue, len(models)), maxDynamic: int64(maxWildcard), clients: clients}
	if s.maxDynamic == 0 {
		s.maxDynamic = 1000
	}
	for name, mc := range models {
		if name == scheduler.Wildcard {
			w := mc
			s.wildcard = &w
			continue
		}
		s.listed[name] = s.newQueue(name, mc)
	}
	return s, nil
}

// Inherit takes over prev's queues (a reloaded config) for the models this
// set serves: each keeps its waiters and admissions, with this set's
// limits and clients. A listed model takes prev's queue of the same name
// (listed or not); prev's unlisted models go on under this set's "*", if
// it has one. Call it before the set is used.
func (s *Set) Inherit(prev *Set) {
	now := time.Now()
	for name, mc := range s.listedConfigs() {
		if q, ok := prev.Lookup(name); ok && !q.Retired() {
			q.Reconfigure(now, mc, s.clientsOf(name, mc)...)
			s.listed[name] = q
		}
	}
	if s.wildcard == nil {
		return
	}
	prev.dynamic.Range(func(k, v any) bool {
		name, q := k.(string), v.(*scheduler.Queue)
		if _, listed := s.listed[name]; listed || q.Retired() || s.dynCount.Load() >= s.maxDynamic {
			return true
		}
		q.Reconfigure(now, *s.wildcard, s.clientsOf(name, *s.wildcard)...)
		s.dynamic.Store(name, q)
		s.dynCount.Add(1)
		return true
	})
}

// listedConfigs returns the limits of the listed models.
func (s *Set) listedConfigs() map[string]scheduler.Config {
	out := make(map[string]scheduler.Config, len(s.listed))
	for name, q := range s.listed {
		out[name] = q.Config()
	}
	return out
}

// clientsOf is the clients of a queue of model.
func (s *Set) clientsOf(model string, cfg scheduler.Config) []scheduler.Client {
	if s.clients == nil {
		return nil
	}
	return s.clients(model, cfg)
}

// Queue returns the queue of model: its own if listed, else a wildcard
// queue of its own. It fails with scheduler.ErrUnknownModel when the model is not
// listed and there is no wildcard, and scheduler.ErrTooManyModels past
// MaxWildcardModels.
func (s *Set) Queue(model string) (*scheduler.Queue, error) {
	if q, ok := s.listed[model]; ok {
		return q, nil
	}
	if s.wildcard == nil {
		return nil, scheduler.ErrUnknownModel
	}
	if q, ok := s.dynamic.Load(model); ok {
		return q.(*scheduler.Queue), nil
	}
	if s.dynCount.Add(1) > s.maxDynamic {
		s.dynCount.Add(-1)
		// Make room: queues of unlisted models that sit idle with full
		// buckets hold nothing a new queue would not (junk names must not
		// use the room up for good).
		if s.Sweep(time.Now()) == 0 {
			return nil, scheduler.ErrTooManyModels
		}
		if s.dynCount.Add(1) > s.maxDynamic {
			s.dynCount.Add(-1)
			return nil, scheduler.ErrTooManyModels
		}
	}
	q, loaded := s.dynamic.LoadOrStore(model, s.newQueue(model, *s.wildcard))
	if loaded {
		s.dynCount.Add(-1)
	} else if s.closed.Load() {
		q.(*scheduler.Queue).Close()
	}
	return q.(*scheduler.Queue), nil
}

// Sweep retires the queues of unlisted models that are idle at now: nobody
// waiting or in flight, no hold, and every bucket full again, so that a
// new queue for the same model would start exactly where this one stands.
// A retired queue answers Acquire with scheduler.ErrRetired (the caller looks the
// model up again). It returns how many it retired.
func (s *Set) Sweep(now time.Time) int {
	n := 0
	s.dynamic.Range(func(k, v any) bool {
		if q := v.(*scheduler.Queue); q.Retire(now) && s.dynamic.CompareAndDelete(k, v) {
			s.dynCount.Add(-1)
			n++
			if s.onRetire != nil {
				s.onRetire(q)
			}
		}
		return true
	})
	return n
}

// Lookup returns the queue of model if it exists, without creating one.
func (s *Set) Lookup(model string) (*scheduler.Queue, bool) {
	if q, ok := s.listed[model]; ok {
		return q, true
	}
	if q, ok := s.dynamic.Load(model); ok {
		return q.(*scheduler.Queue), true
	}
	return nil, false
}

// Models returns the configured model names, sorted, including scheduler.Wildcard if
// configured.
func (s *Set) Models() []string {
	names := slices.Collect(maps.Keys(s.listed))
	if s.wildcard != nil {
		names = append(names, scheduler.Wildcard)
	}
	slices.Sort(names)
	return names
}

// Range calls f for every queue that exists, listed or created.
func (s *Set) Range(f func(q *scheduler.Queue)) {
	for _, q := range s.listed {
		f(q)
	}
	s.dynamic.Range(func(_, q any) bool {
		f(q.(*scheduler.Queue))
		return true
	})
}

// Close closes every queue: waiting requests get ErrClosed, and so does
// every later one.
func (s *Set) Close() {
	s.closed.Store(true)
	s.Range((*scheduler.Queue).Close)
}
