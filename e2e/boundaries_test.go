package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

// Failure at the boundaries: a queen down for longer than a heartbeat's
// TTL, a worker paused long enough to be given up, a spawn that fails with
// jobs waiting on it, and a hive killed with queued work. In each, no job is
// lost, none is stranded, and every reason is true.

// streamText is a finished job's text as its token events hold it, the one
// place the text is stored: followed from the start, each token once, in
// order, the tokens of an attempt given up left out.
func (c *cluster) streamText(id string) string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var b strings.Builder
	require.NoError(c.t, c.connect().Follow(ctx, id, 0, func(ev api.Event) error {
		if ev.Token != nil {
			b.WriteString(ev.Token.Text)
		}
		return nil
	}))
	return b.String()
}

// failedOnItsWorker submits, over the bus as any client may, a job that its
// worker takes and fails: it asks for its first token within a nanosecond
// (every check that can be made before a worker takes a job is made at
// admission, so a bad parameter never gets this far). It returns the job
// once failed.
func (c *cluster) failedOnItsWorker(model string) api.Job {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b := c.connect()
	raw, _ := json.Marshal(api.InferArgs{Model: model, Prompt: "hello", FirstTokenTimeout: api.Duration(time.Nanosecond)})
	var reply api.SubmitReply
	require.NoError(c.t, b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}, &reply))
	var end *api.StateChange
	require.NoError(c.t, b.Follow(ctx, reply.JobID, 0, func(ev api.Event) error {
		if ev.Terminal() {
			end = ev.State
		}
		return nil
	}))
	require.Equal(c.t, api.JobFailed, end.State, end.Error)
	require.Equal(c.t, api.ReasonTimeout, end.Reason, end.Error)
	require.Contains(c.t, end.Error, "no first token within")
	return c.job(reply.JobID)
}

// A queen (and its embedded bus) down past the heartbeat TTL comes back
// without failing the job of a worker that lived through it: the restarted
// queen judges liveness only once workers had a heartbeat's time to beat
// again, and the keeper's answer equals a run with no outage.
func TestQueenDownPastTheHeartbeatTTLKeepsLiveJobsStreaming(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	c.readyHive(map[string]string{"large": "large"})
	k := c.start(longInfer()...)
	eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	c.killQueen()
	// Down for longer than the entries' 3 s TTL, so they expire while the
	// bus is away: what the restarted queen reads says "lost" of every
	// worker and hive.
	time.Sleep(6 * time.Second)
	c.startQueen()
	// At once, before the hive has beaten again: a new job is taken, not
	// refused with "no hive is online".
	r0 := c.rbee("infer", "--detach", "-m", "large", "--max-tokens", "3", "right after the restart")
	require.Equal(t, 0, r0.code, r0.stderr)
	require.Equal(t, 0, k.wait(t, 120*time.Second), k.stderr.String())

	after := strings.TrimSpace(r0.stdout)
	eventually(t, 60*time.Second, func() bool { return c.job(after).State == api.JobCompleted }, "the job submitted right after the restart did not complete")
	j := c.job(k.jobID(t))
	var res api.InferResult
	require.NoError(t, json.Unmarshal(j.Result, &res))
	require.Equal(t, longTokens, res.CompletionTokens)
	require.Equal(t, longGreedy.text+"\n", k.stdout.String(), "the keeper's answer equals a run with no outage")
	require.Equal(t, longGreedy.text, c.streamText(j.ID))
	require.Empty(t, j.Error)
	require.Equal(t, 1, j.Attempts, "the job ran once, on the worker that lived")
}

// A worker paused (SIGSTOP) long enough to be declared lost loses its job,
// with a reason that says what is known; resumed (SIGCONT), it can change
// nothing: the record stays failed and a follower replaying the job sees
// the same end.
func TestPausedWorkerGivenUpCannotChangeTheOutcome(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	ws := c.readyWorkers("large", 1)
	k := c.start(longInfer()...)
	eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	id := k.jobID(t)
	require.NoError(t, syscall.Kill(ws[0].PID, syscall.SIGSTOP))
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = syscall.Kill(ws[0].PID, syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)

	require.Equal(t, 1, k.wait(t, 30*time.Second), k.stderr.String())
	lost := fmt.Sprintf("worker %s on hive local was lost: no heartbeat since", ws[0].ID)
	require.Contains(t, k.stderr.String(), lost)
	require.NotContains(t, k.stderr.String(), "died", "the worker was alive all along")
	before := c.job(id)
	require.Equal(t, api.JobFailed, before.State)

	resume()
	// The worker wakes, is told its job is over, beats again and serves.
	eventually(t, 30*time.Second, func() bool {
		ws := c.workers()
		return len(ws) == 1 && ws[0].ID == before.Worker && ws[0].SlotsBusy == 0
	}, "the resumed worker did not come back idle")
	after := c.job(id)
	require.Equal(t, api.JobFailed, after.State)
	require.Equal(t, before.Error, after.Error)
	require.Equal(t, before.Revision, after.Revision, "the resumed worker wrote nothing to the record")
	replay := c.rbee("jobs", "attach", id)
	require.Equal(t, 1, replay.code, replay.stderr)
	require.Contains(t, replay.stderr, lost)
	require.Equal(t, k.stdout.String(), replay.stdout, "a late follower sees the same tokens and the same end")
}

