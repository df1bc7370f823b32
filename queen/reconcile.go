package queen

import (
	"context"
	"time"

	"github.com/rbee-dev/rbee/api"
)

// reconcile brings jobs left unfinished by an earlier queen back under
// control: deadlines are re-armed, queued inferences are queued again (a
// copy of a request already on the work queue is harmless: only one
// worker can take an attempt), and queen-side operations that died with
// the old queen fail. Running inferences are the scheduler's: it reads
// every record at start and judges their workers once the liveness grace
// is over.
func (q *Queen) reconcile(ctx context.Context) error {
	open, err := q.jobs.List(ctx, "")
	if err != nil {
		return err
	}
	for _, job := range open {
		if job.State.Terminal() {
			continue
		}
		if job.Deadline != nil {
			timeout := job.Deadline.Sub(job.CreatedAt)
			q.deadlines.addDeadline(job.ID, *job.Deadline, timeout)
		}
		switch {
		case job.Op.Kind == api.OpInfer && job.State == api.JobQueued:
			q.log.Info().Str("job", job.ID).Msg("queueing a waiting job again after restart")
			args, err := q.request(ctx, job.ID)
			if err == nil {
				err = q.enqueue(ctx, job.ID, args, job.Attempts+1)
			}
			if err != nil {
				q.failJob(ctx, job.ID, "the queen restarted and could not queue the job again: "+err.Error())
			}
		case job.Op.Kind == api.OpInfer:
		default:
			fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, _ = q.jobs.Transition(fctx, job.ID, api.JobFailed, func(j *api.Job) {
				j.Error = "the queen restarted while this operation ran; run it again"
			})
			cancel()
		}
	}
	return nil
}
