package worker_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/gguf"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/internal/testutil/inproc"
	"github.com/rbee-dev/rbee/internal/testutil/tcpproxy"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rbee-dev/rbee/worker"
	"github.com/rbee-dev/rbee/worker/engine"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const (
	modelID = "tiny"
	ctxSize = 512
	prompt  = "hello world, the bee is"
)

var (
	modelOnce sync.Once
	modelErr  error
	tinyPath  string
	refModel  engine.Model
	modelDir  string
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "rbee-worker-test")
	if err != nil {
		panic(err)
	}
	modelDir = dir
	code := binaries.Main(m) // removes the programs process_test.go built
	if refModel != nil {
		_ = refModel.Close()
	}
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// tiny writes the Tiny model once and loads a reference copy in the test
// process, to compute what the worker should answer.
func tiny(t testing.TB) (string, engine.Model) {
	t.Helper()
	modelOnce.Do(func() {
		tinyPath = filepath.Join(modelDir, "tiny.gguf")
		if modelErr = gguf.SynthFile(tinyPath, gguf.Tiny()); modelErr != nil {
			return
		}
		var llama *engine.Llama
		if llama, modelErr = engine.NewLlama(""); modelErr != nil {
			return
		}
		refModel, modelErr = llama.Load(context.Background(), tinyPath, engine.LoadOptions{ContextSize: ctxSize, Threads: 1, Device: "cpu"})
	})
	require.NoError(t, modelErr)
	return tinyPath, refModel
}

// greedy is the engine's own greedy answer for p.
func greedy(t *testing.T, p string, n int) string {
	t.Helper()
	_, m := tiny(t)
	text, _, err := engine.Complete(context.Background(), m, engine.Request{Prompt: p, MaxTokens: n})
	require.NoError(t, err)
	return text
}

type running struct {
	*inproc.Daemon
	ready api.WorkerStatus
}

// start runs a worker in-process until the test ends and waits until it
// serves.
func start(t *testing.T, f *busfix.Fixture, id string, slots int, mutate ...func(*worker.Config)) *running {
	t.Helper()
	path, _ := tiny(t)
	readyCh := make(chan api.WorkerStatus, 1)
	cfg := worker.Config{
		ID: id, Hive: "hive1", Model: modelID, ModelPath: path, Slots: slots, ContextSize: ctxSize, Threads: 1,
		NATSURL: f.URL, Heartbeat: 500 * time.Millisecond, Log: zerolog.Nop(),
		Ready: func(st api.WorkerStatus) { readyCh <- st },
	}
	for _, m := range mutate {
		m(&cfg)
	}
	d, st := inproc.Start(t, "worker "+id, func(ctx context.Context) error { return worker.Run(ctx, cfg) }, readyCh, 30*time.Second)
	return &running{Daemon: d, ready: st}
}

// longContext lets a worker generate long enough to be interrupted.
func longContext(c *worker.Config) { c.ContextSize = 2048 }

func (r *running) wait(t *testing.T) error { return r.Wait(t, 30*time.Second) }

func store(t *testing.T, f *busfix.Fixture) *jobs.Store {
	t.Helper()
	s, err := jobs.Open(context.Background(), f.Bus, api.Actor{Component: "test"}, time.Hour)
	require.NoError(t, err)
	return s
}

// submit does what the queen does: create the job record, then queue the
// request on the model's work queue.
func submit(t *testing.T, f *busfix.Fixture, args api.InferArgs) string {
	t.Helper()
	id := queueJob(t, f, args)
	publishRequest(t, f, id, args)
	return id
}

func queueJob(t *testing.T, f *busfix.Fixture, args api.InferArgs) string {
	t.Helper()
	args.Model = modelID
	raw, err := json.Marshal(args)
	require.NoError(t, err)
	job, err := store(t, f).Create(context.Background(), api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpInfer, Args: raw}})
	require.NoError(t, err)
	return job.ID
}

