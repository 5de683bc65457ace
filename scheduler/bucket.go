package scheduler

import (
	"math"
	"time"
)

// bucket is one continuously refilling token bucket of capacity
// perMinute, refilled at perMinute per minute. Its arithmetic is the
// scheduler's own, one formula (fill) for what the bucket holds now and
// what a prediction says it will hold: a level at a time, refilled
// linearly up to the capacity. Nothing is reconciled with another
// implementation, so no epsilon is needed: a wait is rounded up to the
// microsecond until that same formula says the level is there.
type bucket struct {
	on         bool      // a limit: a bucket of capacity 0 is none
	lvl        float64   // the level at t (negative: in debt)
	t          time.Time // when lvl was brought up to date
	capacity   float64
	perSec     float64 // the refill rate now: configured less others' estimated use, times share
	configured float64 // the configured refill rate, per second
	full       float64 // the configured capacity
	share      float64 // of the configured limits this bucket enforces (see Queue.Share); 1 alone

	// others is the estimated rate (per second) at which someone the
	// gateway does not see spends the upstream's limit; residual is the
	// discrepancy the last observation left uncorrected (never positive);
	// observed is when the last observation came.
	others, residual float64
	observed         time.Time
}

// newBucket returns a full bucket: after idle the whole minute's allowance
// is available, as OpenAI's own limits behave. A bucket of capacity 0 is no
// limit: it is always ready, and taking from it does nothing.
func newBucket(perMinute int) bucket {
	if perMinute <= 0 {
		return bucket{}
	}
	perSec := float64(perMinute) / 60
	return bucket{on: true, lvl: float64(perMinute), capacity: float64(perMinute),
		perSec: perSec, configured: perSec, full: float64(perMinute), share: 1}
}

// level is the number of tokens in the bucket at now (negative: in debt).
// A time before the last change refills nothing.
func (b *bucket) level(now time.Time) float64 {
	if !b.on {
		return 0
	}
	if b.t.IsZero() || !now.After(b.t) {
		return b.lvl
	}
	return b.fill(b.lvl, now.Sub(b.t))
}

// sync brings the level up to date at now, so that a change of level,
// rate or capacity applies from now on.
func (b *bucket) sync(now time.Time) {
	if b.t.IsZero() || now.After(b.t) {
		b.lvl, b.t = b.level(now), now
	}
}

// take removes n tokens at now. The caller has checked that they are there.
func (b *bucket) take(now time.Time, n int) {
	if b.on {
		b.sync(now)
		b.lvl -= float64(n)
	}
}

// give returns n tokens at now (a request admitted but never sent, or a
// reservation larger than what was used). The level stays capped at
// capacity.
func (b *bucket) give(now time.Time, n int) {
	if n > 0 && b.on {
		b.sync(now)
		b.lvl = math.Min(b.capacity, b.lvl+float64(n))
	}
}

// charge removes n more tokens at now even if that leaves the bucket in
// debt (an upstream used more than was reserved); the debt is repaid by
// refill before anything else is admitted. A single charge is capped at the
// capacity.
func (b *bucket) charge(now time.Time, n int) {
	if n > 0 && b.on {
		b.sync(now)
		b.lvl -= math.Min(float64(n), b.capacity)
	}
}

// setRate makes the bucket refill at perSec from now on.
func (b *bucket) setRate(now time.Time, perSec float64) {
	b.sync(now)
	b.perSec = perSec
}

// adaptWindow is the time constant with which the refill rate follows
// what others spend: a steady drain is matched within about this long.
const adaptWindow = 15 * time.Second

// maxOthersShare caps the refill the estimate may withhold: the gateway
// keeps at least a tenth of its configured rate.
const maxOthersShare = 0.9

