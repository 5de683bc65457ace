package server

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestNoSecretReachesAModelServer: a managed model server's environment
// holds none of the config's secrets, whichever key path they come from
// through ${VAR}: client keys, team keys, admin keys, the metrics key, the
// routes' API keys, the Redis URL and its password.
func TestNoSecretReachesAModelServer(t *testing.T) {
	bin := llproxyBinary(t)
	secrets := map[string]string{
		"T_CLIENT_KEY":  "sk-client-key-0001",
		"T_TEAM_KEY":    "sk-team-key-0002",
		"T_ADMIN_KEY":   "sk-admin-key-0003",
		"T_METRICS_KEY": "sk-metrics-key-0004",
		"T_API_KEY":     "sk-upstream-key-0005",
		"T_REDIS_URL":   "redis://:redis-password-0006@127.0.0.1:1/0",
		"T_REDIS_PW":    "redis-password-0006", // the password alone, as some deployments also set it
	}
	for k, v := range secrets {
		t.Setenv(k, v)
	}
	t.Setenv("T_HARMLESS", "kept-for-the-server")
	envFile := filepath.Join(t.TempDir(), "env")
	addr := port(t)
	cmd, _ := json.Marshal([]string{"sh", "-c", "env > " + envFile + "; exec " + bin + " mock-server -listen " + addr})
	g := newGateway(t, `{
	  "clientKeys": ["${T_CLIENT_KEY}"],
	  "clients": {"team": {"keys": ["${T_TEAM_KEY}"]}},
	  "adminKeys": ["${T_ADMIN_KEY}"],
	  "metricsKey": "${T_METRICS_KEY}",
	  "shared": {"redis": "${T_REDIS_URL}", "timeout": "50ms"},
	  "routes": {"local": {"apiKey": "${T_API_KEY}", "backends": [
	    {"name": "m", "url": "http://`+addr+`", "cmd": `+string(cmd)+`, "models": ["m"]}], `+fleetModels+`}}}`, "", secrets)
	resp := g.post(t, "/local/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":"hi"}]}`,
		"Authorization", "Bearer sk-team-key-0002")
	require.Equal(t, 200, resp.StatusCode, readAll(t, resp))
	var got []byte
	require.Eventually(t, func() bool {
		var err error
		got, err = os.ReadFile(envFile)
		return err == nil && len(got) > 0
	}, 10*time.Second, 10*time.Millisecond)
	for k, v := range secrets {
		assert.NotContains(t, string(got), v, "%s reached the model server", k)
	}
	assert.True(t, strings.Contains(string(got), "T_HARMLESS=kept-for-the-server"), "the rest of the environment passes")
}

// TestUpstreamErrorsNeverQuoteAKey: an upstream error that quotes the key
// it was sent reaches the client with the key redacted, on a scheduled
// request and on one forwarded unscheduled.
func TestUpstreamErrorsNeverQuoteAKey(t *testing.T) {
	up := newUpstream(t)
	up.setHandler(func(w http.ResponseWriter, r *http.Request, body []byte) {
		key := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprintf(w, `{"error":{"message":"Incorrect API key provided: %s. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}`, key)
	})
	g := newGateway(t, `{"clients": {"team": {"keys": ["sk-team-key-0002"]}},
	  "routes": {"openai": {"forward": "$UPSTREAM", "apiKey": "sk-upstream-secret-0005",
	  "models": {"*": {"rpm": 600, "tpm": 100000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`, up.URL, nil)
	for _, tc := range []struct{ method, path, body string }{
		{http.MethodPost, "/openai/v1/chat/completions", `{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`},
		{http.MethodGet, "/openai/v1/models", ""},
	} {
		req, _ := http.NewRequest(tc.method, g.URL+tc.path, strings.NewReader(tc.body))
		req.Header.Set("Authorization", "Bearer sk-team-key-0002")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		body := readAll(t, resp)
		resp.Body.Close()
		assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
		assert.NotContains(t, body, "sk-upstream-secret-0005", tc.path)
		assert.Contains(t, body, "Incorrect API key provided: [redacted].", tc.path)
		assert.Equal(t, strconv.Itoa(len(body)), resp.Header.Get("Content-Length"), "the length follows")
	}
}
