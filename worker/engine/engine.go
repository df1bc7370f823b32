// Package engine runs language-model inference for the worker. The Engine,
// Model and Slot interfaces hide the backend; Llama (llama.cpp through yzma)
// is the real one.
//
// A worker loads one Model with the number of requests it generates at once
// (its slots) and makes one Slot handle per request it serves concurrently;
// each Slot is used by one goroutine at a time. The slots of a model are
// sequences decoded together in batches (see batch.go).
package engine

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/api"
)

// Sentinel errors. Functions wrap them with %w, so test with errors.Is.
var (
	// ErrInvalidRequest: a Request parameter is out of range. The error is a
	// *ParamError naming the field.
	ErrInvalidRequest = errors.New("invalid request")
	// ErrPromptTooLong: the prompt does not fit in the context (also a
	// *ParamError for field "prompt", so it matches ErrInvalidRequest too).
	ErrPromptTooLong = errors.New("prompt too long")
	// ErrLibrary: the llama.cpp shared libraries could not be found or loaded.
	ErrLibrary = errors.New("llama.cpp library")
	// ErrLoad: a model file could not be loaded (missing, corrupt, unsupported).
	ErrLoad = errors.New("load model")
	// ErrDevice: the requested device does not exist or is malformed.
	ErrDevice = errors.New("device")
	// ErrNoChatTemplate: the model carries no chat template.
	ErrNoChatTemplate = errors.New("model has no chat template")
	// ErrChatTemplate: the model's chat template could not be applied.
	ErrChatTemplate = errors.New("apply chat template")
	// ErrClosed: the model or slot was closed.
	ErrClosed = errors.New("closed")
	// ErrSlotBusy: Generate was called on a slot that is already generating.
	ErrSlotBusy = errors.New("slot busy")
	// ErrDecode: llama.cpp failed to evaluate a batch.
	ErrDecode = errors.New("decode")
)

// Engine loads models.
type Engine interface {
	// Load loads the GGUF model at path. A missing, truncated or corrupt file
	// gives an error wrapping ErrLoad with the reason; it never crashes the
	// process.
	Load(ctx context.Context, path string, opts LoadOptions) (Model, error)
}

// LoadOptions says how to load a model. Zero values pick defaults.
type LoadOptions struct {
	// ContextSize is the context (in tokens) of every slot; 0 takes the
	// model's training context.
	ContextSize int
	// Slots is how many requests are generated at once (decoded together,
	// in batches); 0 is 1. Each slot holds a KV cache of ContextSize
	// tokens.
	Slots int
	// Lanes is how many llama contexts the slots are spread over, each
	// decoding its own batch with Threads threads; 0 is 1. One lane reads
	// the weights once per step for every sequence; more lanes pay only
	// on a CPU with a model small enough to sit in its cache.
	Lanes int
	// Threads is the number of CPU threads per lane; 0 picks one per
	// performance core.
	Threads int
	// Device is "cpu" (the default when empty) or "cuda:N" (any GPU of the
	// loaded backends, N counted from 0).
	Device string
	// GPULayers is the number of layers to offload to a GPU device; 0 or
	// negative offloads all of them. Ignored for "cpu".
	GPULayers int
	// Resident reads the weights into the process's own memory instead
	// of mapping the model file (llama.cpp's default). Mapped weights are
	// page cache: loaded on first use, shared, and among the first memory
	// the kernel (and, on a VM, the host) takes back, so a model that
	// idled may be read again, a page at a time, by its next request.
	// Resident weights cost their read up front and memory of the
	// process's own, and stay. Ignored on a GPU.
	Resident bool
}

// MaxSlots is the most sequences a model generates at once (llama.cpp's
// LLAMA_MAX_SEQ).
const MaxSlots = 256

// Model is a loaded model. Its methods are safe for concurrent use.
type Model interface {
	// NewSlot makes a handle that generates one request at a time. Any
	// number may be made; a Generate beyond the model's slot count waits
	// for a slot to free (or for its context to end).
	NewSlot() (Slot, error)
	// Tokenize turns text into token ids, with the model's BOS token when
	// addSpecial is true. Special-token text such as <|im_start|> is parsed
	// into its control token, as in Generate.
	Tokenize(text string, addSpecial bool) ([]int32, error)
	// ApplyChatTemplate renders msgs with the model's chat template (through
	// llama.cpp), ending with the assistant prefix when addAssistant is true.
	// It returns ErrNoChatTemplate when the model has none.
	ApplyChatTemplate(msgs []ChatMessage, addAssistant bool) (string, error)
	// ContextSize is the context of each slot, in tokens.
	ContextSize() int
	// Close closes all slots (waiting for their generation to end) and frees
	// the model. Further calls return ErrClosed; Close is idempotent.
	Close() error
}

// KVReporter is a Model that says how many tokens its sequences hold in
// their KV caches now.
type KVReporter interface {
	KVTokens() int
}

// Slot is a handle for one request at a time. Use it from one goroutine at
// a time; several slots of one model generate concurrently, batched.
type Slot interface {
	// Generate runs one request. onToken is called once per generated token,
	// in order; returning an error stops generation (StopError, and Generate
	// returns that error wrapped). Token.Text may be empty while text is held
	// back (a possible start of a stop sequence, or an incomplete UTF-8
	// character). The end-of-generation token is reported too, carrying any
	// text still held back. Cancelling ctx stops generation before the next
	// token: the Result has StopCancelled and the error is nil. Slots are
	// reusable: state is cleared per request.
	Generate(ctx context.Context, req Request, onToken func(Token) error) (Result, error)
	// Close frees the slot, waiting for a running Generate to end. It is
	// idempotent.
	Close() error
}

