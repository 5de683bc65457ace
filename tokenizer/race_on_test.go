//go:build race

package tokenizer

// raceEnabled: the race detector makes sync.Pool drop what is put back at
// random, so allocation counts mean nothing under it.
const raceEnabled = true
