package scheduler

import "time"

// Clock is the scheduler's one time seam: the current time, and a timer
// that wakes the queue when its head can be admitted. A nil Clock means real
// time (which testing/synctest fakes inside a bubble).
type Clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is the part of *time.Timer the scheduler uses.
type Timer interface {
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }
