package bus

import (
	"slices"
	"testing"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

func tok(i int) api.Event { return api.Event{Kind: "token", Token: &api.Token{Index: i}} }

func indices(evs []api.Event) []int {
	var out []int
	for _, ev := range evs {
		if ev.Token != nil {
			out = append(out, ev.Token.Index)
		}
	}
	return out
}

func TestTokenOrderResumedStartsAtFirstSeen(t *testing.T) {
	o := tokenOrder{resumed: true}
	var got []api.Event
	for _, i := range []int{40, 42, 41, 40, 43} {
		got = append(got, o.admit(tok(i))...)
	}
	require.Equal(t, []int{40, 41, 42, 43}, indices(got))
}

func TestTokenOrderTerminalReleasesWhatWaits(t *testing.T) {
	o := tokenOrder{}
	got := slices.Clone(o.admit(tok(0))) // admit reuses its slice
	got = append(got, o.admit(tok(3))...)
	got = append(got, o.admit(tok(2))...)
	require.Equal(t, []int{0}, indices(got))
	end := o.admit(api.Event{Kind: "state", State: &api.StateChange{State: api.JobCompleted}})
	require.Equal(t, []int{2, 3}, indices(end))
	require.True(t, end[len(end)-1].Terminal())
}

func TestTokenOrderGivesUpAGapThatNeverFills(t *testing.T) {
	o := tokenOrder{}
	var got []api.Event
	for i := 10; i < 10+maxHeldTokens+5; i++ {
		got = append(got, o.admit(tok(i))...)
	}
	idx := indices(got)
	require.Len(t, idx, maxHeldTokens+5)
	for n, i := range idx {
		require.Equal(t, 10+n, i)
	}
}
