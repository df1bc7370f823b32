package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/gguf"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/worker/engine"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// readyHive brings up a queen, a local hive and generated models on it.
func (c *cluster) readyHive(models map[string]string) {
	c.t.Helper()
	c.startQueen()
	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "start", "local")
	for name, size := range models {
		c.mustRbee("model", "synth", "--hive", "local", "--size", size, name)
	}
}

// readyWorkers readies a local hive with model (synthesised at that size)
// and n warm workers serving it.
func (c *cluster) readyWorkers(model string, n int) []api.WorkerStatus {
	c.t.Helper()
	c.readyHive(map[string]string{model: model})
	for range n {
		c.mustRbee("worker", "spawn", "--hive", "local", "-m", model, "--slots", strconv.Itoa(c.slots))
	}
	ws := c.workers()
	require.Len(c.t, ws, n)
	return ws
}

var (
	goldenMu     sync.Mutex
	goldenModels = map[string]engine.Model{}
)

// greedy computes the expected greedy output in this process with the same
// engine the worker uses, so a test knows each prompt's own answer.
func greedy(t *testing.T, prompt string, maxTokens int) string {
	t.Helper()
	return greedyOn(t, "tiny", prompt, maxTokens)
}

// greedyOn is greedy on one of the generated models ("tiny" or "large").
func greedyOn(t *testing.T, model, prompt string, maxTokens int) string {
	t.Helper()
	goldenMu.Lock()
	defer goldenMu.Unlock()
	m, ok := goldenModels[model]
	if !ok {
		cfg := gguf.Tiny()
		if model == "large" {
			cfg = gguf.Large()
		}
		path := filepath.Join(t.TempDir(), model+".gguf")
		require.NoError(t, gguf.SynthFile(path, cfg))
		llama, err := engine.NewLlama("")
		require.NoError(t, err)
		m, err = llama.Load(context.Background(), path, engine.LoadOptions{ContextSize: 2048, Threads: 1, Device: "cpu"})
		require.NoError(t, err)
		goldenModels[model] = m
	}
	text, _, err := engine.Complete(context.Background(), m, engine.Request{Prompt: prompt, MaxTokens: maxTokens})
	require.NoError(t, err)
	return text
}

func (c *cluster) job(id string) api.Job {
	c.t.Helper()
	r := c.mustRbee("--json", "jobs", "get", id)
	var j api.Job
	require.NoError(c.t, json.Unmarshal([]byte(r.stdout), &j), r.stdout)
	return j
}

func (c *cluster) workers() []api.WorkerStatus {
	c.t.Helper()
	r := c.mustRbee("--json", "worker", "list")
	var out []api.WorkerStatus
	sc := bufio.NewScanner(strings.NewReader(r.stdout))
	for sc.Scan() {
		var w api.WorkerStatus
		require.NoError(c.t, json.Unmarshal(sc.Bytes(), &w))
		out = append(out, w)
	}
	return out
}

func TestInferHappyPath(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.readyHive(map[string]string{"tiny": "tiny"})
	prompt := "hello world, the bee is"
	r := c.mustRbee("infer", "-m", "tiny", "--temperature", "0", "--max-tokens", "32", prompt)
	require.Equal(t, greedy(t, prompt, 32)+"\n", r.stdout, "tokens on stdout, nothing else")
	for _, who := range []string{"[queen]", "[hive local]", "[worker "} {
		require.Contains(t, r.stderr, who, "narration from %s on stderr", who)
	}
	require.Regexp(t, `\d+ tokens, first token .*, [\d.]+ tokens/s, worker \S+ on hive local`, r.stderr)

	r = c.mustRbee("--json", "jobs", "list", "--state", "completed")
	var j api.Job
	require.NoError(t, json.Unmarshal([]byte(strings.Split(r.stdout, "\n")[0]), &j))
	var res api.InferResult
	require.NoError(t, json.Unmarshal(j.Result, &res))
	require.Equal(t, 32, res.CompletionTokens)
	require.Positive(t, res.TokensPerSecond)
	require.Equal(t, "local", res.Hive)

	// Only decoding runs as ordinary work (internal/threadpolicy): every thread
	// of the queen and the hive, and all but the worker's decoding ones,
	// run as batch work, so that their wake-ups do not cut into a decode.
	pidFile, err := os.ReadFile(cliutil.QueenPIDFile(c.home))
	require.NoError(t, err)
	queenPID, err := strconv.Atoi(strings.TrimSpace(string(pidFile)))
	require.NoError(t, err)
	for name, pid := range map[string]int{"queen": queenPID, "hive": c.hiveView("local").Status.PID} {
		batch, ordinary := threadPolicies(t, pid)
		require.Zero(t, ordinary, "%s: ordinary threads (of %d)", name, batch+ordinary)
	}
	ws := c.workers()
	require.Len(t, ws, 1)
	batch, ordinary := threadPolicies(t, ws[0].PID)
	require.Positive(t, ordinary, "the worker's decoding threads are ordinary")
	require.Greater(t, batch, ordinary, "the worker's other threads are batch work")

	// -q prints tokens only; --json prints NDJSON events.
	r = c.mustRbee("-q", "infer", "-m", "tiny", "--temperature", "0", "--max-tokens", "8", prompt)
	require.Empty(t, r.stderr)
	r = c.mustRbee("--json", "infer", "-m", "tiny", "--temperature", "0", "--max-tokens", "8", prompt)
	for _, line := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		var ev api.Event
		require.NoError(t, json.Unmarshal([]byte(line), &ev), line)
	}
}

