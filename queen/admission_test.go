package queen

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/stretchr/testify/require"
)

// TestSubmitRefusalsCarryReasonAndParam is the bus endpoints' table of bad
// input: each refusal crosses the bus as an *api.Error with its reason,
// parameter and code (rebuilt by bus.Call from the reply's headers), a
// message with the key words, and no job record or stored request is left
// behind.
func TestSubmitRefusalsCarryReasonAndParam(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	b := busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})
	announceHive(t, q, b, "h1", "tiny")
	infer := func(a api.InferArgs) api.SubmitRequest {
		if a.Model == "" {
			a.Model = "tiny"
		}
		raw, err := json.Marshal(a)
		require.NoError(t, err)
		return api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}
	}
	hi := "hi"
	// Fits in one bus message, but not once the queen wraps it for the
	// work queue.
	big := strings.Repeat("a", int(q.bus.NC.MaxPayload())-600)
	cases := []struct {
		name     string
		endpoint string
		req      any
		reason   api.Reason
		param    string
		code     int
		words    []string
	}{
		{"unknown operation", api.EpSubmit, api.SubmitRequest{Op: api.Operation{Kind: "explode"}}, api.ReasonInvalidRequest, "op.kind", 400, []string{"explode", "known operations"}},
		{"unknown argument", api.EpSubmit, api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: json.RawMessage(`{"model":"tiny","prompt":"hi","frob":1}`)}}, api.ReasonInvalidRequest, "", 400, []string{"frob"}},
		{"invalid model id", api.EpSubmit, infer(api.InferArgs{Model: "a.>", Prompt: hi}), api.ReasonInvalidParam, "model", 400, []string{"invalid model"}},
		{"empty prompt", api.EpSubmit, infer(api.InferArgs{Prompt: "  "}), api.ReasonInvalidParam, "prompt", 400, []string{"empty"}},
		{"NUL in the prompt", api.EpSubmit, infer(api.InferArgs{Prompt: "a\x00b"}), api.ReasonInvalidParam, "prompt", 400, []string{"NUL"}},
		{"NUL in the system text", api.EpSubmit, infer(api.InferArgs{Prompt: hi, System: "be\x00"}), api.ReasonInvalidParam, "system", 400, []string{"NUL"}},
		{"NUL in a message", api.EpSubmit, infer(api.InferArgs{Messages: []api.ChatMessage{{Role: "user", Content: "ok"}, {Role: "user", Content: "\x00"}}}), api.ReasonInvalidParam, "messages[1].content", 400, []string{"NUL", "message 1"}},
		{"message without a role", api.EpSubmit, infer(api.InferArgs{Messages: []api.ChatMessage{{Content: "hi"}}}), api.ReasonInvalidParam, "messages[0].role", 400, []string{"no role"}},
		{"empty stop entry", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Sampling: api.Sampling{Stop: []string{".", ""}}}), api.ReasonInvalidParam, "stop", 400, []string{"entry 1", "empty"}},
		{"negative max_tokens", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Sampling: api.Sampling{MaxTokens: -1}}), api.ReasonInvalidParam, "max_tokens", 400, []string{"at least 1", "-1"}},
		{"temperature above 2", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Sampling: api.Sampling{Temperature: 3}}), api.ReasonInvalidParam, "temperature", 400, []string{"between 0 and 2"}},
		{"top_p above 1", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Sampling: api.Sampling{TopP: 2}}), api.ReasonInvalidParam, "top_p", 400, []string{"between 0 and 1"}},
		{"negative top_k", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Sampling: api.Sampling{TopK: -1}}), api.ReasonInvalidParam, "top_k", 400, []string{"-1"}},
		{"min_p above 1", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Sampling: api.Sampling{MinP: 1.5}}), api.ReasonInvalidParam, "min_p", 400, []string{"1.5"}},
		{"repeat_penalty too large", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Sampling: api.Sampling{RepeatPenalty: 1e7}}), api.ReasonInvalidParam, "repeat_penalty", 400, []string{"between 0 and"}},
		{"bad device", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Device: "tpu"}), api.ReasonInvalidParam, "device", 400, []string{"cuda:N"}},
		{"invalid hive id", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Hive: "h 1"}), api.ReasonInvalidParam, "hive", 400, []string{"invalid hive"}},
		{"pull without a source", api.EpSubmit, infer(api.InferArgs{Model: "other", Prompt: hi, Pull: true}), api.ReasonInvalidParam, "model", 400, []string{"--pull"}},
		{"request larger than the bus carries", api.EpSubmit, infer(api.InferArgs{Prompt: big}), api.ReasonPayloadTooLarge, "prompt", 413, []string{"MiB", "max_payload"}},
		{"unknown model", api.EpSubmit, infer(api.InferArgs{Model: "nope", Prompt: hi}), api.ReasonNotFound, "model", 404, []string{"nope", "rbee model download"}},
		{"pinned to a hive not online", api.EpSubmit, infer(api.InferArgs{Prompt: hi, Hive: "h2"}), api.ReasonNoCapacity, "hive", 503, []string{"h2", "not online"}},
		{"job id with a dot", api.EpJobGet, api.JobRequest{ID: "a.b"}, api.ReasonInvalidParam, "id", 400, []string{"a.b"}},
		{"job that does not exist", api.EpJobGet, api.JobRequest{ID: "nosuchjob"}, api.ReasonNotFound, "id", 404, []string{"nosuchjob"}},
		{"cancel of a job that does not exist", api.EpJobCancel, api.JobRequest{ID: "nosuchjob"}, api.ReasonNotFound, "id", 404, []string{"nosuchjob"}},
		{"job list of an unknown state", api.EpJobList, api.JobListRequest{State: "weird"}, api.ReasonInvalidParam, "state", 400, []string{"weird"}},
		{"hive that is not in the inventory", api.EpHiveRemove, api.HiveRequest{Name: "ghost"}, api.ReasonNotFound, "name", 404, []string{"ghost", "rbee hive add"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			records, requests := stored(t, q)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err := b.Call(ctx, b.Space.Queen(tc.endpoint), tc.req, nil)
			var e *api.Error
			require.ErrorAs(t, err, &e)
			require.Equal(t, tc.reason, e.Reason, "%v", err)
			require.Equal(t, tc.param, e.Param, "%v", err)
			require.Equal(t, tc.code, e.Code, "%v", err)
			for _, w := range tc.words {
				require.Contains(t, e.Message, w)
			}
			nowRecords, nowRequests := stored(t, q)
			require.Equal(t, records, nowRecords, "no job record")
			require.Equal(t, requests, nowRequests, "no stored request")
		})
	}
}

