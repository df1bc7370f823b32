package queen

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	openai "github.com/sashabaranov/go-openai"
	"github.com/stretchr/testify/require"
)

// These tests run a real queen (embedded NATS, JetStream, the scheduler)
// with its gateway on a free port, and talk to it with a real OpenAI
// client. Hives and workers are played by the test on the real bus (see
// fakeWorker): the gateway's path through submit, the work queue, job
// records and the job's event stream is the production one.

// gatewayQueen runs a queen with the gateway on a free loopback port and
// stops it with the test. stop, when the test wants to stop it earlier,
// returns once Run did.
func gatewayQueen(t *testing.T, mutate func(*Config)) (q *Queen, stop func()) {
	t.Helper()
	ready := make(chan *Queen, 1)
	cfg := Config{
		DataDir: t.TempDir(), Listen: "127.0.0.1:-1", GatewayAddr: "127.0.0.1:0",
		Log: zerolog.Nop(), Ready: func(q *Queen) { ready <- q },
	}
	if mutate != nil {
		mutate(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				require.NoError(t, err)
			case <-time.After(20 * time.Second):
				t.Error("queen did not shut down")
			}
		})
	}
	t.Cleanup(stop)
	select {
	case q = <-ready:
	case err := <-done:
		t.Fatalf("queen failed to start: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("queen did not become ready")
	}
	require.NotEmpty(t, q.GatewayURL())
	return q, stop
}

func openAIClient(q *Queen, key string) *openai.Client {
	cfg := openai.DefaultConfig(key)
	cfg.BaseURL = q.GatewayURL() + "/v1"
	return openai.NewClientWithConfig(cfg)
}

