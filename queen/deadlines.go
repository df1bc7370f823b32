package queen

import (
	"container/heap"
	"context"
	"errors"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
)

// deadlineKeeper fails jobs that outlive their deadline. It is the
// leader's: any queen may submit a job, so deadlines are armed from the job
// records the leader watches (a new term arms every open record's), not by
// the queen that took the submit. One goroutine owns a heap of deadlines
// fed through a channel; arming a job again is harmless (armed says which
// deadline of a job counts), and entries leave the heap when they fire, so
// it holds at most the jobs of one timeout window.
type deadlineKeeper struct {
	q     *Queen
	t     *term
	add   chan deadline
	armed map[string]time.Time // owned by run
}

type deadline struct {
	job     string
	at      time.Time
	timeout time.Duration
	// disarm drops the job's deadline: it ended.
	disarm bool
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

func newDeadlineKeeper(q *Queen, t *term) *deadlineKeeper {
	return &deadlineKeeper{q: q, t: t, add: make(chan deadline, 1024), armed: map[string]time.Time{}}
}

// watch arms or drops a job's deadline as its record is now; ctx is the
// term's.
func (d *deadlineKeeper) watch(ctx context.Context, job api.Job) {
	dl := deadline{job: job.ID, disarm: job.State.Terminal() || job.Deadline == nil}
	if !dl.disarm {
		dl.at, dl.timeout = *job.Deadline, job.Deadline.Sub(job.CreatedAt)
	}
	select {
	case d.add <- dl:
	case <-ctx.Done():
	}
}

// forget drops the deadline of a record that is gone.
func (d *deadlineKeeper) forget(ctx context.Context, job string) {
	select {
	case d.add <- deadline{job: job, disarm: true}:
	case <-ctx.Done():
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
			at, armed := d.armed[dl.job]
			switch {
			case dl.disarm:
				delete(d.armed, dl.job)
			case !armed || !at.Equal(dl.at):
				d.armed[dl.job] = dl.at
				heap.Push(&h, dl)
			}
		case <-timer.C:
			now := time.Now()
			for len(h) > 0 && !h[0].at.After(now) {
				dl := heap.Pop(&h).(deadline)
				if at, ok := d.armed[dl.job]; !ok || !at.Equal(dl.at) {
					continue // the job ended, or its deadline moved
				}
				delete(d.armed, dl.job)
				go d.expire(ctx, dl)
			}
		}
	}
}

func (d *deadlineKeeper) expire(ctx context.Context, dl deadline) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if d.q.fence(ctx, d.t, "timeout", dl.job) != nil {
		return
	}
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
