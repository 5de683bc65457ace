package bpe

import (
	"unicode"
	"unicode/utf8"
)

// The pre-splitters cut a text into the pieces BPE merges, exactly as each
// encoding's regular expression does (tiktoken's patterns, with their
// leftmost-alternative, greedy, backtracking semantics), by hand: one pass,
// no allocation. Each next* function returns the end of the piece that
// starts at i (i < len(text)). The text is valid UTF-8 (see count).
//
// cl100k_base:
//
//	(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//
// o200k_base:
//
//	[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//	|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?
//	|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+
//
// \s is unicode.IsSpace and \p{...} Go's Unicode categories, as in the
// regexp2 engine tiktoken-go runs them with.

// Character classes, as bits.
const (
	cL     = 1 << iota // \p{L}
	cN                 // \p{N}
	cS                 // \s
	cUpper             // [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]
	cLower             // [\p{Ll}\p{Lm}\p{Lo}\p{M}]
	cCRLF              // \r or \n
)

// asciiClass is the class of each ASCII character.
var asciiClass = func() (t [utf8.RuneSelf]uint8) {
	for c := range rune(utf8.RuneSelf) {
		t[c] = classOf(c)
	}
	return t
}()

func classOf(r rune) uint8 {
	var c uint8
	if unicode.IsLetter(r) {
		c |= cL
	}
	if unicode.IsNumber(r) {
		c |= cN
	}
	if unicode.IsSpace(r) {
		c |= cS
	}
	if unicode.In(r, unicode.Lu, unicode.Lt, unicode.Lm, unicode.Lo, unicode.M) {
		c |= cUpper
	}
	if unicode.In(r, unicode.Ll, unicode.Lm, unicode.Lo, unicode.M) {
		c |= cLower
	}
	if r == '\r' || r == '\n' {
		c |= cCRLF
	}
	return c
}

// at returns the class and width of the rune at text[i], or 0, 0 at the
// end.
func at(text string, i int) (uint8, int) {
	if i >= len(text) {
		return 0, 0
	}
	if b := text[i]; b < utf8.RuneSelf {
		return asciiClass[b], 1
	}
	r, w := utf8.DecodeRuneInString(text[i:])
	return classOf(r), w
}

// prefixChar is [^\r\n\p{L}\p{N}].
func prefixChar(c uint8) bool { return c&(cL|cN|cCRLF) == 0 }

// punct is [^\s\p{L}\p{N}].
func punct(c uint8) bool { return c&(cL|cN|cS) == 0 }

// contraction returns the length of (?i:'s|'t|'re|'ve|'m|'ll|'d) at i, or 0.
func contraction(text string, i int) int {
	if i+1 >= len(text) || text[i] != '\'' {
		return 0
	}
	switch text[i+1] | 0x20 {
	case 's', 't', 'm', 'd':
		return 2
	case 'r', 'v':
		if i+2 < len(text) && text[i+2]|0x20 == 'e' {
			return 3
		}
	case 'l':
		if i+2 < len(text) && text[i+2]|0x20 == 'l' {
			return 3
		}
	}
	return 0
}

// run returns the end of the run of characters of a class in mask from i.
func run(text string, i int, mask uint8) int {
	for i < len(text) {
		c, w := at(text, i)
		if c&mask == 0 {
			break
		}
		i += w
	}
	return i
}

// digits returns the end of \p{N}{1,3} at i, or i.
func digits(text string, i int) int {
	for range 3 {
		c, w := at(text, i)
		if c&cN == 0 {
			break
		}
		i += w
	}
	return i
}

// punctuation returns the end of ' ?[^\s\p{L}\p{N}]+' followed by a run
// of the characters in tail (\r\n, and / for o200k) at i, or i.
func punctuation(text string, i int, slash bool) int {
	j := i
	if text[j] == ' ' {
		if c, _ := at(text, j+1); punct(c) {
			j++
		}
	}
	c, _ := at(text, j)
	if !punct(c) {
		return i
	}
	for j < len(text) {
		c, w := at(text, j)
		if !punct(c) {
			break
		}
		j += w
	}
	for j < len(text) && (text[j] == '\r' || text[j] == '\n' || (slash && text[j] == '/')) {
		j++
	}
	return j
}

// whitespace returns the end of \s*[\r\n]+|\s+(?!\S)|\s+ at i, where
// text[i] is white space.
func whitespace(text string, i int) int {
	end := run(text, i, cS)
	// \s*[\r\n]+: the white space up to its last line break.
	for k := end - 1; k >= i; k-- {
		if text[k] == '\r' || text[k] == '\n' {
			return k + 1
		}
	}
	// \s+(?!\S): all of it at the end of the text, else all but its last
	// character (which the next piece takes), if that leaves one.
	if end == len(text) {
		return end
	}
	_, last := utf8.DecodeLastRuneInString(text[i:end])
	if end-last > i {
		return end - last
	}
	return end // \s+
}

// nextCl100k returns the end of cl100k_base's piece at i.
func nextCl100k(text string, i int) int {
	if n := contraction(text, i); n > 0 {
		return i + n
	}
	c, w := at(text, i)
	// [^\r\n\p{L}\p{N}]?\p{L}+
	if c&cL != 0 {
		return run(text, i, cL)
	}
	if prefixChar(c) {
		if c2, _ := at(text, i+w); c2&cL != 0 {
			return run(text, i+w, cL)
		}
	}
	if c&cN != 0 {
		return digits(text, i)
	}
	if j := punctuation(text, i, false); j > i {
		return j
	}
	return whitespace(text, i)
}

// nextO200k returns the end of o200k_base's piece at i.
func nextO200k(text string, i int) int {
	c, w := at(text, i)
	// The two letter alternatives in order, each first with the optional
	// prefix character, then without it.
	for _, word := range [...]func(string, int) int{o200kLowerWord, o200kUpperWord} {
		if prefixChar(c) {
			if j := word(text, i+w); j > i+w {
				return j
			}
		}
		if j := word(text, i); j > i {
			return j
		}
	}
	if c&cN != 0 {
		return digits(text, i)
	}
	if j := punctuation(text, i, true); j > i {
		return j
	}
	return whitespace(text, i)
}

// o200kLowerWord returns the end of [Upper]*[Lower]+(contraction)? at s,
// or s.
func o200kLowerWord(text string, s int) int {
	// [Upper]* is greedy; [Lower]+ needs one character, so [Upper]* gives
	// back characters until one that is also Lower can start it.
	u := run(text, s, cUpper)
	if c, _ := at(text, u); c&cLower != 0 {
		end := run(text, u, cLower)
		return end + contraction(text, end)
	}
	for k := u; k > s; {
		_, w := utf8.DecodeLastRuneInString(text[s:k])
		k -= w
		if c, _ := at(text, k); c&cLower != 0 {
			end := k + w // [Lower]+ is this one character: the next is not Lower
			return end + contraction(text, end)
		}
	}
	return s
}

// o200kUpperWord returns the end of [Upper]+[Lower]*(contraction)? at s,
// or s.
func o200kUpperWord(text string, s int) int {
	u := run(text, s, cUpper)
	if u == s {
		return s
	}
	end := run(text, u, cLower)
	return end + contraction(text, end)
}
