package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// result is one target under one load.
type result struct {
	requests, errors int
	elapsed          time.Duration
	latencies        []time.Duration
	cpu              time.Duration // the target process's CPU over the run
}

func (r result) rps() float64 { return float64(r.requests) / r.elapsed.Seconds() }

func (r result) percentile(p float64) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	return r.latencies[min(len(r.latencies)-1, int(p*float64(len(r.latencies))))]
}

func (r result) cpuPerRequest() time.Duration {
	if r.requests == 0 {
		return 0
	}
	return r.cpu / time.Duration(r.requests)
}

// drive sends POSTs of body(i) to url from conc workers for d and measures
// each full response. A response that is not 200 counts as an error. url
// may list several URLs, space-separated (replicas): worker w sends to the
// w-th, round robin.
func drive(client *http.Client, url string, body func(i int64) []byte, conc int, d time.Duration) result {
	urls := strings.Fields(url)
	var (
		seq      atomic.Int64
		mu       sync.Mutex
		res      result
		wg       sync.WaitGroup
		deadline = time.Now().Add(d)
	)
	start := time.Now()
	for w := range conc {
		url := urls[w%len(urls)]
		wg.Go(func() {
			var lat []time.Duration
			errs := 0
			for time.Now().Before(deadline) {
				b := body(seq.Add(1))
				t0 := time.Now()
				resp, err := client.Post(url, "application/json", bytes.NewReader(b))
				if err != nil {
					errs++
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK {
					errs++
					continue
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			res.latencies = append(res.latencies, lat...)
			res.errors += errs
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	res.requests = len(res.latencies)
	slices.Sort(res.latencies)
	return res
}

// fetch returns one response body.
func fetch(client *http.Client, url string, body []byte) ([]byte, error) {
	resp, err := client.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: status %d", url, resp.StatusCode)
	}
	return io.ReadAll(resp.Body)
}
