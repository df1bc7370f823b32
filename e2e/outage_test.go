package e2e

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/stretchr/testify/require"
)

// killQueen ends the local queen, and with it the bus it embeds, without
// a goodbye.
func (c *cluster) killQueen() {
	c.t.Helper()
	b, err := os.ReadFile(cliutil.QueenPIDFile(c.home))
	require.NoError(c.t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(c.t, err)
	require.NoError(c.t, syscall.Kill(pid, syscall.SIGKILL))
}

// lastSeq replays a finished job and returns the stream sequence of its
// last (terminal) event.
func (c *cluster) lastSeq(id string) uint64 {
	c.t.Helper()
	evs := parseEvents(c.t, c.rbee("--json", "jobs", "attach", id).stdout)
	require.NotEmpty(c.t, evs)
	last := evs[len(evs)-1]
	require.True(c.t, last.Terminal(), "the replay ends with the terminal event: %+v", last)
	return last.Seq
}

// A keeper that crashed right after a job's last event resumes past it:
// the attach ends at once with the job's outcome instead of hanging.
func TestAttachFromPastTheEndOfAFinishedJobEndsAtOnce(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.readyHive(map[string]string{"tiny": "tiny"})
	completed := jobIDFrom(t, c.mustRbee("infer", "-m", "tiny", "--max-tokens", "5", "hello").stderr)
	failed := c.failedOnItsWorker("tiny").ID

	cases := []struct {
		name, id string
		code     int
		says     string
	}{
		{"completed", completed, 0, "tokens, first token"},
		{"failed", failed, 1, "job failed: "},
	}
	for _, tc := range cases {
		end := c.lastSeq(tc.id)
		for _, from := range []uint64{end + 1, end + 1000} {
			start := time.Now()
			r := c.rbeeWithin(15*time.Second, "jobs", "attach", tc.id, "--from", fmt.Sprint(from))
			require.Equal(t, tc.code, r.code, "%s job, --from %d: %s", tc.name, from, r.stderr)
			require.Contains(t, r.stderr, tc.says)
			require.Empty(t, r.stdout, "nothing past the end is shown again")
			require.Less(t, time.Since(start), 5*time.Second, "attach past the end returns at once")
		}
		// --json shows the terminal state itself.
		r := c.rbeeWithin(15*time.Second, "--json", "jobs", "attach", tc.id, "--from", fmt.Sprint(end+1))
		evs := parseEvents(t, r.stdout)
		require.Len(t, evs, 1, r.stdout)
		require.True(t, evs[0].Terminal())
		require.Equal(t, end, evs[0].Seq)
	}
}

var reattach = regexp.MustCompile("re-attach with `rbee jobs attach (\\S+) --from (\\d+)`")

// During an outage the keeper says once that the bus is gone, and after
// --reconnect-timeout gives up with exit 3 and the command that resumes
// where it stopped. The job's own fate across the outage is not the
// keeper's to tell here.
func TestKeeperGivesUpOnALostBusWithTheCommandToReattach(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	requireLongGreedy(t)
	c.readyHive(map[string]string{"large": "large"})
	k := c.start(longInfer("--reconnect-timeout", "3s")...)
	eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	id := k.jobID(t)

	c.killQueen()
	killed := time.Now()
	lost := fmt.Sprintf("[rbee] lost the bus at %s; reconnecting (giving up after 3s, --reconnect-timeout)", c.url())
	eventually(t, 5*time.Second, func() bool { return strings.Contains(k.stderr.String(), lost) }, "the keeper did not say it lost the bus")
	require.Equal(t, 3, k.wait(t, 15*time.Second), k.stderr.String())
	took := time.Since(killed)
	require.GreaterOrEqual(t, took, 3*time.Second, "the keeper waited out --reconnect-timeout")
	require.Less(t, took, 8*time.Second, "and gave up soon after it")

	stderr := k.stderr.String()
	require.Equal(t, 1, strings.Count(stderr, "lost the bus at"), "said once per outage:\n%s", stderr)
	require.NotContains(t, stderr, "reconnected")
	require.Contains(t, stderr, fmt.Sprintf("rbee: lost the bus for 3s; job %s may still be running", id))
	m := reattach.FindStringSubmatch(stderr)
	require.NotNil(t, m, "a re-attach command in:\n%s", stderr)
	require.Equal(t, id, m[1])
	from, err := strconv.ParseUint(m[2], 10, 64)
	require.NoError(t, err)
	require.Greater(t, from, uint64(1), "it resumes past the events already shown")
}

// A bus that comes back in time: the keeper says so once and goes on
// following (here until Ctrl-C; whether the job itself survives the
// queen's restart is another test's business).
func TestKeeperSaysOnceThatTheBusIsBack(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	requireLongGreedy(t)
	c.readyHive(map[string]string{"large": "large"})
	k := c.start(longInfer("--reconnect-timeout", "60s")...)
	eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	id := k.jobID(t)

	c.killQueen()
	eventually(t, 5*time.Second, func() bool { return strings.Contains(k.stderr.String(), "[rbee] lost the bus at") }, "the keeper did not say it lost the bus")
	c.startQueen()
	back := fmt.Sprintf("[rbee] reconnected; following job %s again", id)
	eventually(t, 30*time.Second, func() bool { return strings.Contains(k.stderr.String(), back) }, "the keeper did not say the bus is back:\n%s", k.stderr.String())
	select {
	case <-k.done:
		// The job may have ended meanwhile, but not for want of the bus.
		require.NotEqual(t, 3, k.cmd.ProcessState.ExitCode(), k.stderr.String())
	default:
		require.NoError(t, k.cmd.Process.Signal(syscall.SIGINT))
		k.wait(t, 15*time.Second)
	}
	stderr := k.stderr.String()
	require.Equal(t, 1, strings.Count(stderr, "lost the bus at"), stderr)
	require.Equal(t, 1, strings.Count(stderr, "reconnected;"), stderr)
	require.NotContains(t, stderr, "lost the bus for")
}

// A negative --reconnect-timeout is a usage error, before anything runs.
func TestNegativeReconnectTimeoutIsAUsageError(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	for _, args := range [][]string{
		{"infer", "--reconnect-timeout", "-1s", "hello"},
		{"jobs", "attach", "--reconnect-timeout=-5m", "job1"},
	} {
		r := c.rbee(args...)
		require.Equal(t, 2, r.code, "%v: %s", args, r.stderr)
		require.Contains(t, r.stderr, "--reconnect-timeout must not be negative")
	}
}