// announceHive writes a hive heartbeat entry, as rbee-hive does, listing
// models in its catalog, and answers the hive's model-list endpoint. It
// returns when the queen's registry sees the hive online.
func announceHive(t *testing.T, q *Queen, b *bus.Bus, id string, models ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st := api.HiveStatus{ID: id, BeatAt: time.Now().UTC(), RAMFree: 1 << 30}
	var catalog []api.Model
	for _, m := range models {
		key, err := subjects.ModelKey(m)
		require.NoError(t, err)
		st.Models = append(st.Models, api.ModelBrief{ID: m, Key: key})
		catalog = append(catalog, api.Model{ID: m, Key: key, AddedAt: time.Now().UTC()})
	}
	subject, err := b.Space.Hive(id, api.HiveEpModelList)
	require.NoError(t, err)
	sub, err := b.NC.Subscribe(subject, func(m *nats.Msg) {
		data, _ := json.Marshal(api.ModelListReply{Hive: id, Models: catalog})
		_ = m.Respond(data)
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	require.NoError(t, b.NC.Flush())

	kv, err := b.KV(ctx, b.Space.HivesBucket())
	require.NoError(t, err)
	data, _ := json.Marshal(st)
	_, err = kv.Put(ctx, id, data)
	require.NoError(t, err)
	_, err = q.registry.Wait(ctx, func(s *Snapshot) bool { return s.Hives[id].State == api.HiveOnline })
	require.NoError(t, err)
}

// announceWorker writes a worker heartbeat entry for model, as
// llm-worker-rbee does, and returns when the queen's registry sees it.
func announceWorker(t *testing.T, q *Queen, b *bus.Bus, id, hive, modelID string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key, err := subjects.ModelKey(modelID)
	require.NoError(t, err)
	kv, err := b.KV(ctx, b.Space.WorkersBucket())
	require.NoError(t, err)
	data, _ := json.Marshal(api.WorkerStatus{
		ID: id, Hive: hive, Model: modelID, ModelKey: key, Device: "cpu",
		SlotsTotal: 2, State: api.WorkerReady, StartedAt: time.Now().UTC(), BeatAt: time.Now().UTC(),
	})
	_, err = kv.Put(ctx, id, data)
	require.NoError(t, err)
	_, err = q.registry.Wait(ctx, func(s *Snapshot) bool { _, ok := s.Workers[id]; return ok })
	require.NoError(t, err)
}

// fakeWorker stands in for llm-worker-rbee so the gateway can be tested
// end to end without llama.cpp: it pulls the model's work queue over its
// own bus connection and drives each job the way the real worker does
// (record to running, tokens on the job's token subject, flush, record to
// completed with an InferResult), stopping when the job's cancel subject
// fires or its record turns terminal. The real worker is tested in worker/
// and e2e/.
type fakeWorker struct {
	// tokens is what every job generates, one event each, delay apart.
	tokens       []string
	delay        time.Duration
	stopReason   string
	promptTokens int

	id, hive string
	bus      *bus.Bus
	jobs     *jobs.Store
	ctx      context.Context

	mu       sync.Mutex
	closed   bool
	requests []api.InferRequest
	wg       sync.WaitGroup
}

// startFakeWorker announces hive "h1" with model "tiny" and worker "w1"
// serving it, and starts consuming the work queue.
func startFakeWorker(t *testing.T, q *Queen, w *fakeWorker) *fakeWorker {
	t.Helper()
	w.id, w.hive = "w1", "h1"
	if w.stopReason == "" {
		w.stopReason = "eos"
	}
	w.bus = busfix.Connect(t, q.BusURL())
	ctx, cancel := context.WithCancel(context.Background())
	w.ctx = ctx
	setup, cancelSetup := context.WithTimeout(ctx, 10*time.Second)
	defer cancelSetup()
	var err error
	w.jobs, err = jobs.Open(setup, w.bus, api.Actor{Component: "worker", ID: w.id}, 0)
	require.NoError(t, err)
	announceHive(t, q, w.bus, w.hive, "tiny")
	announceWorker(t, q, w.bus, w.id, w.hive, "tiny")

	subject, err := w.bus.Space.Infer("tiny")
	require.NoError(t, err)
	durable, err := w.bus.Space.InferConsumer("tiny")
	require.NoError(t, err)
	cons, err := w.bus.JS.CreateOrUpdateConsumer(setup, w.bus.Space.InferStream(), jetstream.ConsumerConfig{
		Durable: durable, FilterSubject: subject, AckPolicy: jetstream.AckExplicitPolicy,
	})
	require.NoError(t, err)
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		_ = msg.Ack()
		var req api.InferRequest
		if json.Unmarshal(msg.Data(), &req) != nil {
			return
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.closed {
			return
		}
		w.requests = append(w.requests, req)
		w.wg.Add(1)
		go w.run(req)
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		w.mu.Lock()
		w.closed = true
		w.mu.Unlock()
		cc.Stop()
		cancel()
		w.wg.Wait()
	})
	return w
}

func (w *fakeWorker) seen() []api.InferRequest {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]api.InferRequest(nil), w.requests...)
}

