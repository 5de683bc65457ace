package scheduler

import (
	"math"
	"time"

	"golang.org/x/time/rate"
)

// epsilon absorbs float rounding between the scheduler's predictions and the
// limiter's own arithmetic: a level this close to a cost pays for it.
const epsilon = 1e-6

// bucket is one continuously refilling token bucket of capacity perMinute,
// refilled at perMinute per minute, held in a rate.Limiter. The limiter only
// ever answers about now; the queue owns ordering and prediction.
type bucket struct {
	lim      *rate.Limiter
	capacity float64
	perSec   float64
}

// newBucket returns a full bucket: after idle the whole minute's allowance
// is available, as OpenAI's own limits behave.
func newBucket(perMinute int) bucket {
	perSec := float64(perMinute) / 60
	return bucket{lim: rate.NewLimiter(rate.Limit(perSec), perMinute), capacity: float64(perMinute), perSec: perSec}
}

// level is the number of tokens in the bucket at now.
func (b bucket) level(now time.Time) float64 { return b.lim.TokensAt(now) }

// take removes n tokens at now. The caller has checked that they are there.
func (b bucket) take(now time.Time, n int) {
	if !b.lim.AllowN(now, n) {
		// Only float rounding gets here: borrow the sliver.
		b.lim.ReserveN(now, n)
	}
}

// give returns n tokens at now (a request admitted but never sent, or a
// reservation larger than what was used). The level stays capped at
// capacity.
func (b bucket) give(now time.Time, n int) {
	if n > 0 {
		b.lim.ReserveN(now, -n)
	}
}

// charge removes n more tokens at now even if that leaves the bucket in
// debt (an upstream used more than was reserved); the debt is repaid by
// refill before anything else is admitted. A single charge is capped at the
// capacity.
func (b bucket) charge(now time.Time, n int) {
	if n > 0 {
		b.lim.ReserveN(now, min(n, int(b.capacity)))
	}
}

// lowerTo drops the level at now to target if it is higher, and reports
// whether it did.
func (b bucket) lowerTo(now time.Time, target float64) bool {
	excess := int(math.Floor(b.level(now) - target))
	if excess < 1 {
		return false
	}
	b.lim.ReserveN(now, excess)
	return true
}

// waitFrom is how long a bucket at level needs to hold n tokens, rounded up
// to the microsecond so that a timer set for it finds the tokens there.
func (b bucket) waitFrom(level float64, n int) time.Duration {
	missing := float64(n) - level
	if missing <= epsilon {
		return 0
	}
	us := math.Ceil(missing / b.perSec * 1e6)
	return time.Duration(us) * time.Microsecond
}

// fill is the level of a bucket at level after d of refill.
func (b bucket) fill(level float64, d time.Duration) float64 {
	return math.Min(b.capacity, level+d.Seconds()*b.perSec)
}

// untilFull is how long a bucket at level takes to refill completely.
func (b bucket) untilFull(level float64) time.Duration {
	if level >= b.capacity {
		return 0
	}
	return time.Duration(math.Ceil((b.capacity-level)/b.perSec*1e3)) * time.Millisecond
}
