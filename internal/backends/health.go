package backends

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/llproxy/llproxy/internal/safe"
)

// newProbeClient is the client of checks, listings and scans: short dials
// (a closed port answers at once, a dead host must not hold a scan) and
// no keep-alive pool worth the name, since probes are rare.
func newProbeClient(timeout time.Duration) *http.Client {
	dialer := &net.Dialer{Timeout: min(timeout, 2*time.Second)}
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext:         dialer.DialContext,
			MaxIdleConnsPerHost: 2,
			IdleConnTimeout:     30 * time.Second,
		},
	}
}

// Status is one backend's health, as /health reports it.
type Status struct {
	Name       string    `json:"name"`
	URL        string    `json:"url"`
	Healthy    bool      `json:"healthy"`
	Discovered bool      `json:"discovered,omitempty"`
	LastCheck  time.Time `json:"lastCheck"`
	// ErrorCount is the failures in a row; TotalErrors all of them.
	ErrorCount  int      `json:"errorCount"`
	TotalErrors int      `json:"totalErrors"`
	LastError   string   `json:"lastError,omitempty"`
	Models      []string `json:"models"`
	InFlight    int64    `json:"inFlight"`
}

// Status returns every backend's health.
func (p *Pool) Status() []Status {
	p.mu.RLock()
	defer p.mu.RUnlock()
	out := make([]Status, 0, len(p.backends))
	for _, b := range p.backends {
		s := Status{Name: b.Name, URL: b.URL.Redacted(), Healthy: b.healthy, Discovered: b.discovered,
			LastCheck: b.lastCheck, ErrorCount: b.errorCount, TotalErrors: b.totalErrors, LastError: b.lastError,
			Models: []string{}, InFlight: b.Outstanding.Load()}
		for _, m := range b.models {
			s.Models = append(s.Models, m.Name)
		}
		out = append(out, s)
	}
	return out
}

// CheckNow runs one round of active checks on every backend, concurrently,
// and returns when all are done. A backend answering 2xx on its health path
// is healthy; its model list is refreshed from /v1/models.
func (p *Pool) CheckNow(ctx context.Context) {
	p.mu.RLock()
	list := append([]*Backend(nil), p.backends...)
	p.mu.RUnlock()
	var wg sync.WaitGroup
	for _, b := range list {
		if b.managed {
			continue // started on demand: a stopped one is not unhealthy
		}
		wg.Go(safe.Func(p.log, "health check of "+b.Name, func() { p.check(ctx, b) }))
	}
	wg.Wait()
	p.invalidate()
}

func (p *Pool) check(ctx context.Context, b *Backend) {
	err := p.probe(ctx, b.URL.JoinPath(b.healthPath).String())
	var models []Model
	var listErr error
	if err == nil {
		models, listErr = p.listModels(ctx, b)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	b.lastCheck = p.now()
	if err != nil {
		p.fail(b, err)
		return
	}
	p.ok(b)
	if listErr == nil && !b.discovered {
		b.models = mergeStatic(models, b.staticIDs)
	}
}

// probe GETs url and wants a 2xx.
func (p *Pool) probe(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	return nil
}

// Run checks every backend each healthCheck.interval and scans each
// discovery range each every, until ctx ends. The first round of each runs
// at once.
func (p *Pool) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() {
		every(ctx, time.Duration(p.cfg.HealthCheck.Interval), safe.Func(p.log, "health checks", func() { p.CheckNow(ctx) }))
	})
	for i := range p.cfg.Discover {
		d := p.cfg.Discover[i]
		wg.Go(func() {
			every(ctx, time.Duration(d.Every), safe.Func(p.log, "discovery scan", func() { p.Scan(ctx, d) }))
		})
	}
	wg.Wait()
}

func every(ctx context.Context, d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		f()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