func publishRequest(t *testing.T, f *busfix.Fixture, id string, args api.InferArgs) {
	t.Helper()
	args.Model = modelID
	key, err := subjects.ModelKey(modelID)
	require.NoError(t, err)
	subject, err := f.Bus.Space.Infer(key)
	require.NoError(t, err)
	data, err := json.Marshal(api.InferRequest{JobID: id, Args: args, Attempt: 1, EnqueuedAt: time.Now()})
	require.NoError(t, err)
	_, err = f.Bus.JS.Publish(context.Background(), subject, data)
	require.NoError(t, err)
}

type followed struct {
	tokens []api.Token
	states []api.JobState
	final  *api.StateChange
	text   string
}

// follow reads a job's events until its terminal state; onToken may act on
// each token as it arrives.
func follow(t *testing.T, f *busfix.Fixture, id string, onToken func(api.Token)) followed {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out followed
	var b strings.Builder
	err := f.Bus.Follow(ctx, id, 0, func(ev api.Event) error {
		switch {
		case ev.Token != nil:
			out.tokens = append(out.tokens, *ev.Token)
			b.WriteString(ev.Token.Text)
			if onToken != nil {
				onToken(*ev.Token)
			}
		case ev.State != nil:
			out.states = append(out.states, ev.State.State)
			if ev.Terminal() {
				out.final = ev.State
			}
		}
		return nil
	})
	require.NoError(t, err)
	require.NotNil(t, out.final)
	out.text = b.String()
	return out
}

func requireContiguous(t *testing.T, toks []api.Token) {
	t.Helper()
	for i, tok := range toks {
		require.Equal(t, i, tok.Index, "token indices are contiguous from 0")
	}
}

func entry(t *testing.T, f *busfix.Fixture, id string) (api.WorkerStatus, error) {
	t.Helper()
	kv, err := f.Bus.KV(context.Background(), f.Bus.Space.WorkersBucket())
	require.NoError(t, err)
	e, err := kv.Get(context.Background(), subjects.WorkerKey("hive1", id))
	if err != nil {
		return api.WorkerStatus{}, err
	}
	var st api.WorkerStatus
	require.NoError(t, json.Unmarshal(e.Value(), &st))
	return st, nil
}

func workerStatus(t *testing.T, f *busfix.Fixture, id string) api.WorkerStatus {
	t.Helper()
	subject, err := f.Bus.Space.Worker("hive1", id, worker.EpStatus)
	require.NoError(t, err)
	var st api.WorkerStatus
	require.NoError(t, f.Bus.Call(context.Background(), subject, nil, &st))
	return st
}

// requireNoToken checks that the job's stream holds no token of it.
func requireNoToken(t *testing.T, f *busfix.Fixture, id, msg string) {
	t.Helper()
	ctx := context.Background()
	subject, err := f.Bus.Space.JobEvent(id, subjects.EventToken)
	require.NoError(t, err)
	stream, err := f.Bus.JS.Stream(ctx, f.Bus.Space.JobsStream())
	require.NoError(t, err)
	_, err = stream.GetLastMsgForSubject(ctx, subject)
	require.ErrorIs(t, err, jetstream.ErrMsgNotFound, msg)
}

func eventually(t *testing.T, cond func() bool, msg string) {
	t.Helper()
	require.Eventually(t, cond, 10*time.Second, 20*time.Millisecond, msg)
}

