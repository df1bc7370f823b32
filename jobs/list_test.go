package jobs_test

import (
	"context"
	"encoding/json"
	"sort"
	"strings"
	"testing"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/stretchr/testify/require"
)

// bigArgs is an operation's arguments of about n bytes.
func bigArgs(n int) json.RawMessage {
	b, _ := json.Marshal(map[string]string{"pad": strings.Repeat("x", n)})
	return b
}

// walkPages reads the whole list page by page and checks each page's
// encoded size against budget.
func walkPages(t *testing.T, s *jobs.Store, state api.JobState, limit, budget int) (ids []string, pages []api.JobListReply) {
	t.Helper()
	before := ""
	for range 1000 {
		page, err := s.Page(context.Background(), state, before, limit, budget)
		require.NoError(t, err)
		enc, err := json.Marshal(page)
		require.NoError(t, err)
		require.LessOrEqual(t, len(enc), budget, "page after %q", before)
		for _, j := range page.Jobs {
			ids = append(ids, j.ID)
		}
		pages = append(pages, page)
		if page.Next == "" {
			return ids, pages
		}
		require.NotEmpty(t, page.Jobs, "a page with a cursor holds jobs")
		require.Equal(t, page.Jobs[len(page.Jobs)-1].ID, page.Next)
		before = page.Next
	}
	t.Fatal("the list never ended")
	return nil, nil
}

func TestPagesFitTheBudgetAndCoverEveryJobOnce(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	const budget = 64 << 10
	var want []string
	var huge string
	for i := range 40 {
		size := (i % 7) * 3 << 10 // 0 to 18 KiB
		if i == 17 {
			size = 3 * budget // alone more than a page may hold
		}
		j, err := s.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpNoop, Args: bigArgs(size)}})
		require.NoError(t, err)
		if i == 17 {
			huge = j.ID
			_, err = s.Transition(ctx, j.ID, api.JobRunning, nil)
			require.NoError(t, err)
		}
		want = append(want, j.ID)
	}
	sort.Sort(sort.Reverse(sort.StringSlice(want)))

	ids, pages := walkPages(t, s, "", 0, budget)
	require.Equal(t, want, ids, "every job once, newest first")
	require.Greater(t, len(pages), 3, "the records do not fit one page")
	for _, p := range pages {
		for _, j := range p.Jobs {
			if j.ID == huge {
				require.Equal(t, huge, p.Jobs[0].ID, "a record that needs shrinking starts its page")
				require.Contains(t, string(j.Op.Args), "too large for a job list")
				require.Contains(t, string(j.Op.Args), "rbee jobs get "+huge)
				require.Equal(t, api.JobRunning, j.State, "the rest of the record is intact")
			} else {
				require.False(t, strings.Contains(string(j.Op.Args), "omitted"), "job %s was shrunk but fits a page", j.ID)
			}
		}
	}

	// A limit caps each page; a state filter keeps only matching records.
	ids, pages = walkPages(t, s, "", 5, budget)
	require.Equal(t, want, ids)
	for _, p := range pages {
		require.LessOrEqual(t, len(p.Jobs), 5)
	}
	ids, _ = walkPages(t, s, api.JobRunning, 0, budget)
	require.Equal(t, []string{huge}, ids)
	ids, _ = walkPages(t, s, api.JobQueued, 0, budget)
	require.Len(t, ids, len(want)-1)
}

func TestPageOfAnEmptyListAndPastTheEnd(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	page, err := s.Page(ctx, "", "", 0, 64<<10)
	require.NoError(t, err)
	require.Equal(t, api.JobListReply{Jobs: []api.Job{}}, page)

	j, err := s.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpNoop}})
	require.NoError(t, err)
	page, err = s.Page(ctx, "", "", 1, 64<<10)
	require.NoError(t, err)
	require.Len(t, page.Jobs, 1)
	require.Empty(t, page.Next, "an exactly full last page has no cursor")
	page, err = s.Page(ctx, "", j.ID, 0, 64<<10)
	require.NoError(t, err)
	require.Empty(t, page.Jobs)
	require.Empty(t, page.Next)
}

func TestShrunkRecordKeepsResultAndErrorWithinTheBudget(t *testing.T) {
	s, _ := openStore(t)
	ctx := context.Background()
	const budget = 16 << 10
	j, err := s.Create(ctx, api.Job{ID: jobs.NewID(), Op: api.Operation{Kind: api.OpNoop, Args: bigArgs(budget)}})
	require.NoError(t, err)
	_, err = s.Transition(ctx, j.ID, api.JobRunning, nil)
	require.NoError(t, err)
	_, err = s.Transition(ctx, j.ID, api.JobFailed, func(r *api.Job) {
		r.Result = bigArgs(budget)
		r.Error = strings.Repeat("é", budget)
	})
	require.NoError(t, err)
	ids, pages := walkPages(t, s, "", 0, budget)
	require.Equal(t, []string{j.ID}, ids)
	got := pages[0].Jobs[0]
	require.Contains(t, string(got.Result), "bytes of result")
	require.Contains(t, got.Error, "bytes in all")
}
