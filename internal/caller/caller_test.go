package caller

import (
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestKeyAndHow(t *testing.T) {
	for _, tc := range []struct {
		header, value, key, how string
	}{
		{"Authorization", "Bearer sk-1", "sk-1", "bearer"},
		{"Authorization", "bearer   sk-2 ", "sk-2", "bearer"},
		{"Api-Key", "sk-3", "sk-3", "api-key"},
		{"Authorization", "Basic dTpzay00", "sk-4", "basic"}, // u:sk-4
		{"Authorization", "Basic c2stNTo=", "sk-5", "basic"}, // sk-5: (the key as user name)
		{"X-Other", "x", "", "bearer"},
	} {
		r := httptest.NewRequest("GET", "/", nil)
		r.Header.Set(tc.header, tc.value)
		assert.Equal(t, tc.key, Key(r), tc.value)
		assert.Equal(t, tc.how, How(r), tc.value)
	}
}

func TestKeysMatchAndIndex(t *testing.T) {
	k := Hash("a", "b", "c")
	assert.True(t, k.Match("b"))
	assert.False(t, k.Match("d"))
	assert.False(t, Hash("").Match(""), "the empty key matches nothing")
	assert.Equal(t, 2, k.Index("c"))
	assert.Equal(t, -1, k.Index("z"))
}

func TestCrossSite(t *testing.T) {
	r := httptest.NewRequest("POST", "http://gw:8080/unload", nil)
	r.Header.Set("Authorization", "Bearer k")
	assert.Empty(t, CrossSite(r), "a key in a header no form can set")
	r.Header.Set("Origin", "http://gw:8080")
	assert.Empty(t, CrossSite(r), "its own origin")
	r.Header.Set("Origin", "https://evil.example")
	assert.Contains(t, CrossSite(r), "another origin")
	r.Header.Del("Origin")
	r.Header.Set("Sec-Fetch-Site", "cross-site")
	assert.Contains(t, CrossSite(r), "cross-site")
	r.Header.Del("Sec-Fetch-Site")
	r.SetBasicAuth("", "k")
	assert.Contains(t, CrossSite(r), "a form could send it")
	r.Header.Set(AdminHeader, "1")
	assert.Empty(t, CrossSite(r), "the status page's own header")
}
