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
	keys    []keys // by client
	seq     atomic.Uint64

	mu     sync.Mutex
	leases map[string]int // live leases of this replica -> client
	closed bool           // its queue is retired: forgotten once its leases end
}

// keys of one client's call: model requests, model tokens, client
// requests, client tokens, model leases, client leases. One hash tag.
type keys [6]string

// Queue returns the shared buckets of a queue of model on route, with the
// model's limits and its clients' (by ID).
func (s *State) Queue(route, model string, cfg scheduler.Config, clients []scheduler.Client) *Buckets {
	tag := s.cfg.Prefix + "{" + route + "/" + model + "}:"
	b := &Buckets{s: s, model: cfg, clients: clients, keys: make([]keys, len(clients)),
		leases: map[string]int{}}
	for i, c := range clients {
		b.keys[i] = keys{tag + "req", tag + "tok", tag + "c:" + c.Name + ":req", tag + "c:" + c.Name + ":tok",
			tag + "slots", tag + "c:" + c.Name + ":slots"}
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
	// Binding is the resource that binds, Own whether it is the client's.
	Binding scheduler.Resource
	Own     bool
	// Levels are the buckets after (a client's 0 where it has none).
	Levels scheduler.Levels
}

// args are a call's capacities and maxima for client.
func (b *Buckets) args(client int) []any {
	c := b.clients[client]
	return []any{b.model.RPM, b.model.TPM, c.RPM, c.TPM}
}

var errClient = errors.New("replicas: no such client")

// Take reserves one request and tokens for client from every shared
// bucket of the queue (and a slot where there is a maximum), in one
// atomic call, or reports the wait.
func (b *Buckets) Take(parent context.Context, client, tokens int) (Took, error) {
	if client < 0 || client >= len(b.clients) {
		return Took{}, errClient
	}
	c := b.clients[client]
	lease := b.s.id + ":" + strconv.FormatUint(b.seq.Add(1), 36)
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[client]
	res, err := b.s.eval(ctx, takeScript, k[:], bucketTypes[:], append(b.args(client), tokens, b.model.MaxConcurrent,
		c.MaxConcurrent, lease, leaseTTL.Milliseconds())...).Slice()
	if err != nil {
		return Took{}, b.s.failed(err)
	}
	if len(res) < 7 {
		return Took{}, b.s.failed(errors.New("replicas: take answered " + strconv.Itoa(len(res)) + " values"))
	}
	t := Took{OK: res[0].(int64) == 1}
	wait := res[1].(int64)
	t.Wait = time.Duration(wait) * time.Millisecond
	switch res[2].(int64) {
	case 1:
		t.Binding = scheduler.Requests
	case 2:
		t.Binding = scheduler.Tokens
	case 3:
		t.Binding, t.Own = scheduler.Requests, true
	case 4:
		t.Binding, t.Own = scheduler.Tokens, true
	case 5:
		t.Binding = scheduler.Slots
	case 6:
		t.Binding, t.Own = scheduler.Slots, true
	}
	t.Levels = scheduler.Levels{Requests: parseFloat(res[3]), Tokens: parseFloat(res[4]),
		ClientRequests: parseFloat(res[5]), ClientTokens: parseFloat(res[6])}
	if t.OK && (b.model.MaxConcurrent > 0 || c.MaxConcurrent > 0) {
		t.Lease = lease
		b.mu.Lock()
		b.leases[lease] = client
		b.mu.Unlock()
	}
	return t, nil
}

// Adjust gives back (positive) or charges (negative) requests and tokens
// to the model's shared buckets and client's.
func (b *Buckets) Adjust(parent context.Context, client, requests, tokens int) error {
	if requests == 0 && tokens == 0 {
		return nil
	}
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[client]
	if err := b.s.eval(ctx, adjustScript, k[:4], bucketTypes[:4], append(b.args(client), requests, tokens)...).Err(); err != nil {
		return b.s.failed(err)
	}
	return nil
}

// Release ends a lease: the slots it held are free.
func (b *Buckets) Release(parent context.Context, client int, lease string) error {
	if lease == "" {
		return nil
	}
	b.mu.Lock()
	delete(b.leases, lease)
	b.mu.Unlock()
	ctx, cancel := b.s.ctx(parent)
	defer cancel()
	k := b.keys[client]
	if err := b.s.eval(ctx, releaseScript, k[4:], bucketTypes[4:], lease).Err(); err != nil {
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
		for _, k := range b.keys[client][4:] {
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
	args := b.args(client)
	for _, l := range [...]float64{levels.Requests, levels.Tokens, levels.ClientRequests, levels.ClientTokens} {
		args = append(args, strconv.FormatFloat(l, 'f', 3, 64))
	}
	if err := b.s.eval(ctx, capScript, k[:4], bucketTypes[:4], args...).Err(); err != nil {
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
