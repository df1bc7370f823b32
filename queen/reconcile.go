package queen

import (
	"context"
	"time"

	"github.com/rbee-dev/rbee/api"
)

// reconcile brings jobs left unfinished by an earlier queen back under
// control: deadlines are re-armed, queued inferences are queued again (a
// duplicate request is harmless: only one worker can move the job to
// running), and queen-side operations that died with the old queen fail.
// Inferences that were running keep running: their workers publish to the
// job's subjects directly, and a lost worker is handled like any other.
func (q *Queen) reconcile(ctx context.Context) error {
	open, err := q.jobs.List(ctx, "")
	if err != nil {
		return err
	}
	snap := q.registry.Snapshot()
	for _, job := range open {
		if job.State.Terminal() {
			continue
		}
		if job.Deadline != nil {
			timeout := job.Deadline.Sub(job.CreatedAt)
			q.sched.deadlines.addDeadline(job.ID, *job.Deadline, timeout)
		}
		switch {
		case job.Op.Kind == api.OpInfer && job.State == api.JobQueued:
			q.log.Info().Str("job", job.ID).Msg("re-queueing job after restart")
			q.sched.enqueue(job)
		case job.Op.Kind == api.OpInfer && job.State == api.JobRunning:
			if _, alive := snap.Workers[job.Worker]; !alive {
				q.sched.workerLost(job.Worker, api.WorkerStatus{ID: job.Worker, Hive: job.Hive})
			}
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
