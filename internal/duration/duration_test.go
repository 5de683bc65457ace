package duration

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDurationJSON(t *testing.T) {
	for in, want := range map[string]time.Duration{
		`30`: 30 * time.Second, `1.5`: 1500 * time.Millisecond, `"1500ms"`: 1500 * time.Millisecond,
		`"2m"`: 2 * time.Minute, `"5"`: 5 * time.Second, `0`: 0,
	} {
		var d Duration
		require.NoError(t, d.UnmarshalJSON([]byte(in)), in)
		assert.Equal(t, want, d.D(), in)
	}
	var d Duration
	for _, bad := range []string{`"soon"`, `true`, `1e300`, `"NaN"`} {
		assert.Error(t, d.UnmarshalJSON([]byte(bad)), bad)
	}
	out, err := json.Marshal(Duration(1500 * time.Millisecond))
	require.NoError(t, err)
	assert.Equal(t, `"1.5s"`, string(out))
}

func TestParse(t *testing.T) {
	for in, want := range map[string]time.Duration{"2.5": 2500 * time.Millisecond, "0": 0, "1500ms": 1500 * time.Millisecond, "1m": time.Minute} {
		d, err := Parse(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, d, in)
	}
	for _, bad := range []string{"-1", "-2s", "soon", "", "NaN", "1e300"} {
		_, err := Parse(bad)
		assert.Error(t, err, bad)
	}
}
