package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config/yamljson"
)

func env(vars map[string]string) LookupEnv {
	return func(k string) (string, bool) { v, ok := vars[k]; return v, ok }
}

func TestExampleConfigLoadsWithNoEnvironment(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	cfg, err := Load(filepath.Join(filepath.Dir(file), "../../config-example.json"), env(nil))
	require.NoError(t, err)
	assert.Equal(t, ":8080", cfg.Listen)
	assert.Equal(t, "", cfg.Routes["openai"].APIKey.Value(), "no key: clients' own keys pass through")
	assert.Equal(t, "mock", cfg.Routes["demo"].Provider)
	assert.Equal(t, 30*time.Second, time.Duration(cfg.Routes["openai"].Models["gpt-4o"].MaxQueueWait))
	assert.Equal(t, DefaultMaxTokens, cfg.Routes["openai"].Models["gpt-4o"].DefaultMaxTokens)
}

const issueConfig = `{
  "listen": ":8080",
  "clientKeys": ["${TEAM_KEY_A}", "${TEAM_KEY_B}"],
  "routes": {
    "openai": {
      "forward": "https://api.openai.com",
      "provider": "openai",
      "apiKey": "${OPENAI_API_KEY}",
      "models": {
        "gpt-4o":      { "maxQueueSize": 10, "maxQueueWait": 30, "rpm": 200, "tpm": 40000 },
        "gpt-4o-mini": { "maxQueueSize": 100, "maxQueueWait": "1500ms", "rpm": 500, "tpm": 200000, "defaultMaxTokens": 512 },
        "*":           { "maxQueueSize": 10, "maxQueueWait": 5, "rpm": 60, "tpm": 10000 }
      }
    },
    "demo": { "provider": "mock", "models": { "*": { "maxQueueSize": 5, "maxQueueWait": 2, "rpm": 30, "tpm": 20000 } } }
  }
}`

func TestIssueShapeParses(t *testing.T) {
	cfg, err := Parse([]byte(issueConfig), env(map[string]string{
		"TEAM_KEY_A": "team-a", "TEAM_KEY_B": "team-b", "OPENAI_API_KEY": "sk-secret-123",
	}))
	require.NoError(t, err)
	assert.Equal(t, []Secret{"team-a", "team-b"}, cfg.ClientKeys)
	r := cfg.Routes["openai"]
	assert.Equal(t, "sk-secret-123", r.APIKey.Value())
	mini := r.Models["gpt-4o-mini"]
	assert.Equal(t, 1500*time.Millisecond, time.Duration(mini.MaxQueueWait))
	assert.Equal(t, 512, mini.DefaultMaxTokens)
	assert.Equal(t, 200000, mini.TPM)
}

func TestMissingVariableIsNamedAndSecretsNeverPrint(t *testing.T) {
	_, err := Parse([]byte(issueConfig), env(map[string]string{"TEAM_KEY_A": "a", "TEAM_KEY_B": "b"}))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "routes.openai.apiKey: environment variable OPENAI_API_KEY is not set")

	cfg, err := Parse([]byte(issueConfig), env(map[string]string{"TEAM_KEY_A": "a", "TEAM_KEY_B": "b", "OPENAI_API_KEY": "sk-secret-123"}))
	require.NoError(t, err)
	for _, format := range []string{"%v", "%+v", "%#v", "%s"} {
		assert.NotContains(t, fmt.Sprintf(format, cfg.Routes["openai"]), "sk-secret-123", format)
	}

	// A key written in the file with a stray "${" is not quoted back.
	_, err = Parse([]byte(`{"routes": {"openai": {"forward": "https://x", "apiKey": "sk-live-abc${oops",
	  "models": {"*": {"rpm": 1, "tpm": 1, "maxQueueSize": 1, "maxQueueWait": 1}}}}}`), env(nil))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "routes.openai.apiKey: unterminated ${ at byte 11")
	assert.NotContains(t, err.Error(), "sk-live-abc")
}