func TestInferErrorsHaveMessagesAndExitCodes(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.startQueen()
	r := c.rbee("infer", "-m", "tiny", "hello")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "no hive is online")

	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "start", "local")
	r = c.rbee("infer", "-m", "nosuchmodel", "hello")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "model nosuchmodel is not on any online hive")
	require.Contains(t, r.stderr, "rbee model download")

	c.mustRbee("model", "synth", "--hive", "local", "tiny")
	r = c.rbee("infer", "-m", "tiny", "--temperature", "5", "hello")
	require.Equal(t, 2, r.code)
	require.Contains(t, r.stderr, "temperature")
	r = c.rbee("infer", "-m", "tiny", "--top-p", "1.5", "hello")
	require.Equal(t, 2, r.code)
	require.Contains(t, r.stderr, "top_p")
	r = c.rbee("infer", "-m", "tiny")
	require.Equal(t, 2, r.code)
}

func TestConcurrentJobsAcrossTwoWorkersEachGetTheirOwnTokens(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.readyWorkers("tiny", 2)

	prompts := []string{"hello world", "the bee is", "a quick test", "bees make honey", "once upon a time", "the sky", "I and you", "what is it"}
	outs := make([]result, len(prompts))
	var wg sync.WaitGroup
	for i, p := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			outs[i] = c.rbee("-q", "infer", "-m", "tiny", "--temperature", "0", "--max-tokens", "24", p)
		}()
	}
	wg.Wait()
	used := map[string]bool{}
	for i, p := range prompts {
		require.Equal(t, 0, outs[i].code, outs[i].stderr)
		require.Equal(t, greedy(t, p, 24)+"\n", outs[i].stdout, "prompt %q", p)
	}
	r := c.mustRbee("--json", "jobs", "list", "--state", "completed")
	for _, line := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		var j api.Job
		require.NoError(t, json.Unmarshal([]byte(line), &j))
		if j.Op.Kind == api.OpInfer { // not the spawn and synth jobs
			used[j.Worker] = true
		}
	}
	require.Len(t, used, 2, "both workers served jobs")
}

// startInfer runs `rbee infer` in the background and returns a channel of
// stdout chunks, the command, and a function that waits for it.
type runningKeeper struct {
	cmd    *exec.Cmd
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (c *cluster) start(args ...string) *runningKeeper {
	c.t.Helper()
	cmd := exec.Command(filepath.Join(c.bin, "rbee"), args...)
	cmd.Env = c.env
	k := &runningKeeper{cmd: cmd, stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = k.stdout, k.stderr
	require.NoError(c.t, cmd.Start())
	go func() { _ = cmd.Wait(); close(k.done) }()
	c.t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-k.done
	})
	return k
}

func (k *runningKeeper) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-k.done:
		return k.cmd.ProcessState.ExitCode()
	case <-time.After(d):
		t.Fatalf("keeper did not exit within %s; stderr:\n%s", d, k.stderr.String())
		return -1
	}
}

