package tokenizer

import (
	"bytes"
	"encoding/base64"
	"image"
	"image/png"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/pkoukk/tiktoken-go"
	tiktoken_loader "github.com/pkoukk/tiktoken-go-loader"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/valyala/fastjson"
)

var (
	sharedOnce sync.Once
	shared     *Tokenizer
)

// testTokenizer builds the encodings once for the whole package's tests.
func testTokenizer(t testing.TB) *Tokenizer {
	t.Helper()
	sharedOnce.Do(func() {
		var err error
		shared, err = New(Config{})
		if err != nil {
			panic(err)
		}
	})
	return shared
}

func parse(t testing.TB, s string) *fastjson.Value {
	t.Helper()
	v, err := fastjson.Parse(s)
	require.NoError(t, err)
	return v
}

// cookbookMessages is the 6-message example of the OpenAI cookbook "How to
// count tokens with tiktoken"; the API reports 129 prompt tokens for it with
// gpt-3.5/gpt-4 and 124 with gpt-4o.
const cookbookMessages = `[
 {"role":"system","content":"You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
 {"role":"system","name":"example_user","content":"New synergies will help drive top-line growth."},
 {"role":"system","name":"example_assistant","content":"Things working well together will increase revenue."},
 {"role":"system","name":"example_user","content":"Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
 {"role":"system","name":"example_assistant","content":"Let's talk later when we're less busy about how to do better."},
 {"role":"user","content":"This late pivot means we don't have time to boil the ocean for the client deliverable."}
]`

const weatherTools = `[{"type":"function","function":{"name":"get_current_weather","description":"Get the current weather in a given location",
 "parameters":{"type":"object","properties":{
   "location":{"type":"string","description":"The city and state, e.g. San Francisco, CA"},
   "unit":{"type":"string","description":"The unit of temperature to return","enum":["celsius","fahrenheit"]}},
 "required":["location"]}}}]`

const weatherMessages = `[
 {"role":"system","content":"You are a helpful assistant that can answer to questions about the weather."},
 {"role":"user","content":"What's the weather like in San Francisco?"}]`

func TestGoldenCookbookCounts(t *testing.T) {
	tok := testTokenizer(t)
	tests := []struct {
		name, model, body string
		want              int
	}{
		{"messages cl100k", "gpt-4-0613", `{"messages":` + cookbookMessages + `}`, 129},
		{"messages o200k", "gpt-4o", `{"messages":` + cookbookMessages + `}`, 124},
		{"tools cl100k", "gpt-3.5-turbo", `{"messages":` + weatherMessages + `,"tools":` + weatherTools + `}`, 105},
		{"tools o200k", "gpt-4o-mini", `{"messages":` + weatherMessages + `,"tools":` + weatherTools + `}`, 101},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tok.PromptTokens(EndpointChat, tt.model, parse(t, tt.body)))
		})
	}
}

func TestEncodingFor(t *testing.T) {
	tok := testTokenizer(t)
	for model, want := range map[string]string{
		"gpt-4o": O200kBase, "gpt-4o-mini-2024-07-18": O200kBase, "gpt-4.1-nano": O200kBase,
		"gpt-4.5-preview": O200kBase, "o1": O200kBase, "o3-mini": O200kBase, "o4-mini": O200kBase,
		"gpt-5": O200kBase, "chatgpt-4o-latest": O200kBase, "ft:gpt-4o-mini:org::x": O200kBase,
		"gpt-4": Cl100kBase, "gpt-4-turbo": Cl100kBase, "gpt-3.5-turbo-0125": Cl100kBase,
		"text-embedding-3-small": Cl100kBase, "llama3:8b": O200kBase, "": O200kBase,
	} {
		assert.Equal(t, want, tok.EncodingFor(model).Name(), model)
	}
}

