package tokenizer

import (
	"sync"
	"unicode/utf8"
)

// bpe counts texts with one encoding's vocabulary and pre-splitter: the
// number of tokens tiktoken's encode_ordinary would give, exactly, without
// producing them.
type bpe struct {
	ranks *ranks
	next  func(text string, i int) int // the pre-splitter
}

// count returns the number of tokens of text.
func (b *bpe) count(text string) int {
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
func (b *bpe) piece(p string, s *scratch) int {
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
	buf   []byte
	start []int
	rank  []uint32
	next  []int32
	prev  []int32
	pair  []uint32
	heap  []uint64
}

var scratchPool = sync.Pool{New: func() any { return &scratch{buf: make([]byte, 0, 256)} }}

// bytes returns p as a byte slice, in the scratch buffer (no allocation).
func (s *scratch) bytes(p string) []byte {
	s.buf = append(s.buf[:0], p...)
	return s.buf
}

// pairRank is the rank of p[from:to] as one token, or noRank.
func (b *bpe) pairRank(_ *scratch, p string, from, to int) uint32 {
	return b.ranks.rankString(p[from:to])
}

// mergeSmall is tiktoken's own merge loop: parts are byte offsets; each
// step finds the lowest-ranked adjacent pair and merges it.
func (b *bpe) mergeSmall(p string, s *scratch) int {
	n := len(p)
	start, rank := s.start[:0], s.rank[:0]
	for i := 0; i <= n; i++ {
		start = append(start, i)
	}
	// rank[i] is the rank of parts i and i+1 merged.
	for i := 0; i < n-1; i++ {
		rank = append(rank, b.pairRank(s, p, i, i+2))
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
			rank[at] = b.pairRank(s, p, start[at], start[at+2])
		} else {
			rank[at] = noRank
		}
		if at > 0 {
			rank[at-1] = b.pairRank(s, p, start[at-1], start[at+1])
		}
	}
	s.start, s.rank = start, rank
	return len(start) - 1
}

// The heap of candidate merges holds keys rank<<32 | from: the pair of
// the part starting at byte from and the part after it, the lowest rank
// first, then the leftmost, as tiktoken merges. It is 4-ary: half the
// depth of a binary heap, and the four children of a node share a cache
// line.

func (s *scratch) push(key uint64) {
	h := append(s.heap, key)
	for i := len(h) - 1; i > 0; {
		parent := (i - 1) / 4
		if h[i] >= h[parent] {
			break
		}
		h[i], h[parent] = h[parent], h[i]
		i = parent
	}
	s.heap = h
}

func (s *scratch) pop() uint64 {
	h := s.heap
	top := h[0]
	last := len(h) - 1
	h[0] = h[last]
	h = h[:last]
	for i := 0; ; {
		c := 4*i + 1
		if c >= len(h) {
			break
		}
		m := c
		for k := c + 1; k < c+4 && k < len(h); k++ {
			if h[k] < h[m] {
				m = k
			}
		}
		if h[i] <= h[m] {
			break
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
	s.heap = h
	return top
}

// mergeHeap is the same merge for long pieces: the parts are a linked
// list over byte offsets and the candidate pairs a min-heap, so a piece of
// n bytes takes O(n log n), not O(n^2). A candidate is stale when its part
// was merged away or its pair changed since (pair[from] holds the rank of
// the part's current pair: a token's rank names its bytes, so a different
// pair has a different rank); stale ones are skipped when popped.
func (b *bpe) mergeHeap(p string, s *scratch) int {
	n := len(p)
	if cap(s.next) < n+1 {
		s.next, s.prev, s.pair = make([]int32, n+1), make([]int32, n+1), make([]uint32, n+1)
	}
	next, prev, cur := s.next[:n+1], s.prev[:n+1], s.pair[:n+1]
	for i := range n + 1 {
		next[i], prev[i] = int32(i+1), int32(i-1)
	}
	s.heap = s.heap[:0]
	candidate := func(from int32) {
		cur[from] = noRank
		with := next[from]
		if int(with) >= n {
			return
		}
		if r := b.ranks.rankString(p[from:next[with]]); r != noRank {
			cur[from] = r
			s.push(uint64(r)<<32 | uint64(from))
		}
	}
	alive := n
	for i := range int32(n - 1) {
		candidate(i)
	}
	for len(s.heap) > 0 {
		x := s.pop()
		from, rank := int32(x), uint32(x>>32)
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

// newBPE builds the counter of encoding name.
func newBPE(name string) (*bpe, error) {
	r, err := loadRanks(name)
	if err != nil {
		return nil, err
	}
	b := &bpe{ranks: r, next: nextO200k}
	if name == Cl100kBase {
		b.next = nextCl100k
	}
	return b, nil
}
