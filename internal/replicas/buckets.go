package replicas

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llproxy/llproxy/scheduler"
)

// Buckets are the shared buckets and concurrency counts of one (route,
// model) queue: the model's and each client's. It is safe for concurrent
// use.
type Buckets struct {
	s       *State
	model   scheduler.Config
	clients []scheduler.Client
	keys    []keys  // by client
	quota   []quota // by client: this replica's slice of the buckets
	seq     atomic.Uint64

	queued func() bool // whether this replica's queue has requests waiting; set before use

	mu     sync.Mutex
	leases map[string]int // live leases of this replica -> client
	closed bool           // its queue is retired: forgotten once its leases end
}

// Queued tells the buckets, before they are used, how to know whether
// this replica's queue has requests waiting: each take says it, so that
// the other replicas predict their waits with it (Took.Others).
func (b *Buckets) Queued(f func() bool) { b.queued = f }

// keys of one client's call: the model's buckets by resource, the
// client's, the model's leases, the client's, the model's fair-share
// tags. One hash tag.
type keys [2*scheduler.NumBuckets + 3]string

// keyTypes are the types of a call's keys.
type keyTypes [len(keys{})]string

// bucketNames name each resource's bucket in its key.
var bucketNames = [scheduler.NumBuckets]string{
	scheduler.Requests: "req", scheduler.Tokens: "tok", scheduler.InputTokens: "in", scheduler.OutputTokens: "out",
}

const (
	modelSlots  = 2 * scheduler.NumBuckets // keys index of the model's leases
	clientSlots = modelSlots + 1
	fairKey     = clientSlots + 1 // the clients' fair-share tags (see takeScript)
)

// Queue returns the shared buckets of a queue of model on route, with the
// model's limits and its clients' (by ID).
func (s *State) Queue(route, model string, cfg scheduler.Config, clients []scheduler.Client) *Buckets {
	tag := s.cfg.Prefix + "{" + route + "/" + model + "}:"
	b := &Buckets{s: s, model: cfg, clients: clients, keys: make([]keys, len(clients)),
		leases: map[string]int{}, quota: make([]quota, len(clients))}
	for i, c := range clients {
		k := &b.keys[i]
		for r, name := range bucketNames {
			k[r], k[scheduler.NumBuckets+r] = tag+name, tag+"c:"+c.Name+":"+name
		}
		k[modelSlots], k[clientSlots], k[fairKey] = tag+"slots", tag+"c:"+c.Name+":slots", tag+"fair"
	}
	s.mu.Lock()
	s.queues = append(s.queues, b)
	s.mu.Unlock()
	return b
}

// Close forgets the buckets (their queue was retired, or a reload replaced
// it) once the leases of its requests still in flight have ended: until
// then the heartbeat keeps them, so a request older than the reload keeps
// its slot.
func (b *Buckets) Close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.s.forgetClosed()
}

// isClosed reports whether b's queue is gone (its slices go back).
func (b *Buckets) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

// done reports whether b is closed and holds no lease.
func (b *Buckets) done() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed && len(b.leases) == 0
}

// forgetClosed drops the closed buckets that hold no lease.
func (s *State) forgetClosed() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queues = slices.DeleteFunc(s.queues, (*Buckets).done)
}

// Took is a take's answer.
type Took struct {
	// OK: the request was paid for in every shared bucket (and holds a
	// slot if there are any: Lease).
	OK    bool
	Lease string
	// Wait is how long until it could be, from Redis's view; negative
	// when a concurrency slot binds (when one frees is not known).
	Wait time.Duration
	// Fair: the buckets could pay, but another client waiting at another
	// replica is owed its share first, or a request of the same client
	// waiting at another replica must be admitted sooner; look again
	// after Wait.
	Fair bool
	// Binding is the resource that binds, Own whether it is the client's.
	Binding scheduler.Resource
	Own     bool
	// Levels are the buckets after (a client's 0 where it has none).
	Levels scheduler.Levels
	// Mark is where the model's buckets stood when it paid, for Observe.
	Mark Mark
	// Others is how many other replicas have requests waiting for the
	// model (see scheduler.Queue.Others).
	Others int
}

