package backends

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/llproxy/llproxy/internal/safe"
)

// scanParallel bounds the probes of one scan in flight at once.
const scanParallel = 256

// found is one server a scan found.
type found struct {
	addr   string
	models []Model
}

// Scan probes every port of d for GET /v1/models, concurrently with short
// timeouts, and makes the fleet's discovered backends in d's range what it
// found: new servers join, servers that no longer answer leave. Each model
// is served as DisplayName(id, tag) for each of d's tags. It logs each
// server found and a one-line summary.
func (p *Pool) Scan(ctx context.Context, d DiscoverConfig) {
	start := time.Now()
	client := newProbeClient(time.Duration(d.Timeout))
	defer client.CloseIdleConnections()
	results := make(chan found)
	sem := make(chan struct{}, scanParallel)
	var wg sync.WaitGroup
	go func() {
		defer close(results)
		defer wg.Wait()
		for port := d.PortStart; port <= d.PortEnd; port++ {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				defer safe.Recover(p.log, "discovery probe")
				addr := d.Host + ":" + strconv.Itoa(port)
				models, err := fetchModels(ctx, client, "http://"+addr+"/v1/models")
				if err == nil {
					results <- found{addr: addr, models: models}
				}
			})
		}
	}()
	var all []found
	for f := range results {
		all = append(all, f)
	}
	added, removed, models := p.applyScan(d, all)
	p.invalidate()
	// Only changes are news: a scan that found what the last one did
	// logs at debug level.
	level := slog.LevelDebug
	if added+removed > 0 {
		level = slog.LevelInfo
	}

	for _, f := range all {
		ids := make([]string, len(f.models))
		for i, m := range f.models {
			ids[i] = m.ID
		}
		p.log.Log(ctx, level, "discovery found", "addr", f.addr, "models", strings.Join(ids, ","))
	}
	p.log.Log(ctx, level, fmt.Sprintf("discovery scan %s:%d-%d: %d servers (%d new, %d gone), %d models in %s",
		d.Host, d.PortStart, d.PortEnd, len(all), added, removed, models, time.Since(start).Round(time.Millisecond)))
}

// applyScan replaces the discovered backends of d's range with found.
func (p *Pool) applyScan(d DiscoverConfig, all []found) (added, removed, models int) {
	tags := d.Tags
	if len(tags) == 0 {
		tags = []string{""}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := map[string]bool{}
	for _, f := range all {
		seen[f.addr] = true
		var named []Model
		for _, m := range f.models {
			for _, tag := range tags {
				named = append(named, Model{Name: DisplayName(m.ID, tag), ID: m.ID, Raw: m.Raw})
			}
		}
		models += len(named)
		if b := p.byName(f.addr); b != nil {
			b.models = named
			p.ok(b)
			continue
		}
		u, _ := url.Parse("http://" + f.addr)
		p.backends = append(p.backends, &Backend{Name: f.addr, URL: u, healthPath: p.cfg.HealthCheck.Path,
			discovered: true, healthy: true, models: named, lastCheck: p.now(), sendKey: d.SendAPIKey})
		added++
	}
	kept := p.backends[:0]
	for _, b := range p.backends {
		if b.discovered && inRange(b.Name, d) && !seen[b.Name] && b.Outstanding.Load() == 0 {
			removed++
			continue
		}
		kept = append(kept, b)
	}
	p.backends = kept
	return added, removed, models
}

func inRange(addr string, d DiscoverConfig) bool {
	host, port, ok := strings.Cut(addr, ":")
	if !ok || host != d.Host {
		return false
	}
	n, err := strconv.Atoi(port)
	return err == nil && n >= d.PortStart && n <= d.PortEnd
}
