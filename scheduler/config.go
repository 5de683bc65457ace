// Package scheduler admits requests to an upstream per (route, model): each
// client waits in a FIFO of its own, and between clients waiting at the same
// time the model is shared by weight in tokens (start-time fair queueing,
// fair.go); each request is paid for from continuously refilling buckets
// (the model's, per resource: requests, tokens, input and output tokens
// per minute; and its client's own), with a predicted wait that decides at
// arrival.
//
// It exists apart from the HTTP server so that the behaviour that must be
// exactly right (order, prediction of the wait, honest retry times, a
// cancelled request paying nothing) is plain code over integers and times,
// tested in testing/synctest bubbles. It knows nothing of HTTP, tokenizers or
// providers: a request's cost arrives as a vector of integers over the
// resources, and its config as plain Go values (package config reads JSON).
package scheduler

import (
	"errors"
	"fmt"
	"time"
)

// Wildcard is the model key whose limits apply to every model not listed.
const Wildcard = "*"

// Config holds the limits of one (route, model) queue. Its errors name
// its fields as the config file does (package config reads them).
type Config struct {
	// MaxQueueSize is how many requests may wait at once; one more is
	// rejected at once. 0 means no waiting: admit now or reject now.
	MaxQueueSize int
	// MaxQueueWait is the longest predicted wait a request is queued for; a
	// request predicted to wait longer is rejected at once. 0 means admit now
	// or reject now.
	MaxQueueWait time.Duration
	// RPM is the request bucket: capacity RPM, refilled at RPM per minute.
	RPM int
	// TPM is the token bucket, input and output together: capacity TPM,
	// refilled at TPM per minute.
	TPM int
	// ITPM and OTPM are input and output tokens as buckets of their own
	// (a provider that limits them apart). A model has at least one token
	// bucket; 0 means none of that kind.
	ITPM int
	OTPM int
	// MaxConcurrent is how many admitted requests may be in flight at once
	// (a local server's parallel slots); a request holds its slot until
	// Release. 0 means no limit.
	MaxConcurrent int
	// BatchHeadroom is the fraction of every bucket's capacity a batch
	// request must leave after paying (0 to 0.9; 0: batch may use all).
	BatchHeadroom float64
	// BatchMaxAge is how long a batch request waits before it is admitted
	// as if interactive (the starvation bound); 0: DefaultBatchMaxAge.
	BatchMaxAge time.Duration
	// BatchMaxQueueWait and BatchMaxQueueSize are MaxQueueWait and
	// MaxQueueSize for batch requests; 0: DefaultBatchMaxQueueWait,
	// DefaultBatchMaxQueueSize.
	BatchMaxQueueWait time.Duration
	BatchMaxQueueSize int
}

// Defaults of the batch class's settings.
const (
	DefaultBatchHeadroom     = 0.1
	DefaultBatchMaxAge       = 10 * time.Minute
	DefaultBatchMaxQueueWait = time.Hour
	DefaultBatchMaxQueueSize = 10_000
	// MaxBatchHeadroom bounds BatchHeadroom: batch keeps a tenth at least.
	MaxBatchHeadroom = 0.9
)

// batchMaxAge is the starvation bound in force.
func (c Config) batchMaxAge() time.Duration {
	if c.BatchMaxAge > 0 {
		return c.BatchMaxAge
	}
	return DefaultBatchMaxAge
}

// Validate reports every field out of range, each error naming its field by
// JSON name ("tpm: must be > 0, got 0"); callers prefix the path.
func (c Config) Validate() error {
	var errs []error
	if c.MaxQueueSize < 0 {
		errs = append(errs, fmt.Errorf("maxQueueSize: must be >= 0, got %d", c.MaxQueueSize))
	}
	if c.MaxQueueWait < 0 {
		errs = append(errs, fmt.Errorf("maxQueueWait: must be >= 0, got %s", c.MaxQueueWait))
	}
	if c.RPM <= 0 {
		errs = append(errs, fmt.Errorf("rpm: must be > 0, got %d", c.RPM))
	}
	switch {
	case c.TPM < 0:
		errs = append(errs, fmt.Errorf("tpm: must be > 0, got %d", c.TPM))
	case c.TPM == 0 && c.ITPM <= 0 && c.OTPM <= 0:
		errs = append(errs, fmt.Errorf("tpm: must be > 0, got %d", c.TPM))
	}
	for _, f := range [...]struct {
		name string
		v    int
	}{{"itpm", c.ITPM}, {"otpm", c.OTPM}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("%s: must be >= 0, got %d", f.name, f.v))
		}
	}
	if c.MaxConcurrent < 0 {
		errs = append(errs, fmt.Errorf("maxConcurrent: must be >= 0, got %d", c.MaxConcurrent))
	}
	if !(c.BatchHeadroom >= 0 && c.BatchHeadroom <= MaxBatchHeadroom) {
		errs = append(errs, fmt.Errorf("batchHeadroom: must be between 0 and %v, got %v", MaxBatchHeadroom, c.BatchHeadroom))
	}
	for _, f := range [...]struct {
		name string
		d    time.Duration
	}{{"batchMaxAge", c.BatchMaxAge}, {"batchMaxQueueWait", c.BatchMaxQueueWait}} {
		if f.d < 0 {
			errs = append(errs, fmt.Errorf("%s: must be >= 0, got %s", f.name, f.d))
		}
	}
	if c.BatchMaxQueueSize < 0 {
		errs = append(errs, fmt.Errorf("batchMaxQueueSize: must be >= 0, got %d", c.BatchMaxQueueSize))
	}
	return errors.Join(errs...)
}

