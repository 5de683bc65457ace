package models

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/llproxy/llproxy/scheduler"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// qcfg is a model's limits.
func qcfg(size int, wait time.Duration, rpm, tpm int) scheduler.Config {
	return scheduler.Config{MaxQueueSize: size, MaxQueueWait: wait, RPM: rpm, TPM: tpm}
}

func TestSetWildcardQueues(t *testing.T) {
	s, err := NewSet(map[string]scheduler.Config{
		"gpt-4o": qcfg(1, 0, 10, 100), "*": qcfg(2, 0, 20, 200),
	}, 2, nil)
	require.NoError(t, err)
	q1, err := s.Queue("gpt-4o")
	require.NoError(t, err)
	assert.Equal(t, 10, q1.Config().RPM)
	a, _ := s.Queue("a")
	a2, _ := s.Queue("a")
	b, _ := s.Queue("b")
	assert.Same(t, a, a2)
	assert.NotSame(t, a, b, "each unlisted model has its own queue")
	assert.Equal(t, 20, b.Config().RPM)
	_, err = a.Acquire(context.Background(), scheduler.Cost{Amount: scheduler.Request(10, 0)}) // a is in use: its buckets are not full
	require.NoError(t, err)
	c, err := s.Queue("c")
	require.NoError(t, err, "b sat idle with full buckets: retired to make room")
	assert.True(t, b.Retired())
	_, err = b.Acquire(context.Background(), scheduler.Cost{Amount: scheduler.Request(1, 0)})
	assert.ErrorIs(t, err, scheduler.ErrRetired, "the caller looks the model up again")
	assert.False(t, a.Retired(), "a holds spent tokens: keeping them is the limit")
	_, err = c.Acquire(context.Background(), scheduler.Cost{Amount: scheduler.Request(10, 0)})
	require.NoError(t, err)
	_, err = s.Queue("d")
	assert.ErrorIs(t, err, scheduler.ErrTooManyModels, "a and c hold spent tokens")
	assert.Equal(t, []string{"*", "gpt-4o"}, s.Models())

	strict, err := NewSet(map[string]scheduler.Config{"gpt-4o": qcfg(1, 0, 10, 100)}, 0, nil)
	require.NoError(t, err)
	_, err = strict.Queue("other")
	assert.True(t, errors.Is(err, scheduler.ErrUnknownModel))
}
