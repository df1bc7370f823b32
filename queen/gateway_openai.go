package queen

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
)

// --- requests ---

// commonFields are the request fields chat and completions share. top_k,
// min_p and repeat_penalty are llama.cpp's extensions, as its own server
// takes them. Any other field is checked against the parameter lists below
// before it can be silently ignored.
type commonFields struct {
	Model               string         `json:"model"`
	MaxTokens           *int           `json:"max_tokens"`
	MaxCompletionTokens *int           `json:"max_completion_tokens"`
	Temperature         *float32       `json:"temperature"`
	TopP                *float32       `json:"top_p"`
	TopK                *int           `json:"top_k"`
	MinP                *float32       `json:"min_p"`
	RepeatPenalty       *float32       `json:"repeat_penalty"`
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

// Request parameters by what the gateway does with them. A parameter in
// none of these lists is refused with a 400 naming it, so a client never
// believes rbee honoured what it ignored; a null value counts as absent.
var (
	// commonParams are honoured on both endpoints (the fields above).
	commonParams = []string{"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "stop", "seed", "n", "stream", "stream_options"}
	chatParams   = []string{"messages"}
	textParams   = []string{"prompt"}
	// ignoredParams change nothing in the answer a model gives: accepted
	// and ignored (the README lists them).
	ignoredParams = []string{"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"}
	// unsupportedParams are OpenAI features rbee does not have, with what
	// to do instead. Their "off" value is accepted: false, 0, "", [], {},
	// or the value listed in offValues.
	unsupportedParams = map[string]string{
		"tools":              "tool calling is not supported; leave tools out",
		"tool_choice":        "tool calling is not supported; leave tool_choice out",
		"functions":          "function calling is not supported; leave functions out",
		"function_call":      "function calling is not supported; leave function_call out",
		"response_format":    `structured output is not supported; leave response_format out or send {"type":"text"}`,
		"logprobs":           "log probabilities are not returned; leave logprobs out",
		"top_logprobs":       "log probabilities are not returned; leave top_logprobs out",
		"logit_bias":         "logit_bias is not supported",
		"echo":               "echo is not supported; the answer holds the completion only",
		"suffix":             "insertion (suffix) is not supported",
		"best_of":            "rbee answers one choice per request; leave best_of out",
		"presence_penalty":   "presence_penalty is not supported; use repeat_penalty (llama.cpp's) instead",
		"frequency_penalty":  "frequency_penalty is not supported; use repeat_penalty (llama.cpp's) instead",
		"modalities":         "rbee answers text only",
		"audio":              "rbee answers text only",
		"prediction":         "predicted outputs are not supported",
		"reasoning_effort":   "reasoning_effort is not supported",
		"web_search_options": "web search is not supported",
	}
	offValues = map[string][]string{
		"best_of":         {"1"},
		"tool_choice":     {`"none"`},
		"response_format": {`{"type":"text"}`},
		"modalities":      {`["text"]`},
	}
)

// checkParams refuses the parameters of body the endpoint does not honour
// or knowingly ignore, naming the first (in sorted order, so the answer is
// the same every time).
func checkParams(body map[string]json.RawMessage, endpoint []string) error {
	names := make([]string, 0, len(body))
	for k := range body {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, name := range names {
		if slices.Contains(commonParams, name) || slices.Contains(endpoint, name) || slices.Contains(ignoredParams, name) {
			continue
		}
		if isOff(name, body[name]) {
			continue
		}
		if hint, ok := unsupportedParams[name]; ok {
			return api.Fail(reasonUnsupportedParam, name, "parameter %s is not supported by rbee: %s", name, hint)
		}
		return api.Fail(reasonUnsupportedParam, name, "unknown parameter %s; rbee takes %s (and ignores %s)", name,
			strings.Join(append(append([]string{}, commonParams...), endpoint...), ", "), strings.Join(ignoredParams, ", "))
	}
	return nil
}

// isOff reports whether a parameter's value asks for nothing: null, false,
// zero, an empty string, array or object, or its listed default.
func isOff(name string, raw json.RawMessage) bool {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return false
	}
	v := b.String()
	switch v {
	case "null", "false", `""`, "[]", "{}":
		return true
	}
	if f, err := strconv.ParseFloat(v, 64); err == nil && f == 0 {
		return true
	}
	return slices.Contains(offValues[name], v)
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
		return api.InvalidParam("stop", "it must be a string or an array of strings")
	}
	*s = many
	return nil
}

// inferArgs maps the shared fields onto the job's arguments. Range checks
// are the queen's admission (api.Sampling.Problem), the same for every
// client; only what OpenAI's wire format adds is checked here.
func (f commonFields) inferArgs() (api.InferArgs, error) {
	a := api.InferArgs{Model: f.Model}
	if f.N != nil && *f.N != 1 {
		return a, api.Fail(reasonUnsupportedParam, "n", "n = %d is not supported; rbee answers one choice per request", *f.N)
	}
	// An explicit 0 is refused rather than read as "the default": leave
	// the field out for that (the CLI's --max-tokens also starts at 1).
	for _, mt := range []struct {
		name string
		v    *int
	}{{"max_completion_tokens", f.MaxCompletionTokens}, {"max_tokens", f.MaxTokens}} {
		if mt.v == nil {
			continue
		}
		if *mt.v < 1 {
			return a, api.InvalidParam(mt.name, "must be at least 1, got %d; leave it out for the worker's default", *mt.v)
		}
		if a.Sampling.MaxTokens == 0 {
			a.Sampling.MaxTokens = *mt.v
		}
	}
	// OpenAI's default temperature is 1; rbee's zero value means greedy.
	a.Sampling.Temperature = 1
	if f.Temperature != nil {
		a.Sampling.Temperature = *f.Temperature
	}
	if f.TopP != nil {
		a.Sampling.TopP = *f.TopP
	}
	if f.TopK != nil {
		a.Sampling.TopK = *f.TopK
	}
	if f.MinP != nil {
		a.Sampling.MinP = *f.MinP
	}
	if f.RepeatPenalty != nil {
		a.Sampling.RepeatPenalty = *f.RepeatPenalty
	}
	if f.Seed != nil {
		if *f.Seed < 0 || *f.Seed > math.MaxUint32 {
			return a, api.InvalidParam("seed", "%d is outside 0…%d", *f.Seed, uint32(math.MaxUint32))
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

// maxTokensParam is the name the request gave its token limit.
func (f commonFields) maxTokensParam() string {
	if f.MaxCompletionTokens != nil {
		return "max_completion_tokens"
	}
	return "max_tokens"
}

func (r chatRequest) inferArgs() (api.InferArgs, error) {
	a, err := r.commonFields.inferArgs()
	if err != nil {
		return a, err
	}
	if len(r.Messages) == 0 {
		return a, api.InvalidParam("messages", "it is empty; send at least one message")
	}
	for i, m := range r.Messages {
		role := m.Role
		switch role {
		case "system", "user", "assistant":
		case "developer":
			role = "system" // OpenAI's newer name for the system role
		default:
			return a, api.InvalidParam(fmt.Sprintf("messages[%d].role", i), "role %q is not supported; use system, user or assistant", m.Role)
		}
		text, err := messageText(m.Content)
		if err != nil {
			return a, api.InvalidParam(fmt.Sprintf("messages[%d].content", i), "%v", err)
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
		return a, api.InvalidParam("prompt", "it is missing")
	}
	if err := json.Unmarshal(r.Prompt, &a.Prompt); err == nil {
		return a, nil
	}
	var many []string
	if err := json.Unmarshal(r.Prompt, &many); err != nil {
		return a, api.InvalidParam("prompt", "it must be a string or an array of one string (token arrays are not supported)")
	}
	if len(many) != 1 {
		return a, api.InvalidParam("prompt", "it has %d strings; rbee answers one prompt per request", len(many))
	}
	a.Prompt = many[0]
	return a, nil
}

// decodeRequest reads a JSON body into v and checks its parameters against
// the endpoint's list, answering 400 (or 413) itself when it cannot: the
// body must be one JSON object and nothing after it.
func decodeRequest(w http.ResponseWriter, r *http.Request, v any, endpoint []string) bool {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBody))
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, api.Fail(api.ReasonPayloadTooLarge, "", "request body is larger than %d bytes", tooBig.Limit))
		return false
	case err != nil:
		writeError(w, api.Fail(api.ReasonInvalidRequest, "", "reading the request body: %v", err))
		return false
	}
	malformed := func(err error) bool {
		// A field of the wrong shape says which parameter it is.
		var e *api.Error
		if errors.As(err, &e) {
			writeError(w, e)
			return false
		}
		writeError(w, api.Fail(api.ReasonInvalidRequest, "", "malformed JSON body: %v", err))
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return malformed(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		writeError(w, api.Fail(api.ReasonInvalidRequest, "", "malformed JSON body: data after the JSON object at byte %d; send one object", dec.InputOffset()))
		return false
	}
	var params map[string]json.RawMessage
	if err := json.Unmarshal(data, &params); err != nil {
		return malformed(err)
	}
	if err := checkParams(params, endpoint); err != nil {
		writeError(w, err)
		return false
	}
	return true
}

func (g *gateway) chatCompletions(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if !decodeRequest(w, r, &req, chatParams) {
		return
	}
	args, err := req.inferArgs()
	if err != nil {
		writeError(w, err)
		return
	}
	g.complete(w, r, chatEndpoint, req.commonFields, args)
}

func (g *gateway) completions(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	if !decodeRequest(w, r, &req, textParams) {
		return
	}
	args, err := req.inferArgs()
	if err != nil {
		writeError(w, err)
		return
	}
	g.complete(w, r, completionEndpoint, req.commonFields, args)
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
func (g *gateway) complete(w http.ResponseWriter, r *http.Request, kind endpointKind, f commonFields, args api.InferArgs) {
	if g.ctx.Err() != nil {
		writeError(w, api.Fail(api.ReasonUnavailable, "", "the queen is shutting down"))
		return
	}
	c := &completionRun{
		w: w, kind: kind, model: args.Model, maxTokensParam: f.maxTokensParam(),
		created: time.Now().Unix(), stream: f.Stream, includeUsage: f.includeUsage(),
	}
	raw, err := json.Marshal(args)
	if err != nil {
		c.fail(api.Fail(api.ReasonInvalidRequest, "", "the request cannot be encoded: %v", err))
		return
	}
	// The gateway names the job and follows its events while the queen
	// admits it, so the follower is in place when the first token comes
	// rather than one consumer round trip after the submit.
	id := jobs.NewID()
	w.Header().Set("X-Rbee-Job", id) // lets a person trace it: `rbee jobs get ID`
	c.jobID = id
	if kind == chatEndpoint {
		c.id = "chatcmpl-" + id
	} else {
		c.id = "cmpl-" + id
	}
	fctx, stopFollow := context.WithCancel(r.Context())
	defer stopFollow()
	submitted := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
		defer cancel()
		_, err := g.q.submit(sctx, api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}, JobID: id})
		if err != nil {
			stopFollow()
		}
		submitted <- err
	}()
	err = g.q.bus.Follow(fctx, id, 0, c.onEvent)
	if serr := <-submitted; serr != nil && !c.started && c.end == nil {
		e := api.AsError(serr)
		if e.Reason == api.ReasonInternal {
			g.q.log.Error().Err(serr).Msg("gateway: submitting an inference")
		}
		w.Header().Del("X-Rbee-Job") // no such job
		c.fail(e)
		return
	}
	if c.end != nil {
		c.finish()
		return
	}
	clientGone := c.writeErr != nil || r.Context().Err() != nil
	why := api.Fail(api.ReasonCancelled, "", "client disconnected")
	switch {
	case g.ctx.Err() != nil:
		why = api.Fail(api.ReasonUnavailable, "", "the queen shut down its gateway during the request")
	case !clientGone:
		why = api.Fail(api.ReasonInternal, "", "the gateway lost the job's events: %v", err)
		g.q.log.Error().Err(err).Str("job", id).Msg("gateway: following a job")
	}
	g.cancelJob(id, why)
	if clientGone && g.ctx.Err() == nil {
		return // nobody left to answer
	}
	c.fail(api.Fail(why.Reason, "", "job %s cancelled: %s", id, why.Message))
}

