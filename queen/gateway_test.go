package queen

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rbee-dev/rbee/worker/engine"
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
func announceWorker(t *testing.T, q *Queen, b *bus.Bus, id, hive, modelID string, ctxSize int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key, err := subjects.ModelKey(modelID)
	require.NoError(t, err)
	kv, err := b.KV(ctx, b.Space.WorkersBucket())
	require.NoError(t, err)
	data, _ := json.Marshal(api.WorkerStatus{
		ID: id, Hive: hive, Model: modelID, ModelKey: key, Device: "cpu",
		SlotsTotal: 2, State: api.WorkerReady, ContextSize: ctxSize, StartedAt: time.Now().UTC(), BeatAt: time.Now().UTC(),
	})
	_, err = kv.Put(ctx, subjects.WorkerKey(hive, id), data)
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
	// cachedTokens is what the worker's prompt cache held of the prompt.
	cachedTokens int
	// ctxSize, when set, makes the fake check each request as the real
	// worker does before it runs (engine.Request.Validate against the
	// context, and the prompt's length, one token per byte here) and fail
	// the job with the same reason and parameter.
	ctxSize int

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
	w.bus = busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})
	ctx, cancel := context.WithCancel(context.Background())
	w.ctx = ctx
	setup, cancelSetup := context.WithTimeout(ctx, 10*time.Second)
	defer cancelSetup()
	var err error
	w.jobs, err = jobs.Open(setup, w.bus, api.Actor{Component: "worker", ID: w.id}, 0)
	require.NoError(t, err)
	announceHive(t, q, w.bus, w.hive, "tiny")
	announceWorker(t, q, w.bus, w.id, w.hive, "tiny", w.ctxSize)

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
	if bad := w.check(req.Args); bad != nil {
		_, _ = w.jobs.Transition(ctx, req.JobID, api.JobFailed, func(j *api.Job) {
			j.SetError(bad.APIError())
			j.Worker, j.Hive = w.id, w.hive
		})
		return
	}
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
		StopReason: w.stopReason, Worker: w.id, Hive: w.hive, Attempt: req.Attempt,
		PromptTokens: w.promptTokens, CachedTokens: w.cachedTokens, CompletionTokens: len(w.tokens), Duration: api.Duration(elapsed),
		TimeToFirstToken: api.Duration(max(ttft, time.Millisecond)),
		TokensPerSecond:  float64(len(w.tokens)) / max(elapsed, time.Millisecond).Seconds(),
	})
	_, _ = w.jobs.Transition(ctx, req.JobID, api.JobCompleted, func(j *api.Job) { j.Result = res })
}

// check is the real worker's check of a request against its model, with
// a prompt of one token per byte.
func (w *fakeWorker) check(a api.InferArgs) *engine.ParamError {
	if w.ctxSize == 0 {
		return nil
	}
	prompt := a.Prompt
	for _, m := range a.Messages {
		prompt += m.Role + ": " + m.Content + "\n"
	}
	s := a.Sampling
	r := engine.Request{Prompt: prompt, MaxTokens: s.MaxTokens, Temperature: s.Temperature, TopP: s.TopP,
		TopK: s.TopK, MinP: s.MinP, RepeatPenalty: s.RepeatPenalty, Stop: s.Stop}
	if r.MaxTokens == 0 {
		r.MaxTokens = min(16, w.ctxSize)
	}
	var pe *engine.ParamError
	if err := r.Validate(w.ctxSize); errors.As(err, &pe) {
		return pe
	}
	if len(prompt) >= w.ctxSize {
		field := "prompt"
		if len(a.Messages) > 0 {
			field = "messages"
		}
		return &engine.ParamError{Field: field, Err: engine.ErrPromptTooLong, Reason: fmt.Sprintf("%d tokens do not fit in the context of %d", len(prompt), w.ctxSize)}
	}
	return nil
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
	w := startFakeWorker(t, q, &fakeWorker{tokens: []string{" there", " was", " a", " bee"}, stopReason: "max_tokens", promptTokens: 3, cachedTokens: 2})
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
	require.Equal(t, openai.Usage{PromptTokens: 3, CompletionTokens: 4, TotalTokens: 7,
		PromptTokensDetails: &openai.PromptTokensDetails{CachedTokens: 2}}, *resp.Usage, "the prompt cache's share is OpenAI's cached_tokens")

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
		require.Equal(t, api.JobCancelled, end.State, "%+v", end)
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

	// The scheme is case-insensitive (RFC 9110); the key is not, and
	// another scheme is no key.
	for header, want := range map[string]int{
		"bearer s3cret": http.StatusOK, "BEARER s3cret": http.StatusOK, "Bearer  s3cret ": http.StatusOK,
		"bearer S3CRET": http.StatusUnauthorized, "Basic s3cret": http.StatusUnauthorized, "s3cret": http.StatusUnauthorized,
	} {
		req, err := http.NewRequest(http.MethodGet, q.GatewayURL()+"/v1/models", nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", header)
		status, body := do(t, req)
		require.Equal(t, want, status, "Authorization: %q: %s", header, body)
	}

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
	b := busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})

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

