package sched

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

// cluster is a fake View: hives with the model keys they hold, and workers.
type cluster struct {
	mu      sync.Mutex
	hives   map[string][]string // hive → model keys
	state   map[string]string   // hive → state, online when absent
	workers map[string]api.WorkerStatus
	exits   map[string]string
}

func newCluster() *cluster {
	return &cluster{hives: map[string][]string{}, state: map[string]string{}, workers: map[string]api.WorkerStatus{}, exits: map[string]string{}}
}

func (c *cluster) hive(id string, keys ...string) *cluster {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hives[id] = keys
	return c
}

func (c *cluster) worker(id, hive, key string) api.WorkerStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := api.WorkerStatus{ID: id, Hive: hive, Model: key, ModelKey: key, State: api.WorkerReady, SlotsTotal: 1, Device: "cpu"}
	c.workers[id] = w
	return w
}

func (c *cluster) drop(id string) api.WorkerStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.workers[id]
	delete(c.workers, id)
	return w
}

// view is a copy, as the registry's snapshots are.
func (c *cluster) view() View {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := &cluster{hives: map[string][]string{}, state: map[string]string{}, workers: map[string]api.WorkerStatus{}, exits: map[string]string{}}
	for k, x := range c.hives {
		v.hives[k] = x
	}
	for k, x := range c.state {
		v.state[k] = x
	}
	for k, x := range c.workers {
		v.workers[k] = x
	}
	for k, x := range c.exits {
		v.exits[k] = x
	}
	return v
}

