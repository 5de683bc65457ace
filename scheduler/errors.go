package scheduler

import (
	"errors"
	"fmt"
	"time"
)

// Errors callers branch on. A rejection is a *RejectError that wraps one of
// the first three.
var (
	ErrQueueFull     = errors.New("scheduler: queue full")
	ErrWaitTooLong   = errors.New("scheduler: predicted wait exceeds maxQueueWait")
	ErrTooLarge      = errors.New("scheduler: request exceeds the bucket's capacity")
	ErrClosed        = errors.New("scheduler: closed")
	ErrUnknownModel  = errors.New("scheduler: model not configured")
	ErrTooManyModels = errors.New("scheduler: too many distinct models")
	ErrInvalidCost   = errors.New("scheduler: a cost must not be negative")
	ErrRetired       = errors.New("scheduler: queue retired; look the model up again")
	ErrUnknownClient = errors.New("scheduler: no such client in the queue")
)

// RejectError is a request turned away before it waited: the queue was
// full, the predicted wait too long, or the request larger than a bucket.
// It carries what an OpenAI-shaped 429 needs.
type RejectError struct {
	// Reason is ErrQueueFull, ErrWaitTooLong or ErrTooLarge.
	Reason error
	// Model is the queue's model name.
	Model string
	// Resource is the bucket that binds: the one the request waits longest
	// for (or, for ErrTooLarge, the one it cannot fit in).
	Resource Resource
	// Limit is that bucket's per-minute limit, Requested the request's cost
	// in it, and Used how much of it is spent or promised to requests
	// already queued (Limit - available).
	Limit, Used, Requested int
	// RetryAfter is how long until the request, retried alone, would be
	// admitted at once. Zero for ErrTooLarge: it never will be.
	RetryAfter time.Duration
	// Client is the client's name when the limit that binds is the
	// client's own; empty when it is the model's.
	Client string
	// QueueLen is the number of its client's requests waiting when it was
	// rejected.
	QueueLen int
	// State is the buckets' state at the rejection, for response headers.
	State RateState
	// Class is the request's class; MaxWait the wait limit it had, and
	// WaitLimit whose it was.
	Class     Class
	MaxWait   time.Duration
	WaitLimit WaitLimit
}

// WaitLimit says whose limit on a request's wait was in force.
type WaitLimit uint8

// Whose wait limit: the model's (maxQueueWait, or batchMaxQueueWait), the
// client's own, or the request's own.
const (
	WaitModel WaitLimit = iota
	WaitClient
	WaitRequest
)

func (e *RejectError) Error() string {
	return fmt.Sprintf("%v (model %s, %s: limit %d, used %d, requested %d, retry after %s)",
		e.Reason, e.Model, e.Resource, e.Limit, e.Used, e.Requested, e.RetryAfter)
}

// Unwrap returns the reason, so errors.Is(err, ErrQueueFull) works.
func (e *RejectError) Unwrap() error { return e.Reason }
