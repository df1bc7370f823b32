package queen

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// runQueenOn runs queen id on the external bus at url in this process; stop
// ends it cleanly (and is safe to call twice).
func runQueenOn(t *testing.T, url, id string) (q *Queen, stop func()) {
	t.Helper()
	ready := make(chan *Queen, 1)
	cfg := Config{DataDir: t.TempDir(), NATSURL: url, QueenID: id, LeaseTTL: testLeaseTTL, Log: zerolog.Nop(),
		Ready: func(q *Queen) { ready <- q }}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(20 * time.Second):
			t.Error("queen did not shut down")
		}
	}
	t.Cleanup(stop)
	select {
	case q = <-ready:
	case err := <-done:
		t.Fatalf("queen %s failed to start: %v", id, err)
	case <-time.After(20 * time.Second):
		t.Fatalf("queen %s did not become ready", id)
	}
	return q, stop
}

// A standby answers what a leader answers, from the bus: its status names
// the leader, its queue depth is the work queue's, and the deadline of a job
// it took is kept by the leader, which watches every record. When the
// leader stops, the standby leads at its next try.
func TestStandbyServesWhileAnotherQueenLeads(t *testing.T) {
	f := busfix.Start(t)
	a, stopA := runQueenOn(t, f.URL, "queen-a")
	require.True(t, a.Leading(), "the first queen on a bus leads at once")
	b, _ := runQueenOn(t, f.URL, "queen-b")
	require.False(t, b.Leading())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	st, err := b.status(ctx, struct{}{})
	require.NoError(t, err)
	require.Equal(t, "queen-b", st.Queen)
	require.Equal(t, api.QueenStandby, st.Role)
	require.Equal(t, "queen-a", st.Leader)
	st, err = a.status(ctx, struct{}{})
	require.NoError(t, err)
	require.Equal(t, api.QueenLeader, st.Role)
	require.Equal(t, "queen-a", st.Leader)

	// Requests on a model's work queue that no worker took are the
	// standby's depth; the leader counts job records, of which there are
	// none here.
	subject, err := f.Bus.Space.Infer("m1")
	require.NoError(t, err)
	for i := range 3 {
		_, err := f.Bus.JS.Publish(ctx, subject, []byte(fmt.Sprintf(`{"job_id":"j%d"}`, i)))
		require.NoError(t, err)
	}
	require.Equal(t, 3, b.queueDepth(ctx, "m1", "m1"))
	require.Equal(t, map[string]int{"m1": 3}, b.queueDepths(ctx))
	require.Equal(t, 0, a.queueDepth(ctx, "m1", "m1"))

	// A job submitted to the standby outlives its deadline: the leader
	// fails it.
	args, _ := json.Marshal(noopArgs{Sleep: api.Duration(time.Minute)})
	reply, err := b.submit(ctx, api.SubmitRequest{Op: api.Operation{Kind: api.OpNoop, Args: args}, Timeout: api.Duration(300 * time.Millisecond)})
	require.NoError(t, err)
	var job api.Job
	require.Eventually(t, func() bool {
		job, err = b.jobs.Get(ctx, reply.JobID)
		return err == nil && job.State.Terminal()
	}, 10*time.Second, 20*time.Millisecond, "the job outlived its deadline")
	require.Equal(t, api.JobFailed, job.State)
	require.Equal(t, api.ReasonTimeout, job.Reason)
	require.Contains(t, job.Error, "timed out after 300ms")

	// The leader stops cleanly and releases the lease: the standby takes
	// it at its next try, not once it expires. A release deletes the
	// key, while an expiry leaves no mark in this bucket: the key's
	// watcher sees the release, then the standby's take. (Timed against
	// the lease's TTL instead, a machine busy enough to hold up the
	// leader's shutdown for a TTL made this fail.)
	leases, err := f.Bus.JS.KeyValue(ctx, f.Bus.Space.LeasesBucket())
	require.NoError(t, err)
	changes, err := leases.Watch(ctx, subjects.SchedulerLease, jetstream.UpdatesOnly())
	require.NoError(t, err)
	defer func() { _ = changes.Stop() }()
	stopA()
	next := func() jetstream.KeyValueEntry {
		select {
		case e := <-changes.Updates():
			return e
		case <-ctx.Done():
			t.Fatal("the lease did not change")
			return nil
		}
	}
	// The leader may renew the lease (every third of its TTL) between
	// the watch's start and its stop; what follows its renewals must be
	// the release.
	released := next()
	for released.Operation() == jetstream.KeyValuePut && strings.Contains(string(released.Value()), `"queen-a"`) {
		released = next()
	}
	require.Equal(t, jetstream.KeyValueDelete, released.Operation(), "the leader released the lease")
	taken := next()
	require.Equal(t, jetstream.KeyValuePut, taken.Operation())
	require.Contains(t, string(taken.Value()), `"queen-b"`, "the standby took it")
	require.Eventually(t, b.Leading, 10*time.Second, 10*time.Millisecond, "the standby did not take the released lease")
	st, err = b.status(ctx, struct{}{})
	require.NoError(t, err)
	require.Equal(t, api.QueenLeader, st.Role)
	require.Equal(t, "queen-b", st.Leader)
}
