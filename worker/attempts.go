package worker

import (
	"slices"
	"sync"
	"time"
)

// endedKept is how long an attempt this process ran is remembered after it
// ended: longer than a request's redelivery (its AckWait, a lost ack) can
// bring a copy of it back.
const endedKept = 10 * time.Minute

// attemptBook is this process's own record of the job attempts it is
// taking, running or ran. It is what lets a worker tell a take of its own
// from anyone else's when the job record alone cannot: the record says
// "running on worker W, attempt A", and a take whose write was applied but
// whose answer was lost (the bus cut in that round trip) leaves exactly
// that, as does a second copy of the same request pulled by another slot
// of this process. Only the slot holding the attempt here may run it; the
// record then settles whether the take was ours.
type attemptBook struct {
	mu sync.Mutex
	// held is the attempts in a slot's hands; ended those run to their end,
	// with when, and byEnd the same in the order they ended, so forgetting
	// them costs only those forgotten.
	held  map[attemptKey]struct{}
	ended map[attemptKey]time.Time
	byEnd []attemptKey
}

type attemptKey struct {
	job     string
	attempt int
}

// claim gives a slot an attempt of a job, or says it is already taken here
// (in another slot's hands, or run to its end).
func (b *attemptBook) claim(job string, attempt int, now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for len(b.byEnd) > 0 && now.Sub(b.ended[b.byEnd[0]]) > endedKept {
		delete(b.ended, b.byEnd[0])
		b.byEnd = b.byEnd[1:]
	}
	k := attemptKey{job, attempt}
	if _, ok := b.held[k]; ok {
		return false
	}
	if _, ok := b.ended[k]; ok {
		return false
	}
	if b.held == nil {
		b.held = map[attemptKey]struct{}{}
	}
	b.held[k] = struct{}{}
	return true
}

// release hands back an attempt that was not this process's to run, so a
// later copy of its request may be tried again.
func (b *attemptBook) release(job string, attempt int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.held, attemptKey{job, attempt})
}

// end records that the attempt ran here to its end (recorded or given
// up): no later copy of its request runs it again.
func (b *attemptBook) end(job string, attempt int, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	k := attemptKey{job, attempt}
	delete(b.held, k)
	if b.ended == nil {
		b.ended = map[attemptKey]time.Time{}
	}
	if _, again := b.ended[k]; !again {
		b.byEnd = append(b.byEnd, k)
	}
	b.ended[k] = now
}

// jobs lists the jobs whose attempts slots hold now, sorted; never nil (an
// empty list says that no slot holds any).
func (b *attemptBook) jobs() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]string, 0, len(b.held))
	for k := range b.held {
		out = append(out, k.job)
	}
	slices.Sort(out)
	return slices.Compact(out)
}
