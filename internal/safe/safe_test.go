package safe

import (
	"bytes"
	"log/slog"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestAPanicIsLoggedNotFatal(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var wg sync.WaitGroup
	wg.Add(1)
	Go(log, "worker", func() {
		defer wg.Done()
		var m map[string]int
		m["x"] = 1
	})
	wg.Wait()
	Func(log, "timer", func() { panic("boom") })()
	assert.Contains(t, buf.String(), "panic recovered: worker")
	assert.Contains(t, buf.String(), "panic recovered: timer")
	assert.Contains(t, buf.String(), "goroutine", "with the stack")
}
