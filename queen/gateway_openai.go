package queen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
)

// --- requests ---

// commonFields are the request fields chat and completions share. Fields
// rbee does not implement (logprobs, penalties, user, tools...) are
// ignored, as OpenAI-compatible servers commonly do, except n > 1, which
// would change the answer's shape.
type commonFields struct {
	Model               string         `json:"model"`
	MaxTokens           *int           `json:"max_tokens"`
	MaxCompletionTokens *int           `json:"max_completion_tokens"`
	Temperature         *float32       `json:"temperature"`
	TopP                *float32       `json:"top_p"`
	Stop                stopList       `json:"stop"`
	Seed                *int64         `json:"seed"`
	N                   *int           `json:"n"`
	Stream              bool           `json:"stream"`
	StreamOptions       *streamOptions `json:"stream_options"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type chatRequest struct {
	commonFields
	Messages []chatMessageIn `json:"messages"`
}

type completionRequest struct {
	commonFields
	Prompt json.RawMessage `json:"prompt"`
}

type chatMessageIn struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
}

// stopList is OpenAI's stop: a string or an array of strings.
type stopList []string

func (s *stopList) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*s = nil
		return nil
	}
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		if one != "" {
			*s = stopList{one}
		}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return errors.New("stop must be a string or an array of strings")
	}
	*s = many
	return nil
}

// badParam is a request the gateway refuses before it becomes a job.
type badParam struct {
	param, msg string
}

func (e *badParam) Error() string { return e.msg }

func badf(param, format string, args ...any) *badParam {
	return &badParam{param: param, msg: fmt.Sprintf(format, args...)}
}

// inferArgs maps the shared fields onto the job's arguments. Range checks
// are left to the queen's admission, which answers them with code 400 for
// every client alike.
func (f commonFields) inferArgs() (api.InferArgs, error) {
	a := api.InferArgs{Model: f.Model}
	if f.N != nil && *f.N != 1 {
		return a, badf("n", "n = %d is not supported; rbee answers one choice per request", *f.N)
	}
	switch {
	case f.MaxCompletionTokens != nil:
		a.Sampling.MaxTokens = *f.MaxCompletionTokens
	case f.MaxTokens != nil:
		a.Sampling.MaxTokens = *f.MaxTokens
	}
	// OpenAI's default temperature is 1; rbee's zero value means greedy.
	a.Sampling.Temperature = 1
	if f.Temperature != nil {
		a.Sampling.Temperature = *f.Temperature
	}
	if f.TopP != nil {
		a.Sampling.TopP = *f.TopP
	}
	if f.Seed != nil {
		if *f.Seed < 0 || *f.Seed > math.MaxUint32 {
			return a, badf("seed", "seed %d is outside 0…%d", *f.Seed, uint32(math.MaxUint32))
		}
		s := uint32(*f.Seed)
		a.Sampling.Seed = &s
	}
	a.Sampling.Stop = f.Stop
	return a, nil
}

func (f commonFields) includeUsage() bool {
	return f.Stream && f.StreamOptions != nil && f.StreamOptions.IncludeUsage
}

func (r chatRequest) inferArgs() (api.InferArgs, error) {
	a, err := r.commonFields.inferArgs()
	if err != nil {
		return a, err
	}
	if len(r.Messages) == 0 {
		return a, badf("messages", "messages is empty; send at least one message")
	}
	for i, m := range r.Messages {
		role := m.Role
		switch role {
		case "system", "user", "assistant":
		case "developer":
			role = "system" // OpenAI's newer name for the system role
		default:
			return a, badf(fmt.Sprintf("messages[%d].role", i), "role %q is not supported; use system, user or assistant", m.Role)
		}
		text, err := messageText(m.Content)
		if err != nil {
			return a, badf(fmt.Sprintf("messages[%d].content", i), "%v", err)
		}
		a.Messages = append(a.Messages, api.ChatMessage{Role: role, Content: text})
	}
	return a, nil
}

// messageText accepts a content string, null, or an array of text parts.
func messageText(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("content must be a string or an array of text parts")
	}
	texts := make([]string, 0, len(parts))
	for _, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("content part of type %q is not supported; rbee runs text models", p.Type)
		}
		texts = append(texts, p.Text)
	}
	return strings.Join(texts, "\n"), nil
}

func (r completionRequest) inferArgs() (api.InferArgs, error) {
	a, err := r.commonFields.inferArgs()
	if err != nil {
		return a, err
	}
	if len(r.Prompt) == 0 || string(r.Prompt) == "null" {
		return a, badf("prompt", "prompt is missing")
	}
	if err := json.Unmarshal(r.Prompt, &a.Prompt); err == nil {
		return a, nil
	}
	var many []string
	if err := json.Unmarshal(r.Prompt, &many); err != nil {
		return a, badf("prompt", "prompt must be a string or an array of one string (token arrays are not supported)")
	}
	if len(many) != 1 {
		return a, badf("prompt", "prompt has %d strings; rbee answers one prompt per request", len(many))
	}
	a.Prompt = many[0]
	return a, nil
}

// decodeRequest reads a JSON body into v, answering 400 (or 413) itself
// when it cannot.
func decodeRequest(w http.ResponseWriter, r *http.Request, v any) bool {
	body := http.MaxBytesReader(w, r.Body, maxRequestBody)
	err := json.NewDecoder(body).Decode(v)
	// Read to the end, so the server notices at once when the client
	// goes away (it watches the connection only after the body).
	_, _ = io.Copy(io.Discard, body)
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, "", fmt.Sprintf("request body is larger than %d bytes", tooBig.Limit))
		return false
	case err != nil:
		writeError(w, http.StatusBadRequest, "", "malformed JSON body: "+err.Error())
		return false
	}
	return true
}

func (g *gateway) chatCompletions(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if !decodeRequest(w, r, &req) {
		return
	}
	args, err := req.inferArgs()
	if err != nil {
		answerBadParam(w, err)
		return
	}
	g.complete(w, r, chatEndpoint, args, req.Stream, req.includeUsage())
}

func (g *gateway) completions(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	if !decodeRequest(w, r, &req) {
		return
	}
	args, err := req.inferArgs()
	if err != nil {
		answerBadParam(w, err)
		return
	}
	g.complete(w, r, completionEndpoint, args, req.Stream, req.includeUsage())
}

func answerBadParam(w http.ResponseWriter, err error) {
	var bp *badParam
	if errors.As(err, &bp) {
		writeError(w, http.StatusBadRequest, bp.param, bp.msg)
		return
	}
	writeError(w, http.StatusBadRequest, "", err.Error())
}

// --- running a completion ---

type endpointKind int

const (
	chatEndpoint endpointKind = iota
	completionEndpoint
)

// complete submits the inference as a job, follows its events on the bus
// and answers as OpenAI would. The job outlives nobody: if the client goes
// away (or the gateway shuts down) before the job ends, the job is
// cancelled, so a worker slot is not spent on an answer no one reads.
//
// A stream's headers go out with its first token, not before, so a job
// that fails before generating (queue timeout, no worker) still gets a
// proper HTTP status instead of an error inside a 200 stream.
func (g *gateway) complete(w http.ResponseWriter, r *http.Request, kind endpointKind, args api.InferArgs, stream, includeUsage bool) {
	if g.ctx.Err() != nil {
		writeError(w, http.StatusServiceUnavailable, "", "the queen is shutting down")
		return
	}
	raw, err := json.Marshal(args)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "", err.Error())
		return
	}
	sctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	reply, err := g.q.submit(sctx, api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}})
	cancel()
	if err != nil {
		status := statusOf(err)
		if status == http.StatusInternalServerError {
			g.q.log.Error().Err(err).Msg("gateway: submitting an inference")
		}
		writeError(w, status, paramOf(kind, status, err.Error()), err.Error())
		return
	}
	// The job id lets a person trace the request: `rbee jobs get ID`.
	w.Header().Set("X-Rbee-Job", reply.JobID)
	c := &completionRun{
		w: w, kind: kind, jobID: reply.JobID, model: args.Model,
		created: time.Now().Unix(), stream: stream, includeUsage: includeUsage,
	}
	if kind == chatEndpoint {
		c.id = "chatcmpl-" + reply.JobID
	} else {
		c.id = "cmpl-" + reply.JobID
	}
	err = g.q.bus.Follow(r.Context(), reply.JobID, 0, c.onEvent)
	if c.end != nil {
		c.finish()
		return
	}
	clientGone := c.writeErr != nil || r.Context().Err() != nil
	reason := "client disconnected"
	switch {
	case g.ctx.Err() != nil:
		reason = "the queen shut down its gateway during the request"
	case !clientGone:
		reason = fmt.Sprintf("the gateway lost the job's events: %v", err)
		g.q.log.Error().Err(err).Str("job", reply.JobID).Msg("gateway: following a job")
	}
	g.cancelJob(reply.JobID, reason)
	if clientGone && g.ctx.Err() == nil {
		return // nobody left to answer
	}
	status := http.StatusInternalServerError
	if g.ctx.Err() != nil {
		status = http.StatusServiceUnavailable
	}
	c.fail(status, fmt.Sprintf("job %s cancelled: %s", reply.JobID, reason))
}

func (g *gateway) cancelJob(id, reason string) {
	// The request's context is over; the cancel must still reach the bus.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := g.q.cancelJob(ctx, id, reason, api.JobCancelled); err != nil && !errors.Is(err, jobs.ErrTerminal) {
		g.q.log.Warn().Err(err).Str("job", id).Msg("gateway: cancelling an abandoned job")
	}
}

// paramOf names the request field an admission error is about; the queen
// words a bad field as "invalid FIELD: why".
func paramOf(kind endpointKind, status int, msg string) string {
	switch status {
	case http.StatusNotFound:
		return "model" // the one thing an inference can name that may not exist
	case http.StatusBadRequest:
	default:
		return ""
	}
	rest, ok := strings.CutPrefix(msg, "invalid ")
	if !ok {
		return ""
	}
	field, _, ok := strings.Cut(rest, ":")
	if !ok || strings.ContainsRune(field, ' ') {
		return ""
	}
	if field == "prompt" && kind == chatEndpoint {
		return "messages"
	}
	return field
}

// completionRun is one request's view of its job while it is followed.
// Follow calls onEvent on the handler's goroutine, so writes to the
// response never race.
type completionRun struct {
	w            http.ResponseWriter
	kind         endpointKind
	id, jobID    string
	model        string
	created      int64
	stream       bool
	includeUsage bool

	started  bool // stream headers (and the chat role chunk) sent
	text     strings.Builder
	tokens   int
	next     int // index of the next new token
	end      *api.StateChange
	writeErr error
}

func (c *completionRun) onEvent(ev api.Event) error {
	switch {
	case ev.Token != nil:
		if ev.Token.Index < c.next {
			return nil // a redelivered token
		}
		c.next = ev.Token.Index + 1
		c.tokens++
		c.text.WriteString(ev.Token.Text)
		if c.stream {
			if err := c.start(); err != nil {
				return err
			}
			return c.send(c.chunk(ev.Token.Text, nil, nil))
		}
	case ev.State != nil && ev.State.State.Terminal():
		c.end = ev.State
	}
	return nil
}

// finish answers after the job's terminal event.
func (c *completionRun) finish() {
	switch c.end.State {
	case api.JobCompleted:
	case api.JobFailed:
		status := http.StatusInternalServerError
		if strings.Contains(c.end.Error, "timed out after") {
			status = http.StatusGatewayTimeout
		}
		c.fail(status, fmt.Sprintf("job %s failed: %s", c.jobID, c.end.Error))
		return
	default:
		c.fail(http.StatusInternalServerError, fmt.Sprintf("job %s was cancelled: %s", c.jobID, c.end.Error))
		return
	}
	var res api.InferResult
	_ = json.Unmarshal(c.end.Result, &res)
	finish := finishReason(res.StopReason)
	u := usage{PromptTokens: res.PromptTokens, CompletionTokens: res.CompletionTokens}
	if u.CompletionTokens == 0 {
		u.CompletionTokens = c.tokens
	}
	u.TotalTokens = u.PromptTokens + u.CompletionTokens
	if c.stream {
		if c.start() != nil {
			return
		}
		if c.send(c.chunk("", &finish, nil)) != nil {
			return
		}
		if c.includeUsage && c.send(c.chunk("", nil, &u)) != nil {
			return
		}
		_ = c.sendRaw("[DONE]")
		return
	}
	// The worker's final text is authoritative (it may have held back a
	// stop sequence); the streamed tokens are the fallback.
	text := res.Text
	if text == "" {
		text = c.text.String()
	}
	if c.kind == chatEndpoint {
		writeJSON(c.w, http.StatusOK, chatCompletion{
			ID: c.id, Object: "chat.completion", Created: c.created, Model: c.model, Usage: u,
			Choices: []chatChoice{{Message: chatMessageOut{Role: "assistant", Content: text}, FinishReason: finish}},
		})
		return
	}
	writeJSON(c.w, http.StatusOK, textCompletion{
		ID: c.id, Object: "text_completion", Created: c.created, Model: c.model, Usage: &u,
		Choices: []textChoice{{Text: text, FinishReason: &finish}},
	})
}

// fail answers an error: with its status while nothing was sent yet, as an
// error event inside the stream once it has started.
func (c *completionRun) fail(status int, msg string) {
	if !c.started {
		writeError(c.w, status, "", msg)
		return
	}
	data, _ := json.Marshal(errorBody(status, "", msg))
	_ = c.sendRaw(string(data))
}

func finishReason(stop string) string {
	switch stop {
	case "max_tokens", "length":
		return "length"
	}
	return "stop" // eos, a stop sequence
}

// start sends a stream's headers, and for chat the role chunk OpenAI
// clients expect first.
func (c *completionRun) start() error {
	if c.started {
		return nil
	}
	c.started = true
	h := c.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no") // keep proxies from buffering the stream
	c.w.WriteHeader(http.StatusOK)
	if c.kind == chatEndpoint {
		empty := ""
		return c.send(chatChunk{
			ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model,
			Choices: []chatChunkChoice{{Delta: chatDelta{Role: "assistant", Content: &empty}}},
		})
	}
	return nil
}

// chunk builds one stream chunk: a piece of text, the final chunk (finish
// set) or the usage chunk (u set, no choices).
func (c *completionRun) chunk(text string, finish *string, u *usage) any {
	if c.kind == chatEndpoint {
		ch := chatChunk{ID: c.id, Object: "chat.completion.chunk", Created: c.created, Model: c.model, Usage: u, Choices: []chatChunkChoice{}}
		if u == nil {
			choice := chatChunkChoice{FinishReason: finish}
			if finish == nil {
				choice.Delta.Content = &text
			}
			ch.Choices = append(ch.Choices, choice)
		}
		return ch
	}
	ch := textCompletion{ID: c.id, Object: "text_completion", Created: c.created, Model: c.model, Usage: u, Choices: []textChoice{}}
	if u == nil {
		ch.Choices = append(ch.Choices, textChoice{Text: text, FinishReason: finish})
	}
	return ch
}

func (c *completionRun) send(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.sendRaw(string(data))
}

func (c *completionRun) sendRaw(data string) error {
	if c.writeErr != nil {
		return c.writeErr
	}
	if _, err := io.WriteString(c.w, "data: "+data+"\n\n"); err != nil {
		c.writeErr = err
		return err
	}
	if err := http.NewResponseController(c.w).Flush(); err != nil {
		c.writeErr = err
		return err
	}
	return nil
}

// --- responses (OpenAI's shapes) ---

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

type chatCompletion struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []chatChoice `json:"choices"`
	Usage   usage        `json:"usage"`
}

type chatChoice struct {
	Index        int            `json:"index"`
	Message      chatMessageOut `json:"message"`
	FinishReason string         `json:"finish_reason"`
	Logprobs     any            `json:"logprobs"`
}

type chatMessageOut struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type chatChunk struct {
	ID      string            `json:"id"`
	Object  string            `json:"object"`
	Created int64             `json:"created"`
	Model   string            `json:"model"`
	Choices []chatChunkChoice `json:"choices"`
	Usage   *usage            `json:"usage,omitempty"`
}

type chatChunkChoice struct {
	Index        int       `json:"index"`
	Delta        chatDelta `json:"delta"`
	FinishReason *string   `json:"finish_reason"`
	Logprobs     any       `json:"logprobs"`
}

type chatDelta struct {
	Role    string  `json:"role,omitempty"`
	Content *string `json:"content,omitempty"`
}

// textCompletion is both the /v1/completions answer and its stream chunk.
type textCompletion struct {
	ID      string       `json:"id"`
	Object  string       `json:"object"`
	Created int64        `json:"created"`
	Model   string       `json:"model"`
	Choices []textChoice `json:"choices"`
	Usage   *usage       `json:"usage,omitempty"`
}

type textChoice struct {
	Text         string  `json:"text"`
	Index        int     `json:"index"`
	FinishReason *string `json:"finish_reason"`
	Logprobs     any     `json:"logprobs"`
}
