package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// The memory a waiting request and an open stream hold, measured as an
// operator sees it (llbench -memory): the resident set of a fresh process
// with n of them in progress, less the same process's resident set idle.
// Each figure has a process of its own: a process that already grew for
// one measurement reuses that memory for the next, and would report it as
// nearly free (which is how an earlier version of this measured 2.4 KiB
// for a queued request).

// holding starts n requests of body to url that stay in progress until
// they are released, waits until p has sockets open for every one (sockets
// of them each: 2 for a stream, its client's and its upstream's; 1 for a
// request waiting) and its RSS has settled, and returns its growth per
// request.
// headers are (name, value) pairs each request carries.
func holding(p *proc, url string, body []byte, n, sockets int, headers ...string) float64 {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n, DisableCompression: true}}
	before := p.rss()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var started atomic.Int64
	for range n {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			for i := 0; i+1 < len(headers); i += 2 {
				req.Header.Set(headers[i], headers[i+1])
			}
			started.Add(1)
			if resp, err := client.Do(req); err == nil {
				buf := make([]byte, 64)
				resp.Body.Read(buf) // the stream's first bytes; then it stays open
				<-ctx.Done()
				resp.Body.Close()
			}
		})
	}
	// Every request in progress at the proxy, then its RSS settled.
	deadline := time.Now().Add(2 * time.Minute)
	for p.connections() < n*sockets && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	after := p.rss()
	cancel()
	wg.Wait()
	return (after - before) / float64(n)
}

// memory measures an open stream in the baseline and llproxy, and a queued
// request in llproxy, each in a fresh process.
func memory(llproxyBin string, self string, env []string, streams, queued int) error {
	mockAddr := freeAddr()
	mock, err := start("mock", mockAddr, "/v1/models", nil, llproxyBin, "mock-server", "-listen", mockAddr,
		"-chunks", "100000", "-chunk-delay", "50ms")
	if err != nil {
		return err
	}
	defer mock.stop()
	dir, _ := os.MkdirTemp("", "llbench")
	defer os.RemoveAll(dir)
	// A fresh llproxy: model "stream" has room for everyone; model
	// "queued" admits one a minute, so every other request waits (its
	// waits are allowed for years: a request predicted to wait longer
	// than maxQueueWait would be refused, and its connection would only
	// idle, which is not what is measured).
	llproxy := func() (*proc, string, error) {
		addr := freeAddr()
		cfgPath := filepath.Join(dir, "config.json")
		cfg := fmt.Sprintf(`{"listen": %q, "routes": {"bench": {"forward": "http://%s", "models": {
		  "queued": {"maxQueueSize": 1000000, "maxQueueWait": "100000h", "rpm": 1, "tpm": 2000000000,
		    "batchMaxQueueSize": 1000000, "batchMaxQueueWait": "100000h", "batchMaxAge": "100000h"},
		  "*": {"maxQueueSize": 1000000, "maxQueueWait": 60, "rpm": 1000000000, "tpm": 2000000000}}}}}`, addr, mockAddr)
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
			return nil, "", err
		}
		p, err := start("llproxy", addr, "/healthz", env, llproxyBin, "-config", cfgPath)
		return p, addr, err
	}
	stream := chat(1000, true, false)(0)
	queuedBody := bytes.Replace(chat(16, false, false)(0), []byte(`"model":"gpt-4o"`), []byte(`"model":"queued"`), 1)

	base, baseAddr := (*proc)(nil), freeAddr()
	if base, err = start("baseline", baseAddr, "/healthz", env, self, "baseline", "-listen", baseAddr, "-upstream", "http://"+mockAddr); err != nil {
		return err
	}
	b := holding(base, "http://"+baseAddr+"/v1/chat/completions", stream, streams, 2)
	base.stop()
	if base, err = start("baseline", baseAddr, "/healthz", env, self, "baseline", "-listen", baseAddr, "-upstream", "http://"+mockAddr); err != nil {
		return err
	}
	floor := holding(base, "http://"+baseAddr+"/hold", queuedBody, queued, 1)
	base.stop()
	ll, llAddr, err := llproxy()
	if err != nil {
		return err
	}
	l := holding(ll, "http://"+llAddr+"/bench/v1/chat/completions", stream, streams, 2)
	ll.stop()
	fmt.Printf("memory per open stream (%d open, fresh processes): baseline %.1f KiB, llproxy %.1f KiB\n", streams, b/1024, l/1024)

	ll, llAddr, err = llproxy()
	if err != nil {
		return err
	}
	idle := ll.rss()
	q := holding(ll, "http://"+llAddr+"/bench/v1/chat/completions", queuedBody, queued, 1)
	ll.stop()
	fmt.Printf("memory per queued request (%d waiting, a fresh process): llproxy %.1f KiB (idle RSS %.1f MiB, %.1f MiB with them); "+
		"a bare Go HTTP server holding as many: %.1f KiB\n", queued, q/1024, idle/(1<<20), (idle+q*float64(queued))/(1<<20), floor/1024)

	// The same requests as a batch job's: the class machinery's cost.
	if ll, llAddr, err = llproxy(); err != nil {
		return err
	}
	idle = ll.rss()
	qb := holding(ll, "http://"+llAddr+"/bench/v1/chat/completions", queuedBody, queued, 1, "X-Llproxy-Class", "batch")
	ll.stop()
	fmt.Printf("memory per queued batch request (%d waiting, a fresh process): llproxy %.1f KiB (%.1f MiB with them)\n",
		queued, qb/1024, (idle+qb*float64(queued))/(1<<20))
	return nil
}
