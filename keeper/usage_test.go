package keeper

import (
	"bytes"
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"
)

// runApp runs the keeper's command line with its output captured. --nats
// names a port nothing listens on, so a command that got past its checks
// fails as unreachable instead of starting a queen.
func runApp(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	app := App()
	var out, errb bytes.Buffer
	app.Writer, app.ErrWriter = &out, &errb
	full := append([]string{"rbee", "--nats", "nats://127.0.0.1:1"}, args...)
	err = app.Run(interspersed(app, full))
	return out.String(), errb.String(), err
}

// Every usage error is refused before the bus with a usage error (exit 2
// in Main), names the flag or id at fault, and prints nothing on stdout;
// a flag the parser refused also gets the command's help, on stderr, once.
func TestUsageErrorsAreRefusedBeforeTheBus(t *testing.T) {
	cases := []struct {
		args []string
		want []string // key words of the message
		help bool     // the command's help follows on stderr
	}{
		{[]string{"infer", "--temperature", "abc", "hi"}, []string{"--temperature", "number", `"abc"`}, true},
		{[]string{"infer", "--max-tokens", "abc", "hi"}, []string{"--max-tokens", "whole number"}, true},
		{[]string{"infer", "--bogus", "hi"}, []string{"unknown flag --bogus", "rbee infer"}, true},
		{[]string{"--bogus", "status"}, []string{"unknown flag --bogus"}, true},
		{[]string{"jobs", "attach", "--from", "-1", "j1"}, []string{"--from", `"-1"`}, true},
		{[]string{"infer", "--timeout", "abc", "hi"}, []string{"--timeout", "duration"}, true},
		{[]string{"model", "get", "--hive"}, []string{"--hive needs a value"}, true},
		{[]string{"infer", "--timeout", "-1s", "hi"}, []string{"--timeout", "negative"}, false},
		{[]string{"worker", "stop", "--grace", "-5s", "w1"}, []string{"--grace", "negative"}, false},
		{[]string{"infer", "--temperature", "NaN", "hi"}, []string{"--temperature", "finite", "NaN"}, false},
		{[]string{"infer", "--top-p", "Inf", "hi"}, []string{"--top-p", "finite"}, false},
		{[]string{"infer", "--min-p", "-Inf", "hi"}, []string{"--min-p", "finite"}, false},
		{[]string{"infer", "--repeat-penalty", "nan", "hi"}, []string{"--repeat-penalty", "finite"}, false},
		{[]string{"model", "get", "tiny"}, []string{"rbee model get needs --hive"}, false},
		{[]string{"model", "get", "a>b", "--hive", "h1"}, []string{"model id", `"a>b"`}, false},
		{[]string{"model", "delete", "a b", "--hive", "h1"}, []string{"model id"}, false},
		{[]string{"model", "get", "tiny", "--hive", "h.1"}, []string{"hive id"}, false},
		{[]string{"model", "list", "--hive", "a.>"}, []string{"hive id"}, false},
		{[]string{"worker", "spawn", "--hive", "h1", "-m", "a.>"}, []string{"model id"}, false},
		{[]string{"worker", "spawn", "--hive", "h1", "-m", "tiny", "--slots", "-1"}, []string{"--slots"}, false},
		{[]string{"worker", "stop", "w.1"}, []string{"worker id"}, false},
		{[]string{"hive", "get"}, []string{"rbee hive get needs a hive NAME"}, false},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			stdout, stderr, err := runApp(t, c.args...)
			require.Error(t, err)
			require.True(t, errors.Is(err, errUsage) || errors.Is(err, subjects.ErrInvalidID), "a usage error, not: %v", err)
			for _, w := range c.want {
				require.Contains(t, err.Error(), w)
			}
			require.Empty(t, stdout, "nothing on stdout for a usage error")
			require.NotContains(t, stderr, "Incorrect Usage")
			if c.help {
				require.Equal(t, 1, strings.Count(stderr, "USAGE:"), "the help, once, on stderr:\n%s", stderr)
			} else {
				require.Empty(t, stderr)
			}
		})
	}
}

