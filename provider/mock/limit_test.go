package mock

import (
	"encoding/json"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestLimiterIsABucketOfAMinute: a minute's worth plus the slack at once,
// then one request per 60/rpm seconds, as OpenAI's limit refills.
func TestLimiterIsABucketOfAMinute(t *testing.T) {
	t0 := time.Unix(1000, 0)
	l := newLimiter(60, 2, t0)
	for i := range 62 {
		ok, remaining, _ := l.take(t0)
		require.True(t, ok, "request %d", i)
		assert.Equal(t, 61-i, remaining)
	}
	ok, _, reset := l.take(t0)
	assert.False(t, ok, "empty")
	assert.Equal(t, time.Second, reset, "one request a second")
	ok, _, reset = l.take(t0.Add(400 * time.Millisecond))
	assert.False(t, ok)
	assert.Equal(t, 600*time.Millisecond, reset)
	ok, remaining, reset := l.take(t0.Add(time.Second))
	assert.True(t, ok)
	assert.Equal(t, 0, remaining)
	assert.Equal(t, 62*time.Second, reset, "until full again")
	ok, _, _ = l.take(t0.Add(time.Hour))
	assert.True(t, ok)
	_, remaining, _ = l.take(t0.Add(time.Hour))
	assert.Equal(t, 60, remaining, "never above the bucket")
	answered, limited := l.counts()
	assert.Equal(t, int64(65), answered)
	assert.Equal(t, int64(2), limited)
}

// TestMockEnforcesItsRPM: headers on every answer, then OpenAI's 429.
func TestMockEnforcesItsRPM(t *testing.T) {
	m := New(Config{RPM: 2}, nil)
	body := `{"model":"m","messages":[{"role":"user","content":"hi"}]}`
	for i := range 2 {
		w := post(t, m, "/v1/chat/completions", body)
		require.Equal(t, 200, w.Code)
		assert.Equal(t, "2", w.Header().Get("X-Ratelimit-Limit-Requests"))
		assert.Equal(t, []string{"1", "0"}[i], w.Header().Get("X-Ratelimit-Remaining-Requests"))
		assert.NotEmpty(t, w.Header().Get("X-Ratelimit-Reset-Requests"))
	}
	w := post(t, m, "/v1/chat/completions", body)
	require.Equal(t, 429, w.Code)
	assert.Equal(t, "30", w.Header().Get("Retry-After"))
	var e struct{ Error struct{ Type, Code string } }
	require.NoError(t, json.Unmarshal(w.Body.Bytes(), &e))
	assert.Equal(t, "rate_limit_exceeded", e.Error.Code)
	answered, refused := m.Limited()
	assert.Equal(t, [2]int64{2, 1}, [2]int64{answered, refused})

	w = httptest.NewRecorder()
	m.ServeHTTP(w, httptest.NewRequest("GET", "/v1/models", nil))
	assert.Equal(t, 200, w.Code, "the model list is not limited")
}

func TestMockValidatesItsLimit(t *testing.T) {
	err := Config{RPM: -1, RPMSlack: -2}.Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "rpm:")
	assert.Contains(t, err.Error(), "rpmSlack:")
}
