// Package bpe counts the tokens of a text exactly as tiktoken's
// encode_ordinary would produce them, for cl100k_base and o200k_base,
// without producing them: a hand-written pre-splitter per encoding
// (split.go), a compact rank table (ranks.go) and byte-pair merging that
// stays O(n log n) on hostile input, allocating nothing per count.
//
// It exists apart from package tokenizer (which knows models and request
// shapes) because it is the part that must be exactly right, and is
// proven so against tiktoken-go, its oracle, in its own tests.
package bpe

import (
	"fmt"
	"sync"
	"unicode/utf8"
)

// The encodings it knows.
const (
	O200k  = "o200k_base"
	Cl100k = "cl100k_base"
)

// Counter counts texts with one encoding's vocabulary and pre-splitter. It
// is safe for concurrent use.
type Counter struct {
	ranks *ranks
	next  func(text string, i int) int // the pre-splitter
}

// Count returns the number of tokens of text, an ordinary text (special
// tokens in it are the plain text they are).
func (b *Counter) Count(text string) int {
	if !utf8.ValidString(text) {
		text = replaceInvalid(text)
	}
	s := scratchPool.Get().(*scratch)
	n := 0
	for i := 0; i < len(text); {
		j := b.next(text, i)
		n += b.piece(text[i:j], s)
		i = j
	}
	scratchPool.Put(s)
	return n
}

// replaceInvalid replaces each byte that is not part of valid UTF-8 with
// U+FFFD, as tiktoken-go's decoding to runes does.
func replaceInvalid(text string) string {
	out := make([]byte, 0, len(text)+8)
	for i := 0; i < len(text); {
		r, w := utf8.DecodeRuneInString(text[i:])
		if r == utf8.RuneError && w == 1 {
			out = utf8.AppendRune(out, utf8.RuneError)
		} else {
			out = append(out, text[i:i+w]...)
		}
		i += w
	}
	return string(out)
}

// smallPiece is the longest piece merged by the simple quadratic scan;
// longer ones go through the heap, O(n log n).
const smallPiece = 64

// piece returns the number of tokens of one pre-split piece: byte-pair
// merging by rank, the lowest (leftmost on ties) first, until no adjacent
// pair is a token.
func (b *Counter) piece(p string, s *scratch) int {
	if len(p) <= 1 {
		return len(p)
	}
	if b.ranks.rankString(p) != noRank {
		return 1
	}
	if len(p) <= smallPiece {
		return b.mergeSmall(p, s)
	}
	return b.mergeHeap(p, s)
}

// scratch is one count's reusable memory.
type scratch struct {
	start []int
	rank  []uint32
	next  []int32
	prev  []int32
	pair  []uint32
	// the long pieces' priority queue
	buckets []bucket
	slots   []int32 // rank -> bucket index + 1, open addressing
	used    []uint32
	ranks   []uint32 // heap of the ranks with candidates
}

var scratchPool = sync.Pool{New: func() any { return new(scratch) }}

// pairRank is the rank of p[from:to] as one token, or noRank.
func (b *Counter) pairRank(p string, from, to int) uint32 {
	return b.ranks.rankString(p[from:to])
}

// mergeSmall is tiktoken's own merge loop: parts are byte offsets; each
// step finds the lowest-ranked adjacent pair and merges it.
func (b *Counter) mergeSmall(p string, s *scratch) int {
	n := len(p)
	start, rank := s.start[:0], s.rank[:0]
	for i := 0; i <= n; i++ {
		start = append(start, i)
	}
	// rank[i] is the rank of parts i and i+1 merged.
	for i := 0; i < n-1; i++ {
		rank = append(rank, b.pairRank(p, i, i+2))
	}
	rank = append(rank, noRank)
	for len(start) > 2 {
		best, at := noRank, -1
		for i, r := range rank[:len(start)-2] {
			if r < best {
				best, at = r, i
			}
		}
		if at < 0 {
			break
		}
		// Merge parts at and at+1: drop the boundary at+1.
		copy(start[at+1:], start[at+2:])
		start = start[:len(start)-1]
		copy(rank[at+1:], rank[at+2:])
		rank = rank[:len(rank)-1]
		if at+2 < len(start) {
			rank[at] = b.pairRank(p, start[at], start[at+2])
		} else {
			rank[at] = noRank
		}
		if at > 0 {
			rank[at-1] = b.pairRank(p, start[at-1], start[at+1])
		}
	}
	s.start, s.rank = start, rank
	return len(start) - 1
}

// The candidate merges of a long piece wait in a two-level priority
// queue: the pair of the part starting at byte pos and the part after it,
// the lowest rank first, then the leftmost, as tiktoken merges. Few ranks
// are in play at once, and within one rank candidates mostly arrive left
// to right: so each rank has a bucket whose queue takes candidates in
// order (O(1)) and a small heap for the rest, and a heap orders the ranks.

// bucket holds the candidates of one rank.
type bucket struct {
	rank   uint32
	queue  []int32 // ascending
	head   int
	heap   []int32 // those that arrived out of order
	queued bool    // its rank is in the rank heap
}

func (b *bucket) empty() bool { return b.head == len(b.queue) && len(b.heap) == 0 }

