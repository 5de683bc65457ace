package provider

import (
	"bytes"
	"io"

	"github.com/valyala/fastjson"
)

// Usage is the token usage an upstream reports for one request.
type Usage struct {
	// Prompt is the whole prompt, whatever the cache did with it (OpenAI's
	// prompt_tokens; Anthropic's input_tokens plus its two cache counts),
	// Completion the output, Total both.
	Prompt, Completion, Total int
	// CacheRead and CacheWrite are the parts of Prompt read from and
	// written to the provider's prompt cache (OpenAI's cached_tokens;
	// Anthropic's cache_read_input_tokens and
	// cache_creation_input_tokens).
	CacheRead, CacheWrite int
	// Partial is usage the answer reported only at its start (an Anthropic
	// stream that ended before its message_delta): Prompt and the cache
	// counts are known, Completion is what the start said (not the output).
	Partial bool
}

var usageKey = []byte(`"usage"`)

// FindUsage finds the last non-null "usage" object in b (a JSON response, or
// one SSE event's data) and reads it: chat and completions report
// prompt_tokens/completion_tokens, the Responses API input_tokens/
// output_tokens, embeddings prompt_tokens only. A raw `"usage"` can only be
// a key: inside a JSON string its quotes would be escaped.
func FindUsage(b []byte) (Usage, bool) {
	for end := len(b); end > 0; {
		i := bytes.LastIndex(b[:end], usageKey)
		if i < 0 {
			return Usage{}, false
		}
		end = i
		rest := bytes.TrimLeft(b[i+len(usageKey):], " \t\r\n")
		if len(rest) == 0 || rest[0] != ':' {
			continue
		}
		rest = bytes.TrimLeft(rest[1:], " \t\r\n")
		obj := objectPrefix(rest)
		if obj == nil {
			continue // null, or cut off
		}
		if u, ok := parseUsage(obj); ok {
			return u, true
		}
	}
	return Usage{}, false
}

var usageParsers fastjson.ParserPool

func parseUsage(obj []byte) (Usage, bool) {
	p := usageParsers.Get()
	defer usageParsers.Put(p)
	v, err := p.ParseBytes(obj)
	if err != nil {
		return Usage{}, false
	}
	u := usageOf(v)
	return u, true
}

// usageOf reads a usage object: OpenAI's (prompt_tokens, the Responses
// API's input_tokens, each with its cached_tokens) or Anthropic's
// (input_tokens beside its cache counts, which add up to the prompt).
func usageOf(v *fastjson.Value) Usage {
	u := Usage{
		Prompt:     firstInt(v, "prompt_tokens", "input_tokens"),
		Completion: firstInt(v, "completion_tokens", "output_tokens"),
		Total:      boundedInt(v.Get("total_tokens")),
	}
	cw, cr := v.Get("cache_creation_input_tokens"), v.Get("cache_read_input_tokens")
	if cw != nil || cr != nil { // Anthropic: input_tokens is the uncached rest
		u.CacheWrite, u.CacheRead = boundedInt(cw), boundedInt(cr)
		u.Prompt = min(u.Prompt+u.CacheWrite+u.CacheRead, MaxUsage)
	} else {
		u.CacheRead = min(u.Prompt, max(boundedInt(v.Get("prompt_tokens_details", "cached_tokens")),
			boundedInt(v.Get("input_tokens_details", "cached_tokens"))))
	}
	if u.Total < u.Prompt+u.Completion {
		u.Total = u.Prompt + u.Completion
	}
	u.Total = min(u.Total, MaxUsage)
	return u
}

// MaxUsage bounds each usage count an upstream reports: a larger or
// negative one is not believed as it is.
const MaxUsage = 1 << 31

func firstInt(v *fastjson.Value, keys ...string) int {
	for _, k := range keys {
		if x := v.Get(k); x != nil {
			return boundedInt(x)
		}
	}
	return 0
}

