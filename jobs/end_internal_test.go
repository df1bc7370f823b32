package jobs

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
)

// The end of a job is published until the stream takes it, and a try whose
// answer was lost may have been stored: the copy a retry sends (the same
// event of the same record revision) is dropped by the stream, so a
// follower, or anyone reading the stream, sees the job end once.
func TestAJobsEndIsStoredOnceWhenItsPublishIsRetried(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	s, err := Open(ctx, f.Bus, api.Actor{Component: "test"}, time.Hour)
	require.NoError(t, err)
	job, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	w1 := Attempt{Number: 1, Worker: "w1"}
	_, err = s.Take(ctx, job.ID, w1, "h1")
	require.NoError(t, err)
	done, err := s.Finish(ctx, job.ID, w1, api.JobCompleted, nil)
	require.NoError(t, err)
	s.publishState(ctx, done, api.JobRunning) // the retry of a try whose answer was lost

	subject, err := f.Bus.Space.JobEvent(job.ID, subjects.EventState)
	require.NoError(t, err)
	cons, err := f.Bus.JS.OrderedConsumer(ctx, f.Bus.Space.JobsStream(), jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	require.NoError(t, err)
	// Every stored state event: the batch ends when the stream has no more.
	batch, err := cons.Fetch(100, jetstream.FetchMaxWait(time.Second))
	require.NoError(t, err)
	var states []api.JobState
	for m := range batch.Messages() {
		ev, err := bus.DecodeEvent(f.Bus.Space, m)
		require.NoError(t, err)
		states = append(states, ev.State.State)
	}
	require.NoError(t, batch.Error())
	require.Equal(t, []api.JobState{api.JobQueued, api.JobRunning, api.JobCompleted}, states)
}