// TestJobEndsCarryTheirReason: whoever ends a job sets its reason, on the
// record and on the terminal state event: the deadline (timeout), a user's
// cancel (cancelled), and the scheduler when no worker can be started
// (no_capacity).
func TestJobEndsCarryTheirReason(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	b := busfix.ConnectAs(t, q.BusURL(), bus.Credentials{KeyFile: q.CredentialsFile(auth.QueenName)})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	submit := func(kind string, args any, timeout time.Duration) string {
		raw, err := json.Marshal(args)
		require.NoError(t, err)
		var reply api.SubmitReply
		require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: kind, Args: raw}, Timeout: api.Duration(timeout)}, &reply))
		return reply.JobID
	}
	check := func(id string, state api.JobState, reason api.Reason, words string) {
		t.Helper()
		end := awaitTerminal(t, b, id, 20*time.Second)
		require.Equal(t, state, end.State, "%+v", end)
		require.Equal(t, reason, end.Reason, "the state event: %+v", end)
		require.Contains(t, end.Error, words)
		require.Equal(t, reason, end.Err().Reason)
		job, err := q.jobs.Get(ctx, id)
		require.NoError(t, err)
		require.Equal(t, reason, job.Reason, "the record")
	}

	timedOut := submit(api.OpNoop, map[string]string{"sleep": "30s"}, 300*time.Millisecond)
	check(timedOut, api.JobFailed, api.ReasonTimeout, "timed out after 300ms")

	cancelled := submit(api.OpNoop, map[string]string{"sleep": "30s"}, 0)
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpJobCancel), api.JobRequest{ID: cancelled}, nil))
	check(cancelled, api.JobCancelled, api.ReasonCancelled, "cancelled by user")

	// The hive lists the model but does not answer worker-spawn: the
	// spawn fails and the waiting job with it.
	announceHive(t, q, b, "h1", "tiny")
	unserved := submit(api.OpInfer, api.InferArgs{Model: "tiny", Prompt: "hi"}, 0)
	check(unserved, api.JobFailed, api.ReasonNoCapacity, "no worker could be started for tiny")
}
