package mock

import (
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// limiter is the mock's own requests-per-minute limit, enforced as OpenAI
// enforces it: a bucket of RPM (plus a slack) that refills continuously,
// its state in x-ratelimit-*-requests headers on every answer, a 429 in
// OpenAI's shape when it is empty. Load tests point a gateway at it to
// count what the gateway let through beyond the limit.
type limiter struct {
	mu       sync.Mutex
	rpm      float64 // refill per minute
	capacity float64
	level    float64
	last     time.Time

	answered, limited int64
}

func newLimiter(rpm, slack int, now time.Time) *limiter {
	c := float64(rpm + slack)
	return &limiter{rpm: float64(rpm), capacity: c, level: c, last: now}
}

// take spends one request at now if the bucket holds one; it returns what
// is left and how long until the bucket is full again (or, refused, until
// one request is there).
func (l *limiter) take(now time.Time) (ok bool, remaining int, reset time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if dt := now.Sub(l.last); dt > 0 {
		l.level = min(l.capacity, l.level+dt.Minutes()*l.rpm)
		l.last = now
	}
	perRequest := time.Duration(float64(time.Minute) / l.rpm)
	if l.level < 1 {
		l.limited++
		return false, 0, time.Duration((1 - l.level) * float64(perRequest))
	}
	l.level--
	l.answered++
	return true, int(l.level), time.Duration((l.capacity - l.level) * float64(perRequest))
}

// counts is what the limiter answered and refused so far.
func (l *limiter) counts() (answered, limited int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.answered, l.limited
}

// admit takes a request from the limit; refused, it answers the 429.
func (l *limiter) admit(w http.ResponseWriter, now time.Time) bool {
	ok, remaining, reset := l.take(now)
	h := w.Header()
	h.Set("X-Ratelimit-Limit-Requests", strconv.Itoa(int(l.rpm)))
	h.Set("X-Ratelimit-Remaining-Requests", strconv.Itoa(remaining))
	h.Set("X-Ratelimit-Reset-Requests", resetString(reset))
	if !ok {
		h.Set("Retry-After", strconv.Itoa(int(math.Ceil(reset.Seconds()))))
		mockError(w, http.StatusTooManyRequests, "requests", "rate_limit_exceeded",
			"Rate limit reached for requests per min (RPM): Limit "+strconv.Itoa(int(l.rpm))+". Please try again in "+resetString(reset)+".")
	}
	return ok
}

// resetString writes a duration as OpenAI does: "20ms", "1.5s", "6m0s".
func resetString(d time.Duration) string {
	if d < time.Second {
		return strconv.FormatInt(max(1, d.Milliseconds()), 10) + "ms"
	}
	return d.Round(time.Millisecond).String()
}
