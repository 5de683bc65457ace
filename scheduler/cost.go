package scheduler

import "time"

// The scheduler's vocabulary of limits: a model has up to NumBuckets
// buckets (a resource each) and, optionally, concurrency slots; a request
// costs a Vector over the buckets. Everything that reads or changes the
// buckets (the gate, the prediction, which bucket binds a rejection, the
// state a client is told, Observe, the shared store's levels) iterates
// over the resources; none names two of them. Which buckets a model has
// is its Config: a bucket with no limit is none.

// Resource is one of the limits a request waits for: a bucket, or the
// concurrency slots.
type Resource uint8

// The resources. Requests to OutputTokens are buckets, refilled per
// minute; Slots are a model server's parallel slots.
const (
	Requests     Resource = iota // requests per minute
	Tokens                       // tokens per minute, input and output together
	InputTokens                  // input tokens per minute
	OutputTokens                 // output tokens per minute
	Slots                        // concurrent requests
)

// NumBuckets is how many resources are buckets: Requests to OutputTokens.
const NumBuckets = int(Slots)

func (r Resource) String() string {
	switch r {
	case Requests:
		return "requests"
	case Tokens:
		return "tokens"
	case InputTokens:
		return "input_tokens"
	case OutputTokens:
		return "output_tokens"
	case Slots:
		return "slots"
	}
	return "unknown"
}

// Vector is an amount of each bucket resource, indexed by Resource: what
// a request costs or used, or a set of limits per minute (0: no limit).
type Vector [NumBuckets]int

// Request is the cost of one request of input tokens in and at most output
// tokens out: one request, input+output tokens, and each apart. The
// model's config decides which of its buckets exist, so one cost fits a
// model limited in tokens and one limited in input and output apart.
func Request(input, output int) Vector {
	return Vector{Requests: 1, Tokens: input + output, InputTokens: input, OutputTokens: output}
}

// negative reports whether any amount of v is below zero.
func (v *Vector) negative() bool {
	for _, n := range v {
		if n < 0 {
			return true
		}
	}
	return false
}

// add adds sign times w to v.
func (v *Vector) add(w *Vector, sign int) {
	for r := range v {
		v[r] += sign * w[r]
	}
}

// weight is what a cost counts for in fair share: its tokens (at least
// its input and output together, for a cost that names only those).
func (v Vector) weight() int { return max(v[Tokens], v[InputTokens]+v[OutputTokens]) }

// Class is a request's priority class: interactive requests are admitted
// before batch ones (class.go).
type Class uint8

// The classes.
const (
	Interactive Class = iota
	Batch
	numClasses
)

func (c Class) String() string {
	if c == Batch {
		return "batch"
	}
	return "interactive"
}

// Cost is what one request pays, Amount from each bucket, on behalf of
// the queue's client number Client (see NewQueue).
type Cost struct {
	Amount Vector
	// Class is the request's class.
	Class Class
	// MaxWait, with OwnWait set, is the request's own limit on its wait:
	// it lowers its client's (or the model's) for its class, never raises
	// it. 0 means admit now or reject now.
	MaxWait time.Duration
	OwnWait bool
	Client  int
	// Name, if set, is the client's name. A request whose Client index
	// names another client's lane (a reload renumbered the clients between
	// its authentication and its admission) waits in the lane of its name.
	Name string
}

// RateState is a snapshot of a queue's buckets as a newcomer sees them:
// per resource, its limit per minute (0: no such bucket), what is left
// after the requests already queued are paid for, and how long until the
// bucket is full again. It is what x-ratelimit-* headers report.
type RateState struct {
	Limit, Remaining Vector
	Reset            [NumBuckets]time.Duration
}

// Stats is a queue's state for metrics.
type Stats struct {
	Depth int
	// Queued is what the waiting requests will pay, per resource.
	Queued Vector
	// Limit is each bucket's limit per minute (0: none), Remaining its
	// level now, and Refill its refill rate per minute now: the limit
	// less what others are estimated to spend of the upstream's (see
	// Observe).
	Limit             Vector
	Remaining, Refill [NumBuckets]float64
	// InFlight is how many admitted requests hold a concurrency slot
	// (counted only when the queue has MaxConcurrent).
	InFlight int
	// PredictedWait is how long a newcomer would wait now: an
	// interactive one; PredictedWaitBy of each class.
	PredictedWait   time.Duration
	PredictedWaitBy [numClasses]time.Duration
	// DepthBy is how many of each class wait, Oldest how long the
	// longest waiting of each has waited.
	DepthBy [numClasses]int
	Oldest  [numClasses]time.Duration
	// Promoted counts the batch requests admitted as interactive for
	// having waited BatchMaxAge, since the queue was made.
	Promoted uint64
	// Headroom is what batch requests leave in each bucket.
	Headroom Vector
}

// NumClasses is how many classes there are.
const NumClasses = int(numClasses)

// ClientStats is one client's state in a queue.
type ClientStats struct {
	Name     string
	Depth    int             // requests waiting
	DepthBy  [numClasses]int // of each class
	Queued   Vector          // what they will pay
	InFlight int             // admitted and not yet released
}

// Upstream is what an upstream reported about its own limits in response
// headers: per resource, what it had left, where Reported says it said,
// rounded to the nearest Rounding (0 or 1: exact; Anthropic rounds tokens
// to thousands).
type Upstream struct {
	Remaining, Rounding Vector
	Reported            [NumBuckets]bool
}

// Levels are a shared store's buckets as it reported them, per resource:
// the model's and a client's (a bucket the queue does not have is
// ignored; Estimate reports it as -1).
type Levels struct {
	Model, Client [NumBuckets]float64
}
