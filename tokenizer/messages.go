package tokenizer

import (
	"bytes"
	"encoding/base64"
	"image"

	"github.com/valyala/fastjson"
)

// Anthropic's Messages API (POST /v1/messages and its count_tokens). Claude
// has no public tokenizer: its prompt is counted here with the model's
// encoding (o200k for a name the tokenizer does not know), as the text of
// everything the model reads, and the caller scales that by a factor
// learned from what the upstream reports (the calibrated estimate). The
// fixed parts follow Anthropic's documentation:
//
//   - an image costs width × height / 750 tokens after it is fitted within
//     1568 px on its long side and 1.15 megapixels; one whose size is not
//     in its data (a URL, a file id) costs the most an image can: 1,600;
//   - a PDF costs about 1,500 tokens a page; its pages are not parsed, so
//     it counts one page per 50 KB of its data, at least one; a text
//     document counts its text;
//   - tools add the tool-use system prompt (346 tokens) and their names,
//     descriptions and schemas as text;
//   - every message adds a few tokens of framing.
const (
	claudePerMessage  = 4
	claudeToolsPrompt = 346
	claudeImageMax    = 1600
	claudeImagePixels = 750
	claudePDFPage     = 1500
	claudePDFPageSize = 50 << 10
)

// messages counts a Messages request body: system, messages, tools.
func (c counter) messages(body *fastjson.Value) int {
	n := c.blocks(body.Get("system"))
	for _, m := range body.GetArray("messages") {
		n += claudePerMessage + c.blocks(m.Get("content"))
	}
	tools := body.GetArray("tools")
	if len(tools) > 0 {
		n += claudeToolsPrompt
	}
	var buf []byte
	for _, t := range tools {
		n += c.text(t.GetStringBytes("name")) + c.text(t.GetStringBytes("description"))
		if s := t.Get("input_schema"); s != nil {
			buf = s.MarshalTo(buf[:0])
			n += c.text(buf)
		}
		// Server tools ({"type":"web_search_20250305",...}) have no
		// schema: their small fields count.
		if t.Get("input_schema") == nil && t.Get("name") == nil {
			n += c.strings(t)
		}
	}
	if tc := body.Get("tool_choice"); tc != nil {
		n += c.strings(tc)
	}
	return n
}

// blocks counts a string, or an array of content blocks.
func (c counter) blocks(v *fastjson.Value) int {
	if v == nil {
		return 0
	}
	if v.Type() != fastjson.TypeArray {
		return c.strings(v)
	}
	n := 0
	var buf []byte
	for _, b := range v.GetArray() {
		switch string(b.GetStringBytes("type")) {
		case "text":
			n += c.text(b.GetStringBytes("text"))
		case "image":
			n += claudeImage(b.Get("source"))
		case "document":
			n += c.document(b.Get("source")) + c.text(b.GetStringBytes("title")) + c.text(b.GetStringBytes("context"))
		case "tool_use", "server_tool_use":
			n += c.text(b.GetStringBytes("name"))
			if in := b.Get("input"); in != nil {
				buf = in.MarshalTo(buf[:0])
				n += c.text(buf)
			}
		case "tool_result", "web_search_tool_result":
			n += c.blocks(b.Get("content"))
		case "thinking":
			n += c.text(b.GetStringBytes("thinking"))
		case "redacted_thinking":
			n += len(b.GetStringBytes("data")) / 4 // encrypted: about a token per 4 bytes
		default:
			n += c.stringsExcept(b, "signature", "cache_control")
		}
	}
	return n
}

// document counts a document block's source: its text, the pages of a
// PDF, or the blocks of a content document.
func (c counter) document(src *fastjson.Value) int {
	switch string(src.GetStringBytes("type")) {
	case "text":
		return c.text(src.GetStringBytes("data"))
	case "content":
		return c.blocks(src.Get("content"))
	case "base64":
		size := base64.StdEncoding.DecodedLen(len(src.GetStringBytes("data")))
		return claudePDFPage * max(1, (size+claudePDFPageSize-1)/claudePDFPageSize)
	}
	return claudePDFPage // a URL or a file: one page at least, as documented
}

// claudeImage is an image block's cost: its pixels / 750 once fitted, from
// the size in its base64 data's header; the most an image can cost
// otherwise.
func claudeImage(src *fastjson.Value) int {
	if string(src.GetStringBytes("type")) != "base64" {
		return claudeImageMax
	}
	dec := base64.NewDecoder(base64.StdEncoding, bytes.NewReader(src.GetStringBytes("data")))
	cfg, _, err := image.DecodeConfig(dec)
	if err != nil || cfg.Width <= 0 || cfg.Height <= 0 {
		return claudeImageMax
	}
	w, h := float64(cfg.Width), float64(cfg.Height)
	if long := max(w, h); long > 1568 {
		w, h = w*1568/long, h*1568/long
	}
	area := min(w*h, 1.15e6) // beyond, both sides shrink until it is this
	return min(claudeImageMax, max(1, int(area/claudeImagePixels)))
}