func TestErrorsNameTheJSONPath(t *testing.T) {
	bad := `{
  "listen": ":8080",
  "routes": {
    "openai": {
      "forward": "ftp://nowhere",
      "models": {
        "gpt-4o": { "maxQueueSize": -1, "maxQueueWait": "soon", "rpm": 0, "tpm": 0, "tmp": 3 }
      }
    },
    "x": { "provider": "bedrock", "models": { "*": { "rpm": "sixty", "tpm": 1 } } },
    "metrics": { "provider": "mock", "models": {} }
  },
  "logLevel": 7
}`
	_, err := Parse([]byte(bad), env(nil))
	require.Error(t, err)
	// Shape errors come first, all of them.
	for _, want := range []string{
		"routes.openai.models.gpt-4o.maxQueueWait: invalid duration",
		"routes.openai.models.gpt-4o.tmp: unknown field",
		"routes.x.models.*.rpm: must be an integer, got a string",
		"logLevel: must be a string, got the number 7",
	} {
		assert.Contains(t, err.Error(), want)
	}
	fixed := strings.NewReplacer(`"soon"`, `1`, `, "tmp": 3`, ``, `"sixty"`, `60`, `"logLevel": 7`, `"logLevel": "info"`).Replace(bad)
	_, err = Parse([]byte(fixed), env(nil))
	require.Error(t, err)
	for _, want := range []string{
		"routes.openai.forward: must be an http or https URL",
		"routes.openai.models.gpt-4o.tpm: must be > 0, got 0",
		"routes.openai.models.gpt-4o.rpm: must be > 0, got 0",
		"routes.openai.models.gpt-4o.maxQueueSize: must be >= 0, got -1",
		"routes.x.provider: unknown provider \"bedrock\"",
		"routes.metrics: route name is reserved",
		"routes.metrics.models: must list at least one model",
	} {
		assert.Contains(t, err.Error(), want)
	}
}

func TestSyntaxErrorHasLine(t *testing.T) {
	_, err := Parse([]byte("{\n\"listen\": ,\n}"), env(nil))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "line 2")
}