func (g *gateway) cancelJob(id string, why *api.Error) {
	// The request's context is over; the cancel must still reach the bus.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := g.q.cancelJob(ctx, id, why, api.JobCancelled); err != nil && !errors.Is(err, jobs.ErrTerminal) {
		g.q.log.Warn().Err(err).Str("job", id).Msg("gateway: cancelling an abandoned job")
	}
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
	// maxTokensParam is the name the request gave its token limit.
	maxTokensParam string

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
	case api.JobFailed, api.JobCancelled:
		e := c.end.Err()
		verb := "failed"
		if c.end.State == api.JobCancelled {
			verb = "was cancelled"
		}
		e.Message = fmt.Sprintf("job %s %s: %s", c.jobID, verb, e.Message)
		c.fail(e)
		return
	}
	var res api.InferResult
	_ = json.Unmarshal(c.end.Result, &res)
	finish := finishReason(res.StopReason)
	u := usage{PromptTokens: res.PromptTokens, CompletionTokens: res.CompletionTokens}
	if res.CachedTokens > 0 {
		u.PromptTokensDetails = &promptTokensDetails{CachedTokens: res.CachedTokens}
	}
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
	// The tokens are the text: a stop sequence the worker held back was
	// never in them.
	text := c.text.String()
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

// fail answers an error: with its reason's status while nothing was sent
// yet, as an error event inside the stream once it has started. The
// parameter is named as this request named it.
func (c *completionRun) fail(e *api.Error) {
	out := *e
	switch {
	case out.Param == "prompt" && c.kind == chatEndpoint:
		out.Param = "messages" // a chat's prompt is its messages
	case out.Param == "max_tokens":
		out.Param = c.maxTokensParam
	}
	if !c.started {
		writeError(c.w, &out)
		return
	}
	data, _ := json.Marshal(errorBody(&out))
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
	// PromptTokensDetails says how much of the prompt the worker's prompt
	// cache held (OpenAI's field for its own prompt caching).
	PromptTokensDetails *promptTokensDetails `json:"prompt_tokens_details,omitempty"`
}

type promptTokensDetails struct {
	CachedTokens int `json:"cached_tokens"`
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
