package api

import (
	"errors"
	"fmt"
	"strconv"
)

// Error is an error answered by a service endpoint, or the end of a failed
// job: a machine-readable Reason, the request parameter it concerns (if
// any), a bus code borrowed from HTTP, and a message for the person.
// Programs branch on Reason, never on Message: the gateway maps it to an
// HTTP status and OpenAI error, the keeper to an exit status.
type Error struct {
	Code int `json:"code"`
	// Reason says what went wrong, for programs. Errors of components that
	// set only a Code get the reason of their code (ReasonOf).
	Reason Reason `json:"reason,omitempty"`
	// Param names the request parameter at fault, by its wire name
	// ("max_tokens", "messages[2].content"), or is empty.
	Param   string `json:"param,omitempty"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Message }

// Reason is why a request or a job failed, for programs to branch on.
type Reason string

// Reasons. Each is set where the error is born.
const (
	// ReasonInvalidRequest: the request is malformed or names an unknown
	// operation; no one parameter is at fault.
	ReasonInvalidRequest Reason = "invalid_request"
	// ReasonInvalidParam: a parameter (Param) is out of range or malformed.
	ReasonInvalidParam Reason = "invalid_param"
	// ReasonPromptTooLong: the prompt does not fit the model's context.
	ReasonPromptTooLong Reason = "prompt_too_long"
	// ReasonPayloadTooLarge: the request is larger than the bus carries.
	ReasonPayloadTooLarge Reason = "payload_too_large"
	// ReasonNotFound: what the request names (a job, a hive, a model)
	// does not exist.
	ReasonNotFound Reason = "not_found"
	// ReasonConflict: the request conflicts with the current state (a
	// finished job, a running hive).
	ReasonConflict Reason = "conflict"
	// ReasonQueueFull: too many requests already wait for the model.
	ReasonQueueFull Reason = "queue_full"
	// ReasonNoCapacity: nothing can run the job: no hive online, no hive
	// with the model, or no worker could be started.
	ReasonNoCapacity Reason = "no_capacity"
	// ReasonUnavailable: a component is shutting down or not answering.
	ReasonUnavailable Reason = "unavailable"
	// ReasonTimeout: a deadline passed (the job's, or its first token's).
	ReasonTimeout Reason = "timeout"
	// ReasonCancelled: someone cancelled the job.
	ReasonCancelled Reason = "cancelled"
	// ReasonWorkerLost: the worker running the job died, stopped or was
	// cut off before it finished.
	ReasonWorkerLost Reason = "worker_lost"
	// ReasonInternal: a bug or an unexpected failure.
	ReasonInternal Reason = "internal"
)

// Error codes used on the bus, borrowed from HTTP because every reader
// already knows them.
const (
	CodeBadRequest      = 400
	CodeNotFound        = 404
	CodeConflict        = 409
	CodePayloadTooLarge = 413
	CodeQueueFull       = 429
	CodeInternal        = 500
	CodeBadGateway      = 502
	CodeUnavailable     = 503
	CodeTimeout         = 504
)

// reasonCodes is the bus code of each reason: the one table from which
// Fail derives Code. Reasons of the same code are told apart by Reason.
var reasonCodes = map[Reason]int{
	ReasonInvalidRequest:  CodeBadRequest,
	ReasonInvalidParam:    CodeBadRequest,
	ReasonPromptTooLong:   CodeBadRequest,
	ReasonPayloadTooLarge: CodePayloadTooLarge,
	ReasonNotFound:        CodeNotFound,
	ReasonConflict:        CodeConflict,
	ReasonCancelled:       CodeConflict,
	ReasonQueueFull:       CodeQueueFull,
	ReasonNoCapacity:      CodeUnavailable,
	ReasonUnavailable:     CodeUnavailable,
	ReasonTimeout:         CodeTimeout,
	ReasonWorkerLost:      CodeBadGateway,
	ReasonInternal:        CodeInternal,
}

// codeReasons is the reason of an error that carries only a code (one
// built with Errorf, or answered by an older component).
var codeReasons = map[int]Reason{
	CodeBadRequest:      ReasonInvalidRequest,
	CodeNotFound:        ReasonNotFound,
	CodeConflict:        ReasonConflict,
	CodePayloadTooLarge: ReasonPayloadTooLarge,
	CodeQueueFull:       ReasonQueueFull,
	CodeBadGateway:      ReasonWorkerLost,
	CodeUnavailable:     ReasonUnavailable,
	CodeTimeout:         ReasonTimeout,
}

// Reasons lists every reason, for the tables that map them at the edges
// (their tests check that none is missing).
func Reasons() []Reason {
	out := make([]Reason, 0, len(reasonCodes))
	for r := range reasonCodes {
		out = append(out, r)
	}
	return out
}

// CodeOfReason is the bus code of a reason (500 for an unknown one).
func CodeOfReason(r Reason) int {
	if c, ok := reasonCodes[r]; ok {
		return c
	}
	return CodeInternal
}

// Fail builds an *Error of reason about param ("" for none), with the
// reason's code.
func Fail(reason Reason, param, format string, args ...any) *Error {
	return &Error{Code: CodeOfReason(reason), Reason: reason, Param: param, Message: fmt.Sprintf(format, args...)}
}

// InvalidParam is a parameter out of range: "invalid PARAM: WHY".
func InvalidParam(param, format string, args ...any) *Error {
	return Fail(ReasonInvalidParam, param, "invalid %s: %s", param, fmt.Sprintf(format, args...))
}

// Errorf builds an *Error with only a code; its reason is the code's.
// Prefer Fail, which says why.
func Errorf(code int, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// AsError returns the *Error in err's chain, or, for an error without one,
// an internal *Error with err's message. It is nil for a nil err. The
// result's Reason is always set.
func AsError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if !errors.As(err, &e) || e == nil {
		return &Error{Code: CodeInternal, Reason: ReasonInternal, Message: err.Error()}
	}
	out := *e
	out.Message = err.Error() // with what wrapped it
	out.Reason = ReasonOf(e)
	if out.Code == 0 {
		out.Code = CodeOfReason(out.Reason)
	}
	return &out
}

// ReasonOf returns the reason of the *Error in err's chain: its Reason,
// else the reason of its code. An error without one is internal; nil is "".
func ReasonOf(err error) Reason {
	if err == nil {
		return ""
	}
	var e *Error
	if !errors.As(err, &e) || e == nil {
		return ReasonInternal
	}
	if e.Reason != "" {
		return e.Reason
	}
	if r, ok := codeReasons[e.Code]; ok {
		return r
	}
	return ReasonInternal
}

// CodeOf returns the code of an *Error in err's chain, or 0.
func CodeOf(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// CodeString is the micro error code for a code.
func CodeString(code int) string { return strconv.Itoa(code) }

// SetError records on a job record why it ended: the message, reason and
// parameter of e (nil clears them). A reason left empty is internal.
func (j *Job) SetError(e *Error) {
	if e == nil {
		j.Error, j.Reason, j.Param = "", "", ""
		return
	}
	j.Error, j.Reason, j.Param = e.Message, ReasonOf(e), e.Param
}

// Err is the error a failed or cancelled job ended with, as an *Error
// (nil for any other state). A record written without a reason (by an
// older component) is internal when failed, cancelled when cancelled.
func (c *StateChange) Err() *Error {
	var fallback Reason
	switch c.State {
	case JobFailed:
		fallback = ReasonInternal
	case JobCancelled:
		fallback = ReasonCancelled
	default:
		return nil
	}
	r := c.Reason
	if r == "" {
		r = fallback
	}
	return &Error{Code: CodeOfReason(r), Reason: r, Param: c.Param, Message: c.Error}
}
