package queen_test

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

// A handful of multi-megabyte records used to make every job-list reply
// exceed the bus's max payload, so the queen sent nothing at all. Walking
// the pages must return every job once, newest first, each page within
// the max payload.
func TestJobListPagesStayUnderTheMaxPayload(t *testing.T) {
	_, b := startQueen(t, nil)
	ctx := context.Background()
	max := int(b.NC.MaxPayload())
	require.Positive(t, max)
	store, err := jobs.Open(ctx, b, api.Actor{Component: "test"}, time.Hour)
	require.NoError(t, err)

	// Sizes in units of the max payload: together more than it; one
	// record alone is more than the queen's page budget (half of it) yet
	// small enough to be stored.
	parts := []float64{0.25, 0, 0.3, 0.01, 0.55, 0, 0.2, 0.01}
	var want []string
	total := 0
	for _, p := range parts {
		args, _ := json.Marshal(map[string]string{"pad": strings.Repeat("x", int(p*float64(max)))})
		total += len(args)
		j, err := store.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpNoop, Args: args}})
		require.NoError(t, err)
		want = append(want, j.ID)
	}
	require.Greater(t, total, max, "the records together must exceed the max payload")
	sort.Sort(sort.Reverse(sort.StringSlice(want)))

	var got []string
	shrunk := 0
	req := api.JobListRequest{}
	for pages := 0; ; pages++ {
		require.Less(t, pages, len(parts)+1, "the pages never end")
		body, _ := json.Marshal(req)
		msg, err := b.NC.Request(b.Space.Queen(api.EpJobList), body, 15*time.Second)
		require.NoError(t, err, "page after %q", req.Before)
		require.Empty(t, msg.Header.Get("Nats-Service-Error"))
		require.Less(t, len(msg.Data), max, "page after %q", req.Before)
		var page api.JobListReply
		require.NoError(t, json.Unmarshal(msg.Data, &page))
		for _, j := range page.Jobs {
			got = append(got, j.ID)
			if strings.Contains(string(j.Op.Args), "too large for a job list") {
				shrunk++
			}
		}
		if page.Next == "" {
			break
		}
		req.Before = page.Next
	}
	require.Equal(t, want, got, "every job exactly once, newest first")
	require.Equal(t, 1, shrunk, "only the record larger than a page is shrunk")

	// A limit caps a page; a cursor that is no job id is refused.
	var page api.JobListReply
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpJobList), api.JobListRequest{Limit: 2}, &page))
	require.Len(t, page.Jobs, 2)
	require.Equal(t, want[1], page.Next)
	err = b.Call(ctx, b.Space.Queen(api.EpJobList), api.JobListRequest{Before: "a.b"}, nil)
	require.Equal(t, api.CodeBadRequest, api.CodeOf(err), "%v", err)
}
