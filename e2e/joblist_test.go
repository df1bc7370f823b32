package e2e

import (
	"context"
	"encoding/json"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/stretchr/testify/require"
)

// Records that together exceed the bus's max payload used to make `rbee
// jobs list` fail after 15 s. The keeper walks the queen's pages: every
// job comes back once, newest first, and --limit still caps the listing.
func TestJobsListOfRecordsLargerThanTheMaxPayload(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.startQueen()
	b := c.connect()
	ctx := context.Background()
	store, err := jobs.Open(ctx, b, api.Actor{Component: "e2e"}, time.Hour)
	require.NoError(t, err)
	max := int(b.NC.MaxPayload())
	var want []string
	total := 0
	for i := range 12 {
		size := 0
		if i%4 == 0 {
			size = max * 4 / 10 // three of these together pass the max payload
		}
		args, _ := json.Marshal(map[string]string{"pad": strings.Repeat("x", size)})
		total += len(args)
		j, err := store.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpNoop, Args: args}})
		require.NoError(t, err)
		want = append(want, j.ID)
	}
	require.Greater(t, total, max)
	sort.Sort(sort.Reverse(sort.StringSlice(want)))

	r := c.mustRbee("--json", "jobs", "list", "--limit", "0")
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		var j api.Job
		require.NoError(t, json.Unmarshal([]byte(l), &j), "a line of %d bytes", len(l))
		got = append(got, j.ID)
	}
	require.Equal(t, want, got, "every job once, newest first")

	r = c.mustRbee("jobs", "list", "--limit", "5")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	require.Len(t, lines, 6, "a header and five jobs:\n%s", r.stdout)
	for i, l := range lines[1:] {
		require.True(t, strings.HasPrefix(l, want[i]+" "), "row %d is %q, want job %s", i, l, want[i])
	}
}
