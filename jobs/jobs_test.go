package jobs_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCheckTransition(t *testing.T) {
	cases := []struct {
		from, to api.JobState
		want     error
	}{
		{api.JobQueued, api.JobRunning, nil},
		{api.JobQueued, api.JobCancelled, nil},
		{api.JobQueued, api.JobFailed, nil},
		{api.JobQueued, api.JobCompleted, jobs.ErrIllegalTransition},
		{api.JobQueued, api.JobQueued, jobs.ErrIllegalTransition},
		{api.JobRunning, api.JobCompleted, nil},
		{api.JobRunning, api.JobFailed, nil},
		{api.JobRunning, api.JobCancelled, nil},
		{api.JobRunning, api.JobQueued, nil},
		{api.JobRunning, api.JobRunning, jobs.ErrIllegalTransition},
		{api.JobCompleted, api.JobCancelled, jobs.ErrTerminal},
		{api.JobFailed, api.JobRunning, jobs.ErrTerminal},
		{api.JobCancelled, api.JobCancelled, jobs.ErrTerminal},
		{api.JobQueued, "exploded", jobs.ErrIllegalTransition},
	}
	for _, c := range cases {
		t.Run(string(c.from)+"→"+string(c.to), func(t *testing.T) {
			err := jobs.CheckTransition(c.from, c.to)
			if c.want == nil {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, c.want)
			}
		})
	}
}

func TestNewIDIsAValidTokenAndSorts(t *testing.T) {
	a := jobs.NewID()
	time.Sleep(2 * time.Millisecond)
	b := jobs.NewID()
	require.NoError(t, subjects.ValidateID(subjects.KindJob, a))
	require.Len(t, a, 16)
	require.Less(t, a, b)
}

func openStore(t *testing.T) (*jobs.Store, *busfix.Fixture) {
	f := busfix.Start(t)
	s, err := jobs.Open(context.Background(), f.Bus, api.Actor{Component: "test"}, time.Hour)
	require.NoError(t, err)
	return s, f
}

func TestLifecycleAndStateEvents(t *testing.T) {
	s, f := openStore(t)
	ctx := context.Background()
	job, err := s.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpNoop}})
	require.NoError(t, err)
	require.Equal(t, api.JobQueued, job.State)

	_, err = s.Transition(ctx, job.ID, api.JobRunning, func(j *api.Job) { j.Worker = "w1" })
	require.NoError(t, err)
	res, _ := json.Marshal(map[string]int{"tokens": 3})
	done, err := s.Transition(ctx, job.ID, api.JobCompleted, func(j *api.Job) { j.Result = res })
	require.NoError(t, err)
	require.NotNil(t, done.FinishedAt)

	// A terminal state is final.
	_, err = s.Transition(ctx, job.ID, api.JobCancelled, nil)
	require.ErrorIs(t, err, jobs.ErrTerminal)

	var states []api.JobState
	ctx2, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	require.NoError(t, f.Bus.Follow(ctx2, job.ID, 0, func(ev api.Event) error {
		if ev.State != nil {
			states = append(states, ev.State.State)
		}
		return nil
	}))
	require.Equal(t, []api.JobState{api.JobQueued, api.JobRunning, api.JobCompleted}, states)

	got, err := s.Get(ctx, job.ID)
	require.NoError(t, err)
	assert.Equal(t, "w1", got.Worker)
	assert.JSONEq(t, string(res), string(got.Result))
}

func TestCompareAndSwapDetectsConflict(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	job, err := s.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpNoop}})
	require.NoError(t, err)

	// Two writers read the same revision; the second write must fail.
	a, b := job, job
	a.Hive = "first"
	_, err = s.CompareAndSwap(ctx, a)
	require.NoError(t, err)
	b.Hive = "second"
	_, err = s.CompareAndSwap(ctx, b)
	require.ErrorIs(t, err, jobs.ErrConflict)

	got, err := s.Get(ctx, job.ID)
	require.NoError(t, err)
	require.Equal(t, "first", got.Hive)
}

func TestConcurrentTerminalTransitionsEndInOneState(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	job, err := s.Create(ctx, api.Job{ID: jobs.NewID()})
	require.NoError(t, err)
	_, err = s.Transition(ctx, job.ID, api.JobRunning, nil)
	require.NoError(t, err)
	errs := make(chan error, 2)
	go func() { _, err := s.Transition(ctx, job.ID, api.JobCompleted, nil); errs <- err }()
	go func() { _, err := s.Transition(ctx, job.ID, api.JobCancelled, nil); errs <- err }()
	e1, e2 := <-errs, <-errs
	// Exactly one wins; the other sees a finished job.
	require.True(t, (e1 == nil) != (e2 == nil), "e1=%v e2=%v", e1, e2)
	lost := e1
	if lost == nil {
		lost = e2
	}
	require.True(t, errors.Is(lost, jobs.ErrTerminal))
}

