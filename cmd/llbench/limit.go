package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
)

// The at-limit scenario: the key's limit is what binds. A mock upstream
// enforces rpm requests per minute as OpenAI does (a bucket of a minute
// plus a few requests of slack, x-ratelimit headers, 429s); llproxy (or
// its replicas) is configured with the same rpm, and more clients than
// the limit serves ask as fast as they are let, honouring Retry-After.
// What is measured: the rate admitted against the limit, the 429s the
// upstream answered (what the gateway let through beyond the limit), the
// gateway's own refusals and how often a client that waited its
// Retry-After was refused again, and requests lost or hung.

// limitRoute is the config of the route in front of the limited mock,
// with its leading comma; nothing when the scenario does not run.
func limitRoute(addr string, rpm int, wait time.Duration, runs bool) string {
	if !runs {
		return ""
	}
	return fmt.Sprintf(`, "limited": {"forward": "http://%s", "models": {"*": {"maxQueueSize": 100000, "maxQueueWait": %g, "rpm": %d, "tpm": 2000000000}}}`,
		addr, wait.Seconds(), rpm)
}

// limitResult is one target driven at its limit.
type limitResult struct {
	admitted     int           // 200s
	refused      int           // the gateway's 429s
	refusedAgain int           // 429s to a client that had waited the Retry-After it was given
	errors       int           // anything else (a lost request)
	hung         int           // requests that waited beyond the longest honest wait
	retryAfter   time.Duration // the sum of the gateway's Retry-Afters
	late         int           // 429s that came after a wait (250 ms or more), not at once
	elapsed      time.Duration
	upstream429  int64 // what the upstream refused over the run
}

// driveAtLimit sends from conc workers for d; a worker refused with a 429
// waits its Retry-After-Ms (or Retry-After) and asks again. Requests still
// waiting at the end are cancelled and not counted. A request is hung if
// it took longer than maxWait plus a second.
func driveAtLimit(client *http.Client, url string, body []byte, conc int, d, maxWait time.Duration) limitResult {
	urls := strings.Fields(url)
	var (
		mu  sync.Mutex
		res limitResult
		wg  sync.WaitGroup
	)
	start := time.Now()
	ctx, cancel := context.WithDeadline(context.Background(), start.Add(d))
	defer cancel()
	for w := range conc {
		url := urls[w%len(urls)]
		wg.Go(func() {
			var r limitResult
			waited := false
			for ctx.Err() == nil {
				t0 := time.Now()
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				resp, err := client.Do(req)
				took := time.Since(t0)
				if took > maxWait+time.Second {
					r.hung++
				}
				if err != nil {
					if ctx.Err() == nil {
						r.errors++
					}
					continue
				}
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				switch {
				case err != nil && ctx.Err() != nil:
				case err == nil && resp.StatusCode == http.StatusOK:
					r.admitted++
					waited = false
				case err == nil && resp.StatusCode == http.StatusTooManyRequests:
					r.refused++
					if waited {
						r.refusedAgain++
					}
					wait := retryAfter(resp.Header)
					r.retryAfter += wait
					if took >= 250*time.Millisecond {
						r.late++
					}
					waited = true
					select {
					case <-ctx.Done():
					case <-time.After(wait):
					}
				default:
					r.errors++
				}
			}
			mu.Lock()
			res.admitted += r.admitted
			res.refused += r.refused
			res.refusedAgain += r.refusedAgain
			res.errors += r.errors
			res.hung += r.hung
			res.retryAfter += r.retryAfter
			res.late += r.late
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// retryAfter is what a 429 asks a client to wait: retry-after-ms, else
// retry-after in seconds, else a second.
func retryAfter(h http.Header) time.Duration {
	if ms, err := strconv.ParseInt(h.Get("Retry-After-Ms"), 10, 64); err == nil && ms >= 0 {
		return time.Duration(ms) * time.Millisecond
	}
	if s, err := strconv.ParseInt(h.Get("Retry-After"), 10, 64); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	return time.Second
}

// upstreamRefused is how many requests the limited mock has refused.
func upstreamRefused(client *http.Client, addr string) int64 {
	resp, err := client.Get("http://" + addr + "/mock/limited")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var c struct{ Refused int64 }
	if json.NewDecoder(resp.Body).Decode(&c) != nil {
		return -1
	}
	return c.Refused
}

// atLimit runs the at-limit scenario on each target in turn, target i in
// front of the limited upstream at upstreams[i], and prints its table.
func atLimit(client *http.Client, upstreams [2]string, targets []target, rpm, conc int, wait, warmup, d time.Duration, redis *redisProc, outage bool) {
	body := chat(16, false, false)(0)
	fmt.Printf("\nat the key's limit: %d rpm (%.1f req/s) enforced by the upstream and configured in llproxy, maxQueueWait %s, %d clients honouring Retry-After, %s per run\n",
		rpm, float64(rpm)/60, wait, conc, d)
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tadmitted req/s\tvs limit\tupstream 429s\tllproxy 429s\tof them late\tmean Retry-After ms\trefused again after Retry-After\tlost\thung\t")
	for i, t := range targets {
		// The buckets start full (a minute's worth): drain them first.
		driveAtLimit(client, t.url, body, conc, max(warmup, 2*time.Second), wait)
		before := upstreamRefused(client, upstreams[i])
		if outage && redis != nil && len(t.more) > 0 {
			redis.outage(d/3, time.Second)
		}
		r := driveAtLimit(client, t.url, body, conc, d, wait)
		r.upstream429 = upstreamRefused(client, upstreams[i]) - before
		rps := float64(r.admitted) / r.elapsed.Seconds()
		again, meanRA := "-", "-"
		if r.refused > 0 {
			meanRA = strconv.FormatInt((r.retryAfter / time.Duration(r.refused)).Milliseconds(), 10)
			again = fmt.Sprintf("%d (%.0f%%)", r.refusedAgain, 100*float64(r.refusedAgain)/float64(r.refused))
		}
		fmt.Fprintf(tw, "%s\t%.2f\t%.3f\t%d\t%d\t%d\t%s\t%s\t%d\t%d\t\n", t.name, rps, rps/(float64(rpm)/60), r.upstream429, r.refused, r.late, meanRA, again, r.errors, r.hung)
	}
	tw.Flush()
}
