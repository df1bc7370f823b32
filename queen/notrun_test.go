package queen

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

// A worker that does not run a job its record says it runs (a take or an
// end whose write failed in a way the worker did not see through) lives
// on and beats. Its heartbeats list the jobs its slots hold, so the leader sees
// that nobody runs this one and queues it again within two beats, as for
// a lost worker, rather than leaving it "running" until its deadline.
func TestAJobItsLiveWorkerDoesNotRunIsQueuedAgain(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	b := busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	announceHive(t, q, b, "h1", "tiny")
	workers, err := b.KV(ctx, b.Space.WorkersBucket())
	require.NoError(t, err)
	started := time.Now().UTC()
	var last time.Time
	beat := func(held ...string) error {
		last = time.Now().UTC()
		data, _ := json.Marshal(api.WorkerStatus{
			ID: "w1", Hive: "h1", Model: "tiny", ModelKey: "tiny", Device: "cpu", SlotsTotal: 1, State: api.WorkerReady,
			StartedAt: started, BeatAt: last, Jobs: append([]string{}, held...),
		})
		_, err := workers.Put(ctx, subjects.WorkerKey("h1", "w1"), data)
		return err
	}
	require.NoError(t, beat())
	_, err = q.registry.Wait(ctx, func(s *Snapshot) bool { _, ok := s.Workers["w1"]; return ok })
	require.NoError(t, err)

	args, _ := json.Marshal(api.InferArgs{Model: "tiny", Prompt: "hello"})
	var reply api.SubmitReply
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: args}}, &reply))
	store, err := jobs.Open(ctx, b, api.Actor{Component: "worker", ID: "w1"}, 0)
	require.NoError(t, err)
	_, err = store.Take(ctx, reply.JobID, jobs.Attempt{Number: 1, Worker: "w1"}, "h1")
	require.NoError(t, err, "the take, as the worker's write left it")

	// The worker hears that its attempt is given up (api.GiveUp), so
	// that, should it run the job after all, it stops without recording
	// an end of its own.
	cancelSubject, err := b.Space.JobCancel(reply.JobID)
	require.NoError(t, err)
	signals, err := b.NC.SubscribeSync(cancelSubject)
	require.NoError(t, err)
	require.NoError(t, b.NC.Flush())

	// While the worker lists the job, it runs it: two such beats seen.
	for range 2 {
		require.NoError(t, beat(reply.JobID))
		_, err = q.registry.Wait(ctx, func(s *Snapshot) bool {
			w := s.Workers["w1"]
			return !w.BeatAt.Before(last) && slices.Contains(w.Jobs, reply.JobID)
		})
		require.NoError(t, err)
	}
	job, err := q.jobs.Get(ctx, reply.JobID)
	require.NoError(t, err)
	require.Equal(t, api.JobRunning, job.State)

	// Beats that do not list it, as often as the registry reads them.
	require.Eventually(t, func() bool {
		if beat() != nil {
			return false
		}
		job, err = q.jobs.Get(ctx, reply.JobID)
		return err == nil && job.State == api.JobQueued
	}, 10*time.Second, refreshEvery, "the job is queued again")
	require.Equal(t, 1, job.Attempts, "its next request is attempt 2")
	require.Empty(t, job.Worker)
	msg, err := signals.NextMsg(5 * time.Second)
	require.NoError(t, err, "the worker is told")
	var given api.GiveUp
	require.NoError(t, json.Unmarshal(msg.Data, &given))
	require.Equal(t, 1, given.Attempt)
	require.NotNil(t, given.Error)
	require.Equal(t, api.ReasonWorkerLost, given.Error.Reason)
}
