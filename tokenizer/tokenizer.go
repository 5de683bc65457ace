// Package tokenizer counts the prompt tokens of OpenAI-shaped requests before
// they are admitted, so the scheduler can charge a tokens-per-minute bucket
// with a number that matches the upstream's own count.
//
// It exists as its own package because counting is the expensive, hostile-input
// facing part of the hot path: encodings are built once, every text is counted
// through a fixed-size lock-free cache (resent chat history and shared system
// prompts cost no tokenizer work), and pathological input is bounded so that no
// request can stall the gateway. It knows JSON request shapes but nothing of
// HTTP.
package tokenizer

import (
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/llproxy/llproxy/tokenizer/bpe"
)

// Encoding names understood by the tokenizer.
const (
	O200kBase  = bpe.O200k
	Cl100kBase = bpe.Cl100k
)

// Config tunes the tokenizer. The zero value is valid and uses the defaults.
type Config struct {
	// CacheEntries is the number of slots of the text-count cache, rounded up
	// to a power of two. 0 means 65536 (512 KiB). Negative disables caching.
	CacheEntries int `json:"cacheEntries,omitempty"`
	// MaxPieceBytes is accepted for old configs and ignored: every piece
	// is counted exactly, in O(n log n) (see package bpe).
	MaxPieceBytes int `json:"maxPieceBytes,omitempty"`
	// MaxExactBytes bounds the text one request may have counted exactly
	// (uncached texts only); texts past it are charged one token per two
	// bytes without tokenizer work. It caps the CPU a single request can
	// take (about 60 ms per MiB). 0 means 1 MiB.
	MaxExactBytes int `json:"maxExactBytes,omitempty"`
}

// Validate reports every field of c that is out of range, each naming the
// field by its JSON name.
func (c Config) Validate() error {
	var errs []error
	if c.MaxPieceBytes < 0 {
		errs = append(errs, fmt.Errorf("maxPieceBytes: must be >= 0, got %d", c.MaxPieceBytes))
	}
	if c.MaxExactBytes < 0 {
		errs = append(errs, fmt.Errorf("maxExactBytes: must be >= 0, got %d", c.MaxExactBytes))
	}
	if c.CacheEntries > 1<<24 {
		errs = append(errs, fmt.Errorf("cacheEntries: must be <= %d, got %d", 1<<24, c.CacheEntries))
	}
	return errors.Join(errs...)
}

// Encoding is one BPE vocabulary, built once by New. It is safe for
// concurrent use.
type Encoding struct {
	name string
	bpe  *bpe.Counter
	seed maphash.Seed // per-encoding seed, so cache keys never collide across encodings
	tok  *Tokenizer
	// family decides the tool-definition overheads of the cookbook.
	legacy bool // cl100k-era models (gpt-3.5, gpt-4)
}

// Name returns the encoding's name, such as "o200k_base".
func (e *Encoding) Name() string { return e.name }

// Tokenizer maps models to encodings and counts texts and requests. It is
// safe for concurrent use; build one per process.
type Tokenizer struct {
	o200k, cl100k *Encoding
	cache         *countCache
	maxExact      int
}

// New builds both encodings from the ranks embedded in the binary. It never
// touches the network. It takes tens of milliseconds; call it once at
// start-up.
func New(cfg Config) (*Tokenizer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	t := &Tokenizer{maxExact: cfg.MaxExactBytes}
	if t.maxExact == 0 {
		t.maxExact = 1 << 20
	}
	entries := cfg.CacheEntries
	if entries == 0 {
		entries = 1 << 16
	}
	if entries > 0 {
		t.cache = newCountCache(entries)
	}
	encs := []struct {
		dst    **Encoding
		name   string
		legacy bool
	}{{&t.o200k, O200kBase, false}, {&t.cl100k, Cl100kBase, true}}
	errs := make([]error, len(encs))
	var wg sync.WaitGroup
	for i, e := range encs {
		wg.Go(func() { // the two vocabularies load in parallel
			b, err := bpe.New(e.name)
			if err != nil {
				errs[i] = fmt.Errorf("tokenizer: loading %s: %w", e.name, err)
				return
			}
			*e.dst = &Encoding{name: e.name, bpe: b, seed: maphash.MakeSeed(), tok: t, legacy: e.legacy}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return t, nil
}

// o200kPrefixes and cl100kPrefixes are the model families of each encoding.
// Order matters: the o200k families are checked first so that "gpt-4o" and
// "gpt-4.1" do not fall into "gpt-4".
var (
	o200kPrefixes  = []string{"gpt-4o", "gpt-4.1", "gpt-4.5", "o1", "o3", "o4", "gpt-5", "chatgpt-4o"}
	cl100kPrefixes = []string{"gpt-4", "gpt-3.5", "text-embedding-"}
)

// EncodingFor returns the encoding OpenAI uses for model. Unknown models,
// including other vendors' and local ones, get o200k_base: its counts are a
// reasonable estimate for modern vocabularies.
func (t *Tokenizer) EncodingFor(model string) *Encoding {
	// Fine-tuned models are named "ft:gpt-4o-mini:org::id".
	model = strings.TrimPrefix(model, "ft:")
	for _, p := range o200kPrefixes {
		if strings.HasPrefix(model, p) {
			return t.o200k
		}
	}
	for _, p := range cl100kPrefixes {
		if strings.HasPrefix(model, p) {
			return t.cl100k
		}
	}
	return t.o200k
}

// Encoding returns the encoding with the given name, or nil.
func (t *Tokenizer) Encoding(name string) *Encoding {
	switch name {
	case O200kBase:
		return t.o200k
	case Cl100kBase:
		return t.cl100k
	}
	return nil
}

// Count returns the number of tokens of text, as an ordinary text (special
// tokens such as "<|endoftext|>" in user text are counted as the plain text
// they are, never as control tokens). Repeated texts are answered from the
// cache without tokenizer work.
func (e *Encoding) Count(text string) int {
	unlimited := math.MaxInt
	return e.countWithin(text, &unlimited)
}

// countBytes is Count for text held in a byte slice (as JSON parsers give
// it); on a cache hit it allocates nothing.
func (e *Encoding) countBytes(text []byte) int {
	unlimited := math.MaxInt
	return e.countWithin(unsafeString(text), &unlimited)
}

// countWithin counts text exactly if it is cached or fits in *budget bytes
// of tokenizer work, which it then spends; otherwise it estimates one token
// per two bytes (generous for prose and code, about right for CJK) and does
// not cache the estimate.
func (e *Encoding) countWithin(text string, budget *int) int {
	if len(text) == 0 {
		return 0
	}
	c := e.tok.cache
	var h uint64
	if c != nil {
		h = maphash.String(e.seed, text)
		if n, ok := c.get(h); ok {
			return n
		}
	}
	if len(text) > *budget {
		return (len(text) + 1) / 2
	}
	*budget -= len(text)
	n := e.bpe.Count(text)
	if c != nil {
		c.put(h, n)
	}
	return n
}

// unsafeString views b as a string without copying; b must not change
// while the string is used (the count holds it only for its duration).
func unsafeString(b []byte) string { return unsafe.String(unsafe.SliceData(b), len(b)) }

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
