package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/internal/proc"
	"github.com/stretchr/testify/require"
)

// Every mistake a person can type gets a clear answer from the real rbee
// binary: the exit status the README promises (2 for usage, 1 for a name
// that is valid but unknown), a message that names what is wrong, nothing
// on stdout (help for an error goes to stderr, once), and no job.
func TestCLIMistakesGetClearAnswersAndMakeNoJob(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.startQueen()
	cases := []struct {
		args []string
		code int
		want []string // key words of stderr
		help bool     // the command's help is on stderr, once
	}{
		{[]string{"infer", "--temperature", "abc", "hello"}, 2, []string{"--temperature", "number", `"abc"`}, true},
		{[]string{"infer", "--max-tokens", "abc", "hello"}, 2, []string{"--max-tokens", "whole number"}, true},
		{[]string{"infer", "--no-such-flag", "hello"}, 2, []string{"unknown flag --no-such-flag"}, true},
		{[]string{"--no-such-flag", "status"}, 2, []string{"unknown flag --no-such-flag"}, true},
		{[]string{"jobs", "attach", "--from", "-1", "job1"}, 2, []string{"--from", `"-1"`}, true},
		{[]string{"infer", "--timeout", "-1s", "hello"}, 2, []string{"--timeout", "negative"}, false},
		{[]string{"infer", "--temperature", "NaN", "hello"}, 2, []string{"--temperature", "finite", "NaN"}, false},
		{[]string{"infer", "--top-p", "Inf", "hello"}, 2, []string{"--top-p", "finite"}, false},
		{[]string{"infer", "--min-p", "-Inf", "hello"}, 2, []string{"--min-p", "finite"}, false},
		{[]string{"infer", "--max-tokens", "0", "hello"}, 2, []string{"--max-tokens"}, false},
		{[]string{"model", "get", "a.>", "--hive", "local"}, 2, []string{"model id", `"a.>"`}, false},
		{[]string{"model", "delete", "a b", "--hive", "local"}, 2, []string{"model id"}, false},
		{[]string{"model", "get", "tiny"}, 2, []string{"needs --hive"}, false},
		{[]string{"worker", "spawn", "--hive", "local", "-m", "a.>"}, 2, []string{"model id"}, false},
		{[]string{"worker", "stop", "a.>"}, 2, []string{"worker id"}, false},
		{[]string{"worker", "stop", "nosuch"}, 1, []string{"worker nosuch is unknown"}, false},
		{[]string{"model", "list", "--hive", "nosuch"}, 1, []string{"hive nosuch is unknown"}, false},
	}
	for _, tc := range cases {
		r := c.rbeeWithin(30*time.Second, tc.args...)
		what := strings.Join(tc.args, " ")
		require.Equal(t, tc.code, r.code, "rbee %s\nstdout:\n%s\nstderr:\n%s", what, r.stdout, r.stderr)
		for _, w := range tc.want {
			require.Contains(t, r.stderr, w, "rbee %s", what)
		}
		require.Empty(t, r.stdout, "rbee %s: nothing on stdout for a mistake", what)
		require.NotContains(t, r.stderr, "Incorrect Usage", "rbee %s", what)
		helps := strings.Count(r.stderr, "USAGE:")
		if tc.help {
			require.Equal(t, 1, helps, "rbee %s: the help once, on stderr:\n%s", what, r.stderr)
		} else {
			require.Zero(t, helps, "rbee %s: no help for a mistake the message explains:\n%s", what, r.stderr)
		}
		jobs := c.mustRbee("--json", "jobs", "list")
		require.Empty(t, strings.TrimSpace(jobs.stdout), "rbee %s made a job", what)
	}
}

// A queen started for one command (none was running) has not heard yet from
// the hives that outlived the last one and are reconnecting to its bus. It
// must not report them offline, nor take them for stopped: `hive list`
// shows the running hive online, and `hive stop` stops it instead of saying
// "not running; nothing to stop" with exit 0. A hive that left before the
// queen started is shown as never seen since, not with an age computed
// from a zero time and blank facts.
func TestEphemeralQueenKnowsWhoIsAliveBeforeItAnswers(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.startQueen()
	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "start", "local")
	pid := c.hiveView("local").Status.PID
	require.NotZero(t, pid)
	c.killQueen()
	// Down past the entries' 3 s TTL, so what the next queen reads says
	// nothing of the hive, which is alive and reconnecting meanwhile.
	time.Sleep(4 * time.Second)

	r := c.mustRbee("hive", "list")
	require.Regexp(t, `(?m)^local\s+online\s`, r.stdout, "the running hive is online, not offline")

	// Again past the TTL since the last queen saw the hive.
	time.Sleep(4 * time.Second)
	r = c.mustRbee("hive", "stop", "local")
	require.NotContains(t, r.stderr, "nothing to stop")
	require.Contains(t, r.stderr, "hive local stopped")
	require.False(t, proc.Alive(pid), "the hive's process is gone")

	r = c.mustRbee("hive", "list")
	require.Contains(t, r.stdout, "never since the queen started")
	require.NotContains(t, r.stdout, "2562047h")
	r = c.mustRbee("hive", "get", "local")
	require.Contains(t, r.stdout, "never seen since the queen started")
	require.NotContains(t, r.stdout, ": /")
}