// jobID is the id of the job a running keeper submitted. It waits for the
// keeper's "submitted" line: the keeper prints it before any token, but its
// stderr and stdout are copied into the test by two goroutines, so a token
// seen on stdout says nothing of whether that line has been copied yet.
func (k *runningKeeper) jobID(t *testing.T) string {
	t.Helper()
	var id string
	eventually(t, 30*time.Second, func() bool {
		id = submittedJob(k.stderr.String())
		return id != ""
	}, "the keeper printed no job id; stderr:\n%s", k.stderr)
	return id
}

// jobIDFrom is the id of the job in a finished keeper's stderr.
func jobIDFrom(t *testing.T, stderr string) string {
	t.Helper()
	id := submittedJob(stderr)
	if id == "" {
		t.Fatalf("no job id in:\n%s", stderr)
	}
	return id
}

// submittedJob finds the job id in the keeper's whole "submitted" line, or
// returns "" when that line has not (all) arrived.
func submittedJob(stderr string) string {
	lines := strings.Split(stderr, "\n")
	for _, line := range lines[:len(lines)-1] { // the last has no newline yet
		if i := strings.Index(line, "job "); i >= 0 && strings.Contains(line, "submitted") {
			if f := strings.Fields(line[i+4:]); len(f) > 0 {
				return f[0]
			}
		}
	}
	return ""
}

// longPrompt, sent to the generated "large" model with temperature 0, has a
// greedy answer that runs to longTokens without end-of-sequence, so a job
// that must outlast a signal, a kill, a cancel or a deadline lasts seconds
// (about 5 s on a 2-core CPU) by construction. A random seed's answer may end
// at any token: one reached end-of-sequence after 570 tokens in 1.3 s.
const (
	longPrompt = "hello"
	longTokens = 2000
)

var longGreedy struct {
	once sync.Once
	text string
	res  engine.Result
	err  error
}

// requireLongGreedy checks longPrompt's promise once per test run, in this
// process with the engine the worker uses, so a change of the model or the
// engine fails the tests that rely on it loudly instead of making them flaky.
func requireLongGreedy(t *testing.T) {
	t.Helper()
	longGreedy.once.Do(func() {
		path := filepath.Join(t.TempDir(), "large.gguf")
		if longGreedy.err = gguf.SynthFile(path, gguf.Large()); longGreedy.err != nil {
			return
		}
		llama, err := engine.NewLlama("")
		if err != nil {
			longGreedy.err = err
			return
		}
		m, err := llama.Load(context.Background(), path, engine.LoadOptions{ContextSize: 2048, Threads: 1, Device: "cpu"})
		if err != nil {
			longGreedy.err = err
			return
		}
		defer m.Close()
		longGreedy.text, longGreedy.res, longGreedy.err = engine.Complete(context.Background(), m, engine.Request{Prompt: longPrompt, MaxTokens: longTokens})
	})
	require.NoError(t, longGreedy.err)
	require.Equal(t, engine.StopMaxTokens, longGreedy.res.StopReason,
		"the greedy answer to %q on the large model ended after %d tokens; the tests that need a long job need another prompt", longPrompt, longGreedy.res.CompletionTokens)
}

// longInfer is the keeper's arguments for a job that runs long by construction.
func longInfer(extra ...string) []string {
	return append(append([]string{"infer", "-m", "large", "--temperature", "0", "--max-tokens", fmt.Sprint(longTokens)}, extra...), longPrompt)
}

func TestCtrlCCancelsTheJobAndFreesTheSlot(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	c.readyHive(map[string]string{"large": "large"})
	k := c.start(longInfer()...)
	eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	id := k.jobID(t)
	require.NoError(t, k.cmd.Process.Signal(syscall.SIGINT))
	require.Equal(t, 130, k.wait(t, 10*time.Second))
	eventually(t, 5*time.Second, func() bool { return c.job(id).State == api.JobCancelled }, "job not cancelled")
	eventually(t, 5*time.Second, func() bool {
		ws := c.workers()
		return len(ws) == 1 && ws[0].SlotsBusy == 0
	}, "worker slot not freed")
}

