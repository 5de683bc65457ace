package request

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/valyala/fastjson"
)

func TestCheckPath(t *testing.T) {
	for path, ok := range map[string]bool{
		"/openai/v1/chat/completions": true,
		"/openai/v1/models.json":      true,
		"/openai/../admin":            false,
		"/openai/./v1":                false,
		"/openai/v1/..":               false,
		`/openai\..\admin`:            false,
	} {
		assert.Equal(t, ok, CheckPath(path, "") == nil, path)
	}
	assert.Error(t, CheckPath("/openai/v1/x", "/openai/v1/%2e%2e%2fadmin"), "percent-encoded")
}

func TestCheckModelName(t *testing.T) {
	assert.NoError(t, CheckModelName([]byte("llama3:8b-instruct")))
	for _, bad := range []string{"", "a\xffb", "a\x01b", "a\u0085b", string(make([]byte, MaxModelName+1))} {
		assert.Error(t, CheckModelName([]byte(bad)), "%q", bad)
	}
}

func TestCheckDuplicateKeys(t *testing.T) {
	for body, ok := range map[string]bool{
		`{"model":"a","messages":[{"role":"user","content":"x"}]}`:    true,
		`{"model":"a","model":"b"}`:                                   false,
		`{"messages":[{"content":"a","content":"b"}]}`:                false,
		`{"a":{"x":1},"b":{"x":2}}`:                                   true, // the same key in two objects
		`{"tools":[{"function":{"parameters":{"p":1,"q":2,"p":3}}}]}`: false,
	} {
		v := fastjson.MustParse(body)
		assert.Equal(t, ok, CheckDuplicateKeys(v) == nil, body)
	}
	deep := ""
	for range maxJSONDepth + 2 {
		deep += "["
	}
	for range maxJSONDepth + 2 {
		deep += "]"
	}
	assert.Error(t, CheckDuplicateKeys(fastjson.MustParse(deep)), "nested too deeply")
}

func TestIntParam(t *testing.T) {
	for body, want := range map[string]struct {
		n       int64
		ok, err bool
	}{
		`{}`:               {0, false, false},
		`{"k":null}`:       {0, false, false},
		`{"k":100}`:        {100, true, false},
		`{"k":1e5}`:        {100000, true, false},
		`{"k":100000.0}`:   {100000, true, false},
		`{"k":1.5}`:        {0, false, true},
		`{"k":"5"}`:        {0, false, true},
		`{"k":0}`:          {0, false, true}, // OpenAI's 400, never "no limit"
		`{"k":-1}`:         {0, false, true},
		`{"k":-2}`:         {0, false, true},
		`{"k":4294967296}`: {0, false, true},
		`{"k":1e400}`:      {0, false, true},
	} {
		n, ok, err := IntParam(fastjson.MustParse(body), "k", 1, MaxOutputTokens)
		assert.Equal(t, want.n, n, body)
		assert.Equal(t, want.ok, ok, body)
		assert.Equal(t, want.err, err != nil, body)
	}
}

func TestParseKeepAlive(t *testing.T) {
	for raw, want := range map[string]time.Duration{
		`0`: 0, `300`: 5 * time.Minute, `"10m"`: 10 * time.Minute, `-1`: -1, `"-5m"`: -1, `1e300`: -1,
	} {
		d, err := ParseKeepAlive([]byte(raw))
		assert.NoError(t, err, raw)
		assert.Equal(t, want, d, raw)
	}
	for _, raw := range []string{`"soon"`, `true`, `[1]`} {
		_, err := ParseKeepAlive([]byte(raw))
		assert.Error(t, err, raw)
	}
}
