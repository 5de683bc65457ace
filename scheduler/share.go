package scheduler

import (
	"math"
	"time"
)

// When several gateways share one key's limits (through a store such as
// Redis), each keeps its own queue and learns the shared buckets' levels
// from the store at each admission (Sync), so that its predictions and
// rate headers are the shared ones; and when the store cannot be reached
// each enforces its share of the limits (Share).

// ConfirmAdmissions makes every admission of the queue pending until the
// shared store confirms it (Confirm) or refuses it (Refused): the store's
// levels, when they come, do not yet count the admissions still pending,
// and the queue keeps them apart. Call it before the queue is used.
func (q *Queue) ConfirmAdmissions() {
	q.mu.Lock()
	q.confirm = true
	q.mu.Unlock()
}

// Confirm ends a's pending state: the shared store paid for it too, and
// lv (if not nil) is what its buckets hold now; the queue's buckets become
// that, less what the admissions still pending took.
func (a *Admission) Confirm(now time.Time, lv *Levels) {
	if a == nil || a.q == nil {
		return
	}
	q := a.q
	q.mu.Lock()
	defer q.mu.Unlock()
	q.settlePending(a)
	if lv != nil {
		q.learn(now, a.lane, lv)
	}
}

// Refused gives back an admission the shared store refused (another
// replica spent its buckets first): whole, as Unsend does, and the queue's
// buckets become lv less what the admissions still pending took.
func (a *Admission) Refused(now time.Time, lv Levels) {
	if a == nil || a.q == nil {
		return
	}
	q := a.q
	q.mu.Lock()
	defer q.mu.Unlock()
	q.settlePending(a)
	q.unsend(now, a)
	q.learn(now, a.lane, &lv)
}

// settlePending takes a out of the pending admissions. q.mu is held.
func (q *Queue) settlePending(a *Admission) {
	if !a.pending {
		return
	}
	a.pending = false
	q.pendN--
	q.pend.add(&a.cost, -1)
	a.lane.pendN--
	a.lane.pend.add(&a.cost, -1)
}

// learn sets the buckets to the shared store's levels less the pending
// admissions. q.mu is held.
func (q *Queue) learn(now time.Time, l *lane, lv *Levels) {
	for r := range q.b {
		q.b[r].set(now, lv.Model[r]-float64(q.pend[r]))
		l.b[r].set(now, lv.Client[r]-float64(l.pend[r]))
	}
	q.changed(now)
}

// Share makes the queue enforce share (0 < share <= 1) of every limit it
// has, the model's and each client's: capacity, refill and concurrency
// slots (at least one). Share(now, 1) restores them.
func (q *Queue) Share(now time.Time, share float64) {
	share = math.Max(1e-6, math.Min(1, share))
	q.mu.Lock()
	defer q.mu.Unlock()
	q.gate.setShare(now, share, &q.pend)
	for _, l := range q.lanes { // a client's two lanes share its gate
		l.gate.setShare(now, share, &l.pend)
	}
	q.changed(now)
}

func (g *gate) setShare(now time.Time, share float64, pend *Vector) {
	for r := range g.b {
		g.b[r].setShare(now, share, float64(pend[r]))
	}
	if g.maxConcurrent > 0 || g.fullConcurrent > 0 {
		if g.fullConcurrent == 0 {
			g.fullConcurrent = g.maxConcurrent
		}
		g.maxConcurrent = max(1, int(math.Ceil(float64(g.fullConcurrent)*share)))
	}
}

// Estimate is what the queue can vouch the shared buckets hold at now,
// for client number client: its own levels, its share of what is left
// (the other replicas hold the rest, and may have spent it: so this is a
// floor, never more than there is). A bucket it does not have is -1.
func (q *Queue) Estimate(now time.Time, client int) Levels {
	q.mu.Lock()
	defer q.mu.Unlock()
	est := func(b *bucket) float64 {
		if !b.on {
			return -1
		}
		return math.Max(0, b.level(now))
	}
	var lv Levels
	for r := range q.b {
		lv.Model[r], lv.Client[r] = est(&q.b[r]), -1
		if client >= 0 && client < q.clients {
			lv.Client[r] = est(&q.lanes[client].b[r])
		}
	}
	return lv
}