func (w *fakeWorker) run(req api.InferRequest) {
	defer w.wg.Done()
	ctx := w.ctx
	if _, err := w.jobs.Transition(ctx, req.JobID, api.JobRunning, func(j *api.Job) {
		j.Worker, j.Hive, j.Attempts = w.id, w.hive, req.Attempt
	}); err != nil {
		return // cancelled before it started
	}
	cancelled := make(chan struct{})
	var once sync.Once
	subject, _ := w.bus.Space.JobCancel(req.JobID)
	sub, err := w.bus.NC.Subscribe(subject, func(*nats.Msg) { once.Do(func() { close(cancelled) }) })
	if err != nil {
		return
	}
	defer func() { _ = sub.Unsubscribe() }()
	pub, err := w.bus.Tokens(req.JobID)
	if err != nil {
		return
	}
	start := time.Now()
	var ttft time.Duration
	var text strings.Builder
	for i, tok := range w.tokens {
		if i > 0 && w.delay > 0 {
			select {
			case <-time.After(w.delay):
			case <-cancelled:
				return
			case <-ctx.Done():
				return
			}
		}
		// A cancel signal sent before the subscription existed is only
		// in the record.
		if i%25 == 24 {
			if job, err := w.jobs.Get(ctx, req.JobID); err == nil && job.State.Terminal() {
				return
			}
		}
		if pub.Publish(api.Token{Index: i, ID: int32(i), Text: tok}) != nil {
			return
		}
		if i == 0 {
			ttft = time.Since(start)
		}
		text.WriteString(tok)
	}
	if pub.Flush(ctx) != nil {
		return
	}
	elapsed := time.Since(start)
	res, _ := json.Marshal(api.InferResult{
		Text: text.String(), StopReason: w.stopReason, Worker: w.id, Hive: w.hive, Attempt: req.Attempt,
		PromptTokens: w.promptTokens, CompletionTokens: len(w.tokens), Duration: api.Duration(elapsed),
		TimeToFirstToken: api.Duration(max(ttft, time.Millisecond)),
		TokensPerSecond:  float64(len(w.tokens)) / max(elapsed, time.Millisecond).Seconds(),
	})
	_, _ = w.jobs.Transition(ctx, req.JobID, api.JobCompleted, func(j *api.Job) { j.Result = res })
}

// awaitTerminal follows a job's events until its terminal state.
func awaitTerminal(t *testing.T, b *bus.Bus, jobID string, within time.Duration) api.StateChange {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	var last api.StateChange
	require.NoError(t, b.Follow(ctx, jobID, 0, func(ev api.Event) error {
		if ev.State != nil {
			last = *ev.State
		}
		return nil
	}), "job %s did not end within %s", jobID, within)
	return last
}

func TestGatewayStreamingChat(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	w := startFakeWorker(t, q, &fakeWorker{tokens: []string{"Hello", ",", " world", "!"}, promptTokens: 7})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	stream, err := openAIClient(q, "").CreateChatCompletionStream(ctx, openai.ChatCompletionRequest{
		Model:         "tiny",
		Messages:      []openai.ChatCompletionMessage{{Role: "system", Content: "Be brief."}, {Role: "user", Content: "Say hello"}},
		MaxTokens:     16,
		Stop:          []string{"\n"},
		StreamOptions: &openai.StreamOptions{IncludeUsage: true},
	})
	require.NoError(t, err)
	defer stream.Close()
	jobID := stream.Header().Get("X-Rbee-Job")
	require.NotEmpty(t, jobID)

	var chunks []openai.ChatCompletionStreamResponse
	for {
		c, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		chunks = append(chunks, c)
	}
	require.GreaterOrEqual(t, len(chunks), 3)
	require.Equal(t, "assistant", chunks[0].Choices[0].Delta.Role, "the first chunk names the role")
	var text strings.Builder
	finish := ""
	var usage *openai.Usage
	for _, c := range chunks {
		require.Equal(t, "chatcmpl-"+jobID, c.ID)
		require.Equal(t, "chat.completion.chunk", c.Object)
		if c.Usage != nil {
			usage = c.Usage
			require.Empty(t, c.Choices, "the usage chunk carries no choices")
			continue
		}
		text.WriteString(c.Choices[0].Delta.Content)
		if c.Choices[0].FinishReason != "" {
			finish = string(c.Choices[0].FinishReason)
		}
	}
	require.Equal(t, "Hello, world!", text.String())
	require.Equal(t, "stop", finish)
	require.NotNil(t, usage)
	require.Equal(t, openai.Usage{PromptTokens: 7, CompletionTokens: 4, TotalTokens: 11}, *usage)

	// The request was a job like any other, with OpenAI's fields mapped.
	job, err := q.jobs.Get(ctx, jobID)
	require.NoError(t, err)
	require.Equal(t, api.JobCompleted, job.State)
	require.Equal(t, api.OpInfer, job.Op.Kind)
	require.Equal(t, "w1", job.Worker)
	reqs := w.seen()
	require.Len(t, reqs, 1)
	args := reqs[0].Args
	require.Equal(t, "tiny", args.Model)
	require.Equal(t, []api.ChatMessage{{Role: "system", Content: "Be brief."}, {Role: "user", Content: "Say hello"}}, args.Messages)
	require.Equal(t, 16, args.Sampling.MaxTokens)
	require.Equal(t, float32(1), args.Sampling.Temperature, "OpenAI's default temperature applies when none is sent")
	require.Equal(t, []string{"\n"}, args.Sampling.Stop)
}

