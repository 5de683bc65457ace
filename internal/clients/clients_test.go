package clients

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/scheduler"
)

func directory(t *testing.T) *Directory {
	t.Helper()
	cfg, err := config.Parse([]byte(`{
	  "clientKeys": ["k1"],
	  "clients": {
	    "b": {"keys": ["b1", "b2"], "weight": 3, "routes": ["r"]},
	    "a": {"keys": ["a1"], "limits": {"*": {"tokensPerDay": 100}, "big": {"tokensPerDay": 1000, "tpm": 50}}}
	  },
	  "routes": {"r": {"forward": "http://x", "models": {"*": {"rpm": 10, "tpm": 1000, "maxQueueSize": 5, "maxQueueWait": 5}}}}
	}`), nil)
	require.NoError(t, err)
	return New(cfg)
}

func TestDirectory(t *testing.T) {
	d := directory(t)
	require.True(t, d.Keyed())
	var names []string
	for _, c := range d.All() {
		names = append(names, c.Name)
	}
	assert.Equal(t, []string{"a", "b", "key-1"}, names, "configured clients by name, then clientKeys")
	for key, want := range map[string]string{"a1": "a", "b1": "b", "b2": "b", "k1": "key-1"} {
		c, ok := d.Identify(key)
		require.True(t, ok, key)
		assert.Equal(t, want, c.Name)
	}
	for _, key := range []string{"", "a", "b1 ", "k2"} {
		_, ok := d.Identify(key)
		assert.False(t, ok, key)
	}
	b, _ := d.Identify("b1")
	assert.True(t, b.Allowed("r"))
	assert.False(t, b.Allowed("other"))
	a, _ := d.Identify("a1")
	assert.True(t, a.Allowed("other"))
	q := d.Queue("big", scheduler.Config{RPM: 10, TPM: 1000})
	assert.Equal(t, 50, q[0].TPM, "a's own limit for big")
	assert.Equal(t, 3, q[1].Weight)
	assert.Zero(t, q[2].TPM)

	anon := New(&config.Config{})
	assert.False(t, anon.Keyed())
	c, ok := anon.Identify("")
	require.True(t, ok)
	assert.Equal(t, Anonymous, c.Name)
}

func TestBudgetIsHeldThenSettledAndStartsOverAtMidnight(t *testing.T) {
	d := directory(t)
	a, _ := d.Identify("a1")
	day := time.Date(2026, 12, 1, 23, 0, 0, 0, time.UTC)
	s1, err := a.Reserve(day, "m", 60, 0)
	require.NoError(t, err)
	s2, err := a.Reserve(day, "m", 30, 0) // 60 held + 30 <= 100
	require.NoError(t, err)
	_, err = a.Reserve(day, "m", 11, 0)
	var held *Reserved
	require.ErrorAs(t, err, &held, "90 held + 11 > 100: only because of what is in flight")
	assert.Equal(t, int64(90), held.Held)
	s1.Settle(day, 20, 0) // used 20 of its 60: the rest goes back
	s1.Release()          // no effect after Settle
	s2.Release()          // used nothing
	s3, err := a.Reserve(day, "m", 70, 0)
	require.NoError(t, err)
	s3.Settle(day, 75, 0)
	_, err = a.Reserve(day, "m", 10, 0)
	var ex *Exhausted
	require.ErrorAs(t, err, &ex, "95 used + 10 > 100")
	assert.Equal(t, int64(95), ex.Used)
	assert.Equal(t, time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC), ex.Reset)
	assert.Contains(t, ex.Error(), "client a has used 95 of its 100 tokens per day for every model its * limits cover")
	s4, err := a.Reserve(day, "m", 5, 0)
	require.NoError(t, err, "95 + 5 fits exactly")
	s4.Release()
	_, err = a.Reserve(day, "big", 500, 0)
	assert.NoError(t, err, "a listed model has its own budget")
	_, err = a.Reserve(day.Add(time.Hour), "m", 1, 0)
	assert.NoError(t, err, "a new UTC day")
	b, _ := d.Identify("b1")
	for range 10 {
		s, err := b.Reserve(day, "m", 1000, 0)
		require.NoError(t, err, "no budget: only counted")
		s.Settle(day, 1000, 0)
	}
	assert.Equal(t, int64(10000), b.Today(day)[0].Used)
}

// TestOneRequestCannotOvershootTheBudget: a request is checked against its
// own reservation, not only against what was used before it.
func TestOneRequestCannotOvershootTheBudget(t *testing.T) {
	d := directory(t)
	a, _ := d.Identify("a1")
	day := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	_, err := a.Reserve(day, "m", 9_990_010, 0) // max_tokens 999000, n=10
	var ex *Exhausted
	require.ErrorAs(t, err, &ex, "a fresh budget of 100 cannot pay for 9,990,010")
	assert.Equal(t, int64(9_990_010), ex.Requested)
	_, err = a.Reserve(day, "big", 1001, 0)
	require.ErrorAs(t, err, &ex)
	s, err := a.Reserve(day, "big", 1000, 0)
	require.NoError(t, err, "exactly the budget fits")
	s.Release()
}