// boundedInt reads a usage count: a number in [0, MaxUsage], else 0 (or
// MaxUsage when larger).
func boundedInt(x *fastjson.Value) int {
	if x == nil || x.Type() != fastjson.TypeNumber {
		return 0
	}
	f := x.GetFloat64()
	switch {
	case f != f || f <= 0:
		return 0
	case f >= MaxUsage:
		return MaxUsage
	}
	return int(f)
}

// objectPrefix returns the JSON object b starts with, or nil if b does not
// start with a complete one.
func objectPrefix(b []byte) []byte {
	if len(b) == 0 || b[0] != '{' {
		return nil
	}
	if end := skipValue(b, 0); end > 0 {
		return b[:end]
	}
	return nil
}

// BodyTap passes a JSON response body through unchanged and keeps its last
// few KiB, where OpenAI-compatible servers put "usage", so the usage can be
// read when the body is done without holding the whole body. A BodyTap may
// be reused with Reset, keeping its buffer.
type BodyTap struct {
	src   io.ReadCloser
	tail  []byte
	eof   bool
	lines int   // newlines passed: NDJSON chunks
	n     int64 // bytes passed
}

const tapTail = 8 << 10

// newBodyTap wraps a response body.
func newBodyTap(src io.ReadCloser) *BodyTap {
	t := &BodyTap{}
	t.Reset(src)
	return t
}

// Reset makes t tap src, forgetting what it saw before.
func (t *BodyTap) Reset(src io.ReadCloser) {
	t.src, t.tail, t.eof, t.lines, t.n = src, t.tail[:0], false, 0, 0
}

func (t *BodyTap) Read(p []byte) (int, error) {
	n, err := t.src.Read(p)
	if n > 0 {
		t.lines += bytes.Count(p[:n], newline)
		t.n += int64(n)
		if len(t.tail)+n > 2*tapTail {
			keep := max(0, tapTail-n)
			t.tail = append(t.tail[:0], t.tail[len(t.tail)-keep:]...)
		}
		t.tail = append(t.tail, p[:n]...)
	}
	if err == io.EOF {
		t.eof = true
	}
	return n, err
}

var newline = []byte{'\n'}

// Close closes the upstream body.
func (t *BodyTap) Close() error { return t.src.Close() }

// Relayed is what has passed so far: chunks (lines: an NDJSON stream's
// chunks) and bytes. It is how much of an answer cut short the client got.
func (t *BodyTap) Relayed() (chunks int, bytes int64) { return t.lines, t.n }

// Usage returns the body's usage once it was read to the end.
func (t *BodyTap) Usage() (Usage, bool) {
	if !t.eof {
		return Usage{}, false
	}
	return FindUsage(t.tail)
}

// WantsStreamUsage reports whether a streamed chat or completions request
// body already asks for the final usage chunk.
func WantsStreamUsage(v *fastjson.Value) bool {
	return v.GetBool("stream_options", "include_usage")
}

// WithStreamUsage appends to dst the request body with
// stream_options.include_usage set to true, so that the upstream reports the
// stream's usage in a last chunk. v is body, parsed. The body is changed as
// little as possible: when it has no stream_options the member is inserted
// before the closing brace and every other byte stays as it was. A nil body
// means v itself (already changed) is the body to write.
func WithStreamUsage(dst, body []byte, v *fastjson.Value) []byte {
	if body != nil && v.Get("stream_options") == nil {
		end := bytes.LastIndexByte(body, '}')
		if end < 0 {
			return append(dst, body...)
		}
		before := bytes.TrimRight(body[:end], " \t\r\n")
		dst = append(dst, body[:end]...)
		if len(before) > 0 && before[len(before)-1] != '{' {
			dst = append(dst, ',')
		}
		dst = append(dst, `"stream_options":{"include_usage":true}`...)
		return append(dst, body[end:]...)
	}
	var a fastjson.Arena
	if so := v.Get("stream_options"); so != nil && so.Type() == fastjson.TypeObject {
		so.Set("include_usage", a.NewTrue())
	} else {
		o := a.NewObject()
		o.Set("include_usage", a.NewTrue())
		v.Set("stream_options", o)
	}
	return v.MarshalTo(dst)
}