func TestEndpoints(t *testing.T) {
	tok := testTokenizer(t)
	hw := tok.Encoding(O200kBase).Count("hello world")
	require.Equal(t, 2, hw)
	tests := []struct {
		name string
		ep   Endpoint
		body string
		want int
	}{
		{"completions string", EndpointCompletions, `{"prompt":"hello world"}`, 2},
		{"completions array", EndpointCompletions, `{"prompt":["hello world","hello world"]}`, 4},
		{"completions token ids", EndpointCompletions, `{"prompt":[1,2,3]}`, 3},
		{"completions nested ids", EndpointCompletions, `{"prompt":[[1,2],[3]]}`, 3},
		{"completions suffix", EndpointCompletions, `{"prompt":"hello world","suffix":"hello world"}`, 4},
		{"embeddings", EndpointEmbeddings, `{"input":["hello world","hello world","hello world"]}`, 6},
		{"responses string", EndpointResponses, `{"input":"hello world"}`, 2 + replyPriming},
		{"responses instructions", EndpointResponses, `{"instructions":"hello world","input":"hello world"}`, 4 + replyPriming},
		{"responses items", EndpointResponses,
			`{"input":[{"role":"user","content":[{"type":"input_text","text":"hello world"}]}]}`,
			tokensPerMessage + 1 /* user */ + 2 + replyPriming},
		{"chat content parts", EndpointChat,
			`{"messages":[{"role":"user","content":[{"type":"text","text":"hello world"},{"type":"text","text":"hello world"}]}]}`,
			tokensPerMessage + 1 + 4 + replyPriming},
		{"chat null content with tool calls", EndpointChat,
			`{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"x","type":"function","function":{"name":"f","arguments":"{}"}}]}]}`,
			tokensPerMessage + 1 + 1 + 1 + 1 + 1 + replyPriming},
		{"chat prediction string", EndpointChat,
			`{"messages":[{"role":"user","content":"hello world"}],"prediction":{"type":"content","content":"hello world hello world"}}`,
			tokensPerMessage + 1 + 2 + replyPriming + 4},
		{"chat prediction parts", EndpointChat,
			`{"messages":[],"prediction":{"type":"content","content":[{"type":"text","text":"hello world"}]}}`,
			replyPriming + 2},
		{"other endpoint input", EndpointOther, `{"input":"hello world"}`, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tok.PromptTokens(tt.ep, "gpt-4o", parse(t, tt.body)))
		})
	}
}

func pngDataURL(t *testing.T, w, h int) string {
	t.Helper()
	var buf bytes.Buffer
	require.NoError(t, png.Encode(&buf, image.NewGray(image.Rect(0, 0, w, h))))
	return "data:image/png;base64," + base64.StdEncoding.EncodeToString(buf.Bytes())
}

func TestImages(t *testing.T) {
	tests := []struct {
		name, model, url, detail string
		want                     int
	}{
		{"low is flat", "gpt-4o", "https://x/y.png", "low", 85},
		{"remote high is the bound", "gpt-4o", "https://x/y.png", "high", 85 + 8*170},
		{"1024 square high", "gpt-4o", pngDataURL(t, 1024, 1024), "high", 765},
		{"2048x4096 high", "gpt-4o", pngDataURL(t, 2048, 4096), "high", 1105},
		{"small image one tile", "gpt-4o", pngDataURL(t, 300, 200), "auto", 255},
		{"4o-mini constants", "gpt-4o-mini", "https://x", "low", 2833},
		{"gpt-5 constants", "gpt-5", pngDataURL(t, 1024, 1024), "high", 70 + 4*140},
		{"patch model 1024", "gpt-4.1-mini", pngDataURL(t, 1024, 1024), "", 1659}, // ceil(1024*1.62)
		{"patch model capped", "o4-mini", pngDataURL(t, 1800, 2400), "", 2498},    // ceil(1452*1.72)
		{"patch model unknown size", "gpt-5-nano", "https://x", "", 3779},         // ceil(1536*2.46)
		{"broken data url is the bound", "gpt-4o", "data:image/png;base64,AAAA", "high", 85 + 8*170},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, imageTokens(tt.model, []byte(tt.url), []byte(tt.detail)))
		})
	}
	// And through a chat request.
	tok := testTokenizer(t)
	body := `{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x","detail":"low"}}]}]}`
	assert.Equal(t, tokensPerMessage+1+85+replyPriming, tok.PromptTokens(EndpointChat, "gpt-4o", parse(t, body)))
}

func TestSpecialTokensInUserTextDoNotPanic(t *testing.T) {
	tok := testTokenizer(t)
	for _, enc := range []string{O200kBase, Cl100kBase} {
		n := tok.Encoding(enc).Count("a <|endoftext|> b <|fim_prefix|><|endofprompt|>")
		assert.Greater(t, n, 5, enc)
	}
}

func TestHostileInputIsCountedExactly(t *testing.T) {
	// Built uncached so the test measures the work, not the cache.
	tok, err := New(Config{CacheEntries: -1})
	require.NoError(t, err)
	oracle := oracles(t)
	for _, name := range []string{O200kBase, Cl100kBase} {
		enc := tok.Encoding(name)
		for kind, unit := range map[string]string{"letters": "a", "spaces": " ", "symbols": "!", "cjk": "漢",
			"digits": "7", "pairs": "ab", "newlines": "\n"} {
			t.Run(name+" "+kind, func(t *testing.T) {
				// The oracle is quadratic in a piece's length: 3,000 is as far
				// as it goes in a test. Ours takes the same path at any length
				// (the heap merge past 64 bytes).
				text := "x" + strings.Repeat(unit, 3000) + "y"
				assert.Equal(t, len(oracle[name].EncodeOrdinary(text)), enc.Count(text))
				long := strings.Repeat(unit, 100_000)
				enc.Count(long) // warm the scratch
				if !raceEnabled {
					assert.Zero(t, testing.AllocsPerRun(3, func() { enc.Count(long) }), "no allocation per count")
				}
			})
		}
	}
}

