package keeper

import (
	"testing"

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
}