func TestCancelQueuedJobNeverReachesAWorker(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons().oneSlot()
	c.readyHive(map[string]string{"large": "large"})
	// One worker, one slot, busy with a long job.
	busy := strings.TrimSpace(c.mustRbee(longInfer("--detach")...).stdout)
	eventually(t, 90*time.Second, func() bool { return c.job(busy).State == api.JobRunning }, "first job not running")
	queued := strings.TrimSpace(c.mustRbee("infer", "--detach", "-m", "large", "--max-tokens", "5", "hello").stdout)
	require.Equal(t, api.JobQueued, c.job(queued).State)
	c.mustRbee("jobs", "cancel", queued)
	c.mustRbee("jobs", "cancel", busy)
	// attach ends with the job's outcome: a cancelled job exits 1.
	r := c.rbee("--json", "jobs", "attach", queued)
	require.Equal(t, 1, r.code, r.stderr)
	require.Contains(t, r.stderr, "job cancelled")
	require.NotContains(t, r.stdout, `"kind":"token"`)
	require.NotContains(t, r.stdout, `"state":"running"`)
	j := c.job(queued)
	require.Equal(t, api.JobCancelled, j.State)
	require.Empty(t, j.Worker)
	// The worker is free and serves the next job.
	c.mustRbee("infer", "-m", "large", "--max-tokens", "3", "hello")
}

func TestDetachAttachAndResumeWithoutGaps(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.readyHive(map[string]string{"large": "large"})
	id := strings.TrimSpace(c.mustRbee("infer", "--detach", "-m", "large", "--temperature", "0", "--max-tokens", "300", "hello").stdout)

	// A keeper killed mid-stream...
	k := c.start("--json", "jobs", "attach", id)
	eventually(t, 90*time.Second, func() bool { return strings.Count(k.stdout.String(), `"kind":"token"`) >= 5 }, "no tokens")
	require.NoError(t, k.cmd.Process.Kill())
	<-k.done
	first := parseEvents(t, k.stdout.String())
	last := first[len(first)-1].Seq

	// ...and a second keeper attached at the same time see the same stream.
	other := c.start("--json", "jobs", "attach", id)
	rest := parseEvents(t, c.mustRbee("--json", "jobs", "attach", id, "--from", fmt.Sprint(last+1)).stdout)
	require.Equal(t, 0, other.wait(t, 60*time.Second))
	full := parseEvents(t, other.stdout.String())

	var idx []int
	for _, ev := range append(first, rest...) {
		if ev.Token != nil {
			idx = append(idx, ev.Token.Index)
		}
	}
	require.Len(t, idx, 300)
	for i, v := range idx {
		require.Equal(t, i, v, "no gaps or duplicates")
	}
	require.Equal(t, append(first, rest...), full, "resumed stream equals the full one")
}

func parseEvents(t *testing.T, out string) []api.Event {
	t.Helper()
	var evs []api.Event
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		var ev api.Event
		if json.Unmarshal([]byte(line), &ev) != nil || ev.Kind == "" {
			continue // a line cut by the kill
		}
		evs = append(evs, ev)
	}
	return evs
}

func TestWorkerKilledMidStreamFailsTheJobClearly(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	c.readyHive(map[string]string{"large": "large"})
	k := c.start(longInfer()...)
	eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	ws := c.workers()
	require.Len(t, ws, 1)
	require.NoError(t, syscall.Kill(ws[0].PID, syscall.SIGKILL))
	killed := time.Now()
	require.Equal(t, 1, k.wait(t, 15*time.Second))
	require.Less(t, time.Since(killed), 5*time.Second)
	require.Contains(t, k.stderr.String(), fmt.Sprintf("worker %s on hive local died", ws[0].ID))
}

func TestQueueFullIsRefused(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons().oneSlot().setEnv("RBEE_MAX_QUEUE=1")
	c.readyHive(map[string]string{"large": "large"})
	busy := strings.TrimSpace(c.mustRbee(longInfer("--detach")...).stdout)
	eventually(t, 90*time.Second, func() bool { return c.job(busy).State == api.JobRunning }, "first job not running")
	c.mustRbee("infer", "--detach", "-m", "large", "--max-tokens", "5", "hello")
	r := c.rbee("infer", "-m", "large", "--max-tokens", "5", "hello")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "queue full")
	r = c.mustRbee("status")
	require.Contains(t, r.stdout, "large=1")
	c.mustRbee("jobs", "cancel", busy)
}