func (c *cluster) Worker(id string) (api.WorkerStatus, bool) { w, ok := c.workers[id]; return w, ok }
func (c *cluster) Serving(key string, p Pins) []api.WorkerStatus {
	var out []api.WorkerStatus
	for _, w := range c.workers {
		if w.ModelKey == key && w.State != api.WorkerDraining && p.Matches(w.Hive, w.Device) {
			out = append(out, w)
		}
	}
	return out
}
func (c *cluster) Candidates(key string, p Pins) []string {
	var out []string
	for h, keys := range c.hives {
		if c.HiveState(h) == api.HiveOnline && (p.Hive == "" || p.Hive == h) {
			for _, k := range keys {
				if k == key {
					out = append(out, h)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}
func (c *cluster) PullTarget(p Pins) string {
	for _, h := range c.Candidates("", p) {
		return h
	}
	return ""
}
func (c *cluster) HiveState(id string) string {
	if _, ok := c.hives[id]; !ok {
		return ""
	}
	if s, ok := c.state[id]; ok {
		return s
	}
	return api.HiveOnline
}
func (c *cluster) Exited(id string) (string, bool) { e, ok := c.exits[id]; return e, ok }

// world records the scheduler's effects and answers spawns as told.
type world struct {
	t       *testing.T
	mu      sync.Mutex
	spawns  []SpawnOrder
	recover map[string]string // job → why
	failed  map[string]string // job → reason
	// spawnErr is the outcome of each spawn on a hive (nil: the worker
	// serves, and appears in the cluster).
	spawnErr map[string]error
	c        *cluster
	events   chan string
	// gate, when set, holds every spawn until it closes, so all jobs of a
	// case are queued before the spawn's outcome.
	gate chan struct{}
}

func newWorld(t *testing.T, c *cluster) *world {
	return &world{t: t, recover: map[string]string{}, failed: map[string]string{}, spawnErr: map[string]error{}, c: c, events: make(chan string, 100)}
}

func (w *world) effects() Effects {
	return Effects{
		Spawn: func(_ context.Context, o SpawnOrder) (string, error) {
			w.events <- "spawn " + o.Hive
			if w.gate != nil {
				<-w.gate
			}
			w.mu.Lock()
			w.spawns = append(w.spawns, o)
			err := w.spawnErr[o.Hive]
			w.mu.Unlock()
			if err != nil {
				return "", err
			}
			id := fmt.Sprintf("%s-w%d", o.Hive, len(w.spawns))
			w.c.worker(id, o.Hive, o.Key)
			return id, nil
		},
		Recover: func(_ context.Context, j Job, why string) {
			w.mu.Lock()
			w.recover[j.ID] = why
			w.mu.Unlock()
			w.events <- "recover " + j.ID
		},
		Fail: func(_ context.Context, job, reason string) {
			w.mu.Lock()
			w.failed[job] = reason
			w.mu.Unlock()
			w.events <- "fail " + job
		},
		Narrate: func(string, string, string, string) {},
	}
}

// await returns the next n effects, in the order they happened.
func (w *world) await(n int) []string {
	w.t.Helper()
	var out []string
	for len(out) < n {
		select {
		case e := <-w.events:
			out = append(out, e)
		case <-time.After(5 * time.Second):
			w.t.Fatalf("got effects %v, want %d", out, n)
		}
	}
	return out
}

// quiet checks that no effect happens for a while: the scheduler decided
// nothing more.
func (w *world) quiet() {
	w.t.Helper()
	select {
	case e := <-w.events:
		w.t.Fatalf("unexpected effect %q", e)
	case <-time.After(100 * time.Millisecond):
	}
}

func start(t *testing.T, c *cluster, w *world) *Scheduler {
	s := New(Config{}, c.view, w.effects())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	s.Replayed()
	s.Settled(true)
	return s
}

func queued(id, key string) Job {
	return Job{ID: id, State: api.JobQueued, Model: key, Key: key}
}

func running(id, key, worker string, attempt int) Job {
	return Job{ID: id, State: api.JobRunning, Model: key, Key: key, Worker: worker, Hive: "h1", Attempt: attempt}
}

// sync waits until the scheduler has handled everything sent so far.
func (s *Scheduler) sync() {
	done := make(chan struct{})
	s.send(func() { close(done) })
	<-done
}

func TestPlacement(t *testing.T) {
	cases := []struct {
		name string
		// setup prepares the cluster and the world's spawn outcomes.
		setup func(c *cluster, w *world)
		jobs  []Job
		want  []string // effects, in order
	}{
		{"a job for a served model needs nothing",
			func(c *cluster, w *world) { c.hive("h1", "tiny"); c.worker("w1", "h1", "tiny") },
			[]Job{queued("j1", "tiny")}, nil},
		{"jobs for a cold model start one spawn, not one each",
			func(c *cluster, w *world) { c.hive("h1", "tiny") },
			[]Job{queued("j1", "tiny"), queued("j2", "tiny"), queued("j3", "tiny")}, []string{"spawn h1"}},
		{"a failed spawn fails every job waiting on it",
			func(c *cluster, w *world) { c.hive("h1", "tiny"); w.spawnErr["h1"] = errors.New("model does not load") },
			[]Job{queued("j1", "tiny"), queued("j2", "tiny"), queued("j3", "tiny")},
			[]string{"spawn h1", "fail j1", "fail j2", "fail j3"}},
		{"a failed spawn tries the next hive before failing anyone",
			func(c *cluster, w *world) {
				c.hive("h1", "tiny").hive("h2", "tiny")
				w.spawnErr["h1"] = errors.New("507: not enough memory")
			},
			[]Job{queued("j1", "tiny"), queued("j2", "tiny")}, []string{"spawn h1", "spawn h2"}},
		{"no hive holds the model: the job fails at once",
			func(c *cluster, w *world) { c.hive("h1", "other") },
			[]Job{queued("j1", "tiny")}, []string{"fail j1"}},
		{"a job pinned to a hive that is not online fails naming it",
			func(c *cluster, w *world) { c.hive("h1", "tiny").hive("h2", "tiny"); c.state["h2"] = api.HiveLost },
			[]Job{{ID: "j1", State: api.JobQueued, Model: "tiny", Key: "tiny", Pins: Pins{Hive: "h2"}}}, []string{"fail j1"}},
		{"a running job on a worker missing from a settled view is recovered",
			func(c *cluster, w *world) { c.hive("h1", "tiny") },
			[]Job{running("j1", "tiny", "w9", 1)}, []string{"recover j1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster()
			w := newWorld(t, c)
			w.gate = make(chan struct{})
			tc.setup(c, w)
			s := start(t, c, w)
			for _, j := range tc.jobs {
				s.JobChanged(j, false)
			}
			s.sync()
			close(w.gate)
			got := w.await(len(tc.want))
			// Effects of one decision run concurrently: compare the
			// spawns in order, the rest as a set.
			require.ElementsMatch(t, tc.want, got)
			require.Equal(t, spawnsOf(tc.want), spawnsOf(got))
			w.quiet()
		})
	}
}

func spawnsOf(effects []string) []string {
	var out []string
	for _, e := range effects {
		if strings.HasPrefix(e, "spawn ") {
			out = append(out, e)
		}
	}
	return out
}

// The failure names the spawn's own reason, for every waiter.
func TestFailedSpawnReasonReachesEveryWaiter(t *testing.T) {
	c := newCluster().hive("h1", "tiny")
	w := newWorld(t, c)
	w.spawnErr["h1"] = errors.New("model tiny does not load: truncated tensor data")
	w.gate = make(chan struct{})
	s := start(t, c, w)
	for i := range 5 {
		s.JobChanged(queued(fmt.Sprintf("j%d", i), "tiny"), false)
	}
	s.sync()
	close(w.gate)
	w.await(6)
	s.sync()
	for i := range 5 {
		require.Contains(t, w.failed[fmt.Sprintf("j%d", i)], "truncated tensor data")
		require.Contains(t, w.failed[fmt.Sprintf("j%d", i)], "hive h1")
	}
	require.Zero(t, s.Depth("tiny"), "failed jobs left the queue")
}

// A queued job whose last worker goes (drained, lost) is re-placed with a
// new spawn; a running job on it is recovered.
func TestLastWorkerGoingReplacesQueuedJobs(t *testing.T) {
	for _, how := range []string{"gone", "lost"} {
		t.Run(how, func(t *testing.T) {
			c := newCluster().hive("h1", "tiny")
			w := newWorld(t, c)
			c.worker("w1", "h1", "tiny")
			s := start(t, c, w)
			s.JobChanged(running("j1", "tiny", "w1", 1), false)
			s.JobChanged(queued("j2", "tiny"), false)
			w.quiet()
			last := c.drop("w1")
			if how == "gone" {
				s.WorkerGone(last)
			} else {
				s.WorkerLost(last, "worker w1 on hive h1 died (signal: killed)")
			}
			require.ElementsMatch(t, []string{"recover j1", "spawn h1"}, w.await(2))
			w.quiet()
			if how == "lost" {
				require.Equal(t, "worker w1 on hive h1 died (signal: killed)", w.recover["j1"])
			}
		})
	}
}

// Nothing is judged before the view settles: after a start or a reconnect
// a worker may not have beaten yet.
func TestNothingIsJudgedBeforeTheViewSettles(t *testing.T) {
	c := newCluster().hive("h1", "tiny")
	w := newWorld(t, c)
	s := New(Config{}, c.view, w.effects())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	// The records of before the start: one job running on w1 (not in
	// the view yet), one queued.
	s.JobChanged(running("j1", "tiny", "w1", 1), false)
	s.JobChanged(queued("j2", "tiny"), false)
	s.Replayed()
	w.quiet()
	// w1 beats again within the grace.
	c.worker("w1", "h1", "tiny")
	s.Settled(true)
	w.quiet()

	// Later the bus goes away and comes back; w1 dies meanwhile.
	s.Settled(false)
	c.drop("w1")
	s.sync()
	w.quiet()
	s.Settled(true)
	require.ElementsMatch(t, []string{"recover j1", "spawn h1"}, w.await(2))
	require.Contains(t, w.recover["j1"], "has not beaten since the bus came back")
}

// A worker seen to exit while the queen was down is named as dead.
func TestSettledViewNamesAWorkerSeenToExit(t *testing.T) {
	c := newCluster().hive("h1", "tiny")
	c.exits["w1"] = "signal: killed"
	w := newWorld(t, c)
	s := start(t, c, w)
	s.JobChanged(running("j1", "tiny", "w1", 1), false)
	w.await(1)
	require.Equal(t, "worker w1 on hive h1 died (signal: killed)", w.recover["j1"])
}

// Depths count queued jobs by model and follow records to their end.
func TestDepthsFollowRecords(t *testing.T) {
	c := newCluster().hive("h1", "tiny")
	c.worker("w1", "h1", "tiny")
	w := newWorld(t, c)
	s := start(t, c, w)
	for i := range 3 {
		s.JobChanged(queued(fmt.Sprintf("j%d", i), "tiny"), false)
	}
	s.sync()
	require.Equal(t, 3, s.Depth("tiny"))
	s.JobChanged(running("j0", "tiny", "w1", 1), false)
	s.JobChanged(Job{ID: "j1", State: api.JobCancelled}, false)
	s.JobChanged(Job{ID: "j2"}, true)
	s.sync()
	require.Equal(t, map[string]int{}, s.Depths())
	w.quiet()
}

// A worker that starts draining serves no new job: the jobs queued behind
// it get a new worker without waiting for the drain to end.
func TestDrainingWorkerHandsItsQueueToANewOne(t *testing.T) {
	c := newCluster().hive("h1", "tiny")
	w := newWorld(t, c)
	c.worker("w1", "h1", "tiny")
	s := start(t, c, w)
	s.JobChanged(queued("j1", "tiny"), false)
	w.quiet()
	c.mu.Lock()
	d := c.workers["w1"]
	d.State = api.WorkerDraining
	c.workers["w1"] = d
	c.mu.Unlock()
	s.ViewChanged()
	require.Equal(t, []string{"spawn h1"}, w.await(1))
	w.quiet()
}

// A recovery or a failure that did not reach the record (the bus went away
// again) is decided anew when the view settles next: no job is left in
// between.
func TestUnfinishedDecisionsAreTakenAgainAfterASettle(t *testing.T) {
	c := newCluster().hive("h1", "other")
	w := newWorld(t, c)
	s := start(t, c, w)
	s.JobChanged(running("j1", "tiny", "w1", 1), false)
	s.JobChanged(queued("j2", "tiny"), false)
	require.ElementsMatch(t, []string{"recover j1", "fail j2"}, w.await(2))
	// Neither record changed: the effects' writes were lost.
	s.Settled(false)
	s.Settled(true)
	require.ElementsMatch(t, []string{"recover j1", "fail j2"}, w.await(2))
	w.quiet()
}

// beat sets what worker id's latest heartbeat says: when, and the jobs its
// slots hold (nil: a worker that does not say).
func (c *cluster) beat(id string, at time.Time, jobs []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := c.workers[id]
	w.BeatAt, w.Jobs = at, jobs
	c.workers[id] = w
}

// A job recorded as running on a live worker whose heartbeats, two in a
// row made after the take, do not list it is not run by anyone (a take
// whose answer the worker never got, an end it could not record): its
// attempt is given up as if the worker were lost. Beats from before the
// take, and workers that do not list their jobs, say nothing.
func TestAJobItsLiveWorkerDoesNotRunIsRecovered(t *testing.T) {
	c := newCluster().hive("h1", "tiny")
	w := newWorld(t, c)
	c.worker("w1", "h1", "tiny")
	s := start(t, c, w)
	took := time.Now().UTC()
	j := running("j1", "tiny", "w1", 1)
	j.StartedAt = took
	s.JobChanged(j, false)
	s.ViewChanged()
	w.quiet()

	for _, b := range []struct {
		at   time.Time
		jobs []string
	}{
		{took.Add(-time.Second), []string{}},              // before the take
		{took.Add(time.Second), nil},                      // does not say
		{took.Add(time.Second), []string{"j1"}},           // runs it
		{took.Add(2 * time.Second), []string{"j1", "j2"}}, // and another
	} {
		c.beat("w1", b.at, b.jobs)
		s.ViewChanged()
		w.quiet()
	}
	// A beat without it, then one with it, then one without: nothing yet.
	for i, jobs := range [][]string{{"j2"}, {"j1"}, {}} {
		c.beat("w1", took.Add(time.Duration(3+i)*time.Second), jobs)
		s.ViewChanged()
		w.quiet()
		if i == 0 {
			s.ViewChanged() // the same beat seen again is still one beat
			w.quiet()
		}
	}
	c.beat("w1", took.Add(6*time.Second), []string{"j2"})
	s.ViewChanged()
	require.Equal(t, []string{"recover j1"}, w.await(1))
	require.Contains(t, w.recover["j1"], "worker w1 on hive h1 does not run it")
	s.ViewChanged()
	w.quiet() // judged once, until its record moves on
}
