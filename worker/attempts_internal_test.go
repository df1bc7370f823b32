package worker

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/stretchr/testify/require"
)

func TestAttemptBook(t *testing.T) {
	var b attemptBook
	now := time.Now()
	require.True(t, b.claim("j1", 1, now))
	require.False(t, b.claim("j1", 1, now), "held by a slot")
	require.True(t, b.claim("j1", 2, now), "another attempt is another claim")
	b.release("j1", 2)
	require.True(t, b.claim("j1", 2, now), "a released attempt may be tried again")

	b.end("j1", 1, now)
	require.False(t, b.claim("j1", 1, now.Add(endedKept)), "an attempt run to its end is not run again")
	require.True(t, b.claim("j1", 1, now.Add(endedKept+time.Second)), "until it is forgotten")
	require.Empty(t, b.ended, "forgotten attempts leave the book")
	require.Empty(t, b.byEnd)

	// Forgotten in the order they ended, each when its time is up.
	b.end("j1", 1, now)
	b.end("j2", 1, now.Add(time.Minute))
	require.True(t, b.claim("j3", 1, now.Add(endedKept+time.Second)))
	require.False(t, b.claim("j2", 1, now.Add(endedKept+time.Second)), "j2 ended later")
	require.Len(t, b.ended, 1)
}

// A take that failed without saying why (its answer lost) reads the record
// again: the job is this worker's when it runs on this attempt, taken by
// this process (after it started).
func TestATakeWhoseAnswerWasLostReadsTheRecord(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	store, err := jobs.Open(ctx, f.Bus, api.Actor{Component: "worker", ID: "w1"}, time.Hour)
	require.NoError(t, err)
	w := &worker{cfg: Config{ID: "w1"}, store: store, started: time.Now().UTC().Add(-time.Second)}
	lost := errors.New("nats: timeout")
	mine := jobs.Attempt{Number: 1, Worker: "w1"}

	job := func() string {
		j, err := store.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpInfer}})
		require.NoError(t, err)
		return j.ID
	}
	taken := job()
	_, err = store.Take(ctx, taken, mine, "h1")
	require.NoError(t, err)
	require.True(t, w.tookEarlier(api.Job{}, lost, taken, mine), "applied: the job runs on this attempt")
	require.False(t, w.tookEarlier(api.Job{}, lost, taken, jobs.Attempt{Number: 2, Worker: "w1"}), "another attempt")

	waiting := job()
	require.False(t, w.tookEarlier(api.Job{}, lost, waiting, mine), "not applied: the job still waits")

	other := job()
	_, err = store.Take(ctx, other, jobs.Attempt{Number: 1, Worker: "w2"}, "h1")
	require.NoError(t, err)
	require.False(t, w.tookEarlier(api.Job{}, lost, other, mine), "another worker runs it")

	w.started = time.Now().UTC().Add(time.Second)
	require.False(t, w.tookEarlier(api.Job{}, lost, taken, mine), "taken before this process started: an earlier worker of this id")
}