func TestExpandDefaults(t *testing.T) {
	s, err := expandString("a${X:-dflt}b${Y}c", env(map[string]string{"Y": "y"}))
	require.NoError(t, err)
	assert.Equal(t, "adfltbyc", s)
	_, err = expandString("${", env(nil))
	assert.Error(t, err)
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.json"), env(nil))
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestFleetConfigErrorsNameThePath(t *testing.T) {
	bad := `{"defaultRoute": "nope", "routes": {"local": {
	  "forward": "http://x",
	  "backends": [
	    {"name": "a", "url": "ftp://x"},
	    {"name": "a", "url": "http://127.0.0.1:1", "cmd": ["llama-server"], "env": ["NOEQUALS"]},
	    {"name": "c", "url": "http://127.0.0.1:2", "group": "gpu"}],
	  "rules": [{"model": "m", "backend": "zzz"}],
	  "defaultBackend": "ghost",
	  "discover": [{"portStart": 9000, "portEnd": 8000, "tags": ["a:b"]}],
	  "models": {"*": {"rpm": 1, "tpm": 1, "maxConcurrent": -1}}}}}`
	_, err := Parse([]byte(bad), env(nil))
	require.Error(t, err)
	for _, want := range []string{
		"defaultRoute: no route named \"nope\"",
		"routes.local.forward: a route has either forward or backends/discover, not both",
		"routes.local.backends[0].url: must be an http or https URL",
		"routes.local.backends[1].name: \"a\" is used twice",
		"routes.local.backends[1].models: required with cmd",
		"routes.local.backends[1].env[0]: must be KEY=VALUE",
		"routes.local.backends[2].group: only backends with cmd can be grouped",
		"routes.local.rules[0].backend: no backend named \"zzz\"",
		"routes.local.defaultBackend: no backend named \"ghost\"",
		"routes.local.discover[0]: ports must satisfy",
		"routes.local.discover[0].tags[0]: must be non-empty without ':'",
		"routes.local.models.*.maxConcurrent: must be >= 0",
	} {
		assert.Contains(t, err.Error(), want)
	}
}

func TestFleetDefaults(t *testing.T) {
	cfg, err := Parse([]byte(`{"routes": {"local": {"discover": [{"portStart": 8000, "portEnd": 8001}],
	  "healthCheck": {"interval": "10s"}, "models": {"*": {"rpm": 1, "tpm": 1}}}}}`), env(nil))
	require.NoError(t, err)
	r := cfg.Routes["local"]
	assert.True(t, r.Fleet())
	assert.Equal(t, SettleActual, r.Settle, "local servers charge what they use")
	assert.Equal(t, "/v1/models", r.HealthCheck.Path)
	assert.Equal(t, 3, r.HealthCheck.FailureThreshold)
	assert.Equal(t, 20*time.Second, time.Duration(r.ModelsCacheTTL), "the smaller of 30s and twice the interval")
	assert.Equal(t, "127.0.0.1", r.Discover[0].Host)
	assert.Equal(t, 30*time.Second, time.Duration(r.MaxSwapWait))
}

func TestEveryErrorInOnePass(t *testing.T) {
	_, err := Parse([]byte(`{"listen": "8080", "maxBodyBytes": "big",
	  "routes": {"openai": {"forward": "https://api.openai.com/v1/", "models": {"gpt-4o": {"rpm": "x", "tpm": 0}}}}}`), nil)
	require.Error(t, err)
	for _, want := range []string{
		`listen: want host:port or :port, got "8080"`,
		"maxBodyBytes: must be",
		"routes.openai.models.gpt-4o.rpm: must be",
		"routes.openai.models.gpt-4o.tpm: must be > 0, got 0",
		"routes.openai.forward: ends in /v1",
	} {
		assert.Contains(t, err.Error(), want)
	}
	assert.NotContains(t, err.Error(), "rpm: must be > 0", "a value of the wrong type is reported once, as such")
}

func TestNumbersFromTheEnvironment(t *testing.T) {
	env := func(k string) (string, bool) {
		v, ok := map[string]string{"RPM": "120", "STREAM_USAGE": "false"}[k]
		return v, ok
	}
	cfg, err := Parse([]byte(`{"routes": {"openai": {"forward": "https://api.openai.com", "injectStreamUsage": "${STREAM_USAGE}",
	  "models": {"*": {"rpm": "${RPM:-60}", "tpm": "${TPM:-1000}", "maxQueueSize": 1, "maxQueueWait": 1}}}}}`), env)
	require.NoError(t, err)
	m := cfg.Routes["openai"].Models["*"]
	assert.Equal(t, 120, m.RPM)
	assert.Equal(t, 1000, m.TPM, "the default")
	assert.False(t, *cfg.Routes["openai"].InjectStreamUsage)
	_, err = Parse([]byte(`{"routes": {"openai": {"forward": "https://api.openai.com",
	  "models": {"*": {"rpm": "${RPM:-lots}", "tpm": 1, "maxQueueSize": 1, "maxQueueWait": 1}}}}}`), func(string) (string, bool) { return "", false })
	require.Error(t, err)
	assert.Contains(t, err.Error(), "routes.openai.models.*.rpm: must be an integer")
}

func TestYAMLConfig(t *testing.T) {
	dir := t.TempDir()
	y := filepath.Join(dir, "config.yaml")
	require.NoError(t, os.WriteFile(y, []byte(`
listen: ":9090"
clients:
  search: {keys: ["k1"], weight: 3}
routes:
  zeta:
    provider: mock
    models:
      "*": {rpm: 30, tpm: 20000, maxQueueSize: 5, maxQueueWait: 1500ms}
  alpha:
    forward: https://api.openai.com
    apiKey: ${KEY:-sk-x}
    models:
      gpt-4o: &limits {rpm: 200, tpm: 40000, maxQueueSize: 10, maxQueueWait: 30}
      gpt-4o-mini: *limits
`), 0o600))
	cfg, err := Load(y, func(string) (string, bool) { return "", false })
	require.NoError(t, err)
	assert.Equal(t, ":9090", cfg.Listen)
	assert.Equal(t, []string{"zeta", "alpha"}, cfg.RouteOrder, "the order as written")
	assert.Equal(t, 40000, cfg.Routes["alpha"].Models["gpt-4o-mini"].TPM, "anchors and aliases")
	assert.Equal(t, 1500*time.Millisecond, time.Duration(cfg.Routes["zeta"].Models["*"].MaxQueueWait))
	assert.Equal(t, "sk-x", cfg.Routes["alpha"].APIKey.Value())
	assert.Equal(t, 3, cfg.Clients["search"].Weight)

	bad := filepath.Join(dir, "bad.yml")
	require.NoError(t, os.WriteFile(bad, []byte("routes:\n  alpha:\n    forward: https://x\n    models:\n      gpt-4o: {rpm: 1, tpm: 0}\n"), 0o600))
	_, err = Load(bad, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "routes.alpha.models.gpt-4o.tpm: must be > 0, got 0", "the same paths as JSON")
	require.NoError(t, os.WriteFile(bad, []byte("routes: [unclosed\n"), 0o600))
	_, err = Load(bad, nil)
	assert.ErrorContains(t, err, "invalid YAML")
}

// TestYAMLMergeKeysAndIntegerForms: <<: *defaults merges a mapping (the
// mapping's own keys win; earlier merges win over later ones), and YAML's
// integer forms are read as integers.
func TestYAMLMergeKeysAndIntegerForms(t *testing.T) {
	y := filepath.Join(t.TempDir(), "config.yaml")
	require.NoError(t, os.WriteFile(y, []byte(`
x-defaults: &defaults {rpm: 200, tpm: 40000, maxQueueSize: 10, maxQueueWait: 30}
x-small: &small {tpm: 1000, maxQueueSize: 2}
routes:
  openai:
    forward: https://api.openai.com
    models:
      gpt-4o:
        <<: *defaults
        tpm: 50000
      gpt-4o-mini:
        <<: [*small, *defaults]
      o1: {<<: *defaults, rpm: 0x10, maxQueueSize: 1_000}
`), 0o600))
	_, err := Load(y, nil)
	// x-defaults and x-small are not fields of the config: the merge works
	// and the unknown fields are still named.
	require.Error(t, err)
	assert.Contains(t, err.Error(), "x-defaults")
	assert.NotContains(t, err.Error(), "<<")

	data, err := yamljson.ToJSON([]byte(`
d: &d {rpm: 200, tpm: 40000}
s: &s {tpm: 1000, maxQueueSize: 2}
a: {<<: *d, tpm: 50000}
b: {<<: [*s, *d]}
c: {<<: *d, rpm: 0x10, hex: -0x1F, oct: 0o17, bin: 0b101, big: 1_000, f: 1.5}
`))
	require.NoError(t, err)
	var got map[string]map[string]any
	require.NoError(t, json.Unmarshal(data, &got), string(data))
	assert.Equal(t, map[string]any{"rpm": 200.0, "tpm": 50000.0}, got["a"], "its own key wins")
	assert.Equal(t, map[string]any{"rpm": 200.0, "tpm": 1000.0, "maxQueueSize": 2.0}, got["b"], "the earlier merge wins")
	assert.Equal(t, map[string]any{"rpm": 16.0, "tpm": 40000.0, "hex": -31.0, "oct": 15.0, "bin": 5.0, "big": 1000.0, "f": 1.5}, got["c"])

	_, err = yamljson.ToJSON([]byte("a: &a x\nb: {<<: *a}\n"))
	assert.ErrorContains(t, err, "merge key (<<) takes a mapping")
}

// TestYAMLAliasBombIsRefused: nested aliases that would expand to hundreds
// of millions of values are refused with a clear error, at once.
func TestYAMLAliasBombIsRefused(t *testing.T) {
	var b strings.Builder
	b.WriteString("a0: &a0 [x, x, x, x, x, x, x, x, x]\n")
	for i := 1; i <= 9; i++ {
		fmt.Fprintf(&b, "a%d: &a%d [*a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d, *a%d]\n", i, i, i-1, i-1, i-1, i-1, i-1, i-1, i-1, i-1, i-1)
	}
	_, err := yamljson.ToJSON([]byte(b.String()))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "aliases are expanded")
	// The same through merge keys.
	b.Reset()
	b.WriteString("m0: &m0 {k: v}\n")
	for i := 1; i <= 30; i++ {
		fmt.Fprintf(&b, "m%d: &m%d {<<: [*m%d, *m%d], k%d: v}\n", i, i, i-1, i-1, i)
	}
	_, err = yamljson.ToJSON([]byte(b.String()))
	assert.ErrorContains(t, err, "aliases are expanded")
	// A long string aliased many times: few values, many bytes.
	b.Reset()
	fmt.Fprintf(&b, "s: &s %s\nl1: &l1 [%s]\nl2: [%s]\n", strings.Repeat("x", 1<<20),
		strings.TrimSuffix(strings.Repeat("*s, ", 100), ", "), strings.TrimSuffix(strings.Repeat("*l1, ", 100), ", "))
	_, err = yamljson.ToJSON([]byte(b.String()))
	assert.ErrorContains(t, err, "aliases are expanded", "10,000 copies of 1 MiB")

	big := filepath.Join(t.TempDir(), "big.json")
	require.NoError(t, os.WriteFile(big, append([]byte(`{"listen":":1",`), bytes.Repeat([]byte(" "), MaxConfigBytes)...), 0o600))
	_, err = Load(big, nil)
	assert.ErrorContains(t, err, "larger than")
}

