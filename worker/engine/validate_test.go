package engine

import (
	"errors"
	"testing"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

// TestValidateAppliesTheAdmissionRules: the engine's check of sampling and
// length parameters is the queen's (api.Sampling.Problem) against the
// model's context, so the two cannot drift; and its errors cross the bus as
// invalid_param or prompt_too_long with the field.
func TestValidateAppliesTheAdmissionRules(t *testing.T) {
	const ctx = 64
	ok := Request{Prompt: "hi", MaxTokens: 8}
	for name, mutate := range map[string]func(*Request){
		"max_tokens above the context": func(r *Request) { r.MaxTokens = ctx + 1 },
		"temperature":                  func(r *Request) { r.Temperature = 2.5 },
		"top_p":                        func(r *Request) { r.TopP = 1.5 },
		"top_k":                        func(r *Request) { r.TopK = -1 },
		"min_p":                        func(r *Request) { r.MinP = 2 },
		"repeat_penalty":               func(r *Request) { r.RepeatPenalty = 2e6 },
		"stop":                         func(r *Request) { r.Stop = []string{"x", ""} },
	} {
		r := ok
		mutate(&r)
		s := api.Sampling{MaxTokens: r.MaxTokens, Temperature: r.Temperature, TopP: r.TopP, TopK: r.TopK, MinP: r.MinP, RepeatPenalty: r.RepeatPenalty, Stop: r.Stop}
		param, why := s.Problem(ctx)
		require.NotEmpty(t, param, name)
		var pe *ParamError
		require.True(t, errors.As(r.Validate(ctx), &pe), name)
		require.Equal(t, param, pe.Field, name)
		require.Equal(t, why, pe.Reason, name)
		e := pe.APIError()
		require.Equal(t, api.ReasonInvalidParam, e.Reason, name)
		require.Equal(t, param, e.Param, name)
	}
	require.NoError(t, ok.Validate(ctx))

	long := &ParamError{Field: "messages", Err: ErrPromptTooLong, Reason: "900 tokens do not fit in the context of 64"}
	e := long.APIError()
	require.Equal(t, api.ReasonPromptTooLong, e.Reason)
	require.Equal(t, "messages", e.Param)
	require.Contains(t, e.Message, "do not fit")
}