// Mark is where a request's payment left the model's shared buckets: the
// level after it, and what had been paid from and lowered in each until
// then, so that the upstream's answer to it is compared with the key's
// buckets once, whichever replica hears it.
type Mark struct {
	Level, Paid, Lowered [scheduler.NumBuckets]float64
}

// args are a bucket call's first arguments for client: how many
// resources, then the capacities of the model's buckets and the client's,
// then v, an amount per resource.
func (b *Buckets) args(client int, v *scheduler.Vector) []any {
	model, own := b.model.Limits(), b.clients[client].Limits()
	args := make([]any, 0, 3*scheduler.NumBuckets+6)
	args = append(args, scheduler.NumBuckets)
	for _, n := range model {
		args = append(args, n)
	}
	for _, n := range own {
		args = append(args, n)
	}
	for _, n := range v {
		args = append(args, n)
	}
	return args
}

var errClient = errors.New("replicas: no such client")

// Ask is what a take says of its request and of its replica's queue.
type Ask struct {
	// Deadline is when the request stops waiting (zero: no deadline).
	Deadline time.Time
	// Next is the deadline of the client's next request waiting at this
	// replica (zero: none waits; see scheduler.Queue.Next). While one
	// does, the client's share is owed it (see takeScript).
	Next time.Time
}

// ms is how long from now until t, in whole milliseconds, for a script
// (-1: no such time; 0 at the least).
func ms(t, now time.Time) int64 {
	if t.IsZero() {
		return -1
	}
	return min(max(0, t.Sub(now).Milliseconds()), int64(24*time.Hour/time.Millisecond))
}

// Take reserves cost for client from every shared bucket of the queue
// (and a slot where there is a maximum), from this replica's slice of
// them (see quota) or in one atomic call, or reports the wait.
func (b *Buckets) Take(parent context.Context, client int, cost scheduler.Vector, ask Ask) (Took, error) {
	if client < 0 || client >= len(b.clients) {
		return Took{}, errClient
	}
	if !b.leasing(client) {
		t, _, err := b.take(parent, client, cost, scheduler.Vector{}, ask)
		return t, err
	}
	return b.quota[client].take(parent, b, client, cost, ask, time.Now())
}

// take is one take's round trip: need from every bucket, and as much of
// extra as they can spare (granted).
func (b *Buckets) take(parent context.Context, client int, need, extra scheduler.Vector, ask Ask) (Took, scheduler.Vector, error) {
	c := b.clients[client]
	lease := b.s.id + ":" + strconv.FormatUint(b.seq.Add(1), 36)
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[client]
	args := append(b.args(client, &need), b.model.MaxConcurrent, c.MaxConcurrent, lease, leaseTTL.Milliseconds())
	for _, n := range extra {
		args = append(args, n)
	}
	w := 0
	if !ask.Next.IsZero() {
		w = 1
	}
	args = append(args, c.Name, max(1, c.Weight), fairActive.Milliseconds(), fairRetry.Milliseconds(), w, b.s.id)
	queued := 0
	if b.queued != nil && b.queued() {
		queued = 1
	}
	args = append(args, queued)
	now := time.Now()
	args = append(args, ms(ask.Deadline, now), ms(ask.Next, now))
	b.s.trips.Inc()
	res, err := b.s.eval(ctx, takeScript, k[:], bucketTypes[:], args...).Slice()
	if err != nil {
		return Took{}, scheduler.Vector{}, b.s.failed(err)
	}
	if len(res) < 4+5*scheduler.NumBuckets {
		return Took{}, scheduler.Vector{}, b.s.failed(errors.New("replicas: take answered " + strconv.Itoa(len(res)) + " values"))
	}
	ok, _ := res[0].(int64)
	t := Took{OK: ok == 1}
	wait, _ := res[1].(int64)
	t.Wait = time.Duration(wait) * time.Millisecond
	bind64, _ := res[2].(int64)
	switch bind := int(bind64); { // a key's index, from 1
	case bind == fairKey+1:
		t.Fair, t.Binding = true, scheduler.Tokens
	case bind > modelSlots:
		t.Binding, t.Own = scheduler.Slots, bind == clientSlots+1
	case bind > 0:
		t.Binding, t.Own = scheduler.Resource((bind-1)%scheduler.NumBuckets), bind > scheduler.NumBuckets
	}
	t.Levels = levelsOf(res[3:])
	if t.OK {
		t.Mark.Level = t.Levels.Model
		for r := range scheduler.NumBuckets {
			t.Mark.Paid[r], t.Mark.Lowered[r] = parseFloat(res[3+2*scheduler.NumBuckets+r]), parseFloat(res[3+3*scheduler.NumBuckets+r])
		}
	}
	others, _ := res[3+5*scheduler.NumBuckets].(int64)
	t.Others = int(min(max(others, 0), 1<<20))
	var granted scheduler.Vector
	if t.OK {
		for r := range granted {
			g, _ := res[3+4*scheduler.NumBuckets+r].(int64)
			granted[r] = int(max(0, min(g, int64(extra[r]))))
		}
	}
	if t.OK && (b.model.MaxConcurrent > 0 || c.MaxConcurrent > 0) {
		t.Lease = lease
		b.mu.Lock()
		b.leases[lease] = client
		b.mu.Unlock()
	}
	return t, granted, nil
}