func TestServesARequestAndStreamsItsTokens(t *testing.T) {
	f := busfix.Start(t)
	w := start(t, f, "w1", 2)

	st, err := entry(t, f, "w1")
	require.NoError(t, err)
	assert.Equal(t, api.WorkerReady, st.State)
	assert.Equal(t, "hive1", st.Hive)
	assert.Equal(t, modelID, st.ModelKey)
	assert.Equal(t, 2, st.SlotsTotal)
	assert.Equal(t, os.Getpid(), st.PID)
	assert.Equal(t, "cpu", st.Device)
	assert.Positive(t, st.MemoryUsed)
	assert.Equal(t, api.WorkerReady, w.ready.State)

	id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 32}})
	got := follow(t, f, id, nil)
	require.Equal(t, api.JobCompleted, got.final.State, got.final.Error)
	require.Equal(t, []api.JobState{api.JobQueued, api.JobRunning, api.JobCompleted}, got.states)
	require.Len(t, got.tokens, 32)
	requireContiguous(t, got.tokens)
	want := greedy(t, prompt, 32)
	require.Equal(t, want, got.text, "the worker's greedy output is the engine's")

	job, err := store(t, f).Get(context.Background(), id)
	require.NoError(t, err)
	assert.Equal(t, "w1", job.Worker)
	assert.Equal(t, "hive1", job.Hive)
	assert.Equal(t, 1, job.Attempts)
	var res api.InferResult
	require.NoError(t, json.Unmarshal(job.Result, &res))
	assert.NotContains(t, string(job.Result), want, "the record keeps no copy of the text the stream holds")
	assert.Equal(t, string(engine.StopMaxTokens), res.StopReason)
	assert.Equal(t, 32, res.CompletionTokens)
	assert.Greater(t, res.PromptTokens, 1)
	assert.Positive(t, res.TimeToFirstToken)
	assert.Positive(t, res.TokensPerSecond)
	assert.Equal(t, "w1", res.Worker)
	assert.Equal(t, "hive1", res.Hive)
	assert.Equal(t, 1, res.Attempt)
	assert.Zero(t, res.CachedTokens)

	// The same request again: the slot's prompt cache holds all of its
	// prompt but the two tokens decoded again, and the record says so.
	again := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 32}})
	got = follow(t, f, again, nil)
	require.Equal(t, api.JobCompleted, got.final.State, got.final.Error)
	require.Equal(t, want, got.text)
	job, err = store(t, f).Get(context.Background(), again)
	require.NoError(t, err)
	var res2 api.InferResult
	require.NoError(t, json.Unmarshal(job.Result, &res2))
	assert.Equal(t, res.PromptTokens-2, res2.CachedTokens)

	// A chat request goes through the model's template.
	chat := submit(t, f, api.InferArgs{System: "Be brief.", Prompt: "Say hello", Sampling: api.Sampling{MaxTokens: 8}})
	got = follow(t, f, chat, nil)
	require.Equal(t, api.JobCompleted, got.final.State, got.final.Error)
	require.NotEmpty(t, got.tokens)

	st = workerStatus(t, f, "w1")
	assert.Equal(t, api.WorkerReady, st.State)
	assert.Equal(t, 0, st.SlotsBusy)
	assert.GreaterOrEqual(t, st.TokensServed, uint64(33))
	assert.Positive(t, st.TokensPerSec)
}

func TestNarrationNamesTheWorker(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 1)
	id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 4}})
	var human []string
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, f.Bus.Follow(ctx, id, 0, func(ev api.Event) error {
		if ev.Narration != nil {
			human = append(human, ev.Narration.Human)
			assert.Equal(t, api.Actor{Component: "worker", ID: "w1"}, ev.Narration.Actor)
			assert.Equal(t, "hive1", ev.Narration.HiveID)
		}
		return nil
	}))
	require.Contains(t, human, "worker w1 on hive hive1 is generating with model tiny")
}

func TestDuplicateIDIsRefused(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 1)
	path, _ := tiny(t)
	err := worker.Run(context.Background(), worker.Config{ID: "w1", Hive: "hive1", Model: modelID, ModelPath: path, NATSURL: f.URL, Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrDuplicate)
	st, err := entry(t, f, "w1")
	require.NoError(t, err, "the live worker keeps its entry")
	require.Equal(t, api.WorkerReady, st.State)
}

