package bus

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
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

// chunkOf is a stored chunk of attempt a: tokens first..last, each text
// the attempt's letter and the index.
func chunkOf(seq uint64, a, first, last int) api.Event {
	text := func(i int) string { return fmt.Sprintf("%c%d ", 'a'+a, i) }
	c := api.Token{Index: first, ID: int32(first), Text: text(first), Attempt: a}
	for i := first + 1; i <= last; i++ {
		c.More, c.MoreIDs = append(c.More, text(i)), append(c.MoreIDs, int32(i))
	}
	return api.Event{Seq: seq, Kind: "token", Token: &c}
}

// admitSplit feeds stored events to o as Follow does: chunks split first.
func admitSplit(o *tokenOrder, evs ...api.Event) string {
	var text strings.Builder
	for _, ev := range evs {
		for _, one := range splitChunk(ev, nil) {
			for _, out := range o.admit(one) {
				if out.Token != nil {
					text.WriteString(out.Token.Text)
				}
			}
		}
	}
	return text.String()
}

func TestSplitChunkGivesEachTokenItsOwnEvent(t *testing.T) {
	ev := chunkOf(7, 2, 5, 8)
	ev.Token.MoreIDs = ev.Token.MoreIDs[:2] // a missing id reads as 0
	got := splitChunk(ev, nil)
	require.Len(t, got, 4)
	for k, one := range got {
		require.Equal(t, uint64(7), one.Seq, "every token carries its chunk's sequence")
		require.Equal(t, api.Token{Index: 5 + k, ID: []int32{5, 6, 7, 0}[k], Text: fmt.Sprintf("c%d ", 5+k), Attempt: 2}, *one.Token)
	}
	lone := api.Event{Seq: 3, Kind: "token", Token: &api.Token{Index: 1, Text: "x"}}
	require.Equal(t, []api.Event{lone}, splitChunk(lone, nil))
	state := api.Event{Seq: 4, Kind: "state", State: &api.StateChange{State: api.JobRunning}}
	require.Equal(t, []api.Event{state}, splitChunk(state, nil))
}

// One token's message reads as it did before chunks; a chunk keeps the
// attempt once per message.
func TestChunkEncoding(t *testing.T) {
	one, err := json.Marshal(chunk([]api.Token{{Index: 3, ID: 7, Text: "x", Attempt: 1}}))
	require.NoError(t, err)
	require.JSONEq(t, `{"i":3,"id":7,"t":"x","a":1}`, string(one))
	many, err := json.Marshal(chunk([]api.Token{{Index: 3, ID: 7, Text: "x", Attempt: 1}, {Index: 4, ID: 8, Text: "y", Attempt: 1}, {Index: 5, ID: 9, Text: "z", Attempt: 1}}))
	require.NoError(t, err)
	require.JSONEq(t, `{"i":3,"id":7,"t":"x","more":["y","z"],"more_ids":[8,9],"a":1}`, string(many))
}

// A resent chunk repeats indices already shown and may overlap later ones:
// each index comes once, in order.
func TestTokenOrderDropsTheCopiesInAResentChunk(t *testing.T) {
	o := tokenOrder{}
	text := admitSplit(&o, chunkOf(1, 1, 0, 3), chunkOf(2, 1, 6, 9), chunkOf(3, 1, 2, 7), chunkOf(4, 1, 0, 9))
	require.Equal(t, "b0 b1 b2 b3 b4 b5 b6 b7 b8 b9 ", text)
}

// A chunk of a stale attempt is dropped whole, and a newer attempt's chunk
// counts from its own index 0.
func TestTokenOrderFencesAStaleAttemptsChunk(t *testing.T) {
	state := func(from, to api.JobState, a int) api.Event {
		return api.Event{Kind: "state", State: &api.StateChange{From: from, State: to, Attempt: a}}
	}
	o := tokenOrder{}
	text := admitSplit(&o,
		state(api.JobQueued, api.JobRunning, 1),
		chunkOf(2, 1, 0, 2),
		state(api.JobRunning, api.JobQueued, 1),
		chunkOf(4, 1, 3, 6), // the given-up worker wakes up
		state(api.JobQueued, api.JobRunning, 2),
		chunkOf(6, 2, 0, 1), chunkOf(7, 1, 7, 9), chunkOf(8, 2, 2, 3),
	)
	require.Equal(t, "b0 b1 b2 c0 c1 c2 c3 ", text)
}

// The creation event is stored without waiting for its acknowledgement, so
// on a cluster it can land after the worker's "running": a follower drops
// it there, and hands it over where it comes first.
func TestALateCreationEventIsDropped(t *testing.T) {
	created := api.Event{Kind: "state", State: &api.StateChange{State: api.JobQueued, Attempt: 0}}
	running := api.Event{Kind: "state", State: &api.StateChange{From: api.JobQueued, State: api.JobRunning, Attempt: 1}}
	o := tokenOrder{}
	require.Len(t, o.admit(created), 1, "a creation event that comes first is shown")
	require.Len(t, o.admit(running), 1)
	o = tokenOrder{}
	require.Len(t, o.admit(running), 1)
	require.Empty(t, o.admit(created), "a creation event after the job's next state says nothing new")
	require.Len(t, o.admit(api.Event{Kind: "token", Token: &api.Token{Index: 0, Attempt: 1}}), 1, "tokens still flow")
}
