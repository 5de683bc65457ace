package estimate

import (
	"sync"
	"time"
)

// Cache predicts what a provider's prompt cache will read of a request,
// for a provider whose input limit does not count cache reads
// (Anthropic): it remembers, per prompt prefix (a hash of the prompt up to
// its last cache breakpoint), how many tokens the cache held for it at the
// last answer and until when (each read refreshes the cache's time to
// live). A request whose prefix is remembered is reserved only what the
// cache will not read; settlement charges what the upstream reports. It is
// safe for concurrent use; its size is bounded.
type Cache struct {
	mu sync.Mutex
	m  map[uint64]cached
}

type cached struct {
	tokens int
	until  time.Time
}

// MaxCached bounds the prefixes a cache remembers.
const MaxCached = 10_000

// Cached is how many tokens of a prompt with prefix key the cache is
// expected to read at now (0: none known).
func (c *Cache) Cached(key uint64, now time.Time) int {
	if c == nil || key == 0 {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[key]
	if !ok || !now.Before(e.until) {
		return 0
	}
	return e.tokens
}

// Store remembers that the cache holds tokens of prefix key, for ttl from
// now (an answer reported them read or written).
func (c *Cache) Store(key uint64, tokens int, ttl time.Duration, now time.Time) {
	if c == nil || key == 0 || tokens <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[uint64]cached{}
	}
	if _, ok := c.m[key]; !ok && len(c.m) >= MaxCached {
		for k, e := range c.m { // expired ones first; else any one
			if !now.Before(e.until) {
				delete(c.m, k)
			}
		}
		for k := range c.m {
			if len(c.m) < MaxCached {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[key] = cached{tokens: tokens, until: now.Add(ttl)}
}
