package bpe

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/pkoukk/tiktoken-go"
	tiktoken_loader "github.com/pkoukk/tiktoken-go-loader"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The counter is proven exact against tiktoken-go, the oracle: the same
// texts, the same counts, for both encodings.

var (
	oracleOnce sync.Once
	oracles    map[string]*tiktoken.Tiktoken
	ours       map[string]*Counter
)

func exactPair(t testing.TB) (map[string]*tiktoken.Tiktoken, map[string]*Counter) {
	oracleOnce.Do(func() {
		tiktoken.SetBpeLoader(tiktoken_loader.NewOfflineLoader())
		oracles, ours = map[string]*tiktoken.Tiktoken{}, map[string]*Counter{}
		for _, name := range []string{Cl100k, O200k} {
			o, err := tiktoken.GetEncoding(name)
			if err != nil {
				panic(err)
			}
			b, err := New(name)
			if err != nil {
				panic(err)
			}
			oracles[name], ours[name] = o, b
		}
	})
	return oracles, ours
}

// exactCorpus covers prose, code, JSON, CJK, Arabic, emoji and ZWJ
// sequences, combining marks, long white space and digit runs, mixed
// scripts, invalid UTF-8 and special-token text.
var exactCorpus = []string{
	"", "a", " ", "\n", "hello world", "Hello, World! It's a test. I'm sure they'll've done it'd.",
	"HELLO WORLD", "helloWorld FooBar XMLHttpRequest", "'s 'S 'T 'Re 'VE 'm 'LL 'D 'x '", "don't DON'T Don'T",
	"func main() {\n\tfmt.Println(\"hi\")\n}\n", "if (a && b || !c) { return x->y; } // comment\r\n",
	`{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":512}`,
	"今天天气很好，我们去公园散步吧。", "日本語のテキストとカタカナ、ひらがな。", "한국어 텍스트입니다.",
	"مرحبا بالعالم، هذا نص عربي.", "Привет, мир! Ёжик.", "Ελληνικά κείμενο", "हिन्दी पाठ", "ไทยภาษา",
	"😀😃😄 👨‍👩‍👧‍👦 👩🏽‍💻 🏳️‍🌈 ❤️", "e\u0301 a\u0300\u0301 \u0301\u0302 Z\u0351\u0352", "\u0300A", "\u0300a", " \u0300A",
	"    indented\n        more\n\n\n   \t\t  trailing   ", "\r\n\r\n  \n \n", "a  \n  b", "   ", " \u3000 x",
	"1234567890 12 3 123456 ٣٤٥ ½ Ⅻ", "3.14159 -42 1e10 0x1F", "$100.00 (50%) #tag @user a/b/c //x/",
	"mixed中文English日本語123العربية", "<|endoftext|> <|fim_prefix|> <|im_start|>user",
	"\xff\xfe invalid \xc3\x28 bytes \xe2\x82", "a\x80b", "\xed\xa0\x80", "\u00a0nbsp\u2028ls\u2029ps\u0085nel",
	"ǅungla ǈ ǋ ʰʲ ǂ", "İstanbul ß ẞ ſ K", "ABC'sdef", "ÀÉÎõü", "a\u2019s l\u2019été",
	strings.Repeat("a", 1000), strings.Repeat(" ", 500) + "x", strings.Repeat("1", 100), strings.Repeat("ab", 300),
	strings.Repeat("!?", 200), strings.Repeat("\n", 50) + "x" + strings.Repeat("\t", 50),
	strings.Repeat("日本", 200), strings.Repeat("😀", 100),
}

func TestCountsAreExact(t *testing.T) {
	oracle, our := exactPair(t)
	for _, name := range []string{Cl100k, O200k} {
		for _, text := range exactCorpus {
			want := len(oracle[name].EncodeOrdinary(text))
			require.Equal(t, want, our[name].Count(text), "%s %q", name, text)
		}
	}
}

// TestCountsAreExactOnGeneratedText mixes fragments of every kind at
// random: the boundaries between them are where pre-splitters go wrong.
func TestCountsAreExactOnGeneratedText(t *testing.T) {
	oracle, our := exactPair(t)
	rng := rand.New(rand.NewPCG(7, 8))
	frags := []string{"a", "A", "é", "É", "\u0301", "中", "ا", "1", "٣", " ", "  ", "\t", "\n", "\r\n", "'", "'s", "'LL",
		"!", "?", ".", "/", "_", "-", "😀", "\u200d", "\u3000", "\u00a0", "x", "Hello", "WORLD", "ǅ", "ʰ", "\xff", "\xc3"}
	for i := range 20000 {
		var b strings.Builder
		for range 1 + rng.IntN(12) {
			b.WriteString(frags[rng.IntN(len(frags))])
		}
		text := b.String()
		for _, name := range []string{Cl100k, O200k} {
			want := len(oracle[name].EncodeOrdinary(text))
			if got := our[name].Count(text); got != want {
				t.Fatalf("case %d, %s %q: %d, tiktoken %d", i, name, text, got, want)
			}
		}
	}
}

// FuzzExactCount compares counts with tiktoken-go on arbitrary bytes.
func FuzzExactCount(f *testing.F) {
	for _, s := range exactCorpus {
		if len(s) < 200 {
			f.Add(s)
		}
	}
	oracle, our := exactPair(f)
	f.Fuzz(func(t *testing.T, text string) {
		if len(text) > 500 {
			return
		}
		for _, name := range []string{Cl100k, O200k} {
			want := len(oracle[name].EncodeOrdinary(text))
			if got := our[name].Count(text); got != want {
				t.Fatalf("%s %q (valid %v): %d, tiktoken %d", name, text, utf8.ValidString(text), got, want)
			}
		}
	})
}

var _ = fmt.Sprint

// TestLongPieceMergeEqualsTheShortOne: the priority-queue merge long
// pieces take gives what tiktoken's own loop gives, piece by piece.
func TestLongPieceMergeEqualsTheShortOne(t *testing.T) {
	_, our := exactPair(t)
	rng := rand.New(rand.NewPCG(9, 10))
	var texts []string
	for range 3000 {
		var b strings.Builder
		for range 1 + rng.IntN(40) {
			b.WriteString([]string{"a", "ab", "é", "中", "!", "=", "0", " ", "xyz", "\u0301", "😀"}[rng.IntN(11)])
		}
		texts = append(texts, b.String())
	}
	texts = append(texts, exactCorpus...)
	s := &scratch{}
	for _, name := range []string{Cl100k, O200k} {
		b := our[name]
		for _, text := range texts {
			text = replaceInvalid(text)
			for i := 0; i < len(text); {
				j := b.next(text, i)
				if p := text[i:j]; len(p) > 1 {
					require.Equal(t, b.mergeSmall(p, s), b.mergeHeap(p, s), "%s %q", name, p)
				}
				i = j
			}
		}
	}
}

func TestRanks(t *testing.T) {
	_, our := exactPair(t)
	o, c := our[O200k].ranks, our[Cl100k].ranks
	assert.Equal(t, []uint32{24912, 2375}, []uint32{o.rankString("hello"), o.rankString(" world")})
	assert.Equal(t, []uint32{15339, 1917}, []uint32{c.rankString("hello"), c.rankString(" world")})
	assert.Equal(t, noRank, o.rankString("hello world, not a token"))
	assert.Less(t, o.size()+c.size(), 25<<20, "both vocabularies in 25 MiB")
}