func TestCancelStopsGenerationAndFreesTheSlot(t *testing.T) {
	f := busfix.Start(t)
	// A long greedy generation (about half a second), cancelled after
	// its first token.
	start(t, f, "w1", 1, longContext)
	const max = 2000
	id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: max}})
	cancelSubject, err := f.Bus.Space.JobCancel(id)
	require.NoError(t, err)
	var once sync.Once
	got := follow(t, f, id, func(api.Token) {
		once.Do(func() { require.NoError(t, f.Bus.NC.Publish(cancelSubject, nil)) })
	})
	require.Equal(t, api.JobCancelled, got.final.State)
	require.NotEmpty(t, got.tokens)
	require.Less(t, len(got.tokens), max, "generation stopped early")
	requireContiguous(t, got.tokens)
	var res api.InferResult
	require.NoError(t, json.Unmarshal(got.final.Result, &res))
	assert.Equal(t, string(engine.StopCancelled), res.StopReason)
	assert.Equal(t, len(got.tokens), res.CompletionTokens)

	eventually(t, func() bool { return workerStatus(t, f, "w1").SlotsBusy == 0 }, "slot not freed")
	next := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 4}})
	require.Equal(t, api.JobCompleted, follow(t, f, next, nil).final.State)
}

func TestQueuedJobCancelledBeforeAWorkerTakesItNeverRuns(t *testing.T) {
	f := busfix.Start(t)
	s := store(t, f)
	ctx := context.Background()
	cancelled := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 8}})
	_, err := s.Transition(ctx, cancelled, api.JobCancelled, func(j *api.Job) { j.Error = "cancelled by user" })
	require.NoError(t, err)

	start(t, f, "w1", 1)
	// One slot takes requests in order: once the next one is done, the
	// cancelled one has been seen and skipped.
	next := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 4}})
	require.Equal(t, api.JobCompleted, follow(t, f, next, nil).final.State)

	got := follow(t, f, cancelled, nil)
	require.Empty(t, got.tokens)
	require.Equal(t, []api.JobState{api.JobQueued, api.JobCancelled}, got.states)
	job, err := s.Get(ctx, cancelled)
	require.NoError(t, err)
	require.Equal(t, api.JobCancelled, job.State)
	require.Empty(t, job.Worker)

	cons, err := f.Bus.JS.Consumer(ctx, f.Bus.Space.InferStream(), "infer-"+modelID)
	require.NoError(t, err)
	info, err := cons.Info(ctx)
	require.NoError(t, err)
	require.Zero(t, info.NumPending, "nothing left queued")
	require.Zero(t, info.NumAckPending, "the skipped request was acknowledged")
}

func TestBadParametersFailTheJob(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 1)
	cases := []struct {
		name  string
		args  api.InferArgs
		field string
	}{
		{"temperature", api.InferArgs{Prompt: prompt, Sampling: api.Sampling{Temperature: 5}}, "temperature"},
		{"top_p", api.InferArgs{Prompt: prompt, Sampling: api.Sampling{TopP: 1.5}}, "top_p"},
		{"max_tokens beyond the context", api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: ctxSize + 1}}, "max_tokens"},
		{"empty prompt", api.InferArgs{}, "prompt"},
		{"prompt longer than the context", api.InferArgs{Prompt: strings.Repeat("hello ", ctxSize)}, "prompt"},
		{"message without a role", api.InferArgs{Messages: []api.ChatMessage{{Content: "hi"}}}, "messages"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id := submit(t, f, c.args)
			got := follow(t, f, id, nil)
			require.Equal(t, api.JobFailed, got.final.State)
			require.Contains(t, got.final.Error, c.field)
			require.Empty(t, got.tokens)
			require.Equal(t, []api.JobState{api.JobQueued, api.JobFailed}, got.states, "failed before it ran")
		})
	}
}

func TestFirstTokenTimeoutFailsTheJob(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 1)
	// A long prompt takes far longer to read than the timeout allows.
	id := submit(t, f, api.InferArgs{
		Prompt: strings.Repeat("the bee is ", 100), FirstTokenTimeout: api.Duration(time.Microsecond),
		Sampling: api.Sampling{MaxTokens: 8},
	})
	got := follow(t, f, id, nil)
	require.Equal(t, api.JobFailed, got.final.State)
	require.Contains(t, got.final.Error, "no first token within 1µs")
	require.Empty(t, got.tokens)
}

