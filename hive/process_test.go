package hive_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
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

// hiveProc is an rbee-hive process.
type hiveProc struct {
	cmd *exec.Cmd
	// errPath receives the process's stderr (its log).
	errPath string
	done    chan struct{}
	err     error
}

// stderr is what the process wrote to stderr so far.
func (p *hiveProc) stderr() string {
	b, _ := os.ReadFile(p.errPath)
	return string(b)
}

// wait returns the exit code, failing the test after d.
func (p *hiveProc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(d):
		t.Fatalf("rbee-hive did not exit within %s; stderr:\n%s", d, p.stderr())
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	require.NoError(t, p.err)
	return 0
}

// runHive starts rbee-hive with args (after --nats and --heartbeat) and env
// added to the test's environment.
func runHive(t *testing.T, fix *busfix.Fixture, env []string, args ...string) *hiveProc {
	t.Helper()
	dir := binaries.Dir(t)
	args = append([]string{"--nats", fix.URL, "--heartbeat", testBeat.String(), "--log-level", "debug"}, args...)
	cmd := exec.Command(filepath.Join(dir, "rbee-hive"), args...)
	cmd.Env = append(os.Environ(), env...)
	p := &hiveProc{cmd: cmd, errPath: filepath.Join(t.TempDir(), "stderr"), done: make(chan struct{})}
	f, err := os.Create(p.errPath)
	require.NoError(t, err)
	defer f.Close()
	cmd.Stderr = f
	require.NoError(t, cmd.Start())
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("rbee-hive stderr:\n%s", p.stderr())
		}
	})
	return p
}

// pathWithFakeGPUs puts the fake nvidia-smi first on PATH as "nvidia-smi".
func pathWithFakeGPUs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	data, err := os.ReadFile(fakeNvidiaSMI(t))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "nvidia-smi"), data, 0o755))
	return "PATH=" + dir + string(os.PathListSeparator) + os.Getenv("PATH")
}

// TestHiveProcess runs the real rbee-hive and llm-worker-rbee: GPUs in the
// heartbeat, a worker spawned on a synthesised model, a killed worker
// reported within a second, a model too large for free RAM refused, and
// SIGTERM stopping the workers and leaving the registry.
func TestHiveProcess(t *testing.T) {
	t.Parallel()
	lib := llamaLib(t)
	fix := busfix.Start(t)
	b := fix.Bus
	n := listen(t, b)
	hives := watchKey(t, b, b.Space.HivesBucket(), "proc")
	const ramCap = 48 << 20
	p := runHive(t, fix, []string{pathWithFakeGPUs(t), "RBEE_FAKE_RAM_FREE=48Mi"},
		"--id", "proc", "--data", t.TempDir(), "--llama-lib", lib)

	st := hiveStatusOf(t, awaitEntry(t, hives, 20*time.Second, "hive entry", isPut))
	require.Equal(t, p.cmd.Process.Pid, st.PID)
	require.Len(t, st.Capabilities.GPUs, 2, "GPUs from nvidia-smi on PATH")
	require.Equal(t, "NVIDIA GeForce RTX 4090", st.Capabilities.GPUs[0].Name)
	require.Equal(t, uint64(ramCap), st.RAMFree, "RBEE_FAKE_RAM_FREE caps the reported RAM")

	// A model too large for the free RAM is refused with both numbers.
	var large api.Model
	mustCall(t, b, "proc", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "large", Size: "large"}, &large)
	require.Greater(t, large.EstimatedMemory, uint64(ramCap), "precondition: large needs more than the cap")
	err := call(t, b, "proc", api.HiveEpWorkerSpawn, api.WorkerSpawnArgs{Model: "large"}, nil, time.Minute)
	requireCode(t, err, hive.CodeInsufficientMemory, "model large needs ", ", 48.0 MiB free on cpu")
	t.Log(err)

	// A worker on the tiny model registers and becomes ready.
	var tinyModel api.Model
	mustCall(t, b, "proc", api.HiveEpModelSynth, api.ModelSynthArgs{Name: "tiny"}, &tinyModel)
	require.Less(t, tinyModel.EstimatedMemory, uint64(ramCap), "precondition: tiny fits")
	spawn := func() api.WorkerStatus {
		t.Helper()
		var r api.WorkerSpawnReply
		start := time.Now()
		mustCall(t, b, "proc", api.HiveEpWorkerSpawn, api.WorkerSpawnArgs{Model: "tiny", Slots: 1, Ctx: 256, Threads: 1}, &r)
		t.Logf("worker %s (pid %d) ready %s after the spawn request", r.Worker.ID, r.Worker.PID, time.Since(start).Round(time.Millisecond))
		require.Equal(t, api.WorkerReady, r.Worker.State)
		return r.Worker
	}
	w := spawn()
	awaitEntry(t, hives, 2*time.Second, "a beat listing the worker", func(e jetstream.KeyValueEntry) bool {
		return isPut(e) && len(hiveStatusOf(t, e).Workers) == 1 && hiveStatusOf(t, e).Workers[0] == w.ID
	})

	// kill -9 of the worker: the hive purges its entry and tells the
	// cluster at once, rather than leaving it to the TTL.
	wk := watchKey(t, b, b.Space.WorkersBucket(), subjects.WorkerKey(w.Hive, w.ID))
	awaitEntry(t, wk, 2*time.Second, "the worker's entry", isPut)
	require.NoError(t, syscall.Kill(w.PID, syscall.SIGKILL))
	killed := time.Now()
	e := awaitEntry(t, wk, time.Second, "the purge", func(e jetstream.KeyValueEntry) bool { return !isPut(e) })
	purged := time.Since(killed)
	require.Equal(t, jetstream.KeyValuePurge, e.Operation())
	ev := n.await(t, time.Second-purged, "the crash report", containing("worker "+w.ID+" on hive proc exited unexpectedly (signal: killed)"))
	reported := time.Since(killed)
	t.Logf("kill -9 of a worker: entry purged after %s, cluster told after %s", purged.Round(time.Microsecond), reported.Round(time.Microsecond))
	require.Less(t, reported, time.Second)
	require.Equal(t, "warn", ev.Level)
	require.Empty(t, ev.JobID, "on the cluster subject")
	require.Equal(t, w.ID, ev.WorkerID)
	var list api.WorkerListReply
	mustCall(t, b, "proc", api.HiveEpWorkerList, nil, &list)
	require.Empty(t, list.Workers)

	// SIGTERM of the hive stops its workers and leaves the registry.
	w2 := spawn()
	wk2 := watchKey(t, b, b.Space.WorkersBucket(), subjects.WorkerKey(w2.Hive, w2.ID))
	awaitEntry(t, wk2, 2*time.Second, "the second worker's entry", isPut)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	termed := time.Now()
	require.Equal(t, 0, p.wait(t, 30*time.Second), "a SIGTERMed hive exits 0")
	t.Logf("SIGTERM to exit: %s", time.Since(termed).Round(time.Millisecond))
	require.False(t, alive(w2.PID), "the hive stopped its worker")
	awaitEntry(t, wk2, time.Second, "the worker leaving", func(e jetstream.KeyValueEntry) bool { return !isPut(e) })
	e = awaitEntry(t, hives, time.Second, "the hive leaving", func(e jetstream.KeyValueEntry) bool { return !isPut(e) })
	require.Equal(t, jetstream.KeyValueDelete, e.Operation(), "removed at once, not expired")
	n.await(t, time.Second, "shutdown narration", containing("hive proc shutting down"))
}