// levelsOf reads the 2N levels a script returned.
func levelsOf(res []any) (lv scheduler.Levels) {
	for r := range scheduler.NumBuckets {
		lv.Model[r], lv.Client[r] = parseFloat(res[r]), parseFloat(res[scheduler.NumBuckets+r])
	}
	return lv
}

// Adjust gives back (positive amounts) or charges (negative) delta to the
// model's shared buckets and client's: to this replica's slice of them
// where it borrows one (given back, or charged, with it), else in Redis.
func (b *Buckets) Adjust(parent context.Context, client int, delta scheduler.Vector) error {
	if delta == (scheduler.Vector{}) {
		return nil
	}
	if client < 0 || client >= len(b.clients) {
		return errClient
	}
	if b.leasing(client) && b.quota[client].adjust(delta, time.Now()) {
		return nil
	}
	for _, n := range delta {
		if n < 0 {
			return b.adjust(parent, client, delta) // a charge: at once
		}
	}
	if b.s.giveLater(b, client, delta) {
		return nil
	}
	return b.adjust(parent, client, delta)
}

// adjust is Adjust's round trip.
func (b *Buckets) adjust(parent context.Context, client int, delta scheduler.Vector) error {
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[client]
	if err := b.s.eval(ctx, adjustScript, k[:modelSlots], bucketTypes[:modelSlots], b.args(client, &delta)...).Err(); err != nil {
		return b.s.failed(err)
	}
	return nil
}