func TestTwoWorkersShareOneQueue(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 1)
	start(t, f, "w2", 1)
	const n, maxTokens = 8, 24
	ids := make([]string, n)
	for i := range ids {
		ids[i] = submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: maxTokens}})
	}
	want := greedy(t, prompt, maxTokens)
	used := map[string]int{}
	for _, id := range ids {
		got := follow(t, f, id, nil)
		require.Equal(t, api.JobCompleted, got.final.State, got.final.Error)
		// A job run twice would have its tokens and states twice.
		require.Len(t, got.tokens, maxTokens)
		requireContiguous(t, got.tokens)
		require.Equal(t, []api.JobState{api.JobQueued, api.JobRunning, api.JobCompleted}, got.states)
		require.Equal(t, want, got.text)
		used[got.final.Worker]++
	}
	for w := range used {
		require.Contains(t, []string{"w1", "w2"}, w)
	}
	t.Logf("jobs per worker: %v", used)
}

func TestDrainLeavesTheRegistryAtOnce(t *testing.T) {
	f := busfix.Start(t)
	w := start(t, f, "w1", 1, longContext, func(c *worker.Config) { c.Heartbeat = 2 * time.Second })
	kv, err := f.Bus.KV(context.Background(), f.Bus.Space.WorkersBucket())
	require.NoError(t, err)
	watch, err := kv.Watch(context.Background(), subjects.WorkerKey("hive1", "w1"), jetstream.UpdatesOnly())
	require.NoError(t, err)
	defer func() { _ = watch.Stop() }()

	// A long job in flight, cut by a short grace.
	id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 2000}})
	subject, err := f.Bus.Space.Worker("hive1", "w1", worker.EpDrain)
	require.NoError(t, err)
	var drained api.WorkerStatus
	var once sync.Once
	got := follow(t, f, id, func(api.Token) {
		once.Do(func() {
			require.NoError(t, f.Bus.Call(context.Background(), subject, worker.DrainRequest{Grace: api.Duration(time.Millisecond)}, &drained))
		})
	})
	require.Equal(t, api.WorkerDraining, drained.State)
	require.Equal(t, api.JobFailed, got.final.State)
	require.Contains(t, got.final.Error, "shut down before the job finished")
	requireContiguous(t, got.tokens)

	t0 := time.Now()
	require.NoError(t, w.wait(t))
	var states []string
	deadline := time.After(5 * time.Second)
	for {
		select {
		case e := <-watch.Updates():
			if e.Operation() != jetstream.KeyValuePut {
				require.Less(t, time.Since(t0), 2*time.Second, "left at once, not one TTL later")
				require.Contains(t, states, api.WorkerDraining, "draining was beaten before leaving")
				_, err := entry(t, f, "w1")
				require.True(t, errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted), "entry gone: %v", err)
				return
			}
			var st api.WorkerStatus
			require.NoError(t, json.Unmarshal(e.Value(), &st))
			states = append(states, st.State)
		case <-deadline:
			t.Fatalf("no delete seen; states %v", states)
		}
	}
}

func TestBadConfigIsRefusedBeforeTheBus(t *testing.T) {
	cases := []struct {
		name string
		cfg  worker.Config
		want string
	}{
		{"id", worker.Config{ID: "w.1", Hive: "h", Model: "m", ModelPath: "x"}, "--id"},
		{"hive", worker.Config{ID: "w", Hive: "", Model: "m", ModelPath: "x"}, "--hive"},
		{"model", worker.Config{ID: "w", Hive: "h", Model: "../m", ModelPath: "x"}, "--model"},
		{"model path", worker.Config{ID: "w", Hive: "h", Model: "m"}, "--model-path"},
		{"device", worker.Config{ID: "w", Hive: "h", Model: "m", ModelPath: "x", Device: "tpu"}, "--device"},
		{"slots", worker.Config{ID: "w", Hive: "h", Model: "m", ModelPath: "x", Slots: -1}, "--slots"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.cfg.Check()
			require.Error(t, err)
			require.Contains(t, err.Error(), c.want)
		})
	}
	ok := worker.Config{ID: "w", Hive: "h", Model: "llama-3.2-1b", ModelPath: "x", Device: "cuda:1"}
	require.NoError(t, ok.Check())
}