// Reconfigure gives the queue new limits and clients (a reloaded config)
// without losing anyone: waiting requests keep their places, in order,
// and admitted ones their slots. A client is known by its name: one that
// stays keeps its FIFO and gets its new weight and limits; a new one gets
// an empty FIFO; one that is gone keeps its FIFO until it drains, beyond
// the new clients (Cost.Client never names it again). The buckets keep
// their levels, capped at their new capacities. cfg and the clients must
// be valid.
func (q *Queue) Reconfigure(now time.Time, cfg Config, clients ...Client) {
	if len(clients) == 0 {
		clients = []Client{cfg.Client("", 1)}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.cfg = cfg
	q.gate.reconfigure(now, cfg.Limits(), cfg.MaxConcurrent)
	old := map[string]int{}
	for i, l := range q.lanes {
		old[l.Name] = i
	}
	lanes := make([]*lane, 0, len(clients))
	blanes := make([]*lane, 0, len(clients))
	kept := map[int]bool{}
	for _, c := range clients {
		c.Weight = max(1, c.Weight)
		i, ok := old[c.Name]
		if !ok || kept[i] {
			l, b := newClient(c)
			lanes, blanes = append(lanes, l), append(blanes, b)
			continue
		}
		kept[i] = true
		l, b := q.lanes[i], q.blanes[i]
		l.Client, b.Client = c, c.batch()
		l.gate.reconfigure(now, c.Limits(), c.MaxConcurrent)
		lanes, blanes = append(lanes, l), append(blanes, b)
	}
	for i, l := range q.lanes { // the clients that are gone, in their old order
		b := q.blanes[i]
		if !kept[i] && (len(l.waiting) > 0 || l.running > 0 || len(b.waiting) > 0 || b.running > 0) {
			lanes, blanes = append(lanes, l), append(blanes, b)
		}
	}
	q.lanes, q.blanes, q.clients = lanes, blanes, len(clients)
	q.changed(now)
}

// reconfigure gives the gate new limits, keeping what its buckets hold
// (capped at the new capacities) and the slots held.
func (g *gate) reconfigure(now time.Time, limits Vector, maxConcurrent int) {
	for r, n := range limits {
		g.b[r].reconfigure(now, n)
	}
	g.index()
	g.maxConcurrent, g.fullConcurrent = maxConcurrent, 0
}

// reconfigure gives the bucket a new limit per minute, keeping its level
// (at most the new capacity); 0 makes it no limit.
func (b *bucket) reconfigure(now time.Time, perMinute int) {
	if perMinute <= 0 {
		*b = bucket{}
		return
	}
	if !b.on {
		*b = newBucket(perMinute)
		return
	}
	level := b.level(now)
	others := b.others
	*b = newBucket(perMinute)
	b.others = math.Min(others, maxOthersShare*b.configured)
	b.setRate(now, b.configured-b.others)
	b.set(now, math.Min(level, b.capacity))
}

// othersFor is how long what other gateways' queues told is believed: a
// store that stops telling (their backlogs drained, or the store is away)
// stops counting after it.
const othersFor = time.Second

// others is what the other gateways sharing the buckets have waiting.
type others struct {
	n     int // gateways with requests waiting
	until time.Time
}

// Others tells the queue that n other gateways sharing its buckets have
// requests waiting, as the shared store said at now. While they do, the
// buckets' refill is shared with them, so the waits the queue predicts
// (to refuse at once a request that would wait too long, and in
// Retry-After) count them: a request waits as if each of those gateways
// were served in turn with it. Admission itself is unchanged: the store
// decides who pays first. (Their backlogs could bound this, but a
// gateway's queue holds only part of its demand: the rest is admitted
// and asking the store, or asking again.)
func (q *Queue) Others(now time.Time, n int) {
	if n <= 0 && q.othersOff.Load() {
		return // the common case, far from the limit: no lock
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if n <= 0 {
		q.oth = others{}
		q.othersOff.Store(true)
		return
	}
	q.oth = others{n: n, until: now.Add(othersFor)}
	q.othersOff.Store(false)
}

// withOthers is wait, a wait predicted for this queue alone, lengthened
// by the other gateways' share of the refill. q.mu is held.
func (q *Queue) withOthers(now time.Time, wait time.Duration) time.Duration {
	if q.oth.n == 0 || wait <= 0 || !now.Before(q.oth.until) {
		return wait
	}
	// In floating point: a long wait times many gateways would overflow.
	return time.Duration(min(float64(wait)*float64(1+q.oth.n), float64(24*time.Hour)))
}