func TestClassesConfigIsChecked(t *testing.T) {
	_, err := Parse([]byte(`{
	  "clients": {"evals": {"keys": ["k"], "class": "urgent", "limits": {"m": {"batchMaxQueueWait": -1}}}},
	  "routes": {"r": {"forward": "http://x", "models": {"m": {"rpm": 1, "tpm": 1, "batchHeadroom": 1.5, "batchMaxAge": -5}}}}}`), nil)
	require.Error(t, err)
	for _, want := range []string{
		`clients.evals.class: must be "interactive" or "batch", got "urgent"`,
		"clients.evals.limits.m.batchMaxQueueWait: must be >= 0",
		"routes.r.models.m.batchHeadroom: must be between 0 and 0.9, got 1.5",
		"routes.r.models.m.batchMaxAge: must be >= 0",
	} {
		assert.Contains(t, err.Error(), want)
	}
	cfg, err := Parse([]byte(`{"routes": {"r": {"forward": "http://x", "models": {"m": {"rpm": 1, "tpm": 1}, "z": {"rpm": 1, "tpm": 1, "batchHeadroom": 0}}}}}`), nil)
	require.NoError(t, err)
	assert.Equal(t, 0.1, cfg.Routes["r"].Models["m"].Queue().BatchHeadroom, "the default")
	assert.Equal(t, 0.0, cfg.Routes["r"].Models["z"].Queue().BatchHeadroom, "0 is 0")
}