// A slot count whose KV caches do not fit in free memory is refused before
// the worker touches the bus (no NATS URL that answers is given), with the
// numbers.
func TestSlotsThatDoNotFitAreRefused(t *testing.T) {
	path, _ := tiny(t)
	err := worker.Run(context.Background(), worker.Config{
		ID: "w1", Hive: "hive1", Model: modelID, ModelPath: path, Slots: 256, ContextSize: 1 << 22,
		NATSURL: "nats://127.0.0.1:1", Log: zerolog.Nop(),
	})
	require.ErrorIs(t, err, worker.ErrNoMemory)
	assert.Contains(t, err.Error(), "--slots 256 does not fit: 256 slots of 4194304 tokens need")
	assert.Contains(t, err.Error(), "of KV cache (2.0 GiB each)")
}

// Over a long link (100 ms each way) taking a job is a 200 ms round trip,
// and the tiny model makes its tokens in a few milliseconds. The decode
// does not wait for the take: its tokens are held back and sent once the
// take comes back. The tokens of a request whose job another worker runs
// (a redelivery) are made meanwhile too, and dropped unsent and uncounted.
func TestTheDecodeDoesNotWaitForTheTake(t *testing.T) {
	f := busfix.Start(t)
	s := store(t, f)
	ctx := context.Background()
	proxy := f.Proxy(t)
	start(t, f, "w1", 1, func(c *worker.Config) { c.NATSURL = "nats://" + proxy.Addr() })
	const latency = 100 * time.Millisecond
	proxy.SetLatency(latency)

	args := api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 64}}
	result := func(id string) api.InferResult {
		t.Helper()
		job, err := s.Get(ctx, id)
		require.NoError(t, err)
		require.Equal(t, api.JobCompleted, job.State)
		var res api.InferResult
		require.NoError(t, json.Unmarshal(job.Result, &res))
		return res
	}
	ours := submit(t, f, args)
	got := follow(t, f, ours, nil)
	require.Equal(t, api.JobCompleted, got.final.State)
	requireContiguous(t, got.tokens)
	res := result(ours)
	require.Len(t, got.tokens, res.CompletionTokens)
	require.Less(t, time.Duration(res.Duration), latency,
		"the generation ran while its take (a round trip of 2 × %s) was in flight", latency)

	other := queueJob(t, f, args)
	_, err := s.Take(ctx, other, jobs.Attempt{Number: 1, Worker: "w0"}, "hive1")
	require.NoError(t, err)
	publishRequest(t, f, other, args)
	next := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 4}})
	require.Equal(t, api.JobCompleted, follow(t, f, next, nil).final.State)
	requireNoToken(t, f, other, "no token of a job another worker runs")
	job, err := s.Get(ctx, other)
	require.NoError(t, err)
	require.Equal(t, api.JobRunning, job.State)
	require.Equal(t, "w0", job.Worker)
	require.EqualValues(t, res.CompletionTokens+result(next).CompletionTokens, workerStatus(t, f, "w1").TokensServed,
		"only the tokens of its own jobs count as served")
}

// A take whose write was applied but whose answer was lost (the bus cut in
// that round trip) leaves the record running on this worker's attempt
// while the worker thinks it failed. When a copy of the request comes back
// (the worker left it queued), the worker runs the job: without that it
// would stay "running" on a live worker until its deadline.
func TestATakeWhoseAnswerWasLostIsRunAllTheSame(t *testing.T) {
	f := busfix.Start(t)
	s := store(t, f)
	start(t, f, "w1", 1)
	args := api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 16}}
	id := queueJob(t, f, args)
	_, err := s.Take(context.Background(), id, jobs.Attempt{Number: 1, Worker: "w1"}, "hive1")
	require.NoError(t, err, "the take as the worker's own write left it")
	publishRequest(t, f, id, args)

	got := follow(t, f, id, nil)
	require.Equal(t, api.JobCompleted, got.final.State)
	requireContiguous(t, got.tokens)
	require.Equal(t, greedy(t, prompt, 16), got.text)
}

