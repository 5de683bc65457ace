package catalog

import (
	"io"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/metrics"
	"github.com/llproxy/llproxy/internal/route"
	"github.com/llproxy/llproxy/tokenizer"
)

// TestResolveAndModels: a listed model wins over a "*", the default route
// wins a tie, every model is listed once, and nothing serves an unknown
// model without a "*".
func TestResolveAndModels(t *testing.T) {
	cfg, err := config.Parse([]byte(`{"defaultRoute": "b", "routes": {
	  "a": {"forward": "http://a.invalid", "models": {"gpt-4o": {"rpm": 1, "tpm": 1000, "maxQueueSize": 1, "maxQueueWait": 1},
	                                                   "shared": {"rpm": 1, "tpm": 1000, "maxQueueSize": 1, "maxQueueWait": 1}}},
	  "b": {"forward": "http://b.invalid", "models": {"shared": {"rpm": 1, "tpm": 1000, "maxQueueSize": 1, "maxQueueWait": 1},
	                                                   "*": {"rpm": 1, "tpm": 1000, "maxQueueSize": 1, "maxQueueWait": 1}}},
	  "demo": {"provider": "mock", "mock": {"models": ["mock-1"]}, "models": {"*": {"rpm": 1, "tpm": 1000, "maxQueueSize": 1, "maxQueueWait": 1}}}}}`), nil)
	require.NoError(t, err)
	tok, err := tokenizer.New(tokenizer.Config{})
	require.NoError(t, err)
	m, err := metrics.New(prometheus.NewRegistry(), nil) // never scraped
	require.NoError(t, err)
	routes := map[string]*route.Route{}
	var ordered []*route.Route
	for _, name := range []string{"a", "b", "demo"} {
		rt, err := route.New(name, cfg.Routes[name], route.Options{Tokenizer: tok, Metrics: m,
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		require.NoError(t, err)
		routes[name] = rt
		ordered = append(ordered, rt)
	}
	c := New(ordered, routes["b"])
	assert.Equal(t, "a", c.Resolve("gpt-4o").Name(), "listed by a")
	assert.Equal(t, "b", c.Resolve("shared").Name(), "listed by both: the default route")
	assert.Equal(t, "demo", c.Resolve("mock-1").Name(), "the mock's")
	assert.Equal(t, "b", c.Resolve("anything").Name(), `a "*": the default route first`)
	assert.Equal(t, []string{"gpt-4o", "mock-1", "shared"}, c.Models())
	assert.Nil(t, New(ordered[:1], nil).Resolve("anything"), `no "*": nobody`)
	var names []string
	for _, l := range c.Running() {
		names = append(names, l.Name)
	}
	assert.Equal(t, []string{"gpt-4o", "shared", "mock-1"}, names, "each once, in the routes' order")
}
