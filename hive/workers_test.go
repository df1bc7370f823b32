package hive_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

func TestWorkerSpawnIsRefusedBeforeAnythingStarts(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	startHive(t, fix, "tight", func(c *hive.Config) {
		c.NvidiaSMI = fakeNvidiaSMI(t)
		c.RAMFreeCap = 1 << 20 // 1 MiB: no model fits
	})
	b := fix.Bus
	var m api.Model
	mustCall(t, b, "tight", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny"}, &m)
	var st api.HiveStatus
	mustCall(t, b, "tight", api.HiveEpStatus, nil, &st)
	require.Equal(t, uint64(1<<20), st.RAMFree, "the test hook caps reported RAM")

	for _, tc := range []struct {
		name  string
		args  api.WorkerSpawnArgs
		code  int
		parts []string
	}{
		{"unknown model", api.WorkerSpawnArgs{Model: "llama-70b"}, api.CodeNotFound,
			[]string{"model llama-70b is not in hive tight's catalog; add it with `rbee model download --hive tight SOURCE --name llama-70b`"}},
		{"bad device", api.WorkerSpawnArgs{Model: "tiny", Device: "gpu"}, api.CodeBadRequest, []string{`"cpu" or "cuda:N"`}},
		{"missing gpu", api.WorkerSpawnArgs{Model: "tiny", Device: "cuda:7"}, api.CodeBadRequest,
			[]string{"device cuda:7 does not exist on hive tight", "cuda:0, cuda:1"}},
		{"negative slots", api.WorkerSpawnArgs{Model: "tiny", Slots: -1}, api.CodeBadRequest, nil},
		{"other hive", api.WorkerSpawnArgs{Hive: "other", Model: "tiny"}, api.CodeBadRequest, []string{"not other"}},
		{"no RAM", api.WorkerSpawnArgs{Model: "tiny"}, hive.CodeInsufficientMemory,
			[]string{"model tiny needs ", ", 1.0 MiB free on cpu"}},
		{"fits the GPU but the worker binary is missing", api.WorkerSpawnArgs{Model: "tiny", Device: "cuda:1"}, api.CodeInternal,
			[]string{"starting worker for tiny"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := call(t, b, "tight", api.HiveEpWorkerSpawn, tc.args, nil, time.Minute)
			requireCode(t, err, tc.code, tc.parts...)
			t.Log(err)
		})
	}

	err := call(t, b, "tight", api.HiveEpWorkerStop, api.WorkerStopArgs{Worker: "ghost"}, nil, time.Minute)
	requireCode(t, err, api.CodeNotFound, "worker ghost is not running on hive tight")
	var list api.WorkerListReply
	mustCall(t, b, "tight", api.HiveEpWorkerList, nil, &list)
	require.Empty(t, list.Workers)
}

// TestWorkerLifecycleInProcess runs real workers under an in-process hive:
// spawn, list, delete refused while in use, forced delete, stop.
func TestWorkerLifecycleInProcess(t *testing.T) {
	t.Parallel()
	lib := llamaLib(t)
	workerBin := binaries.Path(t, "llm-worker-rbee")
	fix := busfix.Start(t)
	n := listen(t, fix.Bus)
	startHive(t, fix, "life", func(c *hive.Config) { c.WorkerBin = workerBin; c.LlamaLib = lib })
	b := fix.Bus
	mustCall(t, b, "life", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny"}, nil)

	spawn := func(job string) api.WorkerStatus {
		t.Helper()
		var r api.WorkerSpawnReply
		start := time.Now()
		mustCall(t, b, "life", api.HiveEpWorkerSpawn, api.WorkerSpawnArgs{Model: "tiny", Slots: 1, Ctx: 256, Threads: 1, JobID: job}, &r)
		t.Logf("worker %s ready after %s", r.Worker.ID, time.Since(start).Round(time.Millisecond))
		return r.Worker
	}
	w1 := spawn("spawn-1")
	require.Equal(t, api.WorkerReady, w1.State)
	require.Equal(t, "life", w1.Hive)
	require.Equal(t, "tiny", w1.Model)
	require.True(t, strings.HasPrefix(w1.ID, "life-tiny-"), w1.ID)
	require.Len(t, w1.ID, len("life-tiny-")+4)
	n.await(t, time.Second, "spawn narration", func(ev api.Narration) bool {
		return ev.JobID == "spawn-1" && strings.HasPrefix(ev.Human, "worker "+w1.ID+" is ready")
	})

	var list api.WorkerListReply
	mustCall(t, b, "life", api.HiveEpWorkerList, nil, &list)
	require.Len(t, list.Workers, 1)
	require.Equal(t, w1.ID, list.Workers[0].ID)
	require.Equal(t, w1.PID, list.Workers[0].PID)

	err := call(t, b, "life", api.HiveEpModelDelete, api.ModelRequest{Model: "tiny"}, nil, time.Minute)
	requireCode(t, err, api.CodeConflict, "model tiny is in use by worker "+w1.ID+"; use --force to stop it first")
	require.True(t, alive(w1.PID), "a refused delete leaves the worker running")

	wk := watchKey(t, b, b.Space.WorkersBucket(), subjects.WorkerKey(w1.Hive, w1.ID))
	mustCall(t, b, "life", api.HiveEpModelDelete, api.ModelRequest{Model: "tiny", Force: true}, nil)
	require.False(t, alive(w1.PID), "the forced delete stopped the worker first")
	e := awaitEntry(t, wk, 2*time.Second, "the worker leaving", func(e jetstream.KeyValueEntry) bool { return !isPut(e) })
	require.Equal(t, jetstream.KeyValueDelete, e.Operation(), "a drained worker says goodbye itself")
	mustCall(t, b, "life", api.HiveEpWorkerList, nil, &list)
	require.Empty(t, list.Workers)
	var models api.ModelListReply
	mustCall(t, b, "life", api.HiveEpModelList, nil, &models)
	require.Empty(t, models.Models)
	n.mu.Lock()
	for _, ev := range n.events {
		require.NotContains(t, ev.Human, "unexpectedly", "a stop the hive asked for is not a crash")
	}
	n.mu.Unlock()

	// worker-stop drains with narration on the job.
	mustCall(t, b, "life", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny"}, nil)
	w2 := spawn("")
	mustCall(t, b, "life", api.HiveEpWorkerStop, api.WorkerStopArgs{Worker: w2.ID, Grace: api.Duration(2 * time.Second), JobID: "stop-1"}, nil)
	require.False(t, alive(w2.PID))
	n.await(t, time.Second, "drain narration", containing("asking worker "+w2.ID+" to drain (grace 2s)"))
	n.await(t, time.Second, "stopped narration", func(ev api.Narration) bool {
		return ev.JobID == "stop-1" && ev.Human == "worker "+w2.ID+" drained (exit status 0)"
	})
}

// alive reports whether pid runs (a zombie counts as gone).
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	return err != nil || !strings.Contains(string(b), ") Z ")
}

func TestWorkerThatFailsToStartIsReportedWithItsLog(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	n := listen(t, fix.Bus)
	dir := t.TempDir()
	// A stand-in worker that never registers: it says why and sleeps, or
	// exits at once when told to fail.
	script := filepath.Join(dir, "fake-worker")
	require.NoError(t, os.WriteFile(script, []byte("#!/bin/sh\necho \"fake worker args: $*\"\n"+
		"if [ -e '"+filepath.Join(dir, "fail")+"' ]; then echo 'error: cannot load model: bad magic' >&2; exit 3; fi\nexec sleep 60\n"), 0o755))
	startHive(t, fix, "flaky", func(c *hive.Config) { c.WorkerBin = script })
	b := fix.Bus
	mustCall(t, b, "flaky", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny"}, nil)

	start := time.Now()
	err := call(t, b, "flaky", api.HiveEpWorkerSpawn, api.WorkerSpawnArgs{Model: "tiny", LoadTimeout: api.Duration(700 * time.Millisecond), JobID: "slow"}, nil, time.Minute)
	requireCode(t, err, api.CodeTimeout, "did not become ready within 700ms, so it was killed", "last lines of its log", "fake worker args: --id flaky-tiny-")
	require.Less(t, time.Since(start), 5*time.Second)
	var list api.WorkerListReply
	mustCall(t, b, "flaky", api.HiveEpWorkerList, nil, &list)
	require.Empty(t, list.Workers, "the killed worker is gone")
	n.await(t, time.Second, "the failure on the job", func(ev api.Narration) bool { return ev.JobID == "slow" && ev.Level == "warn" })

	require.NoError(t, os.WriteFile(filepath.Join(dir, "fail"), nil, 0o644))
	err = call(t, b, "flaky", api.HiveEpWorkerSpawn, api.WorkerSpawnArgs{Model: "tiny"}, nil, time.Minute)
	requireCode(t, err, api.CodeInternal, "failed to load model tiny (exit status 3)", "error: cannot load model: bad magic")
	n.await(t, time.Second, "the load failure on the cluster", containing("exited while loading model tiny (exit status 3)"))
}

// A worker that dies while its hive is cut off from the bus is reported as
// dead, with how, once the bus is back: the queen tells a death from a
// silence by that report alone (a queen restarted meanwhile judged the
// worker "lost" in a suite run). The cut outlasts the one 5 s try the
// report was once given, and the worker's entry expires by its TTL
// meanwhile.
func TestAWorkerThatDiesWhileTheBusIsAwayIsReportedWhenItIsBack(t *testing.T) {
	t.Parallel()
	lib := llamaLib(t)
	workerBin := binaries.Path(t, "llm-worker-rbee")
	fix := busfix.Start(t)
	proxy := fix.Proxy(t)
	startHive(t, fix, "cutoff", func(c *hive.Config) {
		c.WorkerBin, c.LlamaLib, c.NATSURL = workerBin, lib, "nats://"+proxy.Addr()
	})
	b := fix.Bus
	mustCall(t, b, "cutoff", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny"}, nil)
	var r api.WorkerSpawnReply
	mustCall(t, b, "cutoff", api.HiveEpWorkerSpawn, api.WorkerSpawnArgs{Model: "tiny", Slots: 1, Ctx: 256, Threads: 1}, &r)
	wk := watchKey(t, b, b.Space.WorkersBucket(), subjects.WorkerKey(r.Worker.Hive, r.Worker.ID))
	awaitEntry(t, wk, 5*time.Second, "the worker's entry", isPut)

	// The link dies without either end seeing it: the hive's first report
	// is lost on the way, as a report sent just before a server goes down
	// or answered by a server not ready for it.
	proxy.Stall()
	require.NoError(t, syscall.Kill(r.Worker.PID, syscall.SIGKILL))
	awaitEntry(t, wk, 10*time.Second, "the entry's expiry while cut off", func(e jetstream.KeyValueEntry) bool { return !isPut(e) })
	time.Sleep(6 * time.Second)
	proxy.Cut()
	proxy.Heal()
	healed := time.Now()
	e := awaitEntry(t, wk, 15*time.Second, "exit report", func(e jetstream.KeyValueEntry) bool {
		var rep bus.ExitReport
		return e.Operation() == jetstream.KeyValuePurge && json.Unmarshal(e.Value(), &rep) == nil && rep.Exit != ""
	})
	var rep bus.ExitReport
	require.NoError(t, json.Unmarshal(e.Value(), &rep))
	require.Equal(t, "signal: killed", rep.Exit)
	t.Logf("reported %s after the heal", time.Since(healed).Round(time.Millisecond))
}
