package scheduler

import (
	"slices"
	"time"
)

// Concurrency slots are the third resource of a queue with MaxConcurrent:
// a local model server has N parallel slots, so a request waits in FIFO
// order until one frees, that is until an admitted request is released
// when its response completes. When a slot frees cannot be known in
// advance, so predictions use how long requests have held a slot on
// average: each in-flight request is expected to finish that long after
// its admission (or now, if it is already overdue).

// slotFree reports whether an admission may take a slot now. q.mu is held.
func (q *Queue) slotFree() bool {
	return q.cfg.MaxConcurrent == 0 || len(q.inflight) < q.cfg.MaxConcurrent
}

// slotTimes predicts when each slot frees, from at on, ascending; nil for a
// queue without MaxConcurrent. q.mu is held.
func (q *Queue) slotTimes(at time.Time) []time.Time {
	n := q.cfg.MaxConcurrent
	if n == 0 {
		return nil
	}
	times := make([]time.Time, 0, n)
	for _, a := range q.inflight {
		free := a.start.Add(q.service)
		if free.Before(at) {
			free = at
		}
		times = append(times, free)
	}
	for len(times) < n {
		times = append(times, at)
	}
	slices.SortFunc(times, time.Time.Compare)
	return times
}

// takeSlot returns a copy of slots with its earliest slot taken by a
// request admitted at at, which is expected to hold it for q.service.
func (q *Queue) takeSlot(slots []time.Time, at time.Time) []time.Time {
	out := make([]time.Time, 0, len(slots))
	free := at.Add(q.service)
	i, _ := slices.BinarySearchFunc(slots[1:], free, time.Time.Compare)
	out = append(out, slots[1:1+i]...)
	out = append(out, free)
	return append(out, slots[1+i:]...)
}
