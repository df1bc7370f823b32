package queen

import (
	"container/heap"
	"context"
	"errors"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
)

// deadlineKeeper fails jobs that outlive their deadline. One goroutine owns
// a heap of deadlines fed through a channel; entries leave the heap when
// they fire, so it holds at most the jobs of one timeout window.
type deadlineKeeper struct {
	q   *Queen
	add chan deadline
}

type deadline struct {
	job     string
	at      time.Time
	timeout time.Duration
}

type deadlineHeap []deadline

func (h deadlineHeap) Len() int           { return len(h) }
func (h deadlineHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h deadlineHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *deadlineHeap) Push(x any)        { *h = append(*h, x.(deadline)) }
func (h *deadlineHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

func newDeadlineKeeper(q *Queen) *deadlineKeeper {
	return &deadlineKeeper{q: q, add: make(chan deadline, 1024)}
}

func (d *deadlineKeeper) addDeadline(job string, at time.Time, timeout time.Duration) {
	select {
	case d.add <- deadline{job: job, at: at, timeout: timeout}:
	case <-d.q.runCtx.Done():
	}
}

func (d *deadlineKeeper) run(ctx context.Context) {
	var h deadlineHeap
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		next := time.Hour
		if len(h) > 0 {
			next = time.Until(h[0].at)
		}
		timer.Reset(max(next, 0))
		select {
		case <-ctx.Done():
			return
		case dl := <-d.add:
			heap.Push(&h, dl)
		case <-timer.C:
			now := time.Now()
			for len(h) > 0 && !h[0].at.After(now) {
				dl := heap.Pop(&h).(deadline)
				go d.expire(ctx, dl)
			}
		}
	}
}

func (d *deadlineKeeper) expire(ctx context.Context, dl deadline) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	why := api.Fail(api.ReasonTimeout, "", "timed out after %s", dl.timeout.Round(time.Millisecond))
	_, err := d.q.cancelJob(ctx, dl.job, why, api.JobFailed)
	switch {
	case err == nil:
		d.q.narrator.Warn(ctx, dl.job, "timeout", dl.job, "job %s %s and was stopped", dl.job, why.Message)
	case errors.Is(err, jobs.ErrTerminal), errors.Is(err, jobs.ErrNotFound):
	default:
		d.q.log.Warn().Err(err).Str("job", dl.job).Msg("failing a timed-out job")
	}
}