func TestGatewayCompletionNonStreaming(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	w := startFakeWorker(t, q, &fakeWorker{tokens: []string{" there", " was", " a", " bee"}, stopReason: "max_tokens", promptTokens: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	seed := 42
	resp, err := openAIClient(q, "").CreateCompletion(ctx, openai.CompletionRequest{
		Model: "tiny", Prompt: "Once upon a time", MaxTokens: 4, Temperature: 0.5, TopP: 0.9, Seed: &seed, Stop: []string{"."},
	})
	require.NoError(t, err)
	require.Len(t, resp.Choices, 1)
	require.Equal(t, " there was a bee", resp.Choices[0].Text)
	require.Equal(t, "length", resp.Choices[0].FinishReason)
	require.Equal(t, "text_completion", resp.Object)
	require.NotNil(t, resp.Usage)
	require.Equal(t, openai.Usage{PromptTokens: 3, CompletionTokens: 4, TotalTokens: 7}, *resp.Usage)

	jobID := resp.Header().Get("X-Rbee-Job")
	require.Equal(t, "cmpl-"+jobID, resp.ID)
	job, err := q.jobs.Get(ctx, jobID)
	require.NoError(t, err)
	require.Equal(t, api.JobCompleted, job.State)
	args := w.seen()[0].Args
	require.Equal(t, "Once upon a time", args.Prompt)
	require.Equal(t, api.Sampling{MaxTokens: 4, Temperature: 0.5, TopP: 0.9, Seed: ptr(uint32(42)), Stop: []string{"."}}, args.Sampling)

	// A prompt may also come as an array of one string.
	status, body := postJSON(t, q, "", "/v1/completions", `{"model":"tiny","prompt":["Hi"],"max_tokens":2}`)
	require.Equal(t, http.StatusOK, status, body)
	require.Equal(t, "Hi", w.seen()[1].Args.Prompt)
}

func ptr[T any](v T) *T { return &v }

func TestGatewayClientDisconnectCancelsJob(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	long := make([]string, 5000)
	for i := range long {
		long[i] = "bzz "
	}
	w := startFakeWorker(t, q, &fakeWorker{tokens: long, delay: 20 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	stream, err := openAIClient(q, "").CreateChatCompletionStream(ctx, openai.ChatCompletionRequest{
		Model: "tiny", Messages: []openai.ChatCompletionMessage{{Role: "user", Content: "Tell me everything"}},
	})
	require.NoError(t, err)
	jobID := stream.Header().Get("X-Rbee-Job")
	_, err = stream.Recv()
	require.NoError(t, err)
	require.NoError(t, stream.Close()) // the client hangs up mid-generation

	end := awaitTerminal(t, w.bus, jobID, 5*time.Second)
	require.Equal(t, api.JobCancelled, end.State)
	require.Equal(t, "client disconnected", end.Error)
	job, err := q.jobs.Get(ctx, jobID)
	require.NoError(t, err)
	require.Equal(t, api.JobCancelled, job.State)
}

func TestGatewayShutdownCancelsInFlightStreams(t *testing.T) {
	q, stop := gatewayQueen(t, nil)
	long := make([]string, 5000)
	for i := range long {
		long[i] = "bzz "
	}
	w := startFakeWorker(t, q, &fakeWorker{tokens: long, delay: 20 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	stream, err := openAIClient(q, "").CreateCompletionStream(ctx, openai.CompletionRequest{Model: "tiny", Prompt: "Go on"})
	require.NoError(t, err)
	defer stream.Close()
	jobID := stream.Header().Get("X-Rbee-Job")
	_, err = stream.Recv()
	require.NoError(t, err)

	// Follow from the test's own connection: the embedded bus goes away
	// with the queen, but the cancel is published before it does.
	ended := make(chan api.StateChange, 1)
	go func() {
		var last api.StateChange
		_ = w.bus.Follow(ctx, jobID, 0, func(ev api.Event) error {
			if ev.State != nil {
				last = *ev.State
			}
			if ev.Terminal() {
				ended <- last
			}
			return nil
		})
	}()
	stop()
	select {
	case end := <-ended:
		require.Equal(t, api.JobCancelled, end.State)
		require.Contains(t, end.Error, "shut down")
	case <-ctx.Done():
		t.Fatal("the in-flight job was not cancelled at shutdown")
	}
	// The client is told, in the stream, why it ended.
	for {
		if _, err = stream.Recv(); err != nil {
			break
		}
	}
	require.ErrorContains(t, err, "shut down")
}

func TestGatewayAPIKey(t *testing.T) {
	q, _ := gatewayQueen(t, func(c *Config) { c.APIKey = "s3cret" })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, key := range []string{"", "wrong"} {
		_, err := openAIClient(q, key).ListModels(ctx)
		var apiErr *openai.APIError
		require.ErrorAs(t, err, &apiErr, "key %q", key)
		require.Equal(t, http.StatusUnauthorized, apiErr.HTTPStatusCode)
		require.Equal(t, "invalid_api_key", apiErr.Code)
	}
	_, err := openAIClient(q, "s3cret").ListModels(ctx)
	require.NoError(t, err)
	status, _ := postJSON(t, q, "", "/v1/chat/completions", `{}`)
	require.Equal(t, http.StatusUnauthorized, status)

	// Probes and scrapers need no key.
	for _, path := range []string{"/healthz", "/metrics"} {
		status, body := get(t, q, path)
		require.Equal(t, http.StatusOK, status, path)
		if path == "/healthz" {
			require.Equal(t, "ok", body)
		}
	}
}

// TestGatewayErrors checks each refusal's status and OpenAI's error shape.
func TestGatewayErrors(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	b := busfix.Connect(t, q.BusURL())

	// No hive at all: nothing can run anything.
	status, body := postJSON(t, q, "", "/v1/chat/completions", `{"model":"tiny","messages":[{"role":"user","content":"hi"}]}`)
	requireOpenAIError(t, status, body, http.StatusServiceUnavailable, "server_error", "no_capacity", "")

	announceHive(t, q, b, "h1", "tiny")
	cases := []struct {
		name, path, body string
		status           int
		typ, code, param string
	}{
		{"unknown model", "/v1/chat/completions", `{"model":"nope","messages":[{"role":"user","content":"hi"}]}`, 404, "invalid_request_error", "model_not_found", "model"},
		{"malformed JSON", "/v1/chat/completions", `{"model":`, 400, "invalid_request_error", "", ""},
		{"temperature out of range", "/v1/chat/completions", `{"model":"tiny","temperature":5,"messages":[{"role":"user","content":"hi"}]}`, 400, "invalid_request_error", "", "temperature"},
		{"no messages", "/v1/chat/completions", `{"model":"tiny","messages":[]}`, 400, "invalid_request_error", "", "messages"},
		{"n above 1", "/v1/chat/completions", `{"model":"tiny","n":2,"messages":[{"role":"user","content":"hi"}]}`, 400, "invalid_request_error", "unsupported_parameter", "n"},
		{"tool role", "/v1/chat/completions", `{"model":"tiny","messages":[{"role":"tool","content":"x"}]}`, 400, "invalid_request_error", "", "messages[0].role"},
		{"two prompts", "/v1/completions", `{"model":"tiny","prompt":["a","b"]}`, 400, "invalid_request_error", "", "prompt"},
		{"missing prompt", "/v1/completions", `{"model":"tiny"}`, 400, "invalid_request_error", "", "prompt"},
		{"bad stop", "/v1/completions", `{"model":"tiny","prompt":"a","stop":7}`, 400, "invalid_request_error", "", "stop"},
		{"unknown endpoint", "/v1/embeddings", `{}`, 404, "invalid_request_error", "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			status, body := postJSON(t, q, "", tc.path, tc.body)
			requireOpenAIError(t, status, body, tc.status, tc.typ, tc.code, tc.param)
		})
	}
}

func TestGatewayQueueFull(t *testing.T) {
	q, _ := gatewayQueen(t, func(c *Config) { c.MaxQueue = 1 })
	b := busfix.Connect(t, q.BusURL())
	announceHive(t, q, b, "h1", "tiny")
	announceWorker(t, q, b, "w1", "h1", "tiny") // registered, but it never pulls

	first, cancelFirst := context.WithCancel(context.Background())
	defer cancelFirst()
	firstDone := make(chan struct{})
	go func() {
		defer close(firstDone)
		stream, err := openAIClient(q, "").CreateChatCompletionStream(first, openai.ChatCompletionRequest{
			Model: "tiny", Messages: []openai.ChatCompletionMessage{{Role: "user", Content: "wait"}},
		})
		if err == nil {
			stream.Close()
		}
	}()
	require.Eventually(t, func() bool { return q.sched.Depth("tiny") == 1 }, 10*time.Second, 20*time.Millisecond)
	queued, err := q.jobs.List(first, api.JobQueued)
	require.NoError(t, err)
	require.Len(t, queued, 1)
	id := queued[0].ID

	status, body := postJSON(t, q, "", "/v1/chat/completions", `{"model":"tiny","messages":[{"role":"user","content":"me too"}]}`)
	requireOpenAIError(t, status, body, http.StatusTooManyRequests, "rate_limit_error", "queue_full", "")

	// The waiting client gives up: its job is cancelled, not left queued.
	cancelFirst()
	end := awaitTerminal(t, b, id, 5*time.Second)
	require.Equal(t, api.JobCancelled, end.State)
	require.Equal(t, "client disconnected", end.Error)
	<-firstDone
}

func TestGatewayJobTimeout(t *testing.T) {
	q, _ := gatewayQueen(t, func(c *Config) { c.JobTimeout = time.Second })
	b := busfix.Connect(t, q.BusURL())
	announceHive(t, q, b, "h1", "tiny")
	announceWorker(t, q, b, "w1", "h1", "tiny") // never pulls: the job times out queued

	status, body := postJSON(t, q, "", "/v1/completions", `{"model":"tiny","prompt":"hello"}`)
	requireOpenAIError(t, status, body, http.StatusGatewayTimeout, "timeout_error", "timeout", "")
	require.Contains(t, body, "timed out after 1s")
}

func TestGatewayModels(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	w := startFakeWorker(t, q, &fakeWorker{})
	// A second catalog entry on the hive that no worker serves yet.
	announceHive(t, q, w.bus, "h2", "tiny", "tiny-q8")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	list, err := openAIClient(q, "").ListModels(ctx)
	require.NoError(t, err)
	var ids []string
	for _, m := range list.Models {
		ids = append(ids, m.ID)
		require.Equal(t, "model", m.Object)
		require.Equal(t, "rbee", m.OwnedBy)
		require.NotZero(t, m.CreatedAt)
	}
	require.Equal(t, []string{"tiny", "tiny-q8"}, ids, "listed once each, whether from a catalog or a worker")

	m, err := openAIClient(q, "").GetModel(ctx, "tiny-q8")
	require.NoError(t, err)
	require.Equal(t, "tiny-q8", m.ID)
	_, err = openAIClient(q, "").GetModel(ctx, "nope")
	var apiErr *openai.APIError
	require.ErrorAs(t, err, &apiErr)
	require.Equal(t, http.StatusNotFound, apiErr.HTTPStatusCode)
}

func TestGatewayMetrics(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	startFakeWorker(t, q, &fakeWorker{tokens: []string{"a", "b"}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := openAIClient(q, "").CreateCompletion(ctx, openai.CompletionRequest{Model: "tiny", Prompt: "x"})
	require.NoError(t, err)

	var families map[string]*dto.MetricFamily
	// The latency histograms are fed by the state event, which reaches
	// the metrics watcher independently of the HTTP answer.
	require.Eventually(t, func() bool {
		families = scrape(t, q)
		f, ok := families["rbee_time_to_first_token_seconds"]
		return ok && f.GetMetric()[0].GetHistogram().GetSampleCount() == 1
	}, 5*time.Second, 20*time.Millisecond)

	for _, name := range []string{
		"rbee_jobs", "rbee_queue_depth", "rbee_hives", "rbee_workers_online", "rbee_worker_slots_busy",
		"rbee_time_to_first_token_seconds", "rbee_tokens_per_second", "rbee_gateway_requests_total",
	} {
		require.Contains(t, families, name)
	}
	value := func(name string, labels ...string) float64 {
		for _, m := range families[name].GetMetric() {
			match := true
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, l := range m.GetLabel() {
					found = found || (l.GetName() == labels[i] && l.GetValue() == labels[i+1])
				}
				match = match && found
			}
			if match {
				if m.GetGauge() != nil {
					return m.GetGauge().GetValue()
				}
				return m.GetCounter().GetValue()
			}
		}
		t.Fatalf("no %s%v", name, labels)
		return 0
	}
	require.Equal(t, 1.0, value("rbee_jobs", "state", "completed"))
	require.Equal(t, 0.0, value("rbee_jobs", "state", "queued"))
	require.Equal(t, 0.0, value("rbee_queue_depth", "model", "tiny"))
	require.Equal(t, 1.0, value("rbee_hives", "state", "online"))
	require.Equal(t, 0.0, value("rbee_hives", "state", "lost"))
	require.Equal(t, 1.0, value("rbee_workers_online"))
	require.Equal(t, 0.0, value("rbee_worker_slots_busy"))
	require.Equal(t, 1.0, value("rbee_gateway_requests_total", "endpoint", "completions", "code", "200"))
	require.Equal(t, uint64(1), families["rbee_tokens_per_second"].GetMetric()[0].GetHistogram().GetSampleCount())
}

// --- HTTP helpers ---

func postJSON(t *testing.T, q *Queen, key, path, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, q.GatewayURL()+path, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	return do(t, req)
}

func get(t *testing.T, q *Queen, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, q.GatewayURL()+path, nil)
	require.NoError(t, err)
	return do(t, req)
}

func do(t *testing.T, req *http.Request) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	require.NoError(t, err)
	defer resp.Body.Close()
	data, err := io.ReadAll(bufio.NewReader(resp.Body))
	require.NoError(t, err)
	return resp.StatusCode, string(data)
}

// requireOpenAIError checks an error answer is exactly OpenAI's shape.
func requireOpenAIError(t *testing.T, status int, body string, wantStatus int, typ, code, param string) {
	t.Helper()
	require.Equal(t, wantStatus, status, body)
	var shape map[string]map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &shape), body)
	e := shape["error"]
	require.NotNil(t, e, body)
	require.ElementsMatch(t, []string{"message", "type", "param", "code"}, keys(e), body)
	require.NotEmpty(t, e["message"])
	require.Equal(t, typ, e["type"], body)
	if code == "" {
		require.Nil(t, e["code"], body)
	} else {
		require.Equal(t, code, e["code"], body)
	}
	if param == "" {
		require.Nil(t, e["param"], body)
	} else {
		require.Equal(t, param, e["param"], body)
	}
}

func keys(m map[string]any) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

func scrape(t *testing.T, q *Queen) map[string]*dto.MetricFamily {
	t.Helper()
	status, body := get(t, q, "/metrics")
	require.Equal(t, http.StatusOK, status)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(body))
	require.NoError(t, err)
	return families
}