// urfave takes a backquoted word in a flag's usage for its placeholder:
// `--detach` must not render as a flag that takes "rbee jobs attach ID".
func TestHelpSaysWhatFlagsAndArgumentsAre(t *testing.T) {
	stdout, _, err := runApp(t, "infer", "--help")
	require.NoError(t, err)
	require.Regexp(t, regexp.MustCompile(`(?m)^\s+--detach\s+print the job id`), stdout)

	stdout, _, err = runApp(t, "trace", "--help")
	require.NoError(t, err)
	require.Contains(t, stdout, "FILTER, if given, keeps only the lines that contain it")

	app := App()
	var backquoted []string
	var walk func(flags []cli.Flag, cmds []*cli.Command)
	walk = func(flags []cli.Flag, cmds []*cli.Command) {
		for _, f := range flags {
			if df, ok := f.(cli.DocGenerationFlag); ok && !df.TakesValue() && strings.Contains(df.GetUsage(), "`") {
				backquoted = append(backquoted, f.Names()[0])
			}
		}
		for _, c := range cmds {
			walk(c.Flags, c.Subcommands)
		}
	}
	walk(app.Flags, app.Commands)
	require.Empty(t, backquoted, "a switch's usage with backquotes renders as if the switch took a value")
}

// A --timeout that fires cancels the job and reports the timeout only; it
// is not an interruption.
func TestTimeoutEndsTheFollowWithItsOwnMessage(t *testing.T) {
	f := busfix.Start(t)
	cancelled := make(chan string, 1)
	sub, err := f.Bus.NC.Subscribe(f.Bus.Space.Queen(api.EpJobCancel), func(m *nats.Msg) {
		cancelled <- string(m.Data)
		_ = m.Respond([]byte("{}"))
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })

	var out, errb bytes.Buffer
	p := &Printer{Out: &out, Err: &errb}
	s := &Session{Bus: f.Bus}
	ctx, cancel := context.WithTimeoutCause(context.Background(), 300*time.Millisecond, errTimedOut)
	defer cancel()
	_, err = follow(ctx, s, p, "j1", 0, true)
	require.ErrorIs(t, err, errTimedOut)
	require.NotErrorIs(t, err, errInterrupted)
	require.NotContains(t, errb.String(), "interrupted")
	select {
	case req := <-cancelled:
		require.Contains(t, req, `"j1"`)
	case <-time.After(10 * time.Second):
		t.Fatal("the timed-out job was not cancelled")
	}
}

// A call that finds no queen on the bus asks again for a while: a queen
// reconnecting to another server of a cluster is away for about a second.
// Past the grace it is unreachable (exit 3).
func TestCallWaitsOutAQueenThatIsAwayForAMoment(t *testing.T) {
	f := busfix.Start(t)
	s := &Session{Bus: f.Bus}
	go func() {
		time.Sleep(700 * time.Millisecond)
		sub, err := f.Bus.NC.Subscribe(f.Bus.Space.Queen(api.EpJobGet), func(m *nats.Msg) {
			_ = m.Respond([]byte(`{"id":"j1"}`))
		})
		if err == nil {
			t.Cleanup(func() { _ = sub.Unsubscribe() })
		}
	}()
	var j api.Job
	require.NoError(t, call(context.Background(), s, api.EpJobGet, api.JobRequest{ID: "j1"}, &j))
	require.Equal(t, "j1", j.ID)

	start := time.Now()
	err := call(context.Background(), s, api.EpStatus, nil, nil)
	require.ErrorIs(t, err, ErrQueenUnreachable)
	require.Contains(t, err.Error(), "no queen serves it")
	require.GreaterOrEqual(t, time.Since(start), queenAwayGrace)
}
