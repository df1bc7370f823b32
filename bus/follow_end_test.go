package bus_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// storeJob stores a job's narration, tokens and states (the last one
// given last) and returns the stream sequence of its last event.
func storeJob(t *testing.T, b *bus.Bus, job string, tokens int, states ...api.JobState) uint64 {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, b.PublishEvent(ctx, job, subjects.EventNarration, api.Narration{JobID: job, Human: "starting"}))
	for i := range tokens {
		require.NoError(t, b.PublishEvent(ctx, job, subjects.EventToken, api.Token{Index: i, Text: fmt.Sprintf("t%d ", i)}))
	}
	for _, s := range states {
		require.NoError(t, b.PublishEvent(ctx, job, subjects.EventState, api.StateChange{State: s, Error: "why " + string(s)}))
	}
	return lastSeq(t, b)
}

func lastSeq(t *testing.T, b *bus.Bus) uint64 {
	t.Helper()
	ctx := context.Background()
	stream, err := b.JS.Stream(ctx, b.Space.JobsStream())
	require.NoError(t, err)
	info, err := stream.Info(ctx)
	require.NoError(t, err)
	return info.State.LastSeq
}

// A follower that resumes past a finished job's terminal event (it crashed
// right after showing it) gets that terminal state at once instead of
// waiting forever for an event that will never come.
func TestFollowFromPastTheEndOfAFinishedJobEndsAtOnce(t *testing.T) {
	f := busfix.Start(t)
	end := storeJob(t, f.Bus, "done", 5, api.JobRunning, api.JobCompleted)
	failedEnd := storeJob(t, f.Bus, "failed", 2, api.JobRunning, api.JobFailed)
	storeJob(t, f.Bus, "later", 3, api.JobRunning, api.JobCompleted) // events after both
	cases := []struct {
		name string
		job  string
		from uint64
		want api.JobState
		seq  uint64
	}{
		{"just past the end", "done", end + 1, api.JobCompleted, end},
		{"far past the end", "done", end + 1000, api.JobCompleted, end},
		{"at the end is the usual replay", "done", end, api.JobCompleted, end},
		{"failed job", "failed", failedEnd + 1, api.JobFailed, failedEnd},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var evs []api.Event
			require.NoError(t, f.Bus.Follow(ctx, tc.job, tc.from, func(ev api.Event) error {
				evs = append(evs, ev)
				return nil
			}))
			require.Len(t, evs, 1, "only the terminal event")
			require.True(t, evs[0].Terminal())
			require.Equal(t, tc.want, evs[0].State.State)
			require.Equal(t, "why "+string(tc.want), evs[0].State.Error)
			require.Equal(t, tc.seq, evs[0].Seq)
			require.Equal(t, string(subjects.EventState), evs[0].Kind)
		})
	}
}

// A job that has not ended yet is still followed live from past its last
// event: the shortcut applies only to a terminal state.
func TestFollowFromPastTheEndOfARunningJobWaitsForItsEnd(t *testing.T) {
	f := busfix.Start(t)
	end := storeJob(t, f.Bus, "busy", 3, api.JobRunning)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got := make(chan api.Event, 8)
	done := make(chan error, 1)
	go func() {
		done <- f.Bus.Follow(ctx, "busy", end+1, func(ev api.Event) error {
			got <- ev
			return nil
		})
	}()
	select {
	case err := <-done:
		t.Fatalf("follow of a running job ended early: %v", err)
	case ev := <-got:
		t.Fatalf("follow from past the end saw an old event: %+v", ev)
	case <-time.After(200 * time.Millisecond):
	}
	require.NoError(t, f.Bus.PublishEvent(ctx, "busy", subjects.EventToken, api.Token{Index: 3, Text: "t3 "}))
	require.NoError(t, f.Bus.PublishEvent(ctx, "busy", subjects.EventState, api.StateChange{State: api.JobCompleted}))
	require.NoError(t, <-done)
	close(got)
	var kinds []string
	for ev := range got {
		kinds = append(kinds, ev.Kind)
	}
	require.Equal(t, []string{"token", "state"}, kinds)
}

// The keeper tells its user when the bus is lost: OnDisconnect fires once
// per loss, with the server's URL, and not for a connection closed on
// purpose.
func TestOnDisconnectReportsALossButNotAClose(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(srv.Shutdown)
	lost := make(chan string, 4)
	connect := func() *bus.Bus {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b, err := bus.Connect(ctx, bus.ConnectConfig{URL: srv.ClientURL(), Reconnect: true, Log: zerolog.Nop(),
			OnDisconnect: func(url string) { lost <- url }})
		require.NoError(t, err)
		t.Cleanup(func() { b.NC.Close() })
		return b
	}
	closed := connect()
	closed.NC.Close()
	connect()
	want := srv.ClientURL()
	srv.Shutdown()
	select {
	case url := <-lost:
		require.Equal(t, want, url)
	case <-time.After(5 * time.Second):
		t.Fatal("no OnDisconnect after the server went away")
	}
	select {
	case url := <-lost:
		t.Fatalf("a second OnDisconnect (%s): a close is no loss, and one loss is reported once", url)
	case <-time.After(300 * time.Millisecond):
	}
}