// Observe lowers the model's shared buckets to what the upstream reports
// it has left after the request whose payment left mark (its cost added
// back to the mark where the upstream refused it: unsent), beyond what was
// paid and lowered since by any replica, so that the same discrepancy
// heard by several replicas lowers the key's buckets once. It returns how
// much it lowered, in all; it asks Redis only when the answer could lower
// a bucket.
//
// What client's slice at this replica still holds was paid but not sent:
// it is not among what was paid since the mark.
func (b *Buckets) Observe(parent context.Context, client int, mark Mark, unsent scheduler.Vector, u scheduler.Upstream) (float64, error) {
	model := b.model.Limits()
	if client >= 0 && client < len(b.clients) && b.leasing(client) {
		have := b.quota[client].unspent()
		for r := range mark.Paid {
			if model[r] > 0 {
				mark.Paid[r] += float64(have[r])
			}
		}
	}
	args := make([]any, 0, 1+6*scheduler.NumBuckets)
	args = append(args, scheduler.NumBuckets)
	for _, n := range model {
		args = append(args, n)
	}
	could := false
	for r := range scheduler.NumBuckets {
		level := mark.Level[r] + float64(unsent[r])
		remaining, slack := -1.0, float64(u.Rounding[r])/2
		if u.Reported[r] && model[r] > 0 {
			remaining = float64(max(0, u.Remaining[r]))
			could = could || level-remaining-slack > 0
		}
		args = append(args, strconv.FormatFloat(level, 'f', 3, 64), strconv.FormatFloat(mark.Paid[r], 'f', 3, 64),
			strconv.FormatFloat(mark.Lowered[r], 'f', 3, 64), strconv.FormatFloat(remaining, 'f', 3, 64),
			strconv.FormatFloat(slack, 'f', 3, 64))
	}
	if !could {
		return 0, nil
	}
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[0]
	res, err := b.s.eval(ctx, observeScript, k[:scheduler.NumBuckets], bucketTypes[:scheduler.NumBuckets], args...).Slice()
	if err != nil {
		return 0, b.s.failed(err)
	}
	lowered := 0.0
	for r := range min(len(res), scheduler.NumBuckets) {
		lowered += parseFloat(res[r])
	}
	return lowered, nil
}

// Release ends a lease: the slots it held are free.
func (b *Buckets) Release(parent context.Context, client int, lease string) error {
	if lease == "" {
		return nil
	}
	b.mu.Lock()
	delete(b.leases, lease)
	b.mu.Unlock()
	if b.s.releaseLater(b, client, lease) {
		return nil
	}
	return b.release(parent, client, lease)
}

// release is Release's round trip.
func (b *Buckets) release(parent context.Context, client int, lease string) error {
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[client]
	if err := b.s.eval(ctx, releaseScript, k[modelSlots:fairKey], bucketTypes[modelSlots:fairKey], lease).Err(); err != nil {
		return b.s.failed(err) // the lease expires within leaseTTL anyway
	}
	return nil
}

// refresh extends this replica's leases, and re-asserts those Redis lost.
// It holds b.mu throughout, so that a lease released meanwhile is never
// added back.
func (b *Buckets) refresh(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	byKey := map[string][]any{}
	for lease, client := range b.leases {
		for _, k := range b.keys[client][modelSlots:fairKey] {
			byKey[k] = append(byKey[k], lease)
		}
	}
	for k, leases := range byKey {
		args := append([]any{leaseTTL.Milliseconds()}, leases...)
		if err := b.s.eval(ctx, refreshScript, []string{k}, []string{typeLeases}, args...).Err(); err != nil {
			return err
		}
	}
	return nil
}

// Cap lowers client's shared buckets (and the model's) to at most
// levels (negative: leave it): what this replica estimates they hold after
// an outage, so that they resume from what was spent, not from full.
func (b *Buckets) Cap(parent context.Context, client int, levels scheduler.Levels) error {
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[client]
	args := b.args(client, &scheduler.Vector{})[:1+2*scheduler.NumBuckets]
	for _, lv := range [...]*[scheduler.NumBuckets]float64{&levels.Model, &levels.Client} {
		for _, l := range lv {
			args = append(args, strconv.FormatFloat(l, 'f', 3, 64))
		}
	}
	if err := b.s.eval(ctx, capScript, k[:modelSlots], bucketTypes[:modelSlots], args...).Err(); err != nil {
		return b.s.failed(err)
	}
	return nil
}

// LocalShare is the share of its limits a replica's queue enforces now:
// 1 while Redis answers (or onRedisDown is not split), else 1 / the
// replicas last seen alive.
func (s *State) LocalShare() float64 {
	if !s.Degraded() || s.cfg.OnRedisDown != Split {
		return 1
	}
	return 1 / float64(s.Live())
}

// LocalShare is the share of its limits the queue enforces now.
func (b *Buckets) LocalShare() float64 { return b.s.LocalShare() }