// TestGatewayBadInput is the gateway's table of bad input: each case gets
// its status, OpenAI's error type, code and param, a message with the key
// words, and leaves no job record and no stored request behind, unless
// only the worker can tell (it alone counts a prompt's tokens): then
// exactly one job, failed with the reason,
// and still a 400 with the param, which OpenAI clients do not retry (a 500
// was retried twice: three failed jobs for one bad request).
func TestGatewayBadInput(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	startFakeWorker(t, q, &fakeWorker{tokens: []string{"ok"}, ctxSize: 64})
	const chat, text = "/v1/chat/completions", "/v1/completions"
	hi := `"messages":[{"role":"user","content":"hi"}]`
	long := strings.Repeat("word ", 40) // 200 bytes: more than the fake's 64-token context
	nearMax := strings.Repeat("a", maxRequestBody-200)
	cases := []struct {
		name, method, path, body string
		status                   int
		typ, code, param         string
		words                    []string
		allow                    string     // the Allow header of a 405
		reason                   api.Reason // set when only the worker can tell: the job's reason
	}{
		// Refused at admission: no job.
		{name: "NUL byte in a message", path: chat, body: `{"model":"tiny","messages":[{"role":"user","content":"a\u0000b"}]}`,
			status: 400, typ: "invalid_request_error", param: "messages[0].content", words: []string{"NUL"}},
		{name: "NUL byte in a prompt", path: text, body: `{"model":"tiny","prompt":"a\u0000b"}`,
			status: 400, typ: "invalid_request_error", param: "prompt", words: []string{"NUL"}},
		{name: "empty stop entry", path: chat, body: `{"model":"tiny","stop":["\n",""],` + hi + `}`,
			status: 400, typ: "invalid_request_error", param: "stop", words: []string{"entry 1", "empty"}},
		{name: "max_tokens 0", path: chat, body: `{"model":"tiny","max_tokens":0,` + hi + `}`,
			status: 400, typ: "invalid_request_error", param: "max_tokens", words: []string{"at least 1", "leave it out"}},
		{name: "max_completion_tokens negative", path: chat, body: `{"model":"tiny","max_completion_tokens":-5,` + hi + `}`,
			status: 400, typ: "invalid_request_error", param: "max_completion_tokens", words: []string{"at least 1"}},
		{name: "temperature out of range", path: text, body: `{"model":"tiny","prompt":"a","temperature":2.5}`,
			status: 400, typ: "invalid_request_error", param: "temperature", words: []string{"between 0 and 2", "2.5"}},
		{name: "top_k negative", path: text, body: `{"model":"tiny","prompt":"a","top_k":-1}`,
			status: 400, typ: "invalid_request_error", param: "top_k", words: []string{"-1"}},
		{name: "repeat_penalty negative", path: text, body: `{"model":"tiny","prompt":"a","repeat_penalty":-1}`,
			status: 400, typ: "invalid_request_error", param: "repeat_penalty", words: []string{"-1"}},
		{name: "tools", path: chat, body: `{"model":"tiny","tools":[{"type":"function","function":{"name":"f"}}],` + hi + `}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "tools", words: []string{"tool calling"}},
		{name: "response_format json", path: chat, body: `{"model":"tiny","response_format":{"type":"json_object"},` + hi + `}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "response_format", words: []string{"structured output"}},
		{name: "logprobs", path: chat, body: `{"model":"tiny","logprobs":true,` + hi + `}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "logprobs", words: []string{"log probabilities"}},
		{name: "echo", path: text, body: `{"model":"tiny","prompt":"a","echo":true}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "echo", words: []string{"echo"}},
		{name: "suffix", path: text, body: `{"model":"tiny","prompt":"a","suffix":"z"}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "suffix", words: []string{"suffix"}},
		{name: "n above 1", path: chat, body: `{"model":"tiny","n":3,` + hi + `}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "n", words: []string{"one choice"}},
		{name: "presence_penalty", path: chat, body: `{"model":"tiny","presence_penalty":0.5,` + hi + `}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "presence_penalty", words: []string{"repeat_penalty"}},
		{name: "unknown parameter", path: chat, body: `{"model":"tiny","frobnicate":1,` + hi + `}`,
			status: 400, typ: "invalid_request_error", code: "unsupported_parameter", param: "frobnicate", words: []string{"unknown parameter", "user"}},
		{name: "trailing bytes", path: chat, body: `{"model":"tiny",` + hi + `} {"again":1}`,
			status: 400, typ: "invalid_request_error", words: []string{"after the JSON object"}},
		{name: "trailing garbage", path: text, body: `{"model":"tiny","prompt":"a"}x`,
			status: 400, typ: "invalid_request_error", words: []string{"after the JSON object"}},
		{name: "body near the bus's max payload, chat", path: chat, body: `{"model":"tiny","messages":[{"role":"user","content":"` + nearMax + `"}]}`,
			status: 413, typ: "invalid_request_error", code: "request_too_large", param: "messages", words: []string{"MiB", "max_payload"}},
		{name: "body near the bus's max payload", path: text, body: `{"model":"tiny","prompt":"` + nearMax + `"}`,
			status: 413, typ: "invalid_request_error", code: "request_too_large", param: "prompt", words: []string{"MiB", "max_payload"}},
		{name: "body over the limit", path: text, body: `{"model":"tiny","prompt":"` + nearMax + strings.Repeat("a", 400) + `"}`,
			status: 413, typ: "invalid_request_error", code: "request_too_large", words: []string{"larger than"}},
		{name: "wrong method", method: http.MethodGet, path: chat,
			status: 405, typ: "invalid_request_error", allow: "POST", words: []string{"GET", "POST"}},
		{name: "wrong method on models", method: http.MethodPost, path: "/v1/models", body: `{}`,
			status: 405, typ: "invalid_request_error", allow: "GET, HEAD", words: []string{"POST"}},
		{name: "unknown model", path: chat, body: `{"model":"nope",` + hi + `}`,
			status: 404, typ: "invalid_request_error", code: "model_not_found", param: "model", words: []string{"nope", "rbee model download"}},
		// The serving worker's context is in its heartbeat: refused at
		// admission, no job.
		{name: "max_tokens above the context", path: chat, body: `{"model":"tiny","max_tokens":100,` + hi + `}`,
			status: 400, typ: "invalid_request_error", param: "max_tokens", words: []string{"between 1 and 64", "100"}},
		{name: "max_completion_tokens above the context", path: chat, body: `{"model":"tiny","max_completion_tokens":100,` + hi + `}`,
			status: 400, typ: "invalid_request_error", param: "max_completion_tokens", words: []string{"between 1 and 64"}},
		// Only the worker can count a prompt's tokens: one job, failed
		// with why.
		{name: "chat that does not fit the context", path: chat, body: `{"model":"tiny","messages":[{"role":"user","content":"` + long + `"}]}`,
			status: 400, typ: "invalid_request_error", code: "context_length_exceeded", param: "messages", words: []string{"do not fit", "64"}, reason: api.ReasonPromptTooLong},
		{name: "prompt that does not fit the context", path: text, body: `{"model":"tiny","prompt":"` + long + `"}`,
			status: 400, typ: "invalid_request_error", code: "context_length_exceeded", param: "prompt", words: []string{"do not fit"}, reason: api.ReasonPromptTooLong},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			records, requests := stored(t, q)
			method := tc.method
			if method == "" {
				method = http.MethodPost
			}
			req, err := http.NewRequest(method, q.GatewayURL()+tc.path, strings.NewReader(tc.body))
			require.NoError(t, err)
			req.Header.Set("Content-Type", "application/json")
			resp, body := doResp(t, req)
			requireOpenAIError(t, resp.StatusCode, body, tc.status, tc.typ, tc.code, tc.param)
			var e openAIError
			require.NoError(t, json.Unmarshal([]byte(body), &e))
			for _, w := range tc.words {
				require.Contains(t, e.Error.Message, w)
			}
			if tc.allow != "" {
				require.Equal(t, tc.allow, resp.Header.Get("Allow"))
			}
			nowRecords, nowRequests := stored(t, q)
			if tc.reason == "" {
				require.Equal(t, records, nowRecords, "no job record for a request refused at admission")
				require.Equal(t, requests, nowRequests, "no stored request for a request refused at admission")
				require.Empty(t, resp.Header.Get("X-Rbee-Job"))
				return
			}
			require.Equal(t, records+1, nowRecords, "one job, not one per retry")
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			job, err := q.jobs.Get(ctx, resp.Header.Get("X-Rbee-Job"))
			require.NoError(t, err)
			require.Equal(t, api.JobFailed, job.State)
			require.Equal(t, tc.reason, job.Reason)
			require.NotEmpty(t, job.Param)
		})
	}
}

// TestGatewayAcceptsWhatItIgnores: the parameters the README lists as
// accepted and ignored, and the "off" values of unsupported ones, are no
// reason to refuse a request.
func TestGatewayAcceptsWhatItIgnores(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	startFakeWorker(t, q, &fakeWorker{tokens: []string{"ok"}})
	for _, extra := range []string{
		`"user":"u1","metadata":{"k":"v"},"store":true,"service_tier":"auto","safety_identifier":"s","prompt_cache_key":"p","parallel_tool_calls":true`,
		`"n":1,"logprobs":false,"presence_penalty":0,"frequency_penalty":0,"tools":[],"tool_choice":"none","response_format":{"type":"text"},"logit_bias":{},"stream_options":null`,
		`"top_k":40,"min_p":0.05,"repeat_penalty":1.1,"max_completion_tokens":4`,
	} {
		status, body := postJSON(t, q, "", "/v1/chat/completions", `{"model":"tiny","messages":[{"role":"user","content":"hi"}],`+extra+`}`)
		require.Equal(t, http.StatusOK, status, "%s: %s", extra, body)
	}
	status, body := postJSON(t, q, "", "/v1/completions", `{"model":"tiny","prompt":"hi","echo":false,"suffix":"","best_of":1,"user":"u"}`+"\n")
	require.Equal(t, http.StatusOK, status, body)
}

// stored counts the job records and stored requests: what a request
// refused at admission must not add to.
func stored(t *testing.T, q *Queen) (records, requests int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	all, err := q.jobs.List(ctx, "")
	require.NoError(t, err)
	st, err := q.bus.JS.Stream(ctx, q.bus.Space.RequestsStream())
	require.NoError(t, err)
	info, err := st.Info(ctx)
	require.NoError(t, err)
	return len(all), int(info.State.Msgs)
}

func TestGatewayQueueFull(t *testing.T) {
	q, _ := gatewayQueen(t, func(c *Config) { c.MaxQueue = 1 })
	b := busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})
	announceHive(t, q, b, "h1", "tiny")
	announceWorker(t, q, b, "w1", "h1", "tiny", 0) // registered, but it never pulls

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
	require.Eventually(t, func() bool { return q.queueDepth(context.Background(), "tiny", "tiny") == 1 }, 10*time.Second, 20*time.Millisecond)
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
	b := busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})
	announceHive(t, q, b, "h1", "tiny")
	announceWorker(t, q, b, "w1", "h1", "tiny", 0) // never pulls: the job times out queued

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
	// the metrics watcher independently of the HTTP answer, and one after
	// the other: a scrape may come between the two.
	require.Eventually(t, func() bool {
		families = scrape(t, q)
		for _, name := range []string{"rbee_time_to_first_token_seconds", "rbee_tokens_per_second"} {
			f, ok := families[name]
			if !ok || f.GetMetric()[0].GetHistogram().GetSampleCount() != 1 {
				return false
			}
		}
		return true
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
	resp, body := doResp(t, req)
	return resp.StatusCode, body
}

// doResp sends req and returns the response (its body read and closed)
// and the body.
func doResp(t *testing.T, req *http.Request) (*http.Response, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	require.NoError(t, err)
	defer resp.Body.Close()
	data, err := io.ReadAll(bufio.NewReader(resp.Body))
	require.NoError(t, err)
	return resp, string(data)
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

// TestHTTPErrorTable: every reason a component can give has its HTTP
// answer, and each answer is the one OpenAI clients should act on (a 4xx
// they do not retry for what the request got wrong).
func TestHTTPErrorTable(t *testing.T) {
	want := map[api.Reason]httpError{
		api.ReasonInvalidRequest:  {400, "invalid_request_error", ""},
		api.ReasonInvalidParam:    {400, "invalid_request_error", ""},
		api.ReasonPromptTooLong:   {400, "invalid_request_error", "context_length_exceeded"},
		api.ReasonPayloadTooLarge: {413, "invalid_request_error", "request_too_large"},
		api.ReasonNotFound:        {404, "invalid_request_error", ""},
		api.ReasonConflict:        {409, "invalid_request_error", ""},
		api.ReasonCancelled:       {409, "server_error", "cancelled"},
		api.ReasonQueueFull:       {429, "rate_limit_error", "queue_full"},
		api.ReasonNoCapacity:      {503, "server_error", "no_capacity"},
		api.ReasonUnavailable:     {503, "server_error", "unavailable"},
		api.ReasonTimeout:         {504, "timeout_error", "timeout"},
		api.ReasonWorkerLost:      {502, "server_error", "worker_lost"},
		api.ReasonInternal:        {500, "server_error", ""},
		reasonUnauthorized:        {401, "invalid_request_error", "invalid_api_key"},
		reasonMethodNotAllowed:    {405, "invalid_request_error", ""},
		reasonUnsupportedParam:    {400, "invalid_request_error", "unsupported_parameter"},
	}
	for _, r := range api.Reasons() {
		_, ok := httpErrors[r]
		require.True(t, ok, "reason %s has no HTTP answer", r)
	}
	require.Equal(t, want, httpErrors)
	for r, h := range httpErrors {
		// The status agrees with the bus code where the bus has one.
		if api.CodeOfReason(r) != api.CodeInternal || r == api.ReasonInternal {
			require.Equal(t, api.CodeOfReason(r), h.status, "reason %s", r)
		}
	}
	require.Equal(t, "model_not_found", httpErrorOf(api.Fail(api.ReasonNotFound, "model", "x")).code)
	require.Equal(t, http.StatusInternalServerError, httpErrorOf(api.AsError(errors.New("plain"))).status, "an error without a reason is a 500")
	require.Equal(t, http.StatusInternalServerError, httpErrorOf(&api.Error{Reason: "from_a_newer_component"}).status)
}