func TestKilledHiveProcessExpiresWithinThreeBeats(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	hives := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "doomed")
	p := runHive(t, fix, nil, "--id", "doomed", "--data", t.TempDir())
	awaitEntry(t, hives, 20*time.Second, "hive entry", isPut)

	require.NoError(t, p.cmd.Process.Signal(syscall.SIGKILL))
	killed := time.Now()
	p.wait(t, 5*time.Second)
	bound := 3*testBeat + time.Second
	e := awaitEntry(t, hives, bound+time.Second, "expiry", func(e jetstream.KeyValueEntry) bool { return !isPut(e) })
	took := time.Since(killed)
	t.Logf("kill -9 of the hive: entry expired after %s (TTL %s, bound %s)", took.Round(time.Millisecond), bus.TTLForInterval(testBeat), bound)
	require.Equal(t, jetstream.KeyValuePurge, e.Operation(), "an expiry, since nobody said goodbye")
	require.LessOrEqual(t, took, bound)
}

func TestHiveProcessRefusals(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		code int
		want string
	}{
		{"bad id", nil, []string{"--id", "a.b", "--data", t.TempDir()}, 2, `--id: invalid id: hive id "a.b" contains '.'`},
		{"no id", nil, []string{"--data", t.TempDir()}, 2, "--id"},
		{"bad heartbeat", nil, []string{"--id", "x", "--heartbeat=bogus"}, 2, "bogus"},
		{"bad fake RAM", []string{"RBEE_FAKE_RAM_FREE=lots"}, []string{"--id", "x", "--data", t.TempDir()}, 2, "RBEE_FAKE_RAM_FREE"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := runHive(t, fix, tc.env, tc.args...)
			require.Equal(t, tc.code, p.wait(t, 20*time.Second))
			require.Contains(t, p.stderr(), tc.want)
		})
	}

	t.Run("duplicate id", func(t *testing.T) {
		hives := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "twin")
		first := runHive(t, fix, nil, "--id", "twin", "--data", t.TempDir())
		awaitEntry(t, hives, 20*time.Second, "first hive", isPut)
		second := runHive(t, fix, nil, "--id", "twin", "--data", t.TempDir())
		require.Equal(t, 1, second.wait(t, 20*time.Second))
		require.Contains(t, second.stderr(), "hive twin is already registered by another live process")
		require.NoError(t, first.cmd.Process.Signal(syscall.SIGTERM))
		require.Equal(t, 0, first.wait(t, 20*time.Second))
	})

	t.Run("ignore shutdown", func(t *testing.T) {
		hives := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "mule")
		p := runHive(t, fix, nil, "--id", "mule", "--data", t.TempDir(), "--ignore-shutdown")
		awaitEntry(t, hives, 20*time.Second, "hive entry", isPut)
		mustCall(t, fix.Bus, "mule", api.HiveEpShutdown, api.ShutdownRequest{}, nil)
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
		asked := time.Now()
		awaitEntry(t, hives, 2*time.Second, "a beat after SIGTERM", func(e jetstream.KeyValueEntry) bool {
			return isPut(e) && hiveStatusOf(t, e).BeatAt.After(asked.Add(testBeat))
		})
		require.Contains(t, p.stderr(), "ignoring SIGTERM")
		require.NoError(t, p.cmd.Process.Signal(syscall.SIGKILL))
		require.Equal(t, -1, p.wait(t, 5*time.Second), "only SIGKILL ends it")
		require.True(t, strings.Contains(p.stderr(), "ignoring a shutdown request"))
	})
}