func TestQueenRestartMidStreamKeepsStreaming(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.readyHive(map[string]string{"large": "large"})
	k := c.start("-q", "infer", "-m", "large", "--temperature", "0", "--max-tokens", "400", "hello")
	eventually(t, 90*time.Second, func() bool { return len(k.stdout.String()) > 0 }, "no token arrived")
	c.mustRbee("queen", "stop")
	c.startQueen()
	require.Equal(t, 0, k.wait(t, 90*time.Second), k.stderr.String())
	r := c.mustRbee("--json", "jobs", "list", "--state", "completed")
	var j api.Job
	require.NoError(t, json.Unmarshal([]byte(strings.Split(r.stdout, "\n")[0]), &j))
	var res api.InferResult
	require.NoError(t, json.Unmarshal(j.Result, &res))
	require.Equal(t, 400, res.CompletionTokens)
	require.Equal(t, c.streamText(j.ID)+"\n", k.stdout.String(), "the keeper saw every token across the restart")
}

// A job waiting for a worker on a hive that is lost meanwhile fails at once
// naming the hive, instead of waiting out the worker start timeout.
func TestHiveLostWhileAJobWaitsForItsWorkerFailsTheJobClearly(t *testing.T) {
	t.Parallel()
	stuck := filepath.Join(binaries.Root(t), "e2e", "testdata", "stuck-worker")
	c := newCluster(t).withDaemons().setEnv("RBEE_HIVE_ARGS=--worker-bin="+stuck, "RBEE_WORKER_START_TIMEOUT=60s")
	c.readyHive(map[string]string{"tiny": "tiny"})
	k := c.start("infer", "-m", "tiny", "hello")
	eventually(t, 30*time.Second, func() bool { return strings.Contains(k.stderr.String(), "asking hive local to start one") },
		"the queen never asked the hive for a worker")
	pid := c.hiveView("local").Status.PID
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	killed := time.Now()
	require.Equal(t, 1, k.wait(t, 20*time.Second), k.stderr.String())
	require.Less(t, time.Since(killed), 8*time.Second, "failed later than the hive-lost bound")
	require.Contains(t, k.stderr.String(), "hive local was lost while starting the worker")
	require.Equal(t, api.JobFailed, c.job(k.jobID(t)).State)
}

// After each way a job can end (completed, failed, timed out, its client
// gone) nothing is left behind: the record is terminal, the worker's slot is
// free, no follower's consumer lingers on the jobs stream, and no process
// was added.
func TestNothingIsLeftBehindAfterAnyEnding(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	c.readyWorkers("large", 1)
	b := c.connect()
	// Consumers by name: a client may not delete its followers'
	// consumers, which expire a few seconds after their last read, so
	// those of the commands that readied the cluster may still be there
	// when the baseline is taken, and go later. What must hold is that
	// none made after the baseline stays.
	consumers := func() map[string]bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := b.JS.Stream(ctx, b.Space.JobsStream())
		require.NoError(t, err)
		names := map[string]bool{}
		lister := s.ConsumerNames(ctx)
		for name := range lister.Name() {
			names[name] = true
		}
		require.NoError(t, lister.Err())
		return names
	}
	leftover := func(base map[string]bool) []string {
		var extra []string
		for name := range consumers() {
			if !base[name] {
				extra = append(extra, name)
			}
		}
		return extra
	}
	processes := func() int {
		n := 0
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			if cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil && strings.Contains(string(cmdline), c.home) {
				n++
			}
		}
		return n
	}
	baseConsumers, baseProcesses := consumers(), processes()
	clean := func(ending, id string) {
		t.Helper()
		eventually(t, 10*time.Second, func() bool { return c.job(id).State.Terminal() }, "%s: job %s not terminal", ending, id)
		eventually(t, 10*time.Second, func() bool { ws := c.workers(); return len(ws) == 1 && ws[0].SlotsBusy == 0 }, "%s: slot still held", ending)
		eventually(t, 10*time.Second, func() bool { return len(leftover(baseConsumers)) == 0 }, "%s: consumers left on the jobs stream: %v", ending, leftover(baseConsumers))
		require.Equal(t, baseProcesses, processes(), "%s: processes added or lost", ending)
	}

	r := c.mustRbee("infer", "-m", "large", "--max-tokens", "3", "hello")
	clean("completed", jobIDFrom(t, r.stderr))

	clean("failed", c.failedOnItsWorker("large").ID)

	r = c.rbee(longInfer("--timeout", "2s")...)
	require.Equal(t, 1, r.code, r.stderr)
	require.Contains(t, r.stderr, "timed out after 2s")
	clean("timed out", jobIDFrom(t, r.stderr))

	// A gateway client that goes away mid-stream. /v1/completions takes the
	// raw prompt, so the job is longPrompt's long greedy one; chat requests
	// end the same way (both endpoints share one path).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	body := strings.NewReader(fmt.Sprintf(`{"model":"large","stream":true,"temperature":0,"max_tokens":%d,"prompt":%q}`, longTokens, longPrompt))
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+c.gateway+"/v1/completions", body)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	require.NoError(t, err)
	require.Contains(t, line, "data:")
	cancel()
	var id string
	eventually(t, 10*time.Second, func() bool {
		for _, j := range strings.Split(strings.TrimSpace(c.mustRbee("--json", "jobs", "list").stdout), "\n") {
			var job api.Job
			if json.Unmarshal([]byte(j), &job) == nil && job.Op.Kind == api.OpInfer && job.State == api.JobCancelled {
				id = job.ID
				return true
			}
		}
		return false
	}, "the gateway job was not cancelled when its client went away")
	clean("client gone", id)
}

