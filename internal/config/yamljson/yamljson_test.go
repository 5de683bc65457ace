package yamljson

import (
	"encoding/json"
	"testing"
)

// FuzzToJSON: whatever the YAML, ToJSON never panics, answers quickly and
// in bounded memory (the alias bound), and what it returns is JSON.
func FuzzToJSON(f *testing.F) {
	for _, seed := range []string{
		"a: 1\n", "a: &x {b: [1, 2]}\nc: *x\n", "m: {<<: [*a]}\n", "a: &a {k: v}\nb: {<<: *a, k: w}\n",
		"a0: &a0 [x, x]\na1: &a1 [*a0, *a0]\na2: [*a1, *a1]\n", "n: 0x10\no: 0o17\nb: 0b1\nf: .inf\n", "- [\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		out, err := ToJSON(data)
		if err != nil {
			return
		}
		if !json.Valid(out) {
			t.Fatalf("not JSON: %q from %q", out, data)
		}
	})
}
