// Package scheduler admits requests to an upstream in strict FIFO order per
// (route, model), paying for each from two continuously refilling token
// buckets (requests per minute and tokens per minute, golang.org/x/time/rate).
//
// It exists apart from the HTTP server so that the behaviour that must be
// exactly right (order, prediction of the wait, honest retry times, a
// cancelled request paying nothing) is plain code over integers and times,
// tested in testing/synctest bubbles. It knows nothing of HTTP, tokenizers or
// providers: a request's cost arrives as an integer.
package scheduler

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Wildcard is the model key whose limits apply to every model not listed.
const Wildcard = "*"

// SetConfig configures the queues of one route.
type SetConfig struct {
	// Models maps model names, and optionally Wildcard, to their limits.
	Models map[string]Config
	// MaxWildcardModels bounds how many distinct unlisted models get their
	// own queue, so clients cannot grow memory without end. 0 means 1000.
	MaxWildcardModels int
}

// Validate checks every model's limits; errors name "models.<name>.<field>".
func (c SetConfig) Validate() error {
	var errs []error
	if len(c.Models) == 0 {
		errs = append(errs, errors.New("models: must list at least one model or \"*\""))
	}
	for _, name := range slices.Sorted(maps.Keys(c.Models)) {
		if name == "" {
			errs = append(errs, errors.New("models: a model name must not be empty"))
		}
		errs = append(errs, c.Models[name].validate("models."+name+".")...)
	}
	if c.MaxWildcardModels < 0 {
		errs = append(errs, fmt.Errorf("maxWildcardModels: must be >= 0, got %d", c.MaxWildcardModels))
	}
	return errors.Join(errs...)
}


// Set holds the queues of one route, one per model. Listed models have
// their queue from the start; each unlisted model gets its own queue with
// the wildcard limits when first seen. Lookups take no lock.
type Set struct {
	listed     map[string]*Queue
	wildcard   *Config
	dynamic    sync.Map // model -> *Queue
	dynCount   atomic.Int64
	maxDynamic int64
	closed     atomic.Bool
	onRetire   func(*Queue)
}

// OnRetire sets a function Sweep calls with each queue it retires (to drop
// what the caller keeps about it). Call it before the Set is used.
func (s *Set) OnRetire(f func(*Queue)) { s.onRetire = f }

// NewSet validates cfg and builds the listed queues.
func NewSet(cfg SetConfig) (*Set, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Set{listed: make(map[string]*Queue, len(cfg.Models)), maxDynamic: int64(cfg.MaxWildcardModels)}
	if s.maxDynamic == 0 {
		s.maxDynamic = 1000
	}
	for name, mc := range cfg.Models {
		if name == Wildcard {
			w := mc
			s.wildcard = &w
			continue
		}
		s.listed[name] = NewQueue(name, mc)
	}
	return s, nil
}

// Queue returns the queue of model: its own if listed, else a wildcard
// queue of its own. It fails with ErrUnknownModel when the model is not
// listed and there is no wildcard, and ErrTooManyModels past
// MaxWildcardModels.
func (s *Set) Queue(model string) (*Queue, error) {
	if q, ok := s.listed[model]; ok {
		return q, nil
	}
	if s.wildcard == nil {
		return nil, ErrUnknownModel
	}
	if q, ok := s.dynamic.Load(model); ok {
		return q.(*Queue), nil
	}
	if s.dynCount.Add(1) > s.maxDynamic {
		s.dynCount.Add(-1)
		// Make room: queues of unlisted models that sit idle with full
		// buckets hold nothing a new queue would not (junk names must not
		// use the room up for good).
		if s.Sweep(s.now()) == 0 {
			return nil, ErrTooManyModels
		}
		if s.dynCount.Add(1) > s.maxDynamic {
			s.dynCount.Add(-1)
			return nil, ErrTooManyModels
		}
	}
	q, loaded := s.dynamic.LoadOrStore(model, NewQueue(model, *s.wildcard))
	if loaded {
		s.dynCount.Add(-1)
	} else if s.closed.Load() {
		q.(*Queue).Close()
	}
	return q.(*Queue), nil
}

func (s *Set) now() time.Time { return time.Now() }

// Sweep retires the queues of unlisted models that are idle at now: nobody
// waiting or in flight, no hold, and both buckets full again, so that a
// new queue for the same model would start exactly where this one stands.
// A retired queue answers Acquire with ErrRetired (the caller looks the
// model up again). It returns how many it retired.
func (s *Set) Sweep(now time.Time) int {
	n := 0
	s.dynamic.Range(func(k, v any) bool {
		if q := v.(*Queue); q.retire(now) && s.dynamic.CompareAndDelete(k, v) {
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
func (s *Set) Lookup(model string) (*Queue, bool) {
	if q, ok := s.listed[model]; ok {
		return q, true
	}
	if q, ok := s.dynamic.Load(model); ok {
		return q.(*Queue), true
	}
	return nil, false
}

// Models returns the configured model names, sorted, including Wildcard if
// configured.
func (s *Set) Models() []string {
	names := slices.Collect(maps.Keys(s.listed))
	if s.wildcard != nil {
		names = append(names, Wildcard)
	}
	slices.Sort(names)
	return names
}

// Range calls f for every queue that exists, listed or created.
func (s *Set) Range(f func(q *Queue)) {
	for _, q := range s.listed {
		f(q)
	}
	s.dynamic.Range(func(_, q any) bool {
		f(q.(*Queue))
		return true
	})
}

// Close closes every queue: waiting requests get ErrClosed, and so does
// every later one.
func (s *Set) Close() {
	s.closed.Store(true)
	s.Range((*Queue).Close)
}