func TestListFiltersByStateAndMissingJob(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	var ids []string
	for i := 0; i < 5; i++ {
		j, err := s.Create(ctx, api.Job{ID: jobs.NewID()})
		require.NoError(t, err)
		ids = append(ids, j.ID)
	}
	_, err := s.Transition(ctx, ids[1], api.JobCancelled, nil)
	require.NoError(t, err)
	all, err := s.List(ctx, "")
	require.NoError(t, err)
	require.Len(t, all, 5)
	cancelled, err := s.List(ctx, api.JobCancelled)
	require.NoError(t, err)
	require.Len(t, cancelled, 1)
	require.Equal(t, ids[1], cancelled[0].ID)

	_, err = s.Get(ctx, "nope")
	require.ErrorIs(t, err, jobs.ErrNotFound)
	_, err = s.Get(ctx, "a.b")
	require.ErrorIs(t, err, subjects.ErrInvalidID)
}

// Every attempt at a job is fenced: a request of an old attempt cannot take
// the job again, and a worker given up (paused, cut off) can neither finish
// nor retry a job that moved on without it.
func TestAttemptsAreFenced(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	job, err := s.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	w1 := jobs.Attempt{Number: 1, Worker: "w1"}
	w2 := jobs.Attempt{Number: 2, Worker: "w2"}

	_, err = s.Take(ctx, job.ID, w2, "h1")
	require.ErrorIs(t, err, jobs.ErrStale, "attempt 2 before attempt 1")
	taken, err := s.Take(ctx, job.ID, w1, "h1")
	require.NoError(t, err)
	require.Equal(t, 1, taken.Attempts)
	require.Equal(t, "w1", taken.Worker)

	// The queen gives w1 up and retries the job.
	retried, err := s.Retry(ctx, job.ID, w1)
	require.NoError(t, err)
	require.Equal(t, api.JobQueued, retried.State)
	require.Empty(t, retried.Worker)

	// w1's request, redelivered, is stale; w1 waking up cannot fail the
	// waiting retry (queued → failed is a legal transition).
	_, err = s.Take(ctx, job.ID, w1, "h1")
	require.ErrorIs(t, err, jobs.ErrStale)
	_, err = s.Finish(ctx, job.ID, w1, api.JobFailed, nil)
	require.ErrorIs(t, err, jobs.ErrStale)

	_, err = s.Take(ctx, job.ID, w2, "h2")
	require.NoError(t, err)
	_, err = s.Finish(ctx, job.ID, w1, api.JobCompleted, nil)
	require.ErrorIs(t, err, jobs.ErrStale, "a stale worker cannot finish the new attempt")
	_, err = s.Retry(ctx, job.ID, w1)
	require.ErrorIs(t, err, jobs.ErrStale, "nor retry it")
	done, err := s.Finish(ctx, job.ID, w2, api.JobCompleted, nil)
	require.NoError(t, err)
	require.Equal(t, api.JobCompleted, done.State)
	_, err = s.Finish(ctx, job.ID, w2, api.JobFailed, nil)
	require.ErrorIs(t, err, jobs.ErrTerminal)
}

// A request refused before any work fails only the job waiting for its
// attempt: not a job another worker took meanwhile, nor one waiting for a
// later attempt.
func TestRejectFailsOnlyAJobWaitingForTheAttempt(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	create := func() string {
		job, err := s.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpInfer}})
		require.NoError(t, err)
		return job.ID
	}
	w1 := jobs.Attempt{Number: 1, Worker: "w1"}
	why := api.Fail(api.ReasonInvalidParam, "prompt", "the prompt is too long")

	taken := create()
	_, err := s.Take(ctx, taken, jobs.Attempt{Number: 1, Worker: "w2"}, "h2")
	require.NoError(t, err)
	_, err = s.Reject(ctx, taken, w1, "h1", why)
	require.ErrorIs(t, err, jobs.ErrStale, "another worker took it")
	job, err := s.Get(ctx, taken)
	require.NoError(t, err)
	require.Equal(t, api.JobRunning, job.State)

	_, err = s.Reject(ctx, create(), jobs.Attempt{Number: 2, Worker: "w1"}, "h1", why)
	require.ErrorIs(t, err, jobs.ErrStale, "the job waits for attempt 1")

	waiting := create()
	failed, err := s.Reject(ctx, waiting, w1, "h1", why)
	require.NoError(t, err)
	require.Equal(t, api.JobFailed, failed.State)
	require.Equal(t, why.Message, failed.Error)
	require.Equal(t, api.ReasonInvalidParam, failed.Reason)
	require.Equal(t, "w1", failed.Worker)
	_, err = s.Reject(ctx, waiting, w1, "h1", why)
	require.ErrorIs(t, err, jobs.ErrTerminal, "a copy of the request finds it ended")
}
