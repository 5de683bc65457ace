package bpe

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"hash/maphash"
	"strconv"

	vocab "github.com/pkoukk/tiktoken-go-loader/assets"
)

// ranks is one encoding's vocabulary: every token's bytes, back to back in
// one blob, and an open-addressing hash table from a byte string to its
// rank. No map of strings: about 9 bytes a token beside the token's own
// bytes, and a lookup that allocates nothing.
type ranks struct {
	blob  []byte   // every token's bytes, in rank order
	start []uint32 // token r is blob[start[r]:start[r+1]]
	table []uint32 // rank+1 by hash of the bytes; 0 is empty
	mask  uint64
	seed  maphash.Seed
	// byteRank is the rank of each single byte (every byte is a token).
	byteRank [256]uint32
}

// loadRanks reads the vocabulary file of name (cl100k_base, o200k_base)
// from the loader's embedded files: no network, ever. Each line is a
// token in base64 and its rank; ranks run from 0 without gaps.
func loadRanks(name string) (*ranks, error) {
	data, err := vocab.Assets.ReadFile(name + ".tiktoken")
	if err != nil {
		return nil, err
	}
	n := bytes.Count(data, []byte{'\n'}) + 1
	r := &ranks{blob: make([]byte, 0, len(data)*3/4/2), start: make([]uint32, 0, n+1), seed: maphash.MakeSeed()}
	var buf [256]byte
	for line := range bytes.SplitSeq(data, []byte{'\n'}) {
		if len(line) == 0 {
			continue
		}
		sp := bytes.IndexByte(line, ' ')
		if sp < 0 {
			return nil, fmt.Errorf("%s: line %d: no rank", name, len(r.start)+1)
		}
		rank, err := strconv.Atoi(string(line[sp+1:]))
		if err != nil || rank != len(r.start) {
			return nil, fmt.Errorf("%s: line %d: rank %q out of order", name, len(r.start)+1, line[sp+1:])
		}
		m, err := base64.StdEncoding.Decode(buf[:], line[:sp])
		if err != nil {
			return nil, fmt.Errorf("%s: line %d: %w", name, len(r.start)+1, err)
		}
		r.start = append(r.start, uint32(len(r.blob)))
		r.blob = append(r.blob, buf[:m]...)
	}
	r.start = append(r.start, uint32(len(r.blob)))
	size := 1
	for size < 2*(len(r.start)-1) {
		size <<= 1
	}
	r.table, r.mask = make([]uint32, size), uint64(size-1)
	for rank := range len(r.start) - 1 {
		tok := r.token(uint32(rank))
		i := maphash.Bytes(r.seed, tok) & r.mask
		for r.table[i] != 0 {
			i = (i + 1) & r.mask
		}
		r.table[i] = uint32(rank) + 1
		if len(tok) == 1 {
			r.byteRank[tok[0]] = uint32(rank)
		}
	}
	return r, nil
}

// token is the bytes of rank.
func (r *ranks) token(rank uint32) []byte { return r.blob[r.start[rank]:r.start[rank+1]] }

// noRank is the rank of a byte string that is not a token.
const noRank = ^uint32(0)

// rankString returns the rank of b, or noRank. It copies nothing.
func (r *ranks) rankString(b string) uint32 {
	if len(b) == 1 {
		return r.byteRank[b[0]]
	}
	i := maphash.String(r.seed, b) & r.mask
	for {
		e := r.table[i]
		if e == 0 {
			return noRank
		}
		if string(r.token(e-1)) == b {
			return e - 1
		}
		i = (i + 1) & r.mask
	}
}

// size is the table's memory, in bytes.
func (r *ranks) size() int { return len(r.blob) + 4*len(r.start) + 4*len(r.table) }
