package queen

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

// A job record keeps a bounded excerpt of the prompt, with its size and
// digest, whatever was submitted; the worker still gets the whole request,
// and a retry or a restarted queen reads it from where it is stored once.
func TestRecordsKeepAnExcerptOfTheirPrompt(t *testing.T) {
	q, _ := gatewayQueen(t, nil)
	w := startFakeWorker(t, q, &fakeWorker{tokens: []string{"ok"}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	cases := map[string]api.InferArgs{
		"prompt": {Model: "tiny", Prompt: strings.Repeat("bzz ", 1<<20)},
		"chat": {Model: "tiny", System: strings.Repeat("s", 100_000), Messages: func() []api.ChatMessage {
			var m []api.ChatMessage
			for range 100 {
				m = append(m, api.ChatMessage{Role: "user", Content: strings.Repeat("m", 20_000)})
			}
			return m
		}()},
	}
	for name, args := range cases {
		t.Run(name, func(t *testing.T) {
			raw, _ := json.Marshal(args)
			reply, err := q.submit(ctx, api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}})
			require.NoError(t, err)
			job, err := q.jobs.Get(ctx, reply.JobID)
			require.NoError(t, err)
			enc, _ := json.Marshal(job)
			require.Less(t, len(enc), 4<<10, "the record is small: %d bytes", len(enc))
			require.NotNil(t, job.Prompt)
			require.True(t, job.Prompt.Truncated)
			size := len(args.Prompt) + len(args.System)
			for _, m := range args.Messages {
				size += len(m.Content)
			}
			require.Equal(t, size, job.Prompt.Bytes)
			sum := sha256.Sum256(raw)
			require.Equal(t, hex.EncodeToString(sum[:]), job.Prompt.SHA256)

			full, err := q.request(ctx, reply.JobID)
			require.NoError(t, err)
			require.Equal(t, args, full, "the whole request is stored")
			require.Eventually(t, func() bool {
				for _, r := range w.seen() {
					if r.JobID == reply.JobID {
						return r.Args.Prompt == args.Prompt && len(r.Args.Messages) == len(args.Messages)
					}
				}
				return false
			}, 10*time.Second, 10*time.Millisecond, "the worker got the whole request")
		})
	}
}
