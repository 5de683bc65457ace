package tokenizer

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/valyala/fastjson"
)

// chat1KB is a realistic ~1 KB chat request: a system prompt, history and a
// new user turn.
var chat1KB = `{"model":"gpt-4o","messages":[
{"role":"system","content":"You are a careful assistant for the platform team. Answer briefly, cite the runbook section when you can, and never invent commands that do not exist."},
{"role":"user","content":"Our gateway returns 429 to the batch job while the interactive users see normal latency. Is that expected with per-model queues, and how do I see the queue depth?"},
{"role":"assistant","content":"Yes. Each model has its own FIFO queue in front of its rpm and tpm buckets, so a batch job that floods one model waits in that model's queue. Watch llproxy_queue_depth in Prometheus, labelled by route and model."},
{"role":"user","content":"Good. The batch job sends max_tokens 4096 on every request but uses about 300. Does that hurt the others, and what should we set instead so the bucket is not drained?"}],
"max_tokens":512,"temperature":0.2}`

func BenchmarkCountChat1KB(b *testing.B) {
	tok := testTokenizer(b)
	b.Run("cached", func(b *testing.B) {
		var p fastjson.Parser
		body := []byte(chat1KB)
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			v, _ := p.ParseBytes(body)
			tok.PromptTokens(EndpointChat, "gpt-4o", v)
		}
	})
	b.Run("unique", func(b *testing.B) {
		var p fastjson.Parser
		var seq atomic.Int64
		b.SetBytes(int64(len(chat1KB)))
		b.ReportAllocs()
		for b.Loop() {
			// Every message differs, so nothing is served from the cache.
			body := strings.ReplaceAll(chat1KB, "gateway", fmt.Sprintf("gw%d", seq.Add(1)))
			body = strings.ReplaceAll(body, "Yes.", fmt.Sprintf("Yes %d.", seq.Load()))
			body = strings.ReplaceAll(body, "careful", fmt.Sprintf("careful%d", seq.Load()))
			body = strings.ReplaceAll(body, "Good.", fmt.Sprintf("Good %d.", seq.Load()))
			v, _ := p.Parse(body)
			tok.PromptTokens(EndpointChat, "gpt-4o", v)
		}
	})
}

func BenchmarkHostile100KB(b *testing.B) {
	tok, _ := New(Config{CacheEntries: -1})
	text := strings.Repeat("a", 100_000)
	b.ReportAllocs()
	for b.Loop() {
		tok.Encoding(O200kBase).Count(text)
	}
}
