// Package models holds the models of one route: each one's queue (its own
// if listed; for an unlisted model, one with the wildcard's limits, made on
// first use and retired when idle), its metric series (past MaxLabels
// unlisted models, they share model="other"), and its per-model settings.
//
// It exists so that the request path asks one question, "what is this
// model?", and gets everything it needs of it at once, without a lock.
package models

import (
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/estimate"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/replicas"
	"github.com/llproxy/llproxy/scheduler"
)

// MaxLabels bounds the wildcard models of a route that get metric
// series of their own; the rest share model="other".
const MaxLabels = 100

// Model is what the request path needs of one (route, model).
type Model struct {
	Queue   *scheduler.Queue
	Metrics *metrics.Model
	// Label is the model label of its series.
	Label            string
	DefaultMaxTokens int
	MaxQueueWait     time.Duration
	// Defaults is a JSON object of default request parameters, or nil;
	// System a default system prompt.
	Defaults []byte
	System   string
	// Shared is the model's buckets in the shared store, when replicas
	// share the limits; nil otherwise.
	Shared *replicas.Buckets
	// Factor, when the model's prompts are counted calibrated, is its
	// learned factor; nil: counted exactly.
	Factor *estimate.Factor
	// Cache predicts what the provider's prompt cache reads of a prompt
	// (where cache reads do not count against the input bucket); nil
	// where they count.
	Cache *estimate.Cache
	// CountTokens limits the model's count_tokens calls; nil: unlimited.
	CountTokens *scheduler.Queue
}

// Share returns the shared buckets of a queue of model with limits cfg;
// nil: the limits are not replicas.
type Share func(model string, cfg scheduler.Config) *replicas.Buckets

// Registry is a route's models. It is safe for concurrent use.
type Registry struct {
	route   string
	cfg     map[string]*config.Model
	set     *Set
	metrics *metrics.Metrics
	listed  map[string]*Model // immutable after New: read without a lock
	dynamic sync.Map          // wildcard models: string -> *Model

	labeled   atomic.Int64 // wildcard models with series of their own
	otherOnce sync.Once
	other     *metrics.Model // the series of the wildcard models past MaxLabels
	share     Share
	// learned is what each model learned of its upstream, by name: its
	// estimate factor and its prompt cache. It outlives a retired queue
	// and a reload.
	learned *sync.Map // string -> *learned
}

// learned is what a model learned of its upstream.
type learned struct {
	factor *estimate.Factor
	cache  estimate.Cache
}

// learnedOf is model's, made on first use.
func (r *Registry) learnedOf(model string) *learned {
	if v, ok := r.learned.Load(model); ok {
		return v.(*learned)
	}
	v, _ := r.learned.LoadOrStore(model, &learned{factor: estimate.New(estimate.Start(model))})
	return v.(*learned)
}

// New builds the registry of route's models (rc validated).
func New(route string, rc *config.Route, m *metrics.Metrics, clients Clients, share Share, prev *Registry) (*Registry, error) {
	set, err := NewSet(rc.QueueConfigs(), rc.MaxWildcardModels, clients)
	if err != nil {
		return nil, err
	}
	if prev != nil {
		set.Inherit(prev.set) // a reloaded config: nobody waiting is lost
	}
	r := &Registry{route: route, cfg: rc.Models, set: set, metrics: m, listed: map[string]*Model{}, share: share,
		learned: &sync.Map{}}
	if prev != nil {
		r.learned = prev.learned // what the upstream taught goes on
	}
	set.OnRetire(func(q *scheduler.Queue) {
		if v, ok := r.dynamic.Load(q.Model()); ok && v.(*Model).Queue == q {
			r.forget(v.(*Model))
		}
	})
	for model, mc := range rc.Models {
		if model == scheduler.Wildcard {
			continue
		}
		q, err := set.Queue(model)
		if err != nil {
			return nil, err
		}
		r.listed[model] = r.newModel(q, mc)
	}
	return r, nil
}

// Set is the route's queues.
func (r *Registry) Set() *Set { return r.set }

