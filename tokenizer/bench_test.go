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

// corpus is about 2 MB of prose, code, JSON and several scripts, each
// text different (nothing is cached).
func corpus() []string {
	parts := []string{
		"The gateway admits each request when both buckets can pay for it; a request that would wait too long is told so at once. ",
		"func (q *Queue) Acquire(ctx context.Context, cost Cost) (*Admission, error) {\n\tq.mu.Lock()\n\tdefer q.mu.Unlock()\n}\n",
		`{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}],"max_tokens":512,"temperature":0.2}` + "\n",
		"今天我们讨论分布式系统中的限流策略，以及令牌桶算法的实现细节。", "Привет! Это текст на русском языке о сетях. ",
		"مرحبا، هذا نص عربي عن الشبكات والخوادم. ", "    if err != nil {\n        return nil, fmt.Errorf(\"x: %w\", err)\n    }\n",
	}
	var out []string
	for i := 0; len(out) < 20000; i++ {
		out = append(out, fmt.Sprintf("%d %s", i, parts[i%len(parts)]))
	}
	return out
}

// BenchmarkCorpus is tokenizer throughput on fresh text, per encoding.
func BenchmarkCorpus(b *testing.B) {
	texts := corpus()
	size := 0
	for _, t := range texts {
		size += len(t)
	}
	for _, name := range []string{Cl100kBase, O200kBase} {
		b.Run(name, func(b *testing.B) {
			tok, _ := New(Config{CacheEntries: -1})
			enc := tok.Encoding(name)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				for _, t := range texts {
					enc.Count(t)
				}
			}
		})
	}
}

// BenchmarkNew is building both encodings at start-up.
func BenchmarkNew(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := New(Config{}); err != nil {
			b.Fatal(err)
		}
	}
}