// observe takes a discrepancy between the bucket and the upstream's view
// of the same moment (positive: the upstream had less, so someone else
// spent it), counted two ways (see Admission.Observe): discrepancy, beyond
// anything the gateway's own later requests can explain, is taken out of
// the bucket at once; drain, the most likely one, moves the estimate of
// others' spending by its change since the last observation, and with it
// the refill rate, so that a steady drain stops surprising the gateway. It
// returns how much it lowered the bucket, how much drain it took as
// others' (from then on not counted again), and whether the refill rate
// changed.
//
// slack is how far the upstream's figure may be off by its own rounding
// (half the unit it rounds to; 0 for exact figures): within it, nothing
// is taken as spent, and beyond it only the excess.
func (b *bucket) observe(now time.Time, discrepancy, drain, slack float64) (lowered, drained float64, rateChanged bool) {
	discrepancy -= slack
	if drain > 0 {
		drain = max(0, drain-slack)
	} else {
		drain = min(0, drain+slack)
	}
	// What others can have spent since the last observation, at a steady
	// rate, is at most the configured rate times the time between: more is
	// a burst, corrected by the lowering but not taken as a rate.
	span := 0.0
	if !b.observed.IsZero() {
		span = max(0, now.Sub(b.observed).Seconds()) * b.configured
	}
	b.observed = now
	change := max(-span, min(span, drain-b.residual))
	b.residual = min(drain, 0)
	if n := math.Floor(discrepancy); n > observeNoise {
		b.charge(now, int(min(n, b.capacity)))
		lowered = n
	}
	if n := math.Floor(drain); n > observeNoise {
		drained = n
	}
	others := b.others + change/adaptWindow.Seconds()
	others = max(0, min(others, maxOthersShare*b.configured))
	if others != b.others {
		b.others = others
		b.setRate(now, (b.configured-others)*b.share)
		rateChanged = true
	}
	return lowered, drained, rateChanged
}

// waitFrom is how long a bucket at level needs to hold n tokens, rounded up
// to the microsecond, and further until fill (the formula the live level
// is read with) says they are there: a timer set for it finds them.
func (b *bucket) waitFrom(level float64, n int) time.Duration {
	missing := float64(n) - level
	if missing <= 0 || !b.on {
		return 0
	}
	us := missing / b.perSec * 1e6
	whole := math.Ceil(us)
	d := time.Duration(whole) * time.Microsecond
	// Rounded up by a good part of a microsecond, the refill is there for
	// sure; close to a whole one, fill decides, a microsecond at a time.
	for whole-us < 1e-3 && b.fill(level, d) < float64(n) {
		d += time.Microsecond
		whole++
	}
	return d
}

// fill is the level of a bucket at level after d of refill: the one
// formula of both the live level and predictions.
func (b *bucket) fill(level float64, d time.Duration) float64 {
	return math.Min(b.capacity, level+d.Seconds()*b.perSec)
}

// untilFull is how long a bucket at level takes to refill completely.
func (b *bucket) untilFull(level float64) time.Duration {
	if level >= b.capacity {
		return 0
	}
	return time.Duration(math.Ceil((b.capacity-level)/b.perSec*1e3)) * time.Millisecond
}

// setShare makes the bucket enforce share of its configured limit, in
// capacity and refill. pending is what admissions not yet confirmed by
// the shared store took from it: they will give it back and be decided
// again, so they are shared like the rest.
func (b *bucket) setShare(now time.Time, share, pending float64) {
	if !b.on || share == b.share {
		return
	}
	if share < b.share {
		// What is left is shared too: this bucket keeps its part of it.
		level := (b.level(now)+pending)*share/b.share - pending
		defer b.set(now, level)
	}
	b.sync(now)
	b.share = share
	b.capacity = math.Max(1, math.Floor(b.full*share))
	b.lvl = math.Min(b.lvl, b.capacity)
	b.perSec = (b.configured - b.others) * share
}

// set moves the bucket's level at now to level (what a shared store
// says it holds), to the token.
func (b *bucket) set(now time.Time, level float64) {
	if !b.on {
		return
	}
	b.sync(now)
	b.lvl = math.Min(b.capacity, b.lvl+math.Round(level-b.lvl))
}
