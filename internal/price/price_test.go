package price

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func f(v float64) *float64 { return &v }

// Hand-computed bills.
func TestCostAgainstHandComputedBills(t *testing.T) {
	gpt4o := (&Price{Input: f(2.50), CachedInput: f(1.25), Output: f(10.00)}).Rate()
	// OpenAI: 10,000 prompt tokens of which 4,000 cached, 500 output
	// (reasoning included): 6,000 × $2.50/M + 4,000 × $1.25/M + 500 × $10/M
	// = $0.015 + $0.005 + $0.005 = $0.025.
	assert.Equal(t, Micro(25_000), gpt4o.Cost(Usage{Prompt: 10000, CacheRead: 4000, Output: 500}))
	mini := (&Price{Input: f(0.15), CachedInput: f(0.075), Output: f(0.60)}).Rate()
	// 1 prompt token, 1 output: $0.00000015 + $0.0000006 = 0.75 µ$ → 1 µ$ (half up).
	assert.Equal(t, Micro(1), mini.Cost(Usage{Prompt: 1, Output: 1}))
	// 3 cached tokens of 3 at $0.075/M: 0.225 µ$ → 0.
	assert.Equal(t, Micro(0), mini.Cost(Usage{Prompt: 3, CacheRead: 3}))

	sonnet := (&Price{Input: f(3.00), CacheWrite: f(3.75), CacheRead: f(0.30), Output: f(15.00)}).Rate()
	// Anthropic: input 200 uncached, 10,000 written to the cache, 50,000
	// read from it, 800 out: 200×3 + 10,000×3.75 + 50,000×0.30 + 800×15
	// = 600 + 37,500 + 15,000 + 12,000 = 65,100 µ$.
	assert.Equal(t, Micro(65_100), sonnet.Cost(Usage{Prompt: 60200, CacheWrite: 10000, CacheRead: 50000, Output: 800}))
	// Embeddings: input only.
	emb := (&Price{Input: f(0.02)}).Rate()
	assert.Equal(t, Micro(20), emb.Cost(Usage{Prompt: 1000}))
	// Defaults: cachedInput is input; cacheRead is cachedInput; cacheWrite is input.
	plain := (&Price{Input: f(1), Output: f(2)}).Rate()
	assert.Equal(t, Rate{Input: 1_000_000, CacheRead: 1_000_000, CacheWrite: 1_000_000, Output: 2_000_000}, plain)
	// Nonsense usage is bounded.
	assert.Equal(t, Micro(0), gpt4o.Cost(Usage{Prompt: -5, Output: -1}))
	assert.Equal(t, Micro(10), gpt4o.Cost(Usage{Prompt: 8, CacheRead: 100}), "cache counts beyond the prompt are the prompt: 8 × $1.25/M = 10 µ$")
}

// The most expensive outcome: the prompt at the dearest input price, all
// the output; rounded up.
func TestMost(t *testing.T) {
	sonnet := (&Price{Input: f(3.00), CacheWrite: f(3.75), CacheRead: f(0.30), Output: f(15.00)}).Rate()
	// 1,000 × 3.75 + 1,024 × 15 = 3,750 + 15,360 µ$.
	assert.Equal(t, Micro(19_110), sonnet.Most(1000, 1024))
	mini := (&Price{Input: f(0.15), Output: f(0.60)}).Rate()
	assert.Equal(t, Micro(1), mini.Most(1, 0), "rounded up: never less than it can cost")
}

func TestTableAndMoney(t *testing.T) {
	tb := NewTable(map[string]*Price{"gpt-4o": {Input: f(2.5)}, "*": {Input: f(0), Output: f(0)}})
	r, ok := tb.For("gpt-4o")
	assert.True(t, ok)
	assert.Equal(t, int64(2_500_000), r.Input)
	_, ok = tb.For("other")
	assert.True(t, ok, "the wildcard prices it")
	_, ok = NewTable(nil).For("x")
	assert.False(t, ok, "unpriced")
	assert.Equal(t, "$12.3456", Micro(12_345_600).String())
	assert.Equal(t, "$20.00", Micro(20_000_000).String())
	assert.Equal(t, "$0.50", Micro(500_000).String())
	assert.Equal(t, "$0.000431", Micro(431).String())
	assert.Equal(t, "$0.00", Micro(0).String())
	assert.Equal(t, "-$0.000001", Micro(-1).String())
	assert.Equal(t, "$0.10", Micro(100_000).String())
	assert.Equal(t, "12.3456", Micro(12_345_600).Decimal())
	assert.Equal(t, "20", Micro(20_000_000).Decimal())
	assert.Equal(t, "-0.000001", Micro(-1).Decimal())
	assert.Equal(t, Micro(20_000_000), FromUSD(20))
	assert.ErrorContains(t, (&Price{Input: f(-1)}).Validate(), "input: must be a price")
}
