package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// runClass groups characters the way the o200k and cl100k pre-tokenizer
// regular expressions do: a run of one class can become one BPE piece, and the
// BPE merge of a piece is quadratic in its length ("a" x 100,000 takes seconds
// in tiktoken-go). Digits are never a long piece (the regexes cut them into
// groups of at most three), so they break runs.
type runClass uint8

const (
	classNone runClass = iota
	classLetter
	classSpace
	classSymbol
	classDigit
)

func classify(r rune) runClass {
	switch {
	case r < utf8.RuneSelf:
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z':
			return classLetter
		case r >= '0' && r <= '9':
			return classDigit
		case r == ' ', r == '\t', r == '\n', r == '\r', r == '\v', r == '\f':
			return classSpace
		}
		return classSymbol
	case unicode.IsLetter(r), unicode.IsMark(r):
		return classLetter
	case unicode.IsNumber(r):
		return classDigit
	case unicode.IsSpace(r):
		return classSpace
	}
	return classSymbol
}

// span is a byte range [start, end) of a text.
type span struct{ start, end int }

// longRuns returns the runs of one class (letters, white space, symbols)
// longer than max bytes, in order. It is linear in len(text) and allocates
// only when it finds one.
func longRuns(text string, max int) []span {
	var out []span
	runStart, cur := 0, classNone
	flush := func(end int) {
		if cur != classDigit && end-runStart > max {
			out = append(out, span{runStart, end})
		}
	}
	for i, r := range text {
		c := classify(r)
		if c != cur {
			flush(i)
			runStart, cur = i, c
		}
	}
	flush(len(text))
	return out
}
