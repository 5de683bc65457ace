package backends

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/valyala/fastjson"

	"github.com/llproxy/llproxy/internal/safe"
)

// listModels GETs a backend's /v1/models and returns its models under their
// own ids (discovered backends rename them; see Scan).
func (p *Pool) listModels(ctx context.Context, b *Backend) ([]Model, error) {
	return fetchModels(ctx, p.client, b.URL.JoinPath("/v1/models").String())
}

// fetchModels reads an OpenAI-compatible model list ({"data":[{"id":...}]};
// Ollama's and some servers' {"models":[{"name"|"model"|"id":...}]} too).
func fetchModels(ctx context.Context, client *http.Client, url string) ([]Model, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	v, err := fastjson.ParseBytes(body)
	if err != nil {
		return nil, fmt.Errorf("GET %s: not a model list: %w", url, err)
	}
	entries := v.GetArray("data")
	if entries == nil {
		entries = v.GetArray("models")
	}
	if entries == nil {
		return nil, fmt.Errorf("GET %s: no data array", url)
	}
	var out []Model
	for _, e := range entries {
		id := string(e.GetStringBytes("id"))
		for _, k := range []string{"model", "name"} {
			if id == "" {
				id = string(e.GetStringBytes(k))
			}
		}
		if id == "" {
			continue
		}
		out = append(out, Model{Name: id, ID: id, Raw: e.MarshalTo(nil)})
	}
	return out, nil
}

// mergeStatic adds the configured ids a backend does not list itself.
func mergeStatic(models []Model, ids []string) []Model {
	for _, id := range ids {
		if !slices.ContainsFunc(models, func(m Model) bool { return m.ID == id }) {
			models = append(models, Model{Name: id, ID: id})
		}
	}
	return models
}

// DisplayName is the name a discovered model is served under: its id
// without directory and file extension ("/models/Qwen2.5-7B-Q4_K_M.gguf" ->
// "Qwen2.5-7B-Q4_K_M"), then ":tag".
func DisplayName(id, tag string) string {
	name := path.Base(strings.ReplaceAll(id, "\\", "/"))
	if ext := path.Ext(name); ext != "" && len(ext) <= 13 && !strings.ContainsAny(ext[1:], "0123456789") {
		name = strings.TrimSuffix(name, ext)
	}
	if tag != "" {
		name += ":" + tag
	}
	return name
}

// ModelsJSON is the fleet's aggregated /v1/models: every model of every
// healthy backend, once, each entry as its backend lists it (id replaced by
// the name clients use, with upstream_id keeping the backend's own) and
// with "backends" naming who serves it. It is cached for modelsCacheTTL;
// when the cache is stale the healthy backends are asked again first.
func (p *Pool) ModelsJSON(ctx context.Context) []byte {
	p.cacheMu.Lock()
	defer p.cacheMu.Unlock()
	if p.cached != nil && p.now().Sub(p.cachedAt) < time.Duration(p.cfg.ModelsCacheTTL) {
		return p.cached
	}
	p.refreshListings(ctx)
	p.cached, p.cachedAt = p.aggregate(), p.now()
	return p.cached
}

// invalidate drops the cached listing (health or membership changed).
func (p *Pool) invalidate() {
	p.cacheMu.Lock()
	p.cached = nil
	p.cacheMu.Unlock()
}

// refreshListings asks every healthy static backend for its models.
// Discovered backends are refreshed by their scans.
func (p *Pool) refreshListings(ctx context.Context) {
	p.mu.RLock()
	var list []*Backend
	for _, b := range p.backends {
		if b.healthy && !b.discovered && !b.managed {
			list = append(list, b)
		}
	}
	p.mu.RUnlock()
	ctx, cancel := context.WithTimeout(ctx, time.Duration(p.cfg.HealthCheck.Timeout))
	defer cancel()
	var wg sync.WaitGroup
	for _, b := range list {
		wg.Go(func() {
			defer safe.Recover(p.log, "model listing of "+b.Name)
			models, err := p.listModels(ctx, b)
			if err != nil {
				return
			}
			p.mu.Lock()
			b.models = mergeStatic(models, b.staticIDs)
			p.mu.Unlock()
		})
	}
	wg.Wait()
}

func (p *Pool) aggregate() []byte {
	p.mu.RLock()
	defer p.mu.RUnlock()
	type entry struct {
		raw      map[string]any
		backends []string
	}
	byName := map[string]*entry{}
	var order []string
	for _, b := range p.backends {
		if !b.healthy {
			continue
		}
		for _, m := range b.models {
			e, ok := byName[m.Name]
			if !ok {
				raw := map[string]any{}
				if m.Raw != nil {
					json.Unmarshal(m.Raw, &raw)
				}
				raw["id"] = m.Name
				if _, ok := raw["object"]; !ok {
					raw["object"] = "model"
				}
				if _, ok := raw["owned_by"]; !ok {
					raw["owned_by"] = b.Name
				}
				if m.ID != m.Name {
					raw["upstream_id"] = m.ID
				}
				e = &entry{raw: raw}
				byName[m.Name] = e
				order = append(order, m.Name)
			}
			e.backends = append(e.backends, b.Name)
		}
	}
	slices.Sort(order)
	data := make([]map[string]any, 0, len(order))
	for _, name := range order {
		e := byName[name]
		e.raw["backends"] = e.backends
		data = append(data, e.raw)
	}
	out, _ := json.Marshal(map[string]any{"object": "list", "data": data})
	return out
}
