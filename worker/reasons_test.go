package worker_test

import (
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/stretchr/testify/require"
)

// TestFailedJobsCarryReasonAndParam: the worker fails a job with the reason
// it was born with and the parameter at fault, on the terminal state event
// and the record, so the gateway can answer 400 with the param (not a 500
// an OpenAI client retries) and the keeper exit 2, without reading prose.
// Max_tokens and the prompt's length are checked here because only the
// worker knows its context.
func TestFailedJobsCarryReasonAndParam(t *testing.T) {
	f := busfix.Start(t)
	start(t, f, "w1", 1)
	cases := []struct {
		name   string
		args   api.InferArgs
		reason api.Reason
		param  string
		words  string
	}{
		{"max_tokens beyond the context", api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: ctxSize + 1}}, api.ReasonInvalidParam, "max_tokens", "between 1 and 512"},
		{"temperature", api.InferArgs{Prompt: prompt, Sampling: api.Sampling{Temperature: 5}}, api.ReasonInvalidParam, "temperature", "between 0 and 2"},
		{"empty stop entry", api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 4, Stop: []string{""}}}, api.ReasonInvalidParam, "stop", "empty"},
		{"NUL byte in the prompt", api.InferArgs{Prompt: "a\x00b", Sampling: api.Sampling{MaxTokens: 4}}, api.ReasonInvalidParam, "prompt", "NUL"},
		{"prompt longer than the context", api.InferArgs{Prompt: strings.Repeat("hello ", ctxSize)}, api.ReasonPromptTooLong, "prompt", "do not fit"},
		{"chat longer than the context", api.InferArgs{Messages: []api.ChatMessage{{Role: "user", Content: strings.Repeat("hello ", ctxSize)}}}, api.ReasonPromptTooLong, "messages", "do not fit"},
		{"no first token in time", api.InferArgs{Prompt: strings.Repeat("the bee is ", 100), FirstTokenTimeout: api.Duration(time.Microsecond), Sampling: api.Sampling{MaxTokens: 8}}, api.ReasonTimeout, "", "no first token"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id := submit(t, f, c.args)
			got := follow(t, f, id, nil)
			require.Equal(t, api.JobFailed, got.final.State)
			require.Equal(t, c.reason, got.final.Reason, "%+v", got.final)
			require.Equal(t, c.param, got.final.Param)
			require.Contains(t, got.final.Error, c.words)
			require.Empty(t, got.tokens)
			job, err := store(t, f).Get(t.Context(), id)
			require.NoError(t, err)
			require.Equal(t, c.reason, job.Reason, "the record")
			require.Equal(t, c.param, job.Param, "the record")
		})
	}
}
