package tokenizer

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/valyala/fastjson"
)

func messagesTokens(t *testing.T, tok *Tokenizer, body string) int {
	t.Helper()
	v, err := fastjson.Parse(body)
	require.NoError(t, err, body)
	return tok.PromptTokens(EndpointMessages, "claude-sonnet-4-5", v)
}

func TestMessagesCount(t *testing.T) {
	tok, err := New(Config{CacheEntries: -1})
	require.NoError(t, err)
	enc := tok.EncodingFor("claude-sonnet-4-5")
	text := "The quick brown fox jumps over the lazy dog."
	words := enc.Count(text)

	plain := messagesTokens(t, tok, `{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"`+text+`"}]}`)
	assert.Equal(t, words+claudePerMessage, plain)
	blocks := messagesTokens(t, tok, `{"model":"m","max_tokens":10,"system":[{"type":"text","text":"`+text+`","cache_control":{"type":"ephemeral"}}],`+
		`"messages":[{"role":"user","content":[{"type":"text","text":"`+text+`"}]}]}`)
	assert.Equal(t, 2*words+claudePerMessage, blocks, "system as blocks counts its text, not its cache_control")

	tools := messagesTokens(t, tok, `{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"`+text+`"}],`+
		`"tools":[{"name":"get_weather","description":"Get the weather","input_schema":{"type":"object","properties":{"city":{"type":"string"}}}}]}`)
	assert.Greater(t, tools, plain+claudeToolsPrompt, "tools add the tool-use system prompt and their schemas")

	// An image: its pixels / 750, from its header; a URL the most.
	small := pngDataURL(t, 200, 150)
	img := func(src string) int {
		return messagesTokens(t, tok, `{"model":"m","max_tokens":10,"messages":[{"role":"user","content":[{"type":"image","source":`+src+`}]}]}`) - claudePerMessage
	}
	assert.Equal(t, 200*150/750, img(`{"type":"base64","media_type":"image/png","data":"`+strings.TrimPrefix(small, "data:image/png;base64,")+`"}`))
	big := strings.TrimPrefix(pngDataURL(t, 4000, 3000), "data:image/png;base64,")
	assert.Equal(t, 1533, img(`{"type":"base64","media_type":"image/png","data":"`+big+`"}`), "fitted to 1.15 megapixels")
	assert.Equal(t, claudeImageMax, img(`{"type":"url","url":"https://example.com/a.png"}`))

	// A PDF: a page per 50 KB, at least one; a text document its text.
	pdf := messagesTokens(t, tok, `{"model":"m","max_tokens":10,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"`+strings.Repeat("A", 200_000)+`"}}]}]}`)
	assert.Equal(t, claudePerMessage+3*claudePDFPage, pdf, "150 KB: three pages")
	doc := messagesTokens(t, tok, `{"model":"m","max_tokens":10,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"text","media_type":"text/plain","data":"`+text+`"}}]}]}`)
	assert.Equal(t, claudePerMessage+words, doc)

	// Tool use and results, thinking: their text.
	turn := messagesTokens(t, tok, `{"model":"m","max_tokens":10,"messages":[`+
		`{"role":"assistant","content":[{"type":"thinking","thinking":"`+text+`","signature":"abc"},{"type":"tool_use","id":"t1","name":"f","input":{"q":"x"}}]},`+
		`{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"`+text+`"}]}]}]}`)
	assert.Greater(t, turn, 2*words+2*claudePerMessage)

	// Junk of any shape counts its strings and never fails.
	for _, junk := range []string{`{"messages":"x"}`, `{"messages":[1,null,{"content":{"type":"image"}}]}`, `{"system":5,"tools":[null]}`,
		`{"messages":[{"content":[{"type":"image","source":{"type":"base64","data":"!!!"}},{"type":"document","source":null}]}]}`} {
		assert.GreaterOrEqual(t, messagesTokens(t, tok, junk), 0, junk)
	}
}
