package server

import (
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/replicas"
)

// exportedMetrics returns the names of every series llproxy exports with a
// config that exercises them all: clients with budgets in tokens and in
// money, prices (and a model without one), a usage ledger, a fleet, a
// mock, shared limits.
func exportedMetrics(t *testing.T) map[string]bool {
	up := newUpstream(t)
	g := newGateway(t, `{"prices": {"mock": {"input": 1, "output": 2}},
	  "usage": {"store": "sqlite:`+filepath.Join(t.TempDir(), "usage.db")+`"},
	  "clients": {"a": {"keys": ["k"], "limits": {"*": {"tokensPerDay": 5000}}, "budget": {"usdPerDay": 10, "usdPerMonth": 100}}}, "routes": {
	  "demo": {"provider": "mock", "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}},
	  "local": {"backends": [{"name": "b", "url": "$UPSTREAM", "models": ["m"]}],
	    "models": {"*": {"rpm": 100, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, up.URL, nil)
	resp := g.post(t, "/demo/v1/chat/completions", `{"model":"mock","messages":[{"role":"user","content":"hi"}]}`, "Authorization", "Bearer k")
	require.Equal(t, 200, resp.StatusCode)
	resp = g.post(t, "/demo/v1/chat/completions", `{"model":"mock","max_tokens":1000000,"messages":[{"role":"user","content":"hi"}]}`, "Authorization", "Bearer k")
	require.Equal(t, 429, resp.StatusCode)
	resp = g.post(t, "/local/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`, "Authorization", "Bearer k")
	require.Equal(t, 200, resp.StatusCode, "a model without a price")
	g.settled()
	st, err := replicas.New(replicas.Config{Redis: "redis://127.0.0.1:1/0"}, slog.New(slog.NewTextHandler(io.Discard, nil)), g.reg)
	require.NoError(t, err)
	defer st.Close()
	families, err := g.reg.Gather()
	require.NoError(t, err)
	names := map[string]bool{}
	for _, f := range families {
		n := f.GetName()
		names[n] = true
		if f.GetType().String() == "HISTOGRAM" {
			names[n+"_bucket"], names[n+"_sum"], names[n+"_count"] = true, true, true
		}
	}
	return names
}

var metricName = regexp.MustCompile(`\bllproxy_[a-z_]+`)

// TestDashboardAndAlertsUseRealMetrics: every metric the Grafana
// dashboard and the alert rules name is one llproxy exports; the rules
// pass promtool's check and their unit tests.
func TestDashboardAndAlertsUseRealMetrics(t *testing.T) {
	names := exportedMetrics(t)
	for _, file := range []string{"../../deploy/grafana/llproxy.json", "../../deploy/prometheus/alerts.yml"} {
		b, err := os.ReadFile(file)
		require.NoError(t, err)
		used := metricName.FindAllString(string(b), -1)
		require.NotEmpty(t, used, file)
		for _, m := range used {
			assert.True(t, names[m], "%s uses %s, which llproxy does not export", file, m)
		}
	}
	b, _ := os.ReadFile("../../deploy/grafana/llproxy.json")
	for _, v := range []string{`"name": "route"`, `"name": "model"`, `"name": "client"`} {
		assert.Contains(t, string(b), v, "a dashboard variable")
	}

	out, err := exec.Command("promtool", "check", "rules", "../../deploy/prometheus/alerts.yml").CombinedOutput()
	require.NoError(t, err, "promtool (Debian package prometheus; .ci/run installs it): %s", out)
	cmd := exec.Command("promtool", "test", "rules", "alerts_test.yml")
	cmd.Dir = "../../deploy/prometheus"
	out, err = cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.True(t, strings.Contains(string(out), "SUCCESS"), "%s", out)
}