// A spawn that fails fails every job waiting on it, with the spawn's
// reason, at once: not the first one and the rest at their deadline.
func TestFailedSpawnFailsEveryWaiterAtOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons().setEnv("RBEE_HIVE_ARGS=--worker-bin=/bin/false")
	c.readyHive(map[string]string{"tiny": "tiny"})
	var ids []string
	for i := range 3 {
		r := c.mustRbee("infer", "--detach", "-m", "tiny", fmt.Sprintf("hello %d", i))
		ids = append(ids, strings.TrimSpace(r.stdout))
	}
	var ends []time.Time
	for _, id := range ids {
		eventually(t, 30*time.Second, func() bool { return c.job(id).State.Terminal() }, "job %s still waits", id)
		j := c.job(id)
		require.Equal(t, api.JobFailed, j.State, id)
		require.Contains(t, j.Error, "no worker could be started for tiny", id)
		require.Contains(t, j.Error, "failed to load model tiny", "%s: the spawn's own reason", id)
		ends = append(ends, *j.FinishedAt)
	}
	for _, e := range ends {
		require.WithinDuration(t, ends[0], e, time.Second, "every waiter fails together")
	}
}

// A hive killed with a job running and one queued: the queued job is
// re-placed or failed naming the cause within seconds, never left queued.
func TestKilledHiveLeavesNoQueuedJobStranded(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons().oneSlot()
	c.readyWorkers("large", 1)
	running := c.start(longInfer()...)
	eventually(t, 90*time.Second, func() bool { return running.stdout.String() != "" }, "no token arrived")
	queued := strings.TrimSpace(c.mustRbee("infer", "--detach", "-m", "large", "--max-tokens", "5", "a later question").stdout)
	require.Equal(t, api.JobQueued, c.job(queued).State)

	require.NoError(t, syscall.Kill(c.hiveView("local").Status.PID, syscall.SIGKILL))
	killed := time.Now()
	eventually(t, 30*time.Second, func() bool { return c.job(queued).State.Terminal() }, "the queued job was stranded")
	j := c.job(queued)
	require.Equal(t, api.JobFailed, j.State)
	require.Less(t, j.FinishedAt.Sub(killed), 15*time.Second)
	require.Contains(t, j.Error, "large")
	require.True(t, strings.Contains(j.Error, "hive local") || strings.Contains(j.Error, "no online hive has it"), "the reason names what is missing: %s", j.Error)
	running.wait(t, 60*time.Second)
}

// Jobs queued behind a worker that is stopped get a new worker, and start
// in the order they were submitted: none is overtaken, not even by one
// submitted after the stop.
func TestQueuedJobsOfAStoppedWorkerStartInOrderOnANewOne(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons().oneSlot()
	ws := c.readyWorkers("large", 1)
	running := c.start(longInfer()...)
	eventually(t, 90*time.Second, func() bool { return running.stdout.String() != "" }, "no token arrived")
	var ids []string
	submit := func(i int) {
		r := c.mustRbee("infer", "--detach", "-m", "large", "--temperature", "0", "--max-tokens", "20", fmt.Sprintf("question %d", i))
		ids = append(ids, strings.TrimSpace(r.stdout))
	}
	for i := range 3 {
		submit(i)
	}
	// The grace only has to outlast the running job, which is not what
	// this test is about: 2,000 tokens from a worker built with the race
	// detector, while the rest of the suite runs, took over 60 s in some
	// runs.
	stop := c.start("worker", "stop", ws[0].ID, "--grace", "5m")
	eventually(t, 30*time.Second, func() bool {
		for _, w := range c.workers() {
			if w.ID == ws[0].ID && w.State == api.WorkerDraining {
				return true
			}
		}
		return false
	}, "the worker did not start draining")
	submit(3)
	for _, id := range ids {
		eventually(t, 2*time.Minute, func() bool { return c.job(id).State.Terminal() }, "job %s never ended", id)
	}
	var started []time.Time
	for _, id := range ids {
		j := c.job(id)
		require.Equal(t, api.JobCompleted, j.State, "%s: %s", id, j.Error)
		require.NotEqual(t, ws[0].ID, j.Worker, "%s ran on the draining worker", id)
		started = append(started, *j.StartedAt)
	}
	for i := 1; i < len(started); i++ {
		require.True(t, started[i-1].Before(started[i]), "job %d started before job %d: %v", i, i-1, started)
	}
	require.Equal(t, 0, running.wait(t, 5*time.Minute), running.stderr.String())
	require.Equal(t, 0, stop.wait(t, time.Minute), stop.stderr.String())
}

// A max_tokens that fits no serving worker's context, or a prompt too long
// for it, is refused before it becomes a job: workers say their context in
// their heartbeat, and a serving worker measures a long prompt.
func TestRequestsThatDoNotFitTheWorkersContextMakeNoJob(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	ws := c.readyWorkers("tiny", 1)
	require.Equal(t, 2048, ws[0].ContextSize, "the worker reports its context")
	for _, tc := range []struct {
		args  []string
		words []string
	}{
		{[]string{"--max-tokens", "100000", "hello"}, []string{"max_tokens", "2048"}},
		{[]string{strings.Repeat("x", 5000)}, []string{"do not fit", "2048"}},
		{[]string{"--system", strings.Repeat("zq", 3000), "hello"}, []string{"do not fit"}},
	} {
		r := c.rbee(append([]string{"infer", "-m", "tiny"}, tc.args...)...)
		require.Equal(t, 2, r.code, r.stderr)
		for _, w := range tc.words {
			require.Contains(t, r.stderr, w)
		}
		require.NotContains(t, r.stderr, "submitted", "no job was created")
	}
	for _, line := range strings.Split(strings.TrimSpace(c.mustRbee("--json", "jobs", "list").stdout), "\n") {
		var j api.Job
		require.NoError(t, json.Unmarshal([]byte(line), &j), line)
		require.NotEqual(t, api.OpInfer, j.Op.Kind, "an infer job was created: %s", line)
	}
}
