package server

import (
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llproxy/llproxy/internal/config"
)

// cannedTransport answers every request at once without a network, so the
// benchmark measures the gateway's own work.
type cannedTransport struct{ body string }

func (c cannedTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	return &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}},
		Body: io.NopCloser(strings.NewReader(c.body)), ContentLength: int64(len(c.body)), Request: r}, nil
}

const benchChat = `{"model":"gpt-4o","max_tokens":16,"messages":[
{"role":"system","content":"You are a careful assistant for the platform team. Answer briefly, cite the runbook section when you can, and never invent commands that do not exist."},
{"role":"user","content":"Our gateway returns 429 to the batch job while the interactive users see normal latency. Is that expected with per-model queues, and how do I see the queue depth?"},
{"role":"assistant","content":"Yes. Each model has its own FIFO queue in front of its rpm and tpm buckets, so a batch job that floods one model waits in that model's queue. Watch llproxy_queue_depth in Prometheus."},
{"role":"user","content":"Good. The batch job sends max_tokens 4096 on every request but uses about 300. Does that hurt the others, and what should we set instead so the bucket is not drained?"}]}`

// BenchmarkServeChat is the whole hot path for a 1 KB chat request with a
// cached prompt: read, parse, count, admit, forward, copy the answer back,
// log (to io.Discard) and record metrics.
func BenchmarkServeChat(b *testing.B) {
	cfg, err := config.Parse([]byte(`{"routes": {"openai": {"forward": "http://upstream.invalid",
	  "models": {"*": {"maxQueueSize": 10, "maxQueueWait": 60, "rpm": 1000000000, "tpm": 2000000000}}}}}`), nil)
	if err != nil {
		b.Fatal(err)
	}
	srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(b), Registry: prometheus.NewRegistry(),
		Logger:    slog.New(slog.NewJSONHandler(io.Discard, nil)),
		Transport: cannedTransport{`{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}`}})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(benchChat)))
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(benchChat))
			r.Header.Set("Content-Type", "application/json")
			w := httptest.NewRecorder()
			srv.ServeHTTP(w, r)
			if w.Code != 200 {
				b.Fatal(w.Code, w.Body.String())
			}
		}
	})
}
