package server

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/ledger"
	"github.com/llproxy/llproxy/internal/pgtest"
	"github.com/llproxy/llproxy/internal/price"
)

// moneyConfig: gpt-4o priced, a team with $0.50 a day.
const moneyConfig = `{
  "prices": {"gpt-4o": {"input": 2.50, "cachedInput": 1.25, "output": 10.00}},
  "clients": {"team": {"keys": ["tk"], "budget": {"usdPerDay": 0.5, "usdPerMonth": 100}}, "free": {"keys": ["fk"]}},
  "routes": {"openai": {"forward": "$UPSTREAM", "settle": "actual", "models": {
    "gpt-4o": {"rpm": 1000000, "tpm": 100000000, "maxQueueSize": 100, "maxQueueWait": 60}}}}%s}`

// usageUpstream answers chat requests with a random usage no more than
// the request's max_tokens, cached tokens included.
func usageUpstream(seed uint64) (http.Handler, *atomic.Int64) {
	var mu sync.Mutex
	rng := rand.New(rand.NewPCG(seed, 1))
	var calls atomic.Int64
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		body, _ := io.ReadAll(r.Body)
		var req struct {
			MaxTokens int `json:"max_tokens"`
		}
		json.Unmarshal(body, &req)
		mu.Lock()
		out := rng.IntN(req.MaxTokens + 1)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],`+
			`"usage":{"prompt_tokens":10,"completion_tokens":%d,"total_tokens":%d,"prompt_tokens_details":{"cached_tokens":4}}}`, out, 10+out)
	}), &calls
}

func chatWith(srv http.Handler, key string, maxTokens int) *httptest.ResponseRecorder {
	body := fmt.Sprintf(`{"model":"gpt-4o","max_tokens":%d,"messages":[{"role":"user","content":"hi"}]}`, maxTokens)
	req := httptest.NewRequest(http.MethodPost, "/openai/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	return rec
}

// A budget in money under 50 concurrent requests with random max_tokens
// is never overrun, and a client over it gets 429 insufficient_quota with
// nothing forwarded.
func TestMoneyBudgetUnderConcurrency(t *testing.T) {
	for seed := range uint64(5) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				up, calls := usageUpstream(seed)
				srv, reg := newBubbleGateway(t, fmt.Sprintf(moneyConfig, ""), up)
				rng := rand.New(rand.NewPCG(seed, 2))
				var wg sync.WaitGroup
				var over, ok atomic.Int64
				for range 50 {
					maxTokens := 1000 + rng.IntN(20000) // up to $0.21 each at $10/M output
					wg.Add(1)
					go func() {
						defer wg.Done()
						for range 4 {
							rec := chatWith(srv, "tk", maxTokens)
							switch rec.Code {
							case http.StatusOK:
								ok.Add(1)
							case http.StatusTooManyRequests:
								over.Add(1)
							default:
								t.Errorf("status %d: %s", rec.Code, rec.Body.String())
							}
						}
					}()
				}
				wg.Wait()
				c, _ := srv.dir.Identify("tk")
				day, _, held := c.SpendNow(time.Now())
				assert.LessOrEqual(t, day, price.FromUSD(0.5), "never overrun")
				assert.Zero(t, held)
				assert.Equal(t, ok.Load(), calls.Load(), "only admitted requests reached the upstream")
				assert.Positive(t, over.Load(), "some were refused")
				m := metricsText2(t, reg)
				assert.Contains(t, m, `llproxy_client_spend_usd_total{client="team",model="gpt-4o",route="openai"}`)
				assert.Contains(t, m, `llproxy_client_budget_usd{client="team",period="day"} 0.5`)

				// Drained: a request that cannot fit what is left.
				before := calls.Load()
				for day < price.FromUSD(0.49) {
					if rec := chatWith(srv, "tk", 100); rec.Code != http.StatusOK {
						break
					}
					day, _, _ = c.SpendNow(time.Now())
				}
				before = calls.Load()
				rec := chatWith(srv, "tk", 100000) // up to $1
				assert.Equal(t, http.StatusTooManyRequests, rec.Code)
				assert.Equal(t, "false", rec.Header().Get("X-Should-Retry"))
				assert.Contains(t, rec.Body.String(), `"insufficient_quota"`)
				assert.Contains(t, rec.Body.String(), "client team has spent $")
				assert.Equal(t, before, calls.Load(), "nothing forwarded")
				retry, err := strconv.Atoi(rec.Header().Get("Retry-After"))
				require.NoError(t, err)
				assert.Positive(t, retry, "until the day's reset")
			})
		})
	}
}

// The ledger, end to end on SQLite: 10,000 mixed requests (answered,
// refused by budget, bad input, no key) make 10,000 rows; /usage sums
// them in JSON and CSV as the rows say.
func TestUsageLedgerEndToEnd(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "usage.db")
	up, _ := usageUpstream(9)
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	g := newGateway(t, fmt.Sprintf(moneyConfig, `, "usage": {"store": "sqlite:`+path+`"}, "adminKeys": ["ak"]`), srv.URL, nil)
	kinds := map[string]int{}
	for i := range 10000 {
		var resp *http.Response
		switch i % 10 {
		case 0:
			resp = g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","messages":[]}`) // no key: 401
			kinds["unauthorized"]++
		case 1:
			resp = g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","max_tokens":-1,"messages":[]}`, "Authorization", "Bearer fk")
			kinds["bad_request"]++
		default:
			resp = g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"x"}]}`,
				"Authorization", "Bearer fk")
			kinds["admitted"]++
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// The rows are written within a second or so.
	get := func(query string) string {
		req, _ := http.NewRequest(http.MethodGet, g.URL+"/usage?"+query, nil)
		req.Header.Set("Authorization", "Bearer ak")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		return readAll(t, resp)
	}
	today := time.Now().UTC().Format("2006-01-02")
	var out struct {
		By   []string
		Rows []map[string]any
	}
	require.Eventually(t, func() bool {
		out.Rows = nil
		json.Unmarshal([]byte(get("from="+today+"&to="+today+"&by=outcome")), &out)
		total := 0.0
		for _, r := range out.Rows {
			total += r["requests"].(float64)
		}
		return total == 10000
	}, 10*time.Second, 100*time.Millisecond, "one row a request")
	got := map[string]float64{}
	for _, r := range out.Rows {
		got[r["outcome"].(string)] = r["requests"].(float64)
	}
	assert.Equal(t, map[string]float64{"unauthorized": 1000, "bad_request": 1000, "admitted": 8000}, got)

	// JSON and CSV agree with the rows themselves.
	st, err := ledger.OpenSQLite(path)
	require.NoError(t, err)
	defer st.Close()
	q, _ := ledger.ParseQuery(today, today, "client,model", time.Now())
	groups, err := st.Sum(context.Background(), q)
	require.NoError(t, err)
	body := get("from=" + today + "&to=" + today + "&by=client,model&format=csv")
	records, err := csv.NewReader(strings.NewReader(body)).ReadAll()
	require.NoError(t, err)
	assert.Equal(t, []string{"client", "model", "requests", "promptTokens", "cachedTokens", "outputTokens", "costUsd"}, records[0])
	require.Len(t, records, len(groups)+1)
	var cost price.Micro
	for i, g := range groups {
		assert.Equal(t, g.Keys["client"], records[i+1][0])
		assert.Equal(t, strconv.FormatInt(g.Requests, 10), records[i+1][2])
		assert.Equal(t, g.Cost.Decimal(), records[i+1][6])
		cost += g.Cost
	}
	assert.Positive(t, cost, "priced")
	var js struct {
		From, To string
		Rows     []map[string]any
	}
	require.NoError(t, json.Unmarshal([]byte(get("from="+today+"&to="+today+"&by=client,model")), &js))
	assert.Equal(t, today+"T00:00:00Z", js.From)
	assert.Len(t, js.Rows, len(groups))

	// Bad queries are 400s naming what is wrong; the ledger is admin-only.
	assert.Contains(t, get("by=team"), "is not one of")
	resp, _ := http.Get(g.URL + "/usage")
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
}

// Two replicas write into one PostgreSQL: the rows of both are there.
func TestTwoReplicasIntoOnePostgres(t *testing.T) {
	pg := pgtest.Start(t)
	up, _ := usageUpstream(3)
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	// The password is ignored by a trust-auth server but must never be logged.
	url := strings.Replace(pg.URL(), "postgres@", "postgres:pw-never-logged@", 1)
	cfg := fmt.Sprintf(moneyConfig, `, "usage": {"store": "`+url+`"}`)
	a := newGateway(t, cfg, srv.URL, nil)
	b := newGateway(t, cfg, srv.URL, nil)
	for i := range 200 {
		g := a
		if i%2 == 1 {
			g = b
		}
		resp := g.post(t, "/openai/v1/chat/completions", `{"model":"gpt-4o","max_tokens":5,"messages":[]}`, "Authorization", "Bearer fk")
		resp.Body.Close()
	}
	require.NoError(t, a.srv.ledger.Close(context.Background()))
	require.NoError(t, b.srv.ledger.Close(context.Background()))
	st, err := ledger.OpenPostgres(pg.URL())
	require.NoError(t, err)
	defer st.Close()
	q, _ := ledger.ParseQuery("", "", "client", time.Now())
	groups, err := st.Sum(context.Background(), q)
	require.NoError(t, err)
	require.Len(t, groups, 1)
	assert.Equal(t, int64(200), groups[0].Requests)
	assert.Contains(t, a.logs.String(), "usage ledger")
	assert.NotContains(t, a.logs.String(), "pw-never-logged", "the store is named without its password")
}

// The built binary keeps its ledger in usage.db next to its config; on
// SIGTERM it writes what it holds before it exits, so no row of a request
// it answered is lost to a batch that was not yet due.
func TestSIGTERMFlushesTheLedger(t *testing.T) {
	bin := llproxyBinary(t)
	up, _ := usageUpstream(5)
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	cfg := strings.ReplaceAll(fmt.Sprintf(moneyConfig, ""), "$UPSTREAM", srv.URL)
	require.NoError(t, os.WriteFile(cfgPath, []byte(cfg), 0o600))
	base, cmd, logs := startBinary(t, bin, cfgPath)
	const n = 300
	for range n {
		req, _ := http.NewRequest(http.MethodPost, base+"/openai/v1/chat/completions",
			strings.NewReader(`{"model":"gpt-4o","max_tokens":5,"messages":[]}`))
		req.Header.Set("Authorization", "Bearer tk")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	require.NoError(t, cmd.Wait())
	assert.Contains(t, logs.String(), "usage.db")

	st, err := ledger.OpenSQLite(filepath.Join(dir, "usage.db"))
	require.NoError(t, err)
	defer st.Close()
	q, _ := ledger.ParseQuery("2000-01-01", "2100-01-01", "client", time.Now())
	groups, err := st.Sum(context.Background(), q)
	require.NoError(t, err)
	require.Len(t, groups, 1)
	assert.Equal(t, int64(n), groups[0].Requests, "every answered request is a row")
}

// A PostgreSQL that does not answer at start does not stop the gateway:
// it serves, keeps the rows in memory, and says why in the log and in
// /healthz's body while /healthz stays 200.
func TestUnreachablePostgresAtStart(t *testing.T) {
	bin := llproxyBinary(t)
	up, _ := usageUpstream(6)
	srv := httptest.NewServer(up)
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	dead := "postgres://postgres:pw-never-logged@" + port(t) + "/usage?sslmode=disable&connect_timeout=2"
	cfg := strings.ReplaceAll(fmt.Sprintf(moneyConfig, `, "usage": {"store": "`+dead+`"}`), "$UPSTREAM", srv.URL)
	require.NoError(t, os.WriteFile(cfgPath, []byte(cfg), 0o600))
	base, _, logs := startBinary(t, bin, cfgPath)
	req, _ := http.NewRequest(http.MethodPost, base+"/openai/v1/chat/completions",
		strings.NewReader(`{"model":"gpt-4o","max_tokens":5,"messages":[]}`))
	req.Header.Set("Authorization", "Bearer tk")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	hr, err := http.Get(base + "/healthz")
	require.NoError(t, err)
	body := readAll(t, hr)
	assert.Equal(t, http.StatusOK, hr.StatusCode)
	assert.Contains(t, body, `"status":"degraded"`)
	assert.Contains(t, body, `"usage"`)
	assert.Contains(t, logs.String(), "rows are kept in memory")
	assert.NotContains(t, logs.String()+body, "pw-never-logged")
}
