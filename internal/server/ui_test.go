package server

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStatusPageInABrowser loads /ui in headless Chromium (Debian's
// chromium, driven by playwright-core), sees a queue fill and drain while
// the test sends a burst, and clicks unload on a managed backend.
func TestStatusPageInABrowser(t *testing.T) {
	dir := filepath.Join("testdata", "ui")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "playwright-core")); err != nil {
		t.Fatalf("playwright-core is not installed: run `npm ci --prefix %s` (./test.sh does): %v", dir, err)
	}
	bin := llproxyBinary(t)
	pa := port(t)
	cmdJSON := mockServerCmd(bin, pa)
	g := newGateway(t, `{"adminKeys": ["admin-key"], "routes": {
	  "slow": {"provider": "mock", "mock": {"latency": "400ms", "models": ["slow-model"]},
	    "models": {"slow-model": {"rpm": 1000, "tpm": 1000000, "maxQueueSize": 50, "maxQueueWait": 30, "maxConcurrent": 1}}},
	  "local": {"backends": [{"name": "a", "url": "http://`+pa+`", "cmd": `+cmdJSON+`, "models": ["a-model"], "unloadAfter": "1h"}],
	    `+fleetModels+`}}}`, "", nil)
	// The managed backend runs (it starts on demand).
	status, _ := ask(t, g, "/local/v1/chat/completions", `{"model":"a-model","messages":[{"role":"user","content":"hi"}]}`)
	require.Equal(t, http.StatusOK, status)

	// Without the key, the page is refused (and the browser asked for it).
	resp, err := http.Get(g.URL + "/ui")
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	assert.Contains(t, resp.Header.Get("WWW-Authenticate"), "Basic")

	cmd := exec.Command("node", "ui.mjs")
	cmd.Dir = dir
	shot := filepath.Join(t.TempDir(), "status.png")
	if p := os.Getenv("LLPROXY_UI_SCREENSHOT"); p != "" {
		shot = p // docs/status-page.png is made so
	}
	cmd.Env = append(os.Environ(), "GATEWAY_URL="+g.URL, "ADMIN_KEY=admin-key", "SCREENSHOT="+shot)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	defer cmd.Process.Kill()
	lines := bufio.NewScanner(stdout)
	next := func() string {
		lines.Scan()
		return lines.Text()
	}
	require.Equal(t, "ready", next(), stderr.String())

	// A burst: one slot, 400 ms a request, so they queue and drain.
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			r, err := http.Post(g.URL+"/slow/v1/chat/completions", "application/json",
				strings.NewReader(`{"model":"slow-model","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`))
			if err == nil {
				io.Copy(io.Discard, r.Body)
				r.Body.Close()
			}
		})
	}
	io.WriteString(stdin, "go\n")
	stdin.Close()
	filled := next()
	assert.True(t, strings.HasPrefix(filled, "filled "), "%s %s", filled, stderr.String())
	assert.Equal(t, "drained", next(), stderr.String())
	assert.Equal(t, "charts 1", next())
	wg.Wait()
	assert.Equal(t, "unloaded", next(), stderr.String())
	assert.Equal(t, "done", next(), stderr.String())
	require.NoError(t, cmd.Wait(), stderr.String())
	info, err := os.Stat(shot)
	require.NoError(t, err)
	assert.Positive(t, info.Size())
}

// TestSpendViewInABrowser reads the status page's spend view in headless
// Chromium: each client's spend today and this month (against its budget
// where it has one) equals GET /clients', and its chart draws the days
// the usage ledger holds.
func TestSpendViewInABrowser(t *testing.T) {
	dir := filepath.Join("testdata", "ui")
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "playwright-core")); err != nil {
		t.Fatalf("playwright-core is not installed: run `npm ci --prefix %s` (./test.sh does): %v", dir, err)
	}
	up, _ := usageUpstream(11)
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	store := filepath.Join(t.TempDir(), "usage.db")
	g := newGateway(t, fmt.Sprintf(moneyConfig, `, "adminKeys": ["admin-key"], "usage": {"store": "sqlite:`+store+`"}`), srv.URL, nil)
	for i := range 30 {
		key := "tk"
		if i%3 == 0 {
			key = "fk"
		}
		resp := g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":"hi"}]}`,
			"Authorization", "Bearer "+key)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
	admin := func(path string, v any) {
		req, _ := http.NewRequest(http.MethodGet, g.URL+path, nil)
		req.Header.Set("Authorization", "Bearer admin-key")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.NoError(t, json.NewDecoder(resp.Body).Decode(v))
	}
	// The ledger has written every row (it batches by the second).
	require.Eventually(t, func() bool {
		var v spendView
		admin("/ui/spend", &v)
		return len(v.Days) == 2
	}, 10*time.Second, 50*time.Millisecond)
	var cs struct{ Clients []clientView }
	admin("/clients", &cs)
	want := map[string]clientSpend{}
	for _, c := range cs.Clients {
		want[c.Name] = c.Spend
	}
	require.NotEqual(t, "0", want["team"].TodayUSD.String(), "the team has spent")

	cmd := exec.Command("node", "spend.mjs")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GATEWAY_URL="+g.URL, "ADMIN_KEY=admin-key")
	if p := os.Getenv("LLPROXY_SPEND_SCREENSHOT"); p != "" {
		cmd.Env = append(cmd.Env, "SCREENSHOT="+p)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, stderr.String())
	var seen map[string]struct {
		Today, TodayText, Month, MonthText string
		ChartDays                          int
	}
	require.NoError(t, json.Unmarshal(out, &seen), string(out))
	require.Len(t, seen, 2)
	for name, w := range want {
		s := seen[name]
		assert.Equal(t, w.TodayUSD.String(), s.Today, name)
		assert.Equal(t, w.MonthUSD.String(), s.Month, name)
		assert.Equal(t, 1, s.ChartDays, name)
	}
	assert.True(t, strings.HasSuffix(seen["team"].TodayText, " of $0.50"), "against its daily budget: %q", seen["team"].TodayText)
	assert.True(t, strings.HasSuffix(seen["team"].MonthText, " of $100.00"), "against its monthly budget: %q", seen["team"].MonthText)
	assert.NotContains(t, seen["free"].TodayText, "of", "no budget: the amount alone")
}
