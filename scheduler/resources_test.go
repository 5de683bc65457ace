package scheduler

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A model limited in input and output tokens apart (no combined bucket):
// a request is admitted when every bucket can pay, it waits for the one
// that binds, and that bucket is the one its rejection names.
func TestEveryBucketMustPay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		q := NewQueue("m", Config{MaxQueueSize: 10, MaxQueueWait: 30 * time.Second, RPM: 600, ITPM: 6000, OTPM: 600})
		a, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 600)})
		require.NoError(t, err)
		assert.Equal(t, Vector{Requests: 600, InputTokens: 6000, OutputTokens: 600}, a.State.Limit, "no combined bucket")
		assert.Equal(t, 5900, a.State.Remaining[InputTokens])
		assert.Equal(t, 0, a.State.Remaining[OutputTokens])

		// Plenty of input left; output empty: it waits for output, a
		// second at 10 tokens a second for 10 tokens.
		out := make(chan result, 1)
		go func() {
			adm, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 10)})
			out <- result{at: time.Since(start), adm: adm, err: err}
		}()
		synctest.Wait()
		r := <-out
		require.NoError(t, r.err)
		assert.Equal(t, time.Second, r.at, "admitted when the output bucket holds its 10")

		// One whose output waits longer than maxQueueWait: rejected
		// naming the output bucket.
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(1, 600)})
		var re *RejectError
		require.ErrorAs(t, err, &re)
		assert.Equal(t, OutputTokens, re.Resource)
		assert.Equal(t, 600, re.Limit)
		assert.Equal(t, 600, re.Requested)

		// Larger than the input bucket: too large, naming input.
		_, err = q.Acquire(context.Background(), Cost{Amount: Request(6001, 1)})
		require.ErrorAs(t, err, &re)
		assert.True(t, errors.Is(err, ErrTooLarge))
		assert.Equal(t, InputTokens, re.Resource)
		assert.Equal(t, 6000, re.Limit)
	})
}

// Settling corrects each bucket apart: output reserved and not used goes
// back to the output bucket only.
func TestSettleCorrectsEachBucket(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", Config{MaxQueueSize: 10, MaxQueueWait: time.Minute, RPM: 600, TPM: 60000, ITPM: 6000, OTPM: 600})
		a, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 500)})
		require.NoError(t, err)
		a.Settle(time.Now(), Request(120, 50))
		st := q.Stats(time.Now())
		assert.InDelta(t, 6000-120, st.Remaining[InputTokens], 1e-6, "input charged its overrun")
		assert.InDelta(t, 600-50, st.Remaining[OutputTokens], 1e-6, "output refunded what was not used")
		assert.InDelta(t, 60000-170, st.Remaining[Tokens], 1e-6, "the combined bucket both")
		assert.InDelta(t, 599, st.Remaining[Requests], 1e-6, "the request stays paid")
		a.Unsend(time.Now())
		st = q.Stats(time.Now())
		assert.InDelta(t, 600, st.Remaining[OutputTokens], 1e-6, "given back whole: what it held after settling")
		assert.InDelta(t, 6000, st.Remaining[InputTokens], 1e-6)
	})
}

// An upstream that reports one resource lowers that bucket only.
func TestObserveLowersTheResourceReported(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", Config{MaxQueueSize: 10, MaxQueueWait: time.Minute, RPM: 600, ITPM: 6000, OTPM: 600})
		a, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 100)})
		require.NoError(t, err)
		assert.True(t, a.Observe(time.Now(), reported(OutputTokens, 200)), "someone else spent 300 output tokens")
		st := q.State(time.Now())
		assert.Equal(t, 200, st.Remaining[OutputTokens])
		assert.Equal(t, 5900, st.Remaining[InputTokens], "input untouched")
	})
}

func TestConfigNeedsATokenBucket(t *testing.T) {
	assert.ErrorContains(t, Config{RPM: 1}.Validate(), "tpm: must be > 0, got 0")
	assert.NoError(t, Config{RPM: 1, ITPM: 10, OTPM: 10}.Validate())
	assert.ErrorContains(t, Config{RPM: 1, TPM: 5, OTPM: -1}.Validate(), "otpm: must be >= 0, got -1")
}

// An upstream that rounds its remaining tokens to thousands (Anthropic)
// is not taken to have spent what the rounding hides: the buckets are
// lowered only beyond half the unit, and the estimate of others' spending
// does not swing with the rounding.
func TestRoundedUpstreamFiguresAreNotSpending(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		q := NewQueue("m", Config{MaxQueueSize: 10, MaxQueueWait: time.Minute, RPM: 6000, ITPM: 60000, OTPM: 60000})
		rounded := func(v int) Upstream {
			var u Upstream
			u.Remaining[InputTokens] = (v + 500) / 1000 * 1000
			u.Reported[InputTokens], u.Rounding[InputTokens] = true, 1000
			return u
		}
		for i := range 200 {
			a, err := q.Acquire(context.Background(), Cost{Amount: Request(350+i%7*20, 10)})
			require.NoError(t, err)
			// What the upstream truly had when it took this request: the
			// same as the gateway, nobody else spends.
			truth := int(a.Mark.Level[InputTokens])
			assert.False(t, a.Observe(time.Now(), rounded(truth)), "request %d: nothing lowered", i)
			time.Sleep(200 * time.Millisecond)
		}
		assert.Zero(t, q.b[InputTokens].others, "no drain taken from rounding")
		// Someone else spent 3,000: seen, less the rounding's half unit.
		a, err := q.Acquire(context.Background(), Cost{Amount: Request(100, 10)})
		require.NoError(t, err)
		before := q.State(time.Now()).Remaining[InputTokens]
		assert.True(t, a.Observe(time.Now(), rounded(int(a.Mark.Level[InputTokens])-3000)))
		after := q.State(time.Now()).Remaining[InputTokens]
		assert.InDelta(t, 2500, before-after, 500)
	})
}
