// Package replicas keeps one key's limits together across llproxy replicas
// through Redis: the model buckets, each client's buckets, the
// concurrency counts and the daily budgets live there, and every replica
// reserves from them with one atomic script call per admission, on
// Redis's clock.
//
// It exists apart from the scheduler, which stays one process's queue:
// each replica keeps its own FIFO and fair share, and only the buckets are
// shared. When Redis is down, slow or restarted the package says so (a
// metric, a log line on each change) and the gateway follows onRedisDown:
// each replica enforces its share of the limits, refuses, or lets traffic
// through.
package replicas

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/llproxy/llproxy/internal/duration"
)

// What a replica does while Redis cannot be reached.
const (
	// Split: each replica enforces limit / live replicas, counting the
	// replicas it last saw alive.
	Split = "split"
	// Deny: 503 in OpenAI's shape.
	Deny = "deny"
	// Allow: forward without limits.
	Allow = "allow"
)

// Defaults.
const (
	DefaultPrefix  = "llproxy:"
	DefaultTimeout = 50 * time.Millisecond
	// Heartbeat is how often a replica says it is alive (and checks Redis);
	// a replica not heard from for three is gone, and so are its leases.
	Heartbeat = time.Second
	// Probe is how often a degraded replica tries Redis again.
	Probe    = 100 * time.Millisecond
	leaseTTL = 3 * Heartbeat
)

// Config is the "shared" section of the config file.
type Config struct {
	// Redis is the server's URL: redis://[:password@]host:port/db.
	Redis string `json:"redis"`
	// Prefix starts every key. Default "llproxy:".
	Prefix string `json:"prefix"`
	// Timeout bounds every Redis call. Default 50ms.
	Timeout duration.Duration `json:"timeout"`
	// OnRedisDown is split (default), deny or allow.
	OnRedisDown string `json:"onRedisDown"`
	// Cluster: Redis is a Redis Cluster, Redis one of its nodes (more as
	// ?addr=host:port&addr=...). Every call's keys share a hash tag.
	Cluster bool `json:"cluster"`
}

// SetDefaults fills what is not set.
func (c *Config) SetDefaults() {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.Timeout == 0 {
		c.Timeout = duration.Duration(DefaultTimeout)
	}
	if c.OnRedisDown == "" {
		c.OnRedisDown = Split
	}
}

// Validate reports every field out of range, each by its JSON name.
func (c Config) Validate() error {
	var errs []error
	if c.Redis == "" {
		errs = append(errs, errors.New("redis: required (redis://host:port/db)"))
	} else if c.Cluster {
		if _, err := redis.ParseClusterURL(c.Redis); err != nil {
			errs = append(errs, fmt.Errorf("redis: %v", err))
		}
	} else if _, err := redis.ParseURL(c.Redis); err != nil {
		errs = append(errs, fmt.Errorf("redis: %v", err))
	}
	if c.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("timeout: must be > 0, got %s", time.Duration(c.Timeout)))
	}
	switch c.OnRedisDown {
	case Split, Deny, Allow:
	default:
		errs = append(errs, fmt.Errorf("onRedisDown: must be split, deny or allow, got %q", c.OnRedisDown))
	}
	return errors.Join(errs...)
}

// State is one replica's link to the shared limits. It is safe for
// concurrent use.
type State struct {
	cfg     Config
	rdb     redis.UniversalClient
	id      string // this replica
	log     *slog.Logger
	timeout time.Duration
	now     func() time.Time // this replica's clock: only for how long an outage lasted

	degraded  atomic.Bool
	since     atomic.Int64 // when it turned degraded (unix ns, this replica's clock)
	live      atomic.Int64 // replicas seen alive at the last heartbeat
	gauge     *prometheus.GaugeVec
	changes   *prometheus.CounterVec
	repaired  prometheus.Counter
	trips     prometheus.Counter // takes that went to Redis
	local     prometheus.Counter // takes paid from a leased slice
	pipelines prometheus.Counter // write pipelines (batch.go)
	adds      adds

	mu       sync.Mutex
	queues   []*Buckets            // every queue's buckets, for leases and recovery
	onChange []func(degraded bool) // told when the mode changes
	recover  []func(ctx context.Context) error
	pending  []func(ctx context.Context) error
}

