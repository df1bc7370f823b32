package jobs

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
)

// readCounter counts the record reads of a store.
type readCounter struct {
	jetstream.KeyValue
	reads atomic.Int32
}

func (r *readCounter) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	r.reads.Add(1)
	return r.KeyValue.Get(ctx, key)
}

// countingStore is a store on a bus of its own whose record reads are
// counted.
func countingStore(t *testing.T) (*Store, *readCounter) {
	t.Helper()
	f := busfix.Start(t)
	s, err := Open(context.Background(), f.Bus, api.Actor{Component: "test"}, time.Hour)
	require.NoError(t, err)
	rc := &readCounter{KeyValue: s.kv}
	s.kv = rc
	return s, rc
}

// A worker handed the record as the queen created it takes the job with
// one write and no read; a copy that is stale (the job was cancelled, or
// retried, since) is read again and refused as Take refuses it.
func TestTakeAtWritesWithoutReading(t *testing.T) {
	ctx := context.Background()
	s, rc := countingStore(t)
	w1 := Attempt{Number: 1, Worker: "w1"}

	created, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	rc.reads.Store(0)
	taken, err := s.TakeAt(ctx, created, w1, "h1")
	require.NoError(t, err)
	require.Zero(t, rc.reads.Load(), "a fresh copy is written against without a read")
	require.Equal(t, api.JobRunning, taken.State)
	stored, err := s.Get(ctx, created.ID)
	require.NoError(t, err)
	require.Equal(t, taken, stored, "the record holds the take, whole")
	require.Equal(t, created.Deadline, stored.Deadline)
	require.Equal(t, created.CreatedAt, stored.CreatedAt)

	// Cancelled while queued: the copy is stale, the read says so.
	cancelled, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	_, err = s.Transition(ctx, cancelled.ID, api.JobCancelled, nil)
	require.NoError(t, err)
	rc.reads.Store(0)
	_, err = s.TakeAt(ctx, cancelled, w1, "h1")
	require.ErrorIs(t, err, ErrTerminal)
	require.NotZero(t, rc.reads.Load())

	// A request of attempt 1 redelivered after the job was taken and
	// retried: stale too.
	retried, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	_, err = s.Take(ctx, retried.ID, w1, "h1")
	require.NoError(t, err)
	_, err = s.Retry(ctx, retried.ID, w1)
	require.NoError(t, err)
	_, err = s.TakeAt(ctx, retried, w1, "h2")
	require.ErrorIs(t, err, ErrStale)

	// Without a revision it is Take.
	plain, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	plain.Revision = 0
	_, err = s.TakeAt(ctx, plain, w1, "h1")
	require.NoError(t, err)
}

// A worker ending its job against the record it just read writes once,
// without a second read; a copy that went stale since (the queen retried
// the job) loses the write and the record read again refuses it; and a
// copy older than the worker's own take is not trusted to refuse: the
// record is read and the end recorded.
func TestFinishAtWritesWithoutReading(t *testing.T) {
	ctx := context.Background()
	s, rc := countingStore(t)
	w1 := Attempt{Number: 1, Worker: "w1"}
	result := func(j *api.Job) { j.Result = []byte(`{"tokens":3}`) }

	created, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	taken, err := s.TakeAt(ctx, created, w1, "h1")
	require.NoError(t, err)
	rc.reads.Store(0)
	done, err := s.FinishAt(ctx, taken, w1, api.JobCompleted, result)
	require.NoError(t, err)
	require.Zero(t, rc.reads.Load(), "a current copy is written against without a read")
	stored, err := s.Get(ctx, created.ID)
	require.NoError(t, err)
	require.Equal(t, done, stored)
	require.Equal(t, api.JobCompleted, stored.State)
	require.JSONEq(t, `{"tokens":3}`, string(stored.Result))

	// Retried by the queen after the copy was read: the write conflicts,
	// and the record read again refuses it as Finish would (the job is
	// queued again).
	retried, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	copyOfTake, err := s.Take(ctx, retried.ID, w1, "h1")
	require.NoError(t, err)
	_, err = s.Retry(ctx, retried.ID, w1)
	require.NoError(t, err)
	_, err = s.FinishAt(ctx, copyOfTake, w1, api.JobCompleted, result)
	require.ErrorIs(t, err, ErrIllegalTransition)
	stored, err = s.Get(ctx, retried.ID)
	require.NoError(t, err)
	require.Equal(t, api.JobQueued, stored.State, "the retried job waits for its next attempt")

	// A copy from before the take (a read that lagged): read again.
	lagging, err := s.Create(ctx, api.Job{ID: NewID(), Op: api.Operation{Kind: api.OpInfer}})
	require.NoError(t, err)
	_, err = s.Take(ctx, lagging.ID, w1, "h1")
	require.NoError(t, err)
	rc.reads.Store(0)
	_, err = s.FinishAt(ctx, lagging, w1, api.JobCompleted, result)
	require.NoError(t, err)
	require.NotZero(t, rc.reads.Load())
	stored, err = s.Get(ctx, lagging.ID)
	require.NoError(t, err)
	require.Equal(t, api.JobCompleted, stored.State)
}