// A record running on a worker of the same id that started before this
// process (a predecessor that died) is not this process's take: its
// attempt is not run a second time here.
func TestATakeOfAnEarlierWorkerOfTheSameIDIsNotRun(t *testing.T) {
	f := busfix.Start(t)
	s := store(t, f)
	ctx := context.Background()
	args := api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 16}}
	id := queueJob(t, f, args)
	_, err := s.Take(ctx, id, jobs.Attempt{Number: 1, Worker: "w1"}, "hive1")
	require.NoError(t, err)
	start(t, f, "w1", 1)
	publishRequest(t, f, id, args)
	// One slot, and the queue hands requests out in order: once the next
	// job ended, the first request was handled.
	next := submit(t, f, args)
	require.Equal(t, api.JobCompleted, follow(t, f, next, nil).final.State)

	requireNoToken(t, f, id, "no token of an attempt taken before the worker started")
	job, err := s.Get(ctx, id)
	require.NoError(t, err)
	require.Equal(t, api.JobRunning, job.State)
}

// Two copies of one attempt's request (a new term queues a waiting job
// again while the first copy waits; a lost ack redelivers one) pulled by
// two slots of one worker at once: the job runs once. The record cannot
// tell the second slot's take from a take of the first whose answer was
// lost; the worker's own book of the attempts its slots hold can.
func TestTwoCopiesOfARequestRunOnce(t *testing.T) {
	f := busfix.Start(t)
	args := api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 200}}
	id := queueJob(t, f, args)
	publishRequest(t, f, id, args)
	publishRequest(t, f, id, args)
	start(t, f, "w1", 2, longContext)

	got := follow(t, f, id, nil)
	require.Equal(t, api.JobCompleted, got.final.State)
	requireContiguous(t, got.tokens)
	var res api.InferResult
	job, err := store(t, f).Get(context.Background(), id)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(job.Result, &res))
	// Both copies are handled (the second dropped) before the worker is
	// idle again; a second generation would count its tokens as served.
	eventually(t, func() bool { return workerStatus(t, f, "w1").SlotsBusy == 0 }, "the worker goes idle")
	require.EqualValues(t, res.CompletionTokens, workerStatus(t, f, "w1").TokensServed, "one generation")
}

// The worker's status (and so its heartbeat) lists the jobs its slots
// hold, from before the take until the end is recorded: the leader gives
// up a job recorded as running on a worker that does not list it.
func TestStatusListsTheJobsItsSlotsHold(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 2, longContext)
	require.NotNil(t, workerStatus(t, f, "w1").Jobs, "an idle worker says it holds none")
	require.Empty(t, workerStatus(t, f, "w1").Jobs)
	id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 200}})
	var during []string
	got := follow(t, f, id, func(tok api.Token) {
		if tok.Index == 0 {
			during = workerStatus(t, f, "w1").Jobs
		}
	})
	require.Equal(t, api.JobCompleted, got.final.State)
	require.Equal(t, []string{id}, during)
	st, err := entry(t, f, "w1")
	require.NoError(t, err)
	require.NotNil(t, st.Jobs, "the heartbeat carries the list")
	eventually(t, func() bool { return len(workerStatus(t, f, "w1").Jobs) == 0 }, "the job leaves the list once it ended")
}