// A worker that dies before sending a token costs the client nothing but
// time: the job runs again on another worker, and the client is told.
func TestWorkerDyingBeforeTheFirstTokenIsRetriedElsewhere(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.readyWorkers("large", 2)
	// A long prompt keeps the first worker in prompt processing, before
	// any token, long enough to kill it there.
	prompt := strings.Repeat("the bee is in the hive ", 250)
	k := c.start("infer", "-m", "large", "--temperature", "0", "--max-tokens", "5", prompt)
	var victim string
	eventually(t, 30*time.Second, func() bool {
		s := k.stderr.String()
		i := strings.Index(s, "is generating with model")
		if i < 0 {
			return false
		}
		line := s[strings.LastIndex(s[:i], "\n")+1 : i]
		victim = strings.Fields(line[strings.Index(line, "] ")+2:])[1]
		return true
	}, "no worker took the job")
	require.Empty(t, k.stdout.String(), "the prompt was processed before the worker could be killed; lengthen it")
	for _, w := range c.workers() {
		if w.ID == victim {
			require.NoError(t, syscall.Kill(w.PID, syscall.SIGKILL))
		}
	}
	require.Equal(t, 0, k.wait(t, 60*time.Second), k.stderr.String())
	require.Contains(t, k.stderr.String(), "retrying the job on another worker (attempt 2)")
	j := c.job(k.jobID(t))
	require.Equal(t, api.JobCompleted, j.State)
	require.NotEqual(t, victim, j.Worker)
	require.Equal(t, 2, j.Attempts)
}

// A queen that comes back after its worker died meanwhile finds the job
// running on a worker that is gone, and fails it clearly instead of leaving
// it running until its deadline.
func TestQueenRestartReconcilesAJobWhoseWorkerDiedMeanwhile(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	requireLongGreedy(t)
	ws := c.readyWorkers("large", 1)
	// A token shown first, so stored: a job whose worker is lost before
	// it sent one is run again on another worker, not failed (a job only
	// running could be taken a moment before the queen stops).
	k := c.start(longInfer()...)
	eventually(t, 60*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	id := k.jobID(t)
	c.mustRbee("queen", "stop")
	require.NoError(t, syscall.Kill(ws[0].PID, syscall.SIGKILL))
	require.NoError(t, waitProcessGone(ws[0].PID, 5*time.Second))
	// Past the entry's TTL, so the restarted queen never sees it alive.
	time.Sleep(4 * time.Second)
	c.startQueen()
	eventually(t, 10*time.Second, func() bool { return c.job(id).State == api.JobFailed }, "job still %s", c.job(id).State)
	require.Contains(t, c.job(id).Error, fmt.Sprintf("worker %s on hive local died", ws[0].ID))
}

// threadPolicies counts the threads of process pid that run as batch work
// (SCHED_BATCH) and as ordinary ones (SCHED_NORMAL).
func threadPolicies(t *testing.T, pid int) (batch, ordinary int) {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	require.NoError(t, err)
	for _, task := range tasks {
		tid, err := strconv.Atoi(task.Name())
		require.NoError(t, err)
		a, err := unix.SchedGetAttr(tid, 0)
		if err != nil {
			continue // ended since the listing
		}
		switch a.Policy {
		case unix.SCHED_BATCH:
			batch++
		case unix.SCHED_NORMAL:
			ordinary++
		}
	}
	return batch, ordinary
}
