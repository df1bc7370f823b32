package queen_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// startQueen runs a real queen with its embedded bus in this process and
// returns a client connection to it.
func startQueen(t *testing.T, mutate func(*queen.Config)) (*queen.Queen, *bus.Bus) {
	t.Helper()
	ready := make(chan *queen.Queen, 1)
	cfg := queen.Config{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", Log: zerolog.Nop(), Ready: func(q *queen.Queen) { ready <- q }}
	if mutate != nil {
		mutate(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- queen.Run(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(20 * time.Second):
			t.Error("queen did not shut down")
		}
	})
	select {
	case q := <-ready:
		return q, busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})
	case err := <-done:
		t.Fatalf("queen failed to start: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("queen did not become ready")
	}
	return nil, nil
}

func submit(t *testing.T, b *bus.Bus, op api.Operation, timeout time.Duration) string {
	t.Helper()
	var reply api.SubmitReply
	require.NoError(t, b.Call(context.Background(), b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: op, Timeout: api.Duration(timeout)}, &reply))
	require.NotEmpty(t, reply.JobID)
	return reply.JobID
}

func followAll(t *testing.T, b *bus.Bus, job string) []api.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var evs []api.Event
	require.NoError(t, b.Follow(ctx, job, 0, func(ev api.Event) error {
		evs = append(evs, ev)
		return nil
	}))
	return evs
}

func TestSubmitReturnsJobIDAndEventsEndInTerminalState(t *testing.T) {
	_, b := startQueen(t, nil)
	// A plain subscriber on everything, like `nats sub 'rbee.>'`, sees the
	// job's narration live.
	live := make(chan *nats.Msg, 64)
	sub, err := b.NC.ChanSubscribe(b.Space.All(), live)
	require.NoError(t, err)
	defer sub.Unsubscribe()

	job := submit(t, b, api.Operation{Kind: api.OpNoop}, 0)
	evs := followAll(t, b, job)
	var states []api.JobState
	sawNarration := false
	for _, ev := range evs {
		if ev.State != nil {
			states = append(states, ev.State.State)
		}
		if ev.Narration != nil && ev.Narration.Actor.Component == "queen" {
			sawNarration = true
		}
	}
	require.Equal(t, []api.JobState{api.JobQueued, api.JobRunning, api.JobCompleted}, states)
	require.True(t, sawNarration)

	narration, _ := b.Space.JobEvent(job, "narration")
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-live:
			if m.Subject == narration {
				return
			}
		case <-deadline:
			t.Fatal("no narration seen by a plain subscriber on " + b.Space.All())
		}
	}
}

func TestCancelRunningJobAndTerminalRules(t *testing.T) {
	_, b := startQueen(t, nil)
	args, _ := json.Marshal(map[string]string{"sleep": "30s"})
	job := submit(t, b, api.Operation{Kind: api.OpNoop, Args: args}, 0)
	ctx := context.Background()
	var cancelled api.Job
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpJobCancel), api.JobRequest{ID: job}, &cancelled))
	require.Equal(t, api.JobCancelled, cancelled.State)
	evs := followAll(t, b, job)
	require.Equal(t, api.JobCancelled, evs[len(evs)-1].State.State)
	// Cancelling twice is harmless.
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpJobCancel), api.JobRequest{ID: job}, nil))

	// Cancelling a finished job is a clear error.
	done := submit(t, b, api.Operation{Kind: api.OpNoop}, 0)
	followAll(t, b, done)
	err := b.Call(ctx, b.Space.Queen(api.EpJobCancel), api.JobRequest{ID: done}, nil)
	require.Equal(t, api.CodeConflict, api.CodeOf(err), "%v", err)
	require.Contains(t, err.Error(), "already completed")
}

func TestJobDeadlineFailsTheJob(t *testing.T) {
	_, b := startQueen(t, nil)
	args, _ := json.Marshal(map[string]string{"sleep": "30s"})
	job := submit(t, b, api.Operation{Kind: api.OpNoop, Args: args}, 300*time.Millisecond)
	evs := followAll(t, b, job)
	last := evs[len(evs)-1].State
	require.Equal(t, api.JobFailed, last.State)
	require.Contains(t, last.Error, "timed out after 300ms")
}

func TestBadRequestsGetClearCodes(t *testing.T) {
	_, b := startQueen(t, nil)
	ctx := context.Background()
	err := b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: "explode"}}, nil)
	require.Equal(t, api.CodeBadRequest, api.CodeOf(err), "%v", err)
	require.Contains(t, err.Error(), `unknown operation "explode"`)

	msg, err := b.NC.Request(b.Space.Queen(api.EpSubmit), []byte("{not json"), 5*time.Second)
	require.NoError(t, err)
	require.Equal(t, "400", msg.Header.Get("Nats-Service-Error-Code"))

	err = b.Call(ctx, b.Space.Queen(api.EpJobGet), api.JobRequest{ID: "a.b"}, nil)
	require.Equal(t, api.CodeBadRequest, api.CodeOf(err))
	err = b.Call(ctx, b.Space.Queen(api.EpJobGet), api.JobRequest{ID: "nosuchjob"}, nil)
	require.Equal(t, api.CodeNotFound, api.CodeOf(err))
	err = b.Call(ctx, b.Space.Queen(api.EpJobList), api.JobListRequest{State: "weird"}, nil)
	require.Equal(t, api.CodeBadRequest, api.CodeOf(err))
	// Inference with no hive online is refused at once.
	args, _ := json.Marshal(api.InferArgs{Model: "tiny", Prompt: "hi"})
	err = b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: args}}, nil)
	require.Equal(t, api.CodeUnavailable, api.CodeOf(err))
	require.Contains(t, err.Error(), "no hive is online")
}

func TestStatusCountsJobsByState(t *testing.T) {
	_, b := startQueen(t, nil)
	for i := 0; i < 2; i++ {
		followAll(t, b, submit(t, b, api.Operation{Kind: api.OpNoop}, 0))
	}
	var st api.Status
	require.NoError(t, b.Call(context.Background(), b.Space.Queen(api.EpStatus), nil, &st))
	require.Equal(t, 2, st.Jobs[api.JobCompleted])
	require.NotEmpty(t, st.Version)
}

// A client may name its job (to follow its events while it is submitted):
// the id is the job's; a malformed one is an invalid job_id and a taken one
// a conflict, and neither makes a job.
func TestSubmitWithAClientChosenJobID(t *testing.T) {
	_, b := startQueen(t, nil)
	ctx := context.Background()
	id := jobs.NewID()
	var reply api.SubmitReply
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpNoop}, JobID: id}, &reply))
	require.Equal(t, id, reply.JobID)
	followAll(t, b, id)

	err := b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpNoop}, JobID: id}, nil)
	require.Equal(t, api.ReasonConflict, api.ReasonOf(err), "%v", err)
	require.Contains(t, err.Error(), "job id "+id+" is taken")

	for _, bad := range []string{"short", "ZZZZZZZZZZZZZZZZ", "a.b.c.d.e.f.g.h."} {
		err := b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpNoop}, JobID: bad}, nil)
		require.Equal(t, api.ReasonInvalidParam, api.ReasonOf(err), "%s: %v", bad, err)
		require.Equal(t, "job_id", api.AsError(err).Param)
	}
	var list api.JobListReply
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpJobList), api.JobListRequest{}, &list))
	require.Len(t, list.Jobs, 1)
}