// The leader gives up an attempt whose worker it judged lost; a worker that
// runs it after all (only slow, or cut off a while) hears so on the job's
// cancel subject. It stops that attempt and records nothing, since the
// leader records what follows (queued again, or failed as lost): before,
// it recorded the job cancelled, which nobody had asked for. A give-up of
// another attempt leaves the one it runs alone.
func TestAnAttemptGivenUpStopsWithoutRecordingItsEnd(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 1, longContext)
	giveUp := func(id string, attempt int) {
		subject, err := f.Bus.Space.JobCancel(id)
		require.NoError(t, err)
		data, err := json.Marshal(api.GiveUp{Attempt: attempt, Error: api.Fail(api.ReasonWorkerLost, "", "worker w1 missed its heartbeats")})
		require.NoError(t, err)
		require.NoError(t, f.Bus.NC.Publish(subject, data))
	}

	t.Run("another attempt", func(t *testing.T) {
		const max = 200
		id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: max}})
		var once sync.Once
		got := follow(t, f, id, func(api.Token) { once.Do(func() { giveUp(id, 2) }) })
		require.Equal(t, api.JobCompleted, got.final.State)
		require.Len(t, got.tokens, max)
	})

	t.Run("its own", func(t *testing.T) {
		const max = 2000
		id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: max}})
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		errFirst := errors.New("first token")
		err := f.Bus.Follow(ctx, id, 0, func(ev api.Event) error {
			if ev.Token != nil {
				giveUp(id, 1)
				return errFirst
			}
			return nil
		})
		require.ErrorIs(t, err, errFirst)
		eventually(t, func() bool {
			st := workerStatus(t, f, "w1")
			return st.SlotsBusy == 0 && len(st.Jobs) == 0
		}, "the attempt stops, its slot freed and its job no longer held")
		job, err := store(t, f).Get(context.Background(), id)
		require.NoError(t, err)
		require.Equal(t, api.JobRunning, job.State, "the worker leaves the job's next state to the leader")
		require.Equal(t, 1, job.Attempts)
		require.Equal(t, "w1", job.Worker)
		require.Empty(t, job.Error)
	})
}

// A worker stopped while the bus is away (its hive killed during a cut)
// cancels its jobs after the drain grace and gives their tokens and ends
// a few seconds more, not the whole outage bound (minutes): the leader
// gives its jobs up when its heartbeat expires.
func TestAStoppedWorkerDoesNotWaitOutABusOutage(t *testing.T) {
	f := busfix.Start(t)
	proxy := f.Proxy(t)
	w := start(t, f, "w1", 1, longContext, func(c *worker.Config) {
		c.NATSURL = "nats://" + proxy.Addr()
		c.BusOutage = 2 * time.Minute
		c.DrainGrace = 300 * time.Millisecond
	})
	cutAtFirstToken(t, f, proxy, submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 2000}}))
	stopped := time.Now()
	w.Cancel()
	require.NoError(t, w.Wait(t, 60*time.Second))
	require.Less(t, time.Since(stopped), 25*time.Second, "stopped within its grace and a few seconds, not the 2m outage bound")
}

// cutAtFirstToken cuts the worker's link to the bus once job id has
// streamed its first token: mid-generation, its tokens and end then wait
// for the bus.
func cutAtFirstToken(t *testing.T, f *busfix.Fixture, proxy *tcpproxy.Proxy, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	generating := errors.New("generating")
	err := f.Bus.Follow(ctx, id, 0, func(ev api.Event) error {
		if ev.Token != nil {
			proxy.Cut()
			return generating
		}
		return nil
	})
	require.ErrorIs(t, err, generating)
}

// A bus away for longer than a job's tokens wait for it (a queen restarted
// minutes later) fails the job, and the worker, alive all along, records
// that end once the bus is back. Given up, the end would leave the job
// running on a live worker until its deadline: the leader judges a job by
// its worker's heartbeat, which beats again.
func TestAnEndOwedThroughALongOutageIsRecordedOnceTheBusIsBack(t *testing.T) {
	f := busfix.Start(t)
	proxy := f.Proxy(t)
	start(t, f, "w1", 1, longContext, func(c *worker.Config) {
		c.NATSURL = "nats://" + proxy.Addr()
		c.BusOutage = time.Second
	})
	id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 2000}})
	cutAtFirstToken(t, f, proxy, id)
	// Longer than the tokens' bound and the end's bound before it (each
	// the outage bound and one 10 s bus operation), so a worker that gave
	// the end up has done so.
	time.Sleep(25 * time.Second)
	proxy.Heal()

	got := follow(t, f, id, nil)
	require.Equal(t, api.JobFailed, got.final.State)
	require.Contains(t, got.final.Error, "not stored")
	requireContiguous(t, got.tokens)
	job, err := store(t, f).Get(context.Background(), id)
	require.NoError(t, err)
	require.Equal(t, api.JobFailed, job.State)
}