// For returns model, creating a wildcard queue on first
// use (or anew, if its queue was retired for being idle).
func (r *Registry) For(model string) (*Model, error) {
	if ms, ok := r.listed[model]; ok {
		return ms, nil
	}
	if v, ok := r.dynamic.Load(model); ok {
		ms := v.(*Model)
		if !ms.Queue.Retired() {
			return ms, nil
		}
		r.forget(ms)
	}
	q, err := r.set.Queue(model)
	if err != nil {
		return nil, err
	}
	ms := r.newModel(q, r.cfg[scheduler.Wildcard])
	if v, loaded := r.dynamic.LoadOrStore(model, ms); loaded {
		r.release(ms)
		return v.(*Model), nil
	}
	return ms, nil
}

// forget drops the state of a wildcard model whose queue was retired, and
// its series.
func (r *Registry) forget(ms *Model) {
	if r.dynamic.CompareAndDelete(ms.Queue.Model(), ms) {
		r.release(ms)
	}
}

// release gives back a wildcard model's label and shared buckets.
func (r *Registry) release(ms *Model) {
	if ms.Shared != nil {
		ms.Shared.Close()
	}
	if ms.Label != metrics.OtherModel {
		r.metrics.DeleteModel(r.route, ms.Label)
		r.labeled.Add(-1)
	}
}

func (r *Registry) newModel(q *scheduler.Queue, mc *config.Model) *Model {
	ms := &Model{Queue: q, Label: q.Model(), DefaultMaxTokens: mc.DefaultMaxTokens,
		MaxQueueWait: time.Duration(mc.MaxQueueWait), System: mc.System}
	if _, listed := r.cfg[q.Model()]; !listed && r.labeled.Add(1) > MaxLabels {
		r.labeled.Add(-1)
		ms.Label = metrics.OtherModel
		r.otherOnce.Do(func() { r.other = r.metrics.Model(r.route, metrics.OtherModel) })
		ms.Metrics = r.other
	} else {
		ms.Metrics = r.metrics.Model(r.route, q.Model())
	}
	if len(mc.Defaults) > 0 {
		ms.Defaults, _ = json.Marshal(mc.Defaults)
	}
	if mc.Tokenizer == config.TokenizerCalibrated || !mc.CacheReadsCount {
		l := r.learnedOf(q.Model())
		if mc.Tokenizer == config.TokenizerCalibrated {
			ms.Factor = l.factor
		}
		if !mc.CacheReadsCount {
			ms.Cache = &l.cache
		}
	}
	if mc.CountTokensRPM > 0 {
		ms.CountTokens = scheduler.NewQueue(q.Model()+" count_tokens", scheduler.Config{MaxQueueSize: mc.MaxQueueSize,
			MaxQueueWait: mc.MaxQueueWait.D(), RPM: mc.CountTokensRPM})
	}
	if r.share != nil {
		ms.Shared = r.share(q.Model(), q.Config())
		ms.Shared.Queued(func() bool { return q.Depth() > 0 })
		q.ConfirmAdmissions()
		if f := ms.Shared.LocalShare(); f < 1 {
			q.Share(time.Now(), f) // made while Redis is down
		}
	}
	return ms
}

// LabelOf is the model label of q's series.
func (r *Registry) LabelOf(q *scheduler.Queue) string {
	if _, ok := r.listed[q.Model()]; ok {
		return q.Model()
	}
	if v, ok := r.dynamic.Load(q.Model()); ok && v.(*Model).Queue == q {
		return v.(*Model).Label
	}
	return metrics.OtherModel // being created or retired: not a series of its own
}

// Queued counts the requests waiting in the route's queue of model (for
// the fleet: a server is not unloaded while any wait for it).
func (r *Registry) Queued(model string) int {
	if q, ok := r.set.Lookup(model); ok {
		return q.Depth() // no prediction: the fleet asks often
	}
	return 0
}

// Range calls f with every model of the route that has a queue now.
func (r *Registry) Range(f func(*Model)) {
	for _, ms := range r.listed {
		f(ms)
	}
	r.dynamic.Range(func(_, v any) bool {
		f(v.(*Model))
		return true
	})
}