// A job whose record ended but whose end event never reached the stream
// (its worker was killed between the two writes) does not hold its
// followers for ever: once the stream is quiet they read the record and end
// with its state. A job still running keeps them waiting.
func TestFollowEndsWithTheRecordWhenTheEndEventIsMissing(t *testing.T) {
	f := busfix.Start(t)
	old := bus.EndCheckEvery
	bus.EndCheckEvery = 100 * time.Millisecond
	t.Cleanup(func() { bus.EndCheckEvery = old })
	ctx := context.Background()
	kv, err := f.Bus.KV(ctx, f.Bus.Space.JobsBucket())
	require.NoError(t, err)
	record := func(id string, state api.JobState) {
		data, _ := json.Marshal(api.Job{ID: id, State: state, Worker: "w1", Attempts: 1, Error: "why " + string(state), Reason: api.ReasonWorkerLost})
		_, err := kv.Put(ctx, id, data)
		require.NoError(t, err)
	}
	storeJob(t, f.Bus, "cut", 3, api.JobRunning)
	record("cut", api.JobFailed)
	storeJob(t, f.Bus, "alive", 2, api.JobRunning)
	record("alive", api.JobRunning)

	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var tokens int
	var end *api.StateChange
	require.NoError(t, f.Bus.Follow(fctx, "cut", 0, func(ev api.Event) error {
		if ev.Token != nil {
			tokens++
		}
		if ev.Terminal() {
			end = ev.State
		}
		return nil
	}))
	require.Equal(t, 3, tokens, "every stored token first")
	require.NotNil(t, end)
	require.Equal(t, api.JobFailed, end.State)
	require.Equal(t, "why failed", end.Error)
	require.Equal(t, api.ReasonWorkerLost, end.Reason)

	wctx, wcancel := context.WithTimeout(ctx, time.Second)
	defer wcancel()
	err = f.Bus.Follow(wctx, "alive", 0, func(api.Event) error { return nil })
	require.ErrorIs(t, err, context.DeadlineExceeded, "a running job is followed until it ends")
}

// A follow that starts while the bus is down (a queen restarting between a
// job's submission and its client's attach) attaches once the bus is back,
// however long its first requests go unanswered, and sees the job to its
// end, instead of failing with the first request's timeout.
func TestFollowStartedDuringAnOutageAttachesWhenTheBusIsBack(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	start := func() *bus.Server {
		srv, err := bus.StartServer(bus.ServerConfig{DataDir: dir, Listen: addr, Log: zerolog.Nop()})
		require.NoError(t, err)
		return srv
	}
	srv := start()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: srv.ClientURL(), Reconnect: true, Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(b.NC.Close)
	require.NoError(t, b.EnsureStreams(ctx, bus.DefaultRetention()))
	storeJob(t, b, "outage", 2, api.JobRunning)
	srv.Shutdown()

	done := make(chan error, 1)
	var tokens atomic.Int32
	go func() {
		done <- b.Follow(ctx, "outage", 0, func(ev api.Event) error {
			if ev.Token != nil {
				tokens.Add(1)
			}
			return nil
		})
	}()
	// Longer than a JetStream request's own timeout (5 s).
	select {
	case err := <-done:
		t.Fatalf("the follow ended while the bus was down: %v", err)
	case <-time.After(6 * time.Second):
	}
	srv = start()
	t.Cleanup(srv.Shutdown)
	require.NoError(t, b.PublishEvent(ctx, "outage", subjects.EventState, api.StateChange{State: api.JobCompleted}))
	require.NoError(t, <-done)
	require.EqualValues(t, 2, tokens.Load())
}

// A follow whose consumer stops handing events over while the stream holds
// more of the job (a paused consumer: it beats, so nats.go never makes it
// again; what an ordered consumer sometimes does after a cluster's stream
// leader dies) attaches again after the last event it handed over and goes
// on to the end: every token once, in order.
func TestFollowAttachesAgainWhenItsConsumerStalls(t *testing.T) {
	old := bus.EndCheckEvery
	bus.EndCheckEvery = 200 * time.Millisecond
	t.Cleanup(func() { bus.EndCheckEvery = old })
	f := busfix.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const job, n = "stalled", 20
	require.NoError(t, f.Bus.PublishEvent(ctx, job, subjects.EventToken, api.Token{Index: 0, Text: "t0 "}))
	first := make(chan struct{})
	done := make(chan error, 1)
	var text []byte
	go func() {
		done <- f.Bus.Follow(ctx, job, 0, func(ev api.Event) error {
			if ev.Token != nil {
				text = append(text, ev.Token.Text...)
				if ev.Token.Index == 0 {
					close(first)
				}
			}
			return nil
		})
	}()
	<-first
	// Pause the follow's consumer, then store the rest of the job.
	stream, err := f.Bus.JS.Stream(ctx, f.Bus.Space.JobsStream())
	require.NoError(t, err)
	names := stream.ConsumerNames(ctx)
	var paused int
	for name := range names.Name() {
		_, err := f.Bus.JS.PauseConsumer(ctx, f.Bus.Space.JobsStream(), name, time.Now().Add(time.Hour))
		require.NoError(t, err)
		paused++
	}
	require.Equal(t, 1, paused, "the follow's one consumer")
	var want []byte
	want = append(want, "t0 "...)
	for i := 1; i < n; i++ {
		tok := fmt.Sprintf("t%d ", i)
		want = append(want, tok...)
		require.NoError(t, f.Bus.PublishEvent(ctx, job, subjects.EventToken, api.Token{Index: i, Text: tok}))
	}
	require.NoError(t, f.Bus.PublishEvent(ctx, job, subjects.EventState, api.StateChange{State: api.JobCompleted}))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-ctx.Done():
		t.Fatal("the follow stayed stalled")
	}
	require.Equal(t, string(want), string(text))
}
