package queen

import (
	"context"
	"errors"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
)

// submitInFlight bounds a submit from its record's create to its queueing
// (the endpoint's own timeout, and some): a younger waiting job may still
// be in its submitter's hands.
const submitInFlight = 45 * time.Second

// reconcile brings jobs left unfinished by an earlier leader (this queen
// before a restart, or another queen that died or was cut off) back under
// control at the start of term t: queued inferences are queued again (a
// copy of a request already on the work queue is harmless: only one
// worker can take an attempt), and queen-side operations that died with
// their queen fail. Running inferences are the scheduler's: it reads every
// record when the term begins and judges their workers once the liveness
// grace is over; deadlines are armed from the same records (watchJobs).
//
// A queen-side operation runs in the queen that took its submit. Those of
// this process go on; any other is taken for dead. With two queens that is
// exact (the other one is the leader that was lost); with more, a standby's
// operation that runs through a change of leader is failed, and its own
// end is then refused as a change to a finished job.
//
// Each write is fenced by the lease: a term that lost it stops here.
func (q *Queen) reconcile(ctx context.Context, t *term) error {
	open, err := q.jobs.List(ctx, "")
	if err != nil {
		return err
	}
	for _, job := range open {
		if job.State.Terminal() {
			continue
		}
		if _, mine := q.localOps.Load(job.ID); mine {
			continue
		}
		switch {
		case job.Op.Kind == api.OpInfer && job.State == api.JobQueued:
			if err := q.fence(ctx, t, "requeue", job.ID); err != nil {
				return err
			}
			q.log.Info().Str("job", job.ID).Uint64("epoch", t.epoch).Msg("queueing a waiting job again at the start of a term")
			args, err := q.request(ctx, job.ID)
			if err == nil {
				err = q.enqueue(ctx, job.ID, args, job.Attempts+1, nil)
			}
			switch {
			case err == nil:
			case errors.Is(err, errRequestGone) && time.Since(job.CreatedAt) < submitInFlight:
				// A submit still in flight (this queen's, waiting out an
				// election, or another queen's) writes the record before it
				// stores and queues the request: it is that submit's job.
				q.log.Info().Str("job", job.ID).Msg("a waiting job's request is not stored yet; its submit is still in flight")
			case bus.Unavailable(err) || bus.Starting(err):
				// A bus that cannot store now (a cluster electing leaders,
				// which is also what may have cost the lease) has not lost
				// the request queued at submit: the job waits for it, or
				// for its deadline; a later term queues it again.
				q.log.Warn().Err(err).Str("job", job.ID).Msg("could not queue a waiting job again now; it stays queued")
			default:
				q.failJob(ctx, job.ID, "the queen restarted and could not queue the job again: "+err.Error())
			}
		case job.Op.Kind == api.OpInfer:
		default:
			if err := q.fence(ctx, t, "fail-orphan", job.ID); err != nil {
				return err
			}
			fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, _ = q.jobs.Transition(fctx, job.ID, api.JobFailed, func(j *api.Job) {
				j.Error = "the queen restarted while this operation ran; run it again"
			})
			cancel()
		}
	}
	return nil
}
