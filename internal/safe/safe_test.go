package safe

import (
	"bytes"
	"log/slog"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
)

// lines is a log destination that tells when a line arrives.
type lines struct {
	mu  sync.Mutex
	buf bytes.Buffer
	got chan struct{}
}

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	l.got <- struct{}{}
	return len(p), nil
}

func TestAPanicIsLoggedNotFatal(t *testing.T) {
	out := &lines{got: make(chan struct{}, 2)}
	log := slog.New(slog.NewTextHandler(out, nil))
	Go(log, "worker", func() {
		var m map[string]int
		m["x"] = 1
	})
	<-out.got
	Func(log, "timer", func() { panic("boom") })()
	<-out.got
	out.mu.Lock()
	defer out.mu.Unlock()
	assert.Contains(t, out.buf.String(), "panic recovered: worker")
	assert.Contains(t, out.buf.String(), "panic recovered: timer")
	assert.Contains(t, out.buf.String(), "goroutine", "with the stack")
}