// bucketOf returns the bucket of rank, made on first use.
func (s *scratch) bucketOf(rank uint32) *bucket {
	if len(s.slots) == 0 {
		s.slots = make([]int32, 1024)
	}
	mask := uint32(len(s.slots) - 1)
	for i := (rank * 2654435761) & mask; ; i = (i + 1) & mask {
		e := s.slots[i]
		if e == 0 {
			if 2*(len(s.used)+1) > len(s.slots) {
				s.growSlots()
				return s.bucketOf(rank)
			}
			if len(s.used) == len(s.buckets) {
				s.buckets = append(s.buckets, bucket{})
			}
			b := &s.buckets[len(s.used)]
			b.rank, b.queue, b.head, b.heap, b.queued = rank, b.queue[:0], 0, b.heap[:0], false
			s.used = append(s.used, i)
			s.slots[i] = int32(len(s.used))
			return b
		}
		if b := &s.buckets[e-1]; b.rank == rank {
			return b
		}
	}
}

// growSlots doubles the rank table.
func (s *scratch) growSlots() {
	old := s.slots
	s.slots = make([]int32, 2*len(old))
	mask := uint32(len(s.slots) - 1)
	used := s.used[:0]
	for _, e := range old {
		if e == 0 {
			continue
		}
		i := (s.buckets[e-1].rank * 2654435761) & mask
		for s.slots[i] != 0 {
			i = (i + 1) & mask
		}
		s.slots[i] = e
		used = append(used, i)
	}
	s.used = used
}

// resetBuckets empties the queue for the next piece.
func (s *scratch) resetBuckets() {
	for _, i := range s.used {
		s.slots[i] = 0
	}
	s.used, s.ranks = s.used[:0], s.ranks[:0]
}

func (s *scratch) push(rank uint32, pos int32) {
	b := s.bucketOf(rank)
	if n := len(b.queue); n == b.head || pos > b.queue[n-1] {
		b.queue = append(b.queue, pos)
	} else {
		b.heap = heapPush(b.heap, pos)
	}
	if !b.queued {
		b.queued = true
		s.ranks = heapPush(s.ranks, rank)
	}
}

// pop returns the lowest candidate; ok false when there is none.
func (s *scratch) pop() (rank uint32, pos int32, ok bool) {
	for len(s.ranks) > 0 {
		b := s.bucketOf(s.ranks[0])
		if b.empty() {
			b.queued = false
			s.ranks = heapPop(s.ranks)
			continue
		}
		if len(b.heap) > 0 && (b.head == len(b.queue) || b.heap[0] < b.queue[b.head]) {
			pos = b.heap[0]
			b.heap = heapPop(b.heap)
		} else {
			pos = b.queue[b.head]
			b.head++
		}
		return b.rank, pos, true
	}
	return 0, 0, false
}

// heapPush and heapPop are a binary min-heap over positions or ranks.
func heapPush[T int32 | uint32](h []T, x T) []T {
	h = append(h, x)
	for i := len(h) - 1; i > 0; {
		p := (i - 1) / 2
		if h[i] >= h[p] {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
	return h
}

func heapPop[T int32 | uint32](h []T) []T {
	last := len(h) - 1
	h[0] = h[last]
	h = h[:last]
	for i := 0; ; {
		l, m := 2*i+1, i
		if l < len(h) && h[l] < h[m] {
			m = l
		}
		if r := l + 1; r < len(h) && h[r] < h[m] {
			m = r
		}
		if m == i {
			return h
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
}

// mergeHeap is the same merge for long pieces: the parts are a linked
// list over byte offsets and the candidate pairs a priority queue, so a
// piece of n bytes takes O(n log n) at worst, not O(n^2), and about O(n)
// for a run of one character. A candidate is stale when its part
// was merged away or its pair changed since (pair[from] holds the rank of
// the part's current pair: a token's rank names its bytes, so a different
// pair has a different rank); stale ones are skipped when popped.
func (b *Counter) mergeHeap(p string, s *scratch) int {
	n := len(p)
	if cap(s.next) < n+1 {
		s.next, s.prev, s.pair = make([]int32, n+1), make([]int32, n+1), make([]uint32, n+1)
	}
	next, prev, cur := s.next[:n+1], s.prev[:n+1], s.pair[:n+1]
	for i := range n + 1 {
		next[i], prev[i] = int32(i+1), int32(i-1)
	}
	s.resetBuckets()
	candidate := func(from int32) {
		cur[from] = noRank
		with := next[from]
		if int(with) >= n {
			return
		}
		if r := b.ranks.rankString(p[from:next[with]]); r != noRank {
			cur[from] = r
			s.push(r, from)
		}
	}
	alive := n
	for i := range int32(n - 1) {
		candidate(i)
	}
	for {
		rank, from, ok := s.pop()
		if !ok {
			break
		}
		if prev[from] == -2 || cur[from] != rank {
			continue // stale
		}
		// Merge: the part after joins the part at from.
		with := next[from]
		after := next[with]
		next[from] = after
		if int(after) <= n {
			prev[after] = from
		}
		prev[with] = -2
		alive--
		if q := prev[from]; q >= 0 {
			candidate(q)
		}
		candidate(from)
	}
	return alive
}

// New builds the counter of the encoding name (O200k or Cl100k) from the
// vocabulary embedded in the binary. It never touches the network.
func New(name string) (*Counter, error) {
	var next func(string, int) int
	switch name {
	case O200k:
		next = nextO200k
	case Cl100k:
		next = nextCl100k
	default:
		return nil, fmt.Errorf("bpe: unknown encoding %q", name)
	}
	r, err := loadRanks(name)
	if err != nil {
		return nil, err
	}
	return &Counter{ranks: r, next: next}, nil
}

// Size is the memory the vocabulary takes, in bytes.
func (b *Counter) Size() int { return b.ranks.size() }