// ChatMessage is one message of a conversation.
type ChatMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// RandomSeed asks for a different random seed on every request.
const RandomSeed uint32 = 0xFFFFFFFF

// Request is one generation request. For TopK, TopP, MinP and
// RepeatPenalty the zero value means "off".
type Request struct {
	Prompt string
	// MaxTokens is the most tokens to generate, 1 to the context size.
	MaxTokens int
	// Temperature 0 is greedy decoding; up to 2.
	Temperature float32
	// TopP is nucleus sampling, 0 to 1 (0 or 1: off).
	TopP float32
	// MinP drops tokens less likely than MinP times the best one, 0 to 1.
	MinP float32
	// RepeatPenalty divides the logits of recent tokens, >= 0 (0 or 1: off).
	RepeatPenalty float32
	// TopK keeps the K most likely tokens, >= 0 (0: off).
	TopK int
	// Seed of the sampler; the same seed gives the same output. RandomSeed
	// picks a random one.
	Seed uint32
	// Stop ends generation when the output contains one of these strings,
	// which are not part of the output.
	Stop []string
}

// Token is one generated token.
type Token struct {
	// Index counts tokens of this request from 0.
	Index int
	// ID is the token id in the model's vocabulary.
	ID int32
	// Text is the output text this token releases (see Slot.Generate).
	Text string
}

// StopReason says why generation ended.
type StopReason string

// Stop reasons.
const (
	StopEOS       StopReason = "eos"        // the model produced an end-of-generation token
	StopMaxTokens StopReason = "max_tokens" // MaxTokens reached, or the context is full
	StopSequence  StopReason = "stop"       // a stop sequence appeared
	StopCancelled StopReason = "cancelled"  // the context was cancelled
	StopError     StopReason = "error"      // onToken or llama.cpp failed
)

// Result summarises a finished request.
type Result struct {
	StopReason   StopReason
	PromptTokens int
	// CachedTokens is how many of PromptTokens were not decoded again:
	// the start of the prompt that the slot's cache held from an earlier
	// request.
	CachedTokens     int
	CompletionTokens int
	// TimeToFirstToken is from the call of Generate to the first token.
	TimeToFirstToken time.Duration
	// Duration is the whole call.
	Duration time.Duration
}

// ParamError is a request parameter that is out of range. It matches
// ErrInvalidRequest (and Err, when set) with errors.Is.
type ParamError struct {
	// Field is the parameter's wire name, such as "max_tokens".
	Field string
	// Reason says what is wrong.
	Reason string
	// Err is an extra sentinel such as ErrPromptTooLong, or nil.
	Err error
}

// Error returns "invalid request: <field>: <reason>".
func (e *ParamError) Error() string {
	return fmt.Sprintf("%v: %s: %s", ErrInvalidRequest, e.Field, e.Reason)
}

// Unwrap gives ErrInvalidRequest and Err.
func (e *ParamError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrInvalidRequest, e.Err}
	}
	return []error{ErrInvalidRequest}
}

func paramErr(field, format string, args ...any) error {
	return &ParamError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

// Validate checks the parameters against a context of contextSize tokens and
// returns a *ParamError naming the first bad field. The sampling and length
// rules are the queen's admission rules (api.Sampling.Problem), checked
// again here against the model's context. Whether the prompt's tokens fit
// in the context is checked by Generate, after tokenising.
func (r Request) Validate(contextSize int) error {
	switch {
	case r.Prompt == "":
		return paramErr("prompt", "must not be empty")
	case strings.IndexByte(r.Prompt, 0) >= 0:
		return paramErr("prompt", "must not contain a NUL byte")
	case r.MaxTokens < 1:
		// 0 is the caller's "default", resolved before a Request is made.
		return paramErr("max_tokens", "must be between 1 and %d, got %d", contextSize, r.MaxTokens)
	}
	s := api.Sampling{
		MaxTokens: r.MaxTokens, Temperature: r.Temperature, TopP: r.TopP, TopK: r.TopK,
		MinP: r.MinP, RepeatPenalty: r.RepeatPenalty, Stop: r.Stop,
	}
	if field, why := s.Problem(contextSize); field != "" {
		return &ParamError{Field: field, Reason: why}
	}
	return nil
}

// APIError is e as the bus carries it: reason prompt_too_long for a prompt
// that does not fit, invalid_param otherwise, with the field as the param.
func (e *ParamError) APIError() *api.Error {
	reason := api.ReasonInvalidParam
	if errors.Is(e.Err, ErrPromptTooLong) {
		reason = api.ReasonPromptTooLong
	}
	return api.Fail(reason, e.Field, "%s", e.Error())
}

// Complete generates req on a slot of its own and returns the whole text:
// the non-streaming answer, and what tests compare a stream against.
func Complete(ctx context.Context, m Model, req Request) (string, Result, error) {
	slot, err := m.NewSlot()
	if err != nil {
		return "", Result{}, err
	}
	defer slot.Close()
	var b strings.Builder
	res, err := slot.Generate(ctx, req, func(t Token) error {
		b.WriteString(t.Text)
		return nil
	})
	return b.String(), res, err
}
