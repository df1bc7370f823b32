package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

func TestQueenStartStatusStop(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	r := c.mustRbee("queen", "start")
	require.Contains(t, r.stdout, "queen started")
	// Starting again finds the running one.
	r = c.mustRbee("queen", "start")
	require.Contains(t, r.stderr, "already running")
	r = c.mustRbee("queen", "status")
	require.Contains(t, r.stdout, "is running")
	r = c.mustRbee("--json", "status")
	var st api.Status
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &st))
	require.NotEmpty(t, st.Version)
	c.mustRbee("queen", "stop")
	r = c.rbee("queen", "status")
	require.Equal(t, 3, r.code, r.stderr)
}

func TestUnreachableQueenFailsFastWithExit3(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	start := time.Now()
	r := c.rbee("--nats", "nats://127.0.0.1:1", "jobs", "list")
	require.Equal(t, 3, r.code)
	require.Contains(t, r.stderr, "queen unreachable")
	require.Less(t, time.Since(start), 2*time.Second)
	// Without --nats and without a queen, read-only status commands that
	// must not start one say so too.
	r = c.rbee("queen", "status")
	require.Equal(t, 3, r.code)
	require.Contains(t, r.stderr, "rbee queen start")
}

func TestHiveInventoryAddListRemove(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.startQueen()
	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "add", "gpu1", "--ssh", "bob@127.0.0.1:2222")
	r := c.rbee("hive", "add", "gpu1")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "already exists")

	r = c.mustRbee("hive", "list")
	require.Contains(t, r.stdout, "local")
	require.Contains(t, r.stdout, "ssh://bob@127.0.0.1:2222")

	r = c.mustRbee("--json", "hive", "list")
	names := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(r.stdout))
	for sc.Scan() {
		var v api.HiveView
		require.NoError(t, json.Unmarshal(sc.Bytes(), &v), sc.Text())
		names[v.Name] = v.State
	}
	require.Equal(t, map[string]string{"local": "offline", "gpu1": "offline"}, names)

	c.mustRbee("hive", "remove", "gpu1")
	r = c.rbee("hive", "get", "gpu1")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "not in the inventory")

	// The inventory survives a queen restart (it lives in JetStream).
	c.mustRbee("queen", "stop")
	c.startQueen()
	r = c.mustRbee("hive", "list")
	require.Contains(t, r.stdout, "local")
	require.NotContains(t, r.stdout, "gpu1")
}

func TestInvalidIDsAreRefusedWithExit2AndNothingIsWritten(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.startQueen()
	for _, bad := range []string{"a.b", "x>", "*", "a b"} {
		r := c.rbee("hive", "add", bad)
		require.Equal(t, 2, r.code, "hive add %q: %s", bad, r.stderr)
		require.Contains(t, r.stderr, "hive id")
		r = c.rbee("jobs", "get", bad)
		require.Equal(t, 2, r.code, "jobs get %q: %s", bad, r.stderr)
	}
	b := c.connect()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := b.KV(ctx, b.Space.InventoryBucket())
	require.NoError(t, err)
	keys, err := kv.ListKeys(ctx)
	require.NoError(t, err)
	var n int
	for range keys.Keys() {
		n++
	}
	require.Zero(t, n, "nothing may be written for an invalid id")
}

func TestJSONJobsListIsNDJSON(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.startQueen()
	b := c.connect()
	// Three jobs through the real submit path.
	for i := 0; i < 3; i++ {
		var reply api.SubmitReply
		require.NoError(t, b.Call(context.Background(), b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpNoop}}, &reply))
	}
	eventually(t, 10*time.Second, func() bool {
		r := c.mustRbee("--json", "jobs", "list", "--state", "completed")
		return strings.Count(r.stdout, "\n") == 3
	}, "three completed jobs")
	r := c.mustRbee("--json", "jobs", "list")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	require.Len(t, lines, 3)
	for _, l := range lines {
		var j api.Job
		require.NoError(t, json.Unmarshal([]byte(l), &j), l)
		require.Equal(t, api.JobCompleted, j.State)
	}
	// Attach replays a finished job to its end.
	r = c.mustRbee("--json", "jobs", "attach", lastJob(t, lines))
	require.Contains(t, r.stdout, `"state":"completed"`)
}

func lastJob(t *testing.T, lines []string) string {
	var j api.Job
	require.NoError(t, json.Unmarshal([]byte(lines[0]), &j))
	return j.ID
}

func TestEphemeralQueenIsStartedAndStopped(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	r := c.mustRbee("hive", "add", "local")
	require.Contains(t, r.stdout, "added")
	// The queen it started is gone again...
	r = c.rbee("queen", "status")
	require.Equal(t, 3, r.code)
	// ...and what it wrote is still there for the next one.
	r = c.mustRbee("hive", "list")
	require.Contains(t, r.stdout, "local")
}