// Limits are the model's buckets' limits per minute, by resource.
func (c Config) Limits() Vector { return Vector{c.RPM, c.TPM, c.ITPM, c.OTPM} }

// MaxWeight is the largest client weight.
const MaxWeight = 1000

// Client is one client of a queue: its name, its share of the queue's
// buckets against the other clients waiting at the same time, and its own
// limits for the queue's model. Zero RPM, TPM, ITPM, OTPM or MaxConcurrent mean no
// limit of its own; MaxQueueSize and MaxQueueWait are its own values (see
// Config.Client for the model's).
type Client struct {
	Name string
	// Weight is the client's share (1 to MaxWeight).
	Weight        int
	RPM, TPM      int
	ITPM, OTPM    int
	MaxConcurrent int
	MaxQueueSize  int
	MaxQueueWait  time.Duration
	// BatchMaxQueueSize and BatchMaxQueueWait are its batch requests'.
	BatchMaxQueueSize int
	BatchMaxQueueWait time.Duration
	// OwnWait and OwnBatchWait say MaxQueueWait and BatchMaxQueueWait are
	// the client's own, not the model's (a rejection says whose).
	OwnWait, OwnBatchWait bool
}

// Client returns a client of the queue with weight and no limits of its
// own: its MaxQueueSize and MaxQueueWait are the model's.
func (c Config) Client(name string, weight int) Client {
	cl := Client{Name: name, Weight: weight, MaxQueueSize: c.MaxQueueSize, MaxQueueWait: c.MaxQueueWait,
		BatchMaxQueueSize: c.BatchMaxQueueSize, BatchMaxQueueWait: c.BatchMaxQueueWait}
	if cl.BatchMaxQueueSize == 0 {
		cl.BatchMaxQueueSize = DefaultBatchMaxQueueSize
	}
	if cl.BatchMaxQueueWait == 0 {
		cl.BatchMaxQueueWait = DefaultBatchMaxQueueWait
	}
	return cl
}

// batch is the client as its batch lane waits: its batch size and wait.
func (c Client) batch() Client {
	c.MaxQueueSize, c.MaxQueueWait, c.OwnWait = c.BatchMaxQueueSize, c.BatchMaxQueueWait, c.OwnBatchWait
	if c.MaxQueueSize == 0 {
		c.MaxQueueSize = DefaultBatchMaxQueueSize
	}
	if c.MaxQueueWait == 0 {
		c.MaxQueueWait = DefaultBatchMaxQueueWait
	}
	return c
}

// Validate reports every field of the client out of range, each naming
// its field by JSON name.
func (c Client) Validate() error {
	var errs []error
	if c.Weight < 1 || c.Weight > MaxWeight {
		errs = append(errs, fmt.Errorf("weight: must be 1 to %d, got %d", MaxWeight, c.Weight))
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"rpm", c.RPM}, {"tpm", c.TPM}, {"itpm", c.ITPM}, {"otpm", c.OTPM},
		{"maxConcurrent", c.MaxConcurrent}, {"maxQueueSize", c.MaxQueueSize}, {"batchMaxQueueSize", c.BatchMaxQueueSize}} {
		if f.v < 0 {
			errs = append(errs, fmt.Errorf("%s: must be >= 0, got %d", f.name, f.v))
		}
	}
	if c.MaxQueueWait < 0 {
		errs = append(errs, fmt.Errorf("maxQueueWait: must be >= 0, got %s", c.MaxQueueWait))
	}
	if c.BatchMaxQueueWait < 0 {
		errs = append(errs, fmt.Errorf("batchMaxQueueWait: must be >= 0, got %s", c.BatchMaxQueueWait))
	}
	return errors.Join(errs...)
}

// Limits are the client's own buckets' limits per minute, by resource
// (0: none of its own).
func (c Client) Limits() Vector { return Vector{c.RPM, c.TPM, c.ITPM, c.OTPM} }
