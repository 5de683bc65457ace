package server

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/llproxy/llproxy/internal/config"
)

// cannedTransport answers every request at once without a network, so the
// benchmark measures the gateway's own work.
type cannedTransport struct {
	body    string
	headers http.Header
}

func (c cannedTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	h := http.Header{"Content-Type": {"application/json"}}
	for k, v := range c.headers {
		h[k] = v
	}
	return &http.Response{StatusCode: 200, Header: h,
		Body: io.NopCloser(strings.NewReader(c.body)), ContentLength: int64(len(c.body)), Request: r}, nil
}

const benchChat = `{"model":"gpt-4o","max_tokens":16,"messages":[
{"role":"system","content":"You are a careful assistant for the platform team. Answer briefly, cite the runbook section when you can, and never invent commands that do not exist."},
{"role":"user","content":"Our gateway returns 429 to the batch job while the interactive users see normal latency. Is that expected with per-model queues, and how do I see the queue depth?"},
{"role":"assistant","content":"Yes. Each model has its own FIFO queue in front of its rpm and tpm buckets, so a batch job that floods one model waits in that model's queue. Watch llproxy_queue_depth in Prometheus."},
{"role":"user","content":"Good. The batch job sends max_tokens 4096 on every request but uses about 300. Does that hurt the others, and what should we set instead so the bucket is not drained?"}]}`

// BenchmarkServeChat is the whole hot path for a 1 KB chat request with a
// cached prompt: read, parse, count, admit, forward, copy the answer back,
// log (to io.Discard) and record metrics. The variants add the accounting
// around the send: reading usage and settling the reservation, and reading
// the upstream's rate headers into the buckets.
func BenchmarkServeChat(b *testing.B) {
	const usage = `{"choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}`
	rateHeaders := http.Header{"X-Ratelimit-Limit-Requests": {"1000000000"}, "X-Ratelimit-Remaining-Requests": {"999999999"},
		"X-Ratelimit-Reset-Requests": {"1ms"}, "X-Ratelimit-Limit-Tokens": {"2000000000"},
		"X-Ratelimit-Remaining-Tokens": {"1999999000"}, "X-Ratelimit-Reset-Tokens": {"6ms"}}
	// Ten teams, the request from the last one (every key is compared),
	// with a daily budget.
	var teams strings.Builder
	for i := range 10 {
		fmt.Fprintf(&teams, `"team-%d": {"keys": ["key-%d"], "weight": %d, "limits": {"*": {"tokensPerDay": 1000000000000}}},`, i, i, i+1)
	}
	clients := `"clients": {` + strings.TrimSuffix(teams.String(), ",") + `},`
	// The same teams with budgets in money, the model priced, and every
	// request a row of the usage ledger in SQLite.
	var money strings.Builder
	for i := range 10 {
		fmt.Fprintf(&money, `"team-%d": {"keys": ["key-%d"], "weight": %d, "limits": {"*": {"tokensPerDay": 1000000000000}},
		  "budget": {"usdPerDay": 1000000000, "usdPerMonth": 1000000000}},`, i, i, i+1)
	}
	ledgerPath := filepath.Join(b.TempDir(), "usage.db")
	moneyClients := `"prices": {"gpt-4o": {"input": 2.5, "cachedInput": 1.25, "output": 10}}, "usage": {"store": "sqlite:` + ledgerPath +
		`"}, "clients": {` + strings.TrimSuffix(money.String(), ",") + `},`
	for _, bc := range []struct {
		name, settle string
		headers      http.Header
		clients      string
		path         string
	}{
		{"settle=reserved", "reserved", nil, "", ""},
		{"settle=actual", "actual", nil, "", ""},
		{"settle=actual+rate headers", "actual", rateHeaders, "", ""},
		{"settle=actual+10 teams with budgets", "actual", nil, clients, ""},
		{"settle=actual+10 teams with budgets+money+ledger", "actual", nil, moneyClients, ""},
		{"settle=actual+at the root /v1", "actual", nil, "", "/v1/chat/completions"},
	} {
		path := bc.path
		if path == "" {
			path = "/openai/v1/chat/completions"
		}
		b.Run(bc.name, func(b *testing.B) {
			cfg, err := config.Parse([]byte(`{`+bc.clients+`"routes": {"openai": {"forward": "http://upstream.invalid", "settle": "`+bc.settle+`",
			  "models": {"*": {"maxQueueSize": 10, "maxQueueWait": 60, "rpm": 1000000000, "tpm": 2000000000}}}}}`), nil)
			if err != nil {
				b.Fatal(err)
			}
			srv, err := New(Options{Config: cfg, Tokenizer: testTokenizer(b), Registry: prometheus.NewRegistry(),
				Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Transport: cannedTransport{usage, bc.headers}})
			if err != nil {
				b.Fatal(err)
			}
			if srv.ledger != nil {
				b.Cleanup(func() { srv.ledger.Close(context.Background()) })
			}
			b.ReportAllocs()
			b.SetBytes(int64(len(benchChat)))
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					r := httptest.NewRequest(http.MethodPost, path, strings.NewReader(benchChat))
					r.Header.Set("Content-Type", "application/json")
					r.Header.Set("Authorization", "Bearer key-9")
					w := httptest.NewRecorder()
					srv.ServeHTTP(w, r)
					if w.Code != 200 {
						b.Fatal(w.Code, w.Body.String())
					}
				}
			})
		})
	}
}
