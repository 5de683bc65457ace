package tokenizer

import "sync/atomic"

// countCache is a direct-mapped cache from a text's 64-bit hash to its token
// count. Each slot is one atomic word, so lookups take no lock and allocate
// nothing, and memory is fixed at 8 bytes a slot. A slot packs the hash's high
// bits (the low bits choose the slot) with the count; a colliding text simply
// evicts the older one. Counts that do not fit in countBits are not cached.
type countCache struct {
	slots []atomic.Uint64
	mask  uint64
}

const (
	countBits = 24
	countMax  = 1<<countBits - 1
	tagMask   = ^uint64(countMax)
)

func newCountCache(entries int) *countCache {
	n := 1
	for n < entries {
		n <<= 1
	}
	return &countCache{slots: make([]atomic.Uint64, n), mask: uint64(n - 1)}
}

func (c *countCache) get(h uint64) (int, bool) {
	v := c.slots[h&c.mask].Load()
	// A zero word is an empty slot; a real entry always has count >= 1 or a
	// non-zero tag, and count 0 is never stored (empty texts are not cached).
	if v == 0 || v&tagMask != h&tagMask {
		return 0, false
	}
	return int(v & countMax), true
}

func (c *countCache) put(h uint64, n int) {
	if n <= 0 || n > countMax {
		return
	}
	c.slots[h&c.mask].Store(h&tagMask | uint64(n))
}
