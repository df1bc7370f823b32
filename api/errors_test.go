package api

import (
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestReasonsHaveCodesBothWays(t *testing.T) {
	for _, r := range Reasons() {
		code := CodeOfReason(r)
		require.NotZero(t, code, r)
		e := Fail(r, "p", "x")
		require.Equal(t, code, e.Code, r)
		require.Equal(t, r, ReasonOf(e), r)
		require.Equal(t, r, ReasonOf(fmt.Errorf("wrapped: %w", e)), r)
	}
	// An error with a code only gets its code's reason.
	for code, r := range codeReasons {
		require.Equal(t, r, ReasonOf(Errorf(code, "x")), code)
		require.Equal(t, code, CodeOfReason(r), "code %d's reason %s maps back to it", code, r)
	}
	require.Equal(t, ReasonInternal, ReasonOf(Errorf(507, "a hive's own code")))
	require.Equal(t, ReasonInternal, ReasonOf(errors.New("plain")))
	require.Equal(t, Reason(""), ReasonOf(nil))
}

func TestAsError(t *testing.T) {
	require.Nil(t, AsError(nil))
	plain := AsError(errors.New("boom"))
	require.Equal(t, &Error{Code: 500, Reason: ReasonInternal, Message: "boom"}, plain)
	e := AsError(fmt.Errorf("submit: %w", InvalidParam("top_k", "must be 0 (off) or more, got -1")))
	require.Equal(t, &Error{Code: 400, Reason: ReasonInvalidParam, Param: "top_k", Message: "submit: invalid top_k: must be 0 (off) or more, got -1"}, e)
	var typedNil *Error
	require.Equal(t, ReasonInternal, AsError(fmt.Errorf("odd: %w", typedNil)).Reason)
}

func TestJobErrorRoundTrip(t *testing.T) {
	var j Job
	j.SetError(Fail(ReasonPromptTooLong, "messages", "900 tokens do not fit in the context of 512"))
	require.Equal(t, ReasonPromptTooLong, j.Reason)
	require.Equal(t, "messages", j.Param)
	c := StateChange{State: JobFailed, Error: j.Error, Reason: j.Reason, Param: j.Param}
	require.Equal(t, &Error{Code: 400, Reason: ReasonPromptTooLong, Param: "messages", Message: j.Error}, c.Err())
	j.SetError(nil)
	require.Equal(t, Job{}, j)

	// Records without a reason (older components) still answer one.
	require.Equal(t, ReasonInternal, (&StateChange{State: JobFailed, Error: "x"}).Err().Reason)
	require.Equal(t, ReasonCancelled, (&StateChange{State: JobCancelled, Error: "x"}).Err().Reason)
	require.Nil(t, (&StateChange{State: JobCompleted}).Err())
}

// TestSamplingProblem is the one table of sampling and length rules, which
// the queen's admission and the engine both apply.
func TestSamplingProblem(t *testing.T) {
	cases := []struct {
		name  string
		s     Sampling
		ctx   int
		param string
	}{
		{"defaults", Sampling{}, 0, ""},
		{"all in range", Sampling{MaxTokens: 16, Temperature: 2, TopP: 1, TopK: 40, MinP: 1, RepeatPenalty: 1.1, Stop: []string{"\n"}}, 64, ""},
		{"max_tokens at the context", Sampling{MaxTokens: 64}, 64, ""},
		{"max_tokens above the context", Sampling{MaxTokens: 65}, 64, "max_tokens"},
		{"max_tokens unknown context", Sampling{MaxTokens: 1 << 20}, 0, ""},
		{"negative max_tokens", Sampling{MaxTokens: -1}, 0, "max_tokens"},
		{"temperature", Sampling{Temperature: 2.01}, 0, "temperature"},
		{"temperature NaN", Sampling{Temperature: float32(math.NaN())}, 0, "temperature"},
		{"negative temperature", Sampling{Temperature: -0.1}, 0, "temperature"},
		{"top_p", Sampling{TopP: 1.5}, 0, "top_p"},
		{"top_k", Sampling{TopK: -1}, 0, "top_k"},
		{"min_p", Sampling{MinP: -0.1}, 0, "min_p"},
		{"repeat_penalty", Sampling{RepeatPenalty: -1}, 0, "repeat_penalty"},
		{"repeat_penalty infinite", Sampling{RepeatPenalty: float32(math.Inf(1))}, 0, "repeat_penalty"},
		{"empty stop entry", Sampling{Stop: []string{"a", ""}}, 0, "stop"},
	}
	for _, c := range cases {
		param, why := c.s.Problem(c.ctx)
		require.Equal(t, c.param, param, c.name)
		e := c.s.Validate(c.ctx)
		if c.param == "" {
			require.Empty(t, why, c.name)
			require.Nil(t, e, c.name)
			continue
		}
		require.NotEmpty(t, why, c.name)
		require.Equal(t, ReasonInvalidParam, e.Reason, c.name)
		require.Equal(t, c.param, e.Param, c.name)
		require.Equal(t, "invalid "+c.param+": "+why, e.Message, c.name)
	}
}

func TestValidatePrompt(t *testing.T) {
	cases := []struct {
		a     InferArgs
		param string
	}{
		{InferArgs{Prompt: "hi"}, ""},
		{InferArgs{Messages: []ChatMessage{{Role: "user", Content: "hi"}}}, ""},
		{InferArgs{Prompt: " \n"}, "prompt"},
		{InferArgs{Prompt: "a\x00"}, "prompt"},
		{InferArgs{Prompt: "hi", System: "\x00"}, "system"},
		{InferArgs{Messages: []ChatMessage{{Role: "user", Content: "ok"}, {Role: "", Content: "x"}}}, "messages[1].role"},
		{InferArgs{Messages: []ChatMessage{{Role: "user", Content: "a\x00b"}}}, "messages[0].content"},
	}
	for _, c := range cases {
		e := c.a.ValidatePrompt()
		if c.param == "" {
			require.Nil(t, e, "%+v", c.a)
			continue
		}
		require.NotNil(t, e, "%+v", c.a)
		require.Equal(t, ReasonInvalidParam, e.Reason)
		require.Equal(t, c.param, e.Param)
	}
}