// New connects to cfg.Redis (lazily: the first call dials) and registers
// the shared-state metrics on reg.
func New(cfg Config, log *slog.Logger, reg prometheus.Registerer) (*State, error) {
	cfg.SetDefaults()
	t := time.Duration(cfg.Timeout)
	var rdb redis.UniversalClient
	if cfg.Cluster {
		opts, err := redis.ParseClusterURL(cfg.Redis)
		if err != nil {
			return nil, fmt.Errorf("shared.redis: %w", err)
		}
		opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = t, t, t
		opts.MaxRetries = -1 // a retry would double the bound (a MOVED redirect is followed)
		opts.ContextTimeoutEnabled = true
		rdb = redis.NewClusterClient(opts)
	} else {
		opts, err := redis.ParseURL(cfg.Redis)
		if err != nil {
			return nil, fmt.Errorf("shared.redis: %w", err)
		}
		opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = t, t, t
		opts.MaxRetries = -1 // a retry would double the bound
		opts.ContextTimeoutEnabled = true
		rdb = redis.NewClient(opts)
	}
	var b [8]byte
	rand.Read(b[:])
	s := &State{cfg: cfg, rdb: rdb, id: hex.EncodeToString(b[:]), log: log, timeout: t,
		gauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "llproxy_shared_state",
			Help: "1 for the mode the shared limits are in: ok (Redis answers) or degraded (onRedisDown in force)."},
			[]string{"state"}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "llproxy_shared_state_changes_total",
			Help: "Times the shared limits changed mode, by the mode entered."}, []string{"state"}),
		repaired: prometheus.NewCounter(prometheus.CounterOpts{Name: "llproxy_shared_keys_replaced_total",
			Help: "Redis keys of the shared limits found holding the wrong type of value, and replaced."}),
		trips: prometheus.NewCounter(prometheus.CounterOpts{Name: "llproxy_shared_takes_total", ConstLabels: prometheus.Labels{"from": "redis"},
			Help: "Admissions paid in the shared buckets: from a leased slice at this replica (from=lease), or in a round trip to Redis (from=redis)."}),
		local: prometheus.NewCounter(prometheus.CounterOpts{Name: "llproxy_shared_takes_total", ConstLabels: prometheus.Labels{"from": "lease"},
			Help: "Admissions paid in the shared buckets: from a leased slice at this replica (from=lease), or in a round trip to Redis (from=redis)."}),
		pipelines: prometheus.NewCounter(prometheus.CounterOpts{Name: "llproxy_shared_write_pipelines_total",
			Help: "Round trips that wrote what requests write after their admission (budget additions, give-backs at settlement, freed slots), each for every request of its batch."}),
	}
	s.adds.kick = make(chan struct{}, 1)
	s.now = time.Now
	s.live.Store(1)
	s.gauge.WithLabelValues("ok").Set(1)
	s.gauge.WithLabelValues("degraded").Set(0)
	if reg != nil {
		for _, c := range []prometheus.Collector{s.gauge, s.changes, s.repaired, s.trips, s.local, s.pipelines} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

// SetClock replaces this replica's clock (tests skew it). The buckets
// never read it: their arithmetic runs on Redis's clock. Call it before
// Run.
func (s *State) SetClock(now func() time.Time) { s.now = now }

// Mode is what the replica does while Redis is down.
func (s *State) Mode() string { return s.cfg.OnRedisDown }

// Degraded reports whether Redis could not be reached last time.
func (s *State) Degraded() bool { return s.degraded.Load() }

// Live is how many replicas were alive at the last heartbeat (at least 1).
func (s *State) Live() int { return int(max(1, s.live.Load())) }

// OnChange registers f, told (outside any lock) each time the mode
// changes. Call it before Run.
func (s *State) OnChange(f func(degraded bool)) {
	s.mu.Lock()
	s.onChange = append(s.onChange, f)
	s.mu.Unlock()
}

// OnRecover registers f, run when Redis answers after an outage and
// before the shared buckets are used again (to write what was spent
// meanwhile). Call it before Run.
func (s *State) OnRecover(f func(ctx context.Context) error) {
	s.mu.Lock()
	s.recover = append(s.recover, f)
	s.mu.Unlock()
}

// Close gives back what this replica's slices hold (within the timeout)
// and closes the connection pool.
func (s *State) Close() error {
	s.flushAdds(context.Background())
	if !s.Degraded() {
		s.mu.Lock()
		queues := append([]*Buckets{}, s.queues...)
		s.mu.Unlock()
		for _, b := range queues {
			if b.settle(context.Background(), time.Now(), true) != nil {
				break
			}
		}
	}
	return s.rdb.Close()
}

// ctx bounds one Redis call by the timeout.
func (s *State) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	if parent == nil {
		parent = context.Background()
	}
	return context.WithTimeout(context.WithoutCancel(parent), s.timeout)
}

// failed records that a Redis call failed: the mode turns degraded, unless
// Redis did answer, about one key's data (see repair.go): that is the
// key's problem, not every model's.
func (s *State) failed(err error) error {
	if keyTrouble(err) {
		s.log.Warn("shared limits: a Redis key holds the wrong type of value", "error", err.Error())
		return err
	}
	if s.degraded.CompareAndSwap(false, true) {
		s.since.Store(s.now().UnixNano())
		s.log.Warn("shared limits degraded: Redis cannot be reached", "error", err.Error(),
			"onRedisDown", s.cfg.OnRedisDown, "live_replicas", s.Live())
		s.changed(true)
	}
	return err
}

