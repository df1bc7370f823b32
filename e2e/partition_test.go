package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/tcpproxy"
	"github.com/stretchr/testify/require"
)

// A partition: two hives behind NAT, each joined to the hub through its own
// leaf link, a job streaming on each; one hive is cut off from the queen
// for 10 s. Its job fails saying which worker or hive was lost (or is
// placed again and completes with its own answer); after the heal it
// registers again, once; the other hive's job goes on undisturbed to its
// own answer, and that hive is never lost.
//
// The partition is a loopback TCP proxy on each hive's leaf link, not
// network namespaces: a proxy cut is the same thing to every program (the
// link drops and redials fail until the heal) and needs no root.
func TestPartitionOfOneHiveLeavesTheOtherUndisturbed(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	hub := c.startLeafHub("east", "west")
	c.startHubQueen()
	said := c.watchClusterNarration()
	proxies := map[string]*tcpproxy.Proxy{}
	for _, h := range []string{"east", "west"} {
		p, err := tcpproxy.Listen(hub.leafAddr)
		require.NoError(t, err)
		t.Cleanup(func() { _ = p.Close() })
		proxies[h] = p
		c.startLeafHive(h, p)
		// A model of each hive's own (the same weights under two names):
		// requests wait in one work queue per model, which any hive's
		// worker of that model takes from, and each job must run where
		// the test means it to.
		c.mustRbee("model", "synth", "--hive", h, "--size", "large", "large-"+h)
		c.mustRbee("worker", "spawn", "--hive", h, "-m", "large-"+h)
	}

	longOn := func(h string) []string {
		return []string{"infer", "-m", "large-" + h, "--temperature", "0", "--max-tokens", fmt.Sprint(longTokens), longPrompt}
	}
	east := c.start(longOn("east")...)
	west := c.start(longOn("west")...)
	for _, k := range []*runningKeeper{east, west} {
		eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
	}
	from := said.mark()
	proxies["east"].Cut()
	time.Sleep(10 * time.Second)
	proxies["east"].Heal()

	require.Equal(t, 0, west.wait(t, 3*time.Minute), west.stderr.String())
	require.Equal(t, longGreedy.text+"\n", west.stdout.String(), "the other hive's job has its own answer")
	westJob := c.job(west.jobID(t))
	require.Equal(t, api.JobCompleted, westJob.State)
	require.Equal(t, 1, westJob.Attempts, "it ran once, where it started")

	code := east.wait(t, 2*time.Minute)
	t.Logf("the cut-off hive's job: exit %d: %s", code, lastLine(east.stderr.String()))
	eastJob := c.job(east.jobID(t))
	if code == 0 {
		require.Equal(t, longGreedy.text+"\n", east.stdout.String(), "a job placed again has its own answer")
		require.Equal(t, api.JobCompleted, eastJob.State)
	} else {
		require.Equal(t, 1, code, east.stderr.String())
		require.Equal(t, api.JobFailed, eastJob.State)
		require.Regexp(t, `(worker \S+ on hive east|hive east) was lost`, eastJob.Error, "the failure names what was lost")
		require.Contains(t, east.stderr.String(), eastJob.Error[:min(len(eastJob.Error), 40)], "the keeper was told why")
	}

	eventually(t, 30*time.Second, func() bool { return said.count(from, "hive east is online") >= 1 }, "the queen did not see hive east back:\n%s", said.since(from))
	time.Sleep(2 * time.Second) // for a second loss or return to show, were there one
	require.Equal(t, 1, said.count(from, "hive east lost"), "lost once:\n%s", said.since(from))
	require.Equal(t, 1, said.count(from, "hive east is online"), "registered again once:\n%s", said.since(from))
	require.Zero(t, said.count(from, "hive west"), "the other hive was neither lost nor re-registered:\n%s", said.since(from))
	c.requireOneEntry("east", "online")
	c.requireOneEntry("west", "online")
}
