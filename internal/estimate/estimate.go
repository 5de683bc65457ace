// Package estimate is the calibrated count of a model whose tokenizer the
// gateway does not have (Claude, a local Llama behind a fleet): its prompt
// is counted with o200k and scaled by a factor learned from what the
// upstream reports it counted, request after request, and reserved with a
// margin taken from the factor's recent error, so that an upstream that
// enforces the same limit does not refuse at the margin. Settlement then
// charges the truth.
//
// It exists apart from the tokenizer (which counts exactly what it knows)
// because the factor is learned online, per (route, model), from answers.
package estimate

import (
	"math"
	"strings"
	"sync"
	"sync/atomic"
)

// The factor's bounds: an upstream that reports absurd counts cannot push
// it outside them.
const (
	MinFactor = 0.5
	MaxFactor = 3.0
	// maxMargin bounds the margin reserved on top of the factor.
	maxMargin = 0.5
	// rate is the weight of a new observation once the first few have
	// set the factor: it converges within a few percent in about 20
	// requests of a stable workload, and one odd answer moves it a tenth.
	rate = 0.1
)

// Start is the documented factor a model starts from: Claude's tokenizer
// yields about a fifth more tokens than o200k on English prose and code
// (1.2); any other model is taken to count as o200k does (1.0) until its
// upstream says otherwise.
func Start(model string) float64 {
	if strings.HasPrefix(strings.ToLower(model), "claude") {
		return 1.2
	}
	return 1.0
}

// Factor is one model's learned ratio of the upstream's prompt count to
// the gateway's. Reserve is lock-free; Learn takes the factor's own lock.
// It is safe for concurrent use.
type Factor struct {
	factor atomic.Uint64 // float64 bits
	margin atomic.Uint64 // float64 bits: the relative margin reserved on top

	mu  sync.Mutex
	n   int     // observations so far
	err float64 // recent relative error of the factor (EWMA)
}

// New returns a factor starting at start (bounded), with the margin of a
// factor not yet confirmed (a tenth).
func New(start float64) *Factor {
	f := &Factor{}
	f.factor.Store(math.Float64bits(bound(start)))
	f.margin.Store(math.Float64bits(0.1))
	f.err = 0.05
	return f
}

func bound(x float64) float64 {
	if math.IsNaN(x) {
		return 1
	}
	return max(MinFactor, min(MaxFactor, x))
}

// Value is the factor now.
func (f *Factor) Value() float64 { return math.Float64frombits(f.factor.Load()) }

// Margin is the relative margin reserved on top of the factor now.
func (f *Factor) Margin() float64 { return math.Float64frombits(f.margin.Load()) }

// Estimate is the prompt counted raw as the upstream is expected to count
// it: raw × factor, rounded up.
func (f *Factor) Estimate(raw int) int {
	return int(math.Ceil(float64(max(0, raw)) * f.Value()))
}

// Reserve is what to reserve for a prompt counted raw: the estimate plus
// the margin, rounded up, bounded by MaxFactor × raw.
func (f *Factor) Reserve(raw int) int {
	x := float64(max(0, raw)) * f.Value() * (1 + f.Margin())
	return int(math.Ceil(min(x, float64(max(0, raw))*MaxFactor)))
}

// Learn takes what the upstream reported (actual) for a prompt the
// gateway counted raw, and moves the factor toward their ratio (bounded).
// The first observations move it most (each the mean of those so far);
// then each moves it by a tenth. The margin follows the factor's recent
// relative error, twice over, at most a half. A prompt too small to
// measure a ratio (under 16 tokens either way) is not learned from. ok
// reports whether it was.
func (f *Factor) Learn(raw, actual int) (ratio float64, ok bool) {
	if raw < 16 || actual < 16 {
		return 0, false
	}
	ratio = bound(float64(actual) / float64(raw))
	f.mu.Lock()
	defer f.mu.Unlock()
	cur := f.Value()
	f.n++
	w := max(rate, 1/float64(f.n))
	e := math.Abs(ratio-cur) / cur
	f.err += max(rate, 1/float64(f.n+1)) * (e - f.err)
	next := bound(cur + w*(ratio-cur))
	f.factor.Store(math.Float64bits(next))
	f.margin.Store(math.Float64bits(min(maxMargin, 2*f.err)))
	return ratio, true
}
