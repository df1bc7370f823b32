package keeper

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/stretchr/testify/require"
)

func TestInterspersedMovesFlagsBeforeArguments(t *testing.T) {
	app := App()
	cases := []struct{ in, want []string }{
		{[]string{"rbee", "hive", "add", "gpu1", "--ssh", "gpu1"}, []string{"rbee", "hive", "add", "--ssh", "gpu1", "--", "gpu1"}},
		{[]string{"rbee", "hive", "get", "gpu1", "--json"}, []string{"rbee", "--json", "hive", "get", "--", "gpu1"}},
		{[]string{"rbee", "--nats", "nats://x", "status"}, []string{"rbee", "--nats", "nats://x", "status"}},
		{[]string{"rbee", "infer", "-m", "tiny", "hello", "world", "--max-tokens", "5"}, []string{"rbee", "infer", "-m", "tiny", "--max-tokens", "5", "--", "hello", "world"}},
		{[]string{"rbee", "infer", "--", "-not-a-flag"}, []string{"rbee", "infer", "--", "-not-a-flag"}},
		{[]string{"rbee", "jobs", "list", "--state=queued"}, []string{"rbee", "jobs", "list", "--state=queued"}},
	}
	for _, c := range cases {
		require.Equal(t, c.want, interspersed(app, c.in), "%v", c.in)
	}
}

func TestExitCodes(t *testing.T) {
	require.Equal(t, ExitUsage, exitCodeOf(usage("x")))
	require.Equal(t, ExitUnreachable, exitCodeOf(ErrQueenUnreachable))
	require.Equal(t, ExitInterrupted, exitCodeOf(errInterrupted))
	require.Equal(t, ExitFailed, exitCodeOf(errors.New("anything else")))

	// The reason an error crossed the bus with decides, whatever its
	// words: what the user asked for wrong is a usage error.
	want := map[api.Reason]int{
		api.ReasonInvalidRequest: ExitUsage, api.ReasonInvalidParam: ExitUsage,
		api.ReasonPromptTooLong: ExitUsage, api.ReasonPayloadTooLarge: ExitUsage,
		api.ReasonNotFound: ExitFailed, api.ReasonConflict: ExitFailed, api.ReasonQueueFull: ExitFailed,
		api.ReasonNoCapacity: ExitFailed, api.ReasonUnavailable: ExitFailed, api.ReasonTimeout: ExitFailed,
		api.ReasonCancelled: ExitFailed, api.ReasonWorkerLost: ExitFailed, api.ReasonInternal: ExitFailed,
	}
	require.ElementsMatch(t, api.Reasons(), slices.Collect(maps.Keys(want)), "every reason has its exit code here")
	for r, code := range want {
		err := api.Fail(r, "p", "invalid p: words that must not matter")
		require.Equal(t, code, exitCodeOf(err), "reason %s", r)
		require.Equal(t, code, exitCodeOf(fmt.Errorf("submit: %w", err)), "reason %s, wrapped", r)
	}
	// An answer with a code only (an older component) has its code's reason.
	require.Equal(t, ExitUsage, exitCodeOf(api.Errorf(api.CodeBadRequest, "bad")))
	require.Equal(t, ExitFailed, exitCodeOf(api.Errorf(api.CodeNotFound, "invalid name")))
}

// TestPromptLargerThanTheBusCarries: a prompt on stdin larger than the
// bus's max payload is refused before anything is sent, with exit 2 and the
// size a prompt may have, instead of exit 1 and a raw "nats: maximum
// payload exceeded".
func TestPromptLargerThanTheBusCarries(t *testing.T) {
	f := busfix.Start(t)
	submits, err := f.Bus.NC.SubscribeSync(f.Bus.Space.Queen(api.EpSubmit))
	require.NoError(t, err)
	t.Cleanup(func() { _ = submits.Unsubscribe() })

	prompt, err := os.Create(filepath.Join(t.TempDir(), "prompt"))
	require.NoError(t, err)
	_, err = prompt.WriteString(strings.Repeat("bzz ", 10<<20/4))
	require.NoError(t, err)
	_, err = prompt.Seek(0, 0)
	require.NoError(t, err)
	stderr, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	require.NoError(t, err)
	oldIn, oldErr := os.Stdin, os.Stderr
	os.Stdin, os.Stderr = prompt, stderr
	t.Cleanup(func() { os.Stdin, os.Stderr = oldIn, oldErr; _ = prompt.Close(); _ = stderr.Close() })

	code := Main([]string{"rbee", "--nats", f.URL, "infer", "-m", "tiny"})
	os.Stdin, os.Stderr = oldIn, oldErr
	out, err := os.ReadFile(stderr.Name())
	require.NoError(t, err)
	require.Equal(t, ExitUsage, code, "%s", out)
	require.Contains(t, string(out), "the prompt is 10.0 MiB")
	require.Contains(t, string(out), "max_payload 8.0 MiB")
	require.Contains(t, string(out), "a prompt must stay below about")
	require.NotContains(t, string(out), "maximum payload exceeded")
	require.NoError(t, f.Bus.NC.Flush())
	_, err = submits.NextMsg(100 * time.Millisecond)
	require.ErrorIs(t, err, nats.ErrTimeout, "nothing was submitted")
}

// A job's end keeps its reason, so the exit code follows it: a parameter
// only the worker could refuse is a usage error, a lost worker a failure.
func TestFinishedJobsExitByTheirReason(t *testing.T) {
	cases := []struct {
		end  api.StateChange
		want int
	}{
		{api.StateChange{State: api.JobCompleted}, ExitOK},
		{api.StateChange{State: api.JobFailed, Reason: api.ReasonInvalidParam, Param: "max_tokens", Error: "invalid max_tokens"}, ExitUsage},
		{api.StateChange{State: api.JobFailed, Reason: api.ReasonPromptTooLong, Error: "too long"}, ExitUsage},
		{api.StateChange{State: api.JobFailed, Reason: api.ReasonWorkerLost, Error: "worker w1 died"}, ExitFailed},
		{api.StateChange{State: api.JobFailed, Error: "no reason given"}, ExitFailed},
		{api.StateChange{State: api.JobCancelled, Reason: api.ReasonCancelled, Error: "cancelled by user"}, ExitFailed},
	}
	for _, c := range cases {
		err := finish(&c.end)
		if c.want == ExitOK {
			require.NoError(t, err)
			continue
		}
		require.Equal(t, c.want, exitCodeOf(err), "%+v", c.end)
		require.Contains(t, err.Error(), c.end.Error)
	}
}
