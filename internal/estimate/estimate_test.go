package estimate

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

// On a stable workload whose upstream counts 1.4 × o200k (with a few
// percent of noise per request), the factor is within 3% after 20
// requests, starting from the documented 1.2; the margin shrinks with the
// error.
func TestFactorConverges(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	f := New(Start("claude-sonnet-4-5"))
	assert.Equal(t, 1.2, f.Value())
	for range 20 {
		raw := 500 + rng.IntN(3000)
		actual := int(float64(raw) * 1.4 * (1 + 0.02*(rng.Float64()*2-1)))
		f.Learn(raw, actual)
	}
	assert.InDelta(t, 1.4, f.Value(), 1.4*0.03)
	assert.Less(t, f.Margin(), 0.1, "a confirmed factor needs a small margin")
	assert.GreaterOrEqual(t, f.Reserve(1000), f.Estimate(1000))
	assert.Equal(t, int(math.Ceil(1000*f.Value())), f.Estimate(1000))
}

// An upstream that lies cannot push the factor outside [0.5, 3], nor the
// reservation beyond 3 × the count.
func TestFactorIsBounded(t *testing.T) {
	f := New(1)
	for range 100 {
		f.Learn(100, 1_000_000)
	}
	assert.Equal(t, MaxFactor, f.Value())
	assert.LessOrEqual(t, f.Reserve(1000), 3000)
	for range 100 {
		f.Learn(1_000_000, 16)
	}
	assert.InDelta(t, MinFactor, f.Value(), 0.01)
	_, ok := f.Learn(5, 100)
	assert.False(t, ok, "too small to measure")
	assert.Equal(t, 1.0, New(math.NaN()).Value())
	assert.Equal(t, 0, f.Reserve(-5))
}

func TestCacheRemembersPrefixesUntilTheirTTL(t *testing.T) {
	var c Cache
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	assert.Zero(t, c.Cached(7, now))
	c.Store(7, 3000, 5*time.Minute, now)
	assert.Equal(t, 3000, c.Cached(7, now.Add(4*time.Minute)))
	assert.Zero(t, c.Cached(7, now.Add(5*time.Minute)), "expired")
	c.Store(0, 100, time.Hour, now)
	assert.Zero(t, c.Cached(0, now), "no prefix, nothing cached")
	for i := range MaxCached + 50 {
		c.Store(uint64(i+1), 10, time.Minute, now)
	}
	assert.LessOrEqual(t, len(c.m), MaxCached, "bounded")
	var none *Cache
	assert.Zero(t, none.Cached(1, now))
	none.Store(1, 1, time.Minute, now)
}