func TestCacheHitsAndCollisions(t *testing.T) {
	c := newCountCache(4)
	_, ok := c.get(42)
	assert.False(t, ok)
	c.put(42, 7)
	n, ok := c.get(42)
	assert.True(t, ok)
	assert.Equal(t, 7, n)
	// Same slot, different tag: a miss, not a wrong answer.
	_, ok = c.get(42 + 1<<40)
	assert.False(t, ok)
	c.put(1, countMax+1) // too large to cache
	_, ok = c.get(1)
	assert.False(t, ok)
}

func TestCachedCountIsFreeAndEqual(t *testing.T) {
	tok := testTokenizer(t)
	enc := tok.Encoding(O200kBase)
	text := []byte(strings.Repeat("The team shares one upstream key. ", 30))
	first := enc.countBytes(text)
	assert.Equal(t, len(oracles(t)[O200kBase].EncodeOrdinary(string(text))), first)
	allocs := testing.AllocsPerRun(100, func() { enc.countBytes(text) })
	assert.Zero(t, allocs, "a cached text must cost no tokenizer work")
}

// TestNewIsOffline builds the encodings in a fresh process (in this one
// another test may have built them already, which would prove nothing),
// with every proxy pointed at a dead address and an empty cache directory:
// New must not try the network.
func TestNewIsOffline(t *testing.T) {
	if os.Getenv("LLPROXY_OFFLINE_CHILD") == "1" {
		tok, err := New(Config{})
		require.NoError(t, err)
		assert.Equal(t, 2, tok.Encoding(O200kBase).Count("hello world"))
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestNewIsOffline$", "-test.count=1")
	cmd.Env = append(os.Environ(), "LLPROXY_OFFLINE_CHILD=1", "HTTPS_PROXY=http://127.0.0.1:1",
		"HTTP_PROXY=http://127.0.0.1:1", "TIKTOKEN_CACHE_DIR="+t.TempDir())
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "PASS")
}

func TestConfigValidate(t *testing.T) {
	assert.NoError(t, Config{}.Validate())
	err := Config{MaxPieceBytes: -1, MaxExactBytes: -1}.Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "maxPieceBytes")
}

func TestExactWorkPerRequestIsBounded(t *testing.T) {
	tok, err := New(Config{MaxExactBytes: 1000})
	require.NoError(t, err)
	sentence := "The quick brown fox jumps over the lazy dog. "
	small := strings.Repeat(sentence, 10) // 450 bytes: counted
	big := strings.Repeat(sentence, 100)  // 4500 bytes: past the budget
	body := `{"messages":[{"role":"user","content":"` + small + `"},{"role":"user","content":"` + big + `"}]}`
	n := tok.PromptTokens(EndpointChat, "gpt-4o", parse(t, body))
	exactSmall := tok.Encoding(O200kBase).Count(small)
	want := 2*tokensPerMessage + 2 /* roles */ + exactSmall + len(big)/2 + replyPriming
	assert.Equal(t, want, n)
	// Once counted exactly (here, outside a request), a text is cached and
	// costs no budget: the same request now counts exactly.
	exactBig := tok.Encoding(O200kBase).Count(big)
	n = tok.PromptTokens(EndpointChat, "gpt-4o", parse(t, body))
	assert.Equal(t, 2*tokensPerMessage+2+exactSmall+exactBig+replyPriming, n)
}

var (
	oracleOnce sync.Once
	oracleEncs map[string]*tiktoken.Tiktoken
)

// oracles is tiktoken-go, which the counts are checked against (package
// bpe proves them exact; these tests check the wiring).
func oracles(t testing.TB) map[string]*tiktoken.Tiktoken {
	oracleOnce.Do(func() {
		tiktoken.SetBpeLoader(tiktoken_loader.NewOfflineLoader())
		oracleEncs = map[string]*tiktoken.Tiktoken{}
		for _, name := range []string{Cl100kBase, O200kBase} {
			e, err := tiktoken.GetEncoding(name)
			if err != nil {
				panic(err)
			}
			oracleEncs[name] = e
		}
	})
	return oracleEncs
}
