package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// The memory a waiting request and an open stream hold, measured as the
// growth of each proxy's resident set while n of them are in progress
// (llbench -memory).

// holding starts n requests of body to url that stay in progress until
// release is closed, waits until p's RSS has settled, and returns its
// growth per request.
func holding(client *http.Client, p *proc, url string, body []byte, n int) float64 {
	before := p.rss()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			if resp, err := client.Do(req); err == nil {
				buf := make([]byte, 64)
				resp.Body.Read(buf) // the stream's first bytes; then it stays open
				<-ctx.Done()
				resp.Body.Close()
			}
		})
	}
	time.Sleep(3 * time.Second)
	after := p.rss()
	cancel()
	wg.Wait()
	return (after - before) / float64(n)
}

// memory measures a queued request in llproxy and an open stream in the
// baseline and llproxy.
func memory(llproxyBin string, self string, env []string) error {
	const n = 400
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n, MaxConnsPerHost: 0, DisableCompression: true}}
	mockAddr, baseAddr, llAddr := freeAddr(), freeAddr(), freeAddr()
	mock, err := start("mock", mockAddr, "/v1/models", nil, llproxyBin, "mock-server", "-listen", mockAddr,
		"-chunks", "1000", "-chunk-delay", "50ms")
	if err != nil {
		return err
	}
	defer mock.stop()
	base, err := start("baseline", baseAddr, "/healthz", env, self, "baseline", "-listen", baseAddr, "-upstream", "http://"+mockAddr)
	if err != nil {
		return err
	}
	defer base.stop()
	dir, _ := os.MkdirTemp("", "llbench")
	defer os.RemoveAll(dir)
	cfgPath := filepath.Join(dir, "config.json")
	// Model "stream" has room for everyone; model "queued" admits one a
	// minute, so every other request waits in its queue.
	cfg := fmt.Sprintf(`{"listen": %q, "routes": {"bench": {"forward": "http://%s", "models": {
	  "queued": {"maxQueueSize": 100000, "maxQueueWait": 3600, "rpm": 1, "tpm": 2000000000},
	  "*": {"maxQueueSize": 100000, "maxQueueWait": 60, "rpm": 1000000000, "tpm": 2000000000}}}}}`, llAddr, mockAddr)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	ll, err := start("llproxy", llAddr, "/healthz", env, llproxyBin, "-config", cfgPath)
	if err != nil {
		return err
	}
	defer ll.stop()
	stream := chat(1000, true, false)(0)
	queued := bytes.Replace(chat(16, false, false)(0), []byte(`"model":"gpt-4o"`), []byte(`"model":"queued"`), 1)
	fmt.Printf("memory per open stream (%d open):  baseline %.1f KiB, llproxy %.1f KiB\n", n,
		holding(client, base, "http://"+baseAddr+"/v1/chat/completions", stream, n)/1024,
		holding(client, ll, "http://"+llAddr+"/bench/v1/chat/completions", stream, n)/1024)
	fmt.Printf("memory per queued request (%d waiting): llproxy %.1f KiB\n", n,
		holding(client, ll, "http://"+llAddr+"/bench/v1/chat/completions", queued, n)/1024)
	return nil
}
