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

// A worker given up (paused, cut off) may publish after the job moved on:
// once the state events say the job was retried, or a newer attempt runs,
// the stale attempt's tokens are not shown, whatever their index, and the
// new attempt is counted from its own index 0.
func TestTokenOrderFencesStaleAttempts(t *testing.T) {
	attemptTok := func(a, i int) api.Event {
		return api.Event{Kind: "token", Token: &api.Token{Index: i, Attempt: a, Text: string(rune('a' + a))}}
	}
	state := func(from, to api.JobState, a int) api.Event {
		return api.Event{Kind: "state", State: &api.StateChange{From: from, State: to, Attempt: a}}
	}
	cases := []struct {
		name   string
		events []api.Event
		want   string
	}{
		{"retry before any token", []api.Event{
			state(api.JobQueued, api.JobRunning, 1),
			state(api.JobRunning, api.JobQueued, 1),
			attemptTok(1, 0), // the paused worker wakes up
			state(api.JobQueued, api.JobRunning, 2),
			attemptTok(2, 0), attemptTok(1, 1), attemptTok(2, 1), attemptTok(1, 99999999),
		}, "cc"},
		{"newer attempt seen only by its running event", []api.Event{
			state(api.JobQueued, api.JobRunning, 2),
			attemptTok(1, 0), attemptTok(2, 0), attemptTok(2, 1),
		}, "cc"},
		{"tokens without an attempt are never fenced", []api.Event{
			state(api.JobQueued, api.JobRunning, 1),
			attemptTok(0, 0), attemptTok(0, 1),
		}, "aa"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := tokenOrder{}
			var text string
			for _, ev := range c.events {
				for _, out := range o.admit(ev) {
					if out.Token != nil {
						text += out.Token.Text
					}
				}
			}
			require.Equal(t, c.want, text)
		})
	}
}