// TestWildcardBudgetIsOneAcrossModels: every model that "*" covers draws
// on one budget; a new model name is not a new budget.
func TestWildcardBudgetIsOneAcrossModels(t *testing.T) {
	d := directory(t)
	a, _ := d.Identify("a1")
	day := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for _, m := range []string{"m1", "m2", "m3", "m4"} {
		s, err := a.Reserve(day, m, 25, 0)
		require.NoError(t, err, m)
		s.Settle(day, 25, 0)
	}
	_, err := a.Reserve(day, "m5", 1, 0)
	var ex *Exhausted
	require.ErrorAs(t, err, &ex, "100 used across four names under *")
	assert.Equal(t, "*", ex.Model)
	_, err = a.Reserve(day, "big", 10, 0)
	assert.NoError(t, err, "a listed model is not under *")
	var total int64
	for _, m := range a.Today(day) {
		if m.Model == "*" {
			total = m.Used
			assert.Equal(t, int64(100), m.Budget)
		}
	}
	assert.Equal(t, int64(100), total)
}

func TestStateFileRoundTripAndCorruption(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	d := directory(t)
	require.NoError(t, d.Load(path, now), "no file yet: empty")
	a, _ := d.Identify("a1")
	s, _ := a.Reserve(now, "big", 10, 0)
	s.Settle(now, 60, 0)
	require.NoError(t, d.Save(path, now))

	d2 := directory(t)
	require.NoError(t, d2.Load(path, now.Add(time.Hour)))
	a2, _ := d2.Identify("a1")
	used := map[string]int64{}
	for _, m := range a2.Today(now) {
		used[m.Model] = m.Used
	}
	assert.Equal(t, int64(60), used["big"])
	d3 := directory(t)
	require.NoError(t, d3.Load(path, now.Add(24*time.Hour)), "yesterday's file")
	a3, _ := d3.Identify("a1")
	for _, m := range a3.Today(now.Add(24 * time.Hour)) {
		assert.Zero(t, m.Used)
	}
	for _, bad := range []string{`{"version":1,"day":`, `{"version":3,"day":"2026-12-01","clients":{}}`,
		`{"version":2,"day":"2026-12-01","clients":{},"spend":{"a":{"dayMicroUsd":-1}}}`,
		`{"version":1,"day":"yesterday","clients":{}}`, `{"version":1,"day":"2026-12-01","clients":{"a":{"m":-5}}}`, `[]`} {
		require.NoError(t, os.WriteFile(path, []byte(bad), 0o600))
		err := directory(t).Load(path, now)
		require.Error(t, err, bad)
		assert.Contains(t, err.Error(), "corrupt")
	}
}

func TestAdoptKeepsTodaysUse(t *testing.T) {
	old := directory(t)
	a, _ := old.Identify("a1")
	day := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	s, err := a.Reserve(day, "m", 10, 0)
	require.NoError(t, err)
	// A reload while the request is in flight.
	cfg, err := config.Parse([]byte(`{"clients": {"a": {"keys": ["a2"], "limits": {"*": {"tokensPerDay": 100}}}},
	  "routes": {"r": {"forward": "http://x", "models": {"*": {"rpm": 10, "tpm": 1000, "maxQueueSize": 5, "maxQueueWait": 5}}}}}`), nil)
	require.NoError(t, err)
	d := New(cfg)
	d.Adopt(old)
	s.Settle(day, 100, 0) // settles into the same ledger
	a2, ok := d.Identify("a2")
	require.True(t, ok)
	_, err = a2.Reserve(day, "m", 10, 0)
	assert.Error(t, err, "100 used before the reload counts after it")
	_, ok = d.Identify("a1")
	assert.False(t, ok, "the old key is gone")
}

// TestStateFileIsOwnedWritableAndNotFromTheFuture: Open locks the state
// file against a second process, fails at once when it cannot be written,
// and a file dated after today is an error, not silently ignored.
func TestStateFileIsOwnedWritableAndNotFromTheFuture(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	d := directory(t)
	require.NoError(t, d.Open(path, now))
	_, err := os.Stat(path)
	require.NoError(t, err, "written once at start")
	err = directory(t).Open(path, now)
	require.Error(t, err, "a second owner of the same file")
	assert.Contains(t, err.Error(), "another llproxy")

	err = directory(t).Open(filepath.Join(dir, "missing-dir", "state.json"), now)
	require.Error(t, err, "cannot be written: a start-up error")

	tomorrow := filepath.Join(dir, "tomorrow.json")
	require.NoError(t, os.WriteFile(tomorrow, []byte(`{"version":1,"day":"2026-12-02","clients":{"a":{"*":50}}}`), 0o600))
	err = directory(t).Load(tomorrow, now)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "after today")

	// A save that fails later is remembered until one succeeds.
	require.NoError(t, os.RemoveAll(dir))
	require.Error(t, d.Save(path, now))
	assert.Error(t, d.StateError())
	require.NoError(t, os.MkdirAll(dir, 0o700))
	require.NoError(t, d.Save(path, now))
	assert.NoError(t, d.StateError())
}
