package worker

import (
	"context"
	"sync/atomic"
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

// A take that got no answer is settled by taking the job again: the job is
// this worker's when the first write was applied (the job runs on this
// attempt, taken by this process, after it started) or when the new write
// is.
func TestATakeWhoseAnswerWasLostIsSettledByTakingAgain(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	store, err := jobs.Open(ctx, f.Bus, api.Actor{Component: "worker", ID: "w1"}, time.Hour)
	require.NoError(t, err)
	w := &worker{cfg: Config{ID: "w1"}, store: store, started: time.Now().UTC().Add(-time.Second)}
	mine := jobs.Attempt{Number: 1, Worker: "w1"}
	job := func() string {
		j, err := store.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpInfer}})
		require.NoError(t, err)
		return j.ID
	}
	retake := func(id string, a jobs.Attempt) bool {
		t.Helper()
		taken, err := w.retake(func(ctx context.Context) (api.Job, error) { return store.Take(ctx, id, a, "h1") }, func() {})
		if err == nil {
			return true
		}
		require.ErrorIs(t, err, jobs.ErrIllegalTransition)
		return w.ownTake(taken, id, a)
	}

	taken := job()
	_, err = store.Take(ctx, taken, mine, "h1")
	require.NoError(t, err)
	require.True(t, retake(taken, mine), "applied: the job runs on this attempt")
	require.False(t, w.ownTake(mustGet(t, store, taken), taken, jobs.Attempt{Number: 2, Worker: "w1"}), "another attempt")

	waiting := job()
	require.True(t, retake(waiting, mine), "not applied: taken now")
	require.Equal(t, api.JobRunning, mustGet(t, store, waiting).State)

	other := job()
	_, err = store.Take(ctx, other, jobs.Attempt{Number: 1, Worker: "w2"}, "h1")
	require.NoError(t, err)
	require.False(t, retake(other, mine), "another worker runs it")

	w.started = time.Now().UTC().Add(time.Second)
	require.False(t, retake(taken, mine), "taken before this process started: an earlier worker of this id")
}

func mustGet(t *testing.T, s *jobs.Store, id string) api.Job {
	t.Helper()
	j, err := s.Get(context.Background(), id)
	require.NoError(t, err)
	return j
}

// A take whose answer was lost in a cut longer than one bus operation's
// bound, and longer than a job's tokens wait for the bus, keeps its
// request and takes the job again until the bus is back: letting the
// request go first could hand it to another worker, which finds the job
// running here and drops it, and the job would wait on this live worker
// for its deadline.
func TestATakeWhoseAnswerWasLostWaitsForTheBus(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	proxy := f.Proxy(t)
	actor := api.Actor{Component: "worker", ID: "w1"}
	store, err := jobs.Open(ctx, busfix.Connect(t, "nats://"+proxy.Addr()), actor, time.Hour)
	require.NoError(t, err)
	w := &worker{cfg: Config{ID: "w1", BusOutage: time.Second}, store: store, started: time.Now().UTC().Add(-time.Second)}
	mine := jobs.Attempt{Number: 1, Worker: "w1"}
	direct, err := jobs.Open(ctx, f.Bus, actor, time.Hour)
	require.NoError(t, err)
	j, err := direct.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	_, err = direct.Take(ctx, j.ID, mine, "h1")
	require.NoError(t, err, "the take as the worker's own write left it")

	proxy.Cut()
	var held atomic.Int32
	type settled struct {
		taken api.Job
		err   error
	}
	took := make(chan settled, 1)
	go func() {
		taken, err := w.retake(func(ctx context.Context) (api.Job, error) { return store.Take(ctx, j.ID, mine, "h1") },
			func() { held.Add(1) })
		took <- settled{taken, err}
	}()
	// Longer than one operation's bound (busTimeout), and than the outage
	// bound and one more try: the waits the take got before, when the
	// request went back to the queue.
	time.Sleep(busTimeout + 3*time.Second)
	select {
	case s := <-took:
		t.Fatalf("settled (%v) while the bus was away", s.err)
	default:
	}
	require.Positive(t, held.Load(), "the request is kept in progress meanwhile")
	proxy.Heal()
	select {
	case s := <-took:
		require.ErrorIs(t, s.err, jobs.ErrIllegalTransition)
		require.True(t, w.ownTake(s.taken, j.ID, mine), "the job runs on this attempt: the lost take was applied")
	case <-time.After(30 * time.Second):
		t.Fatal("the take was not settled once the bus was back")
	}
}