func (s *State) changed(degraded bool) {
	state := "ok"
	if degraded {
		state = "degraded"
	}
	s.gauge.WithLabelValues("ok").Set(b2f(!degraded))
	s.gauge.WithLabelValues("degraded").Set(b2f(degraded))
	s.changes.WithLabelValues(state).Inc()
	s.mu.Lock()
	fs := append([]func(bool){}, s.onChange...)
	s.mu.Unlock()
	for _, f := range fs {
		f(degraded)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Run sends a heartbeat every Heartbeat until ctx ends: it counts the
// live replicas, extends this replica's leases, and, when Redis answers
// again after an outage, writes what was spent meanwhile before the
// shared buckets are used again.
//
// While degraded it tries every Probe instead, so that the replicas come
// back to the shared buckets close together: one that is back spends from
// them at the full rate while one still degraded spends its share.
func (s *State) Run(ctx context.Context) {
	s.startWriter(ctx)
	for {
		s.beat(ctx)
		every := Heartbeat
		if s.Degraded() {
			every = Probe
		}
		t := time.NewTimer(every)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (s *State) beat(parent context.Context) {
	ctx, cancel := s.ctx(parent)
	defer cancel()
	n, err := s.eval(ctx, heartbeatScript, []string{s.cfg.Prefix + "replicas"}, []string{typeLeases}, s.id,
		leaseTTL.Milliseconds()).Int64()
	if err != nil {
		s.failed(err)
		return
	}
	s.live.Store(n)
	s.mu.Lock()
	queues := append([]*Buckets{}, s.queues...)
	s.mu.Unlock()
	for _, b := range queues {
		if err := b.refresh(ctx); err != nil && !keyTrouble(err) {
			s.failed(err)
			return
		}
		if err := b.settle(ctx, time.Now(), b.isClosed()); err != nil && !keyTrouble(err) {
			s.failed(err)
			return
		}
	}
	s.forgetClosed()
	if s.degraded.Load() {
		if err := s.flush(parent); err != nil {
			s.failed(err)
			return
		}
		if s.degraded.CompareAndSwap(true, false) {
			s.log.Info("shared limits ok: Redis answers again", "live_replicas", n,
				"outage", s.now().Sub(time.Unix(0, s.since.Load())).Round(time.Millisecond).String())
			s.changed(false)
		}
	}
}

// Defer queues f, a write that could not reach Redis (a budget counted
// during an outage), to be retried when Redis answers again.
func (s *State) Defer(f func(ctx context.Context) error) {
	s.mu.Lock()
	s.pending = append(s.pending, f)
	s.mu.Unlock()
}

// flush writes what was spent while Redis was down: the recovery hooks
// (the buckets resume from what was spent, not from full) and the
// deferred writes.
func (s *State) flush(parent context.Context) error {
	s.mu.Lock()
	hooks := append([]func(context.Context) error{}, s.recover...)
	pending := s.pending
	s.pending = nil
	s.mu.Unlock()
	for _, f := range hooks {
		if err := f(parent); err != nil {
			s.mu.Lock()
			s.pending = append(pending, s.pending...)
			s.mu.Unlock()
			return err
		}
	}
	for i, f := range pending {
		ctx, cancel := s.ctx(parent)
		err := f(ctx)
		cancel()
		if err != nil {
			s.mu.Lock()
			s.pending = append(pending[i:], s.pending...)
			s.mu.Unlock()
			return err
		}
	}
	return nil
}

// AddBudget adds tokens to client's use of model on day and returns the
// total in Redis.
func (s *State) AddBudget(parent context.Context, client, model, day string, tokens int64) (int64, error) {
	ctx, cancel := s.ctx(parent)
	defer cancel()
	n, err := s.eval(ctx, budgetScript, []string{s.budgetKey(client, model, day)}, []string{typeCount}, tokens,
		int64(budgetTTL(model)/time.Second)).Int64()
	if err != nil {
		return 0, s.failed(err)
	}
	return n, nil
}

// Budget returns client's use of model on day in Redis.
func (s *State) Budget(parent context.Context, client, model, day string) (int64, error) {
	ctx, cancel := s.ctx(parent)
	defer cancel()
	key := s.budgetKey(client, model, day)
	n, err := s.rdb.Get(ctx, key).Int64()
	if keyTrouble(err) && s.repair(ctx, []string{key}, []string{typeCount}) {
		n, err = s.rdb.Get(ctx, key).Int64()
	}
	if errors.Is(err, redis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, s.failed(err)
	}
	return n, nil
}

func (s *State) budgetKey(client, model, day string) string {
	return s.cfg.Prefix + "budget:{" + client + "}:" + model + ":" + day
}

func parseFloat(v any) float64 {
	switch x := v.(type) {
	case string:
		f, _ := strconv.ParseFloat(x, 64)
		return f
	case int64:
		return float64(x)
	}
	return 0
}
