package bus_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// tokenText is token i's text: varied lengths, quotes, escapes and
// multi-byte runes, so a chunk's encoding is exercised, not just its count.
func tokenText(i int) string {
	return []string{"a", " the", "\"q\"", "\n", "é", "日本", "\\", " x" + fmt.Sprint(i)}[i%8]
}

// tokenMessages counts the messages stored on job's token subject.
func tokenMessages(t *testing.T, b *bus.Bus, job string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	subject, err := b.Space.JobEvent(job, subjects.EventToken)
	require.NoError(t, err)
	stream, err := b.JS.Stream(ctx, b.Space.JobsStream())
	require.NoError(t, err)
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(subject))
	require.NoError(t, err)
	return int(info.State.Subjects[subject])
}

// storedTokens reads job's token messages straight from the stream, as
// stored (chunks not split), with their sequences.
func storedTokens(t *testing.T, b *bus.Bus, job string) (seqs []uint64, toks []api.Token) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	subject, err := b.Space.JobEvent(job, subjects.EventToken)
	require.NoError(t, err)
	stream, err := b.JS.Stream(ctx, b.Space.JobsStream())
	require.NoError(t, err)
	info, err := stream.Info(ctx)
	require.NoError(t, err)
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		raw, err := stream.GetMsg(ctx, seq)
		require.NoError(t, err)
		if raw.Subject != subject {
			continue
		}
		var tk api.Token
		require.NoError(t, json.Unmarshal(raw.Data, &tk))
		seqs, toks = append(seqs, seq), append(toks, tk)
	}
	return seqs, toks
}

// publishBursts publishes tokens 0..n-1 in bursts of the given sizes (in
// turn), flushing after each, so the stream holds lone tokens and chunks of
// many sizes; then the job's end.
func publishBursts(t *testing.T, b *bus.Bus, job string, n int, bursts ...int) {
	t.Helper()
	ctx := context.Background()
	tp, err := b.Tokens(job)
	require.NoError(t, err)
	t.Cleanup(tp.Close)
	for i, k := 0, 0; i < n; k++ {
		for end := min(n, i+bursts[k%len(bursts)]); i < end; i++ {
			require.NoError(t, tp.Publish(api.Token{Index: i, ID: int32(i), Text: tokenText(i), Attempt: 1}))
		}
		require.NoError(t, tp.Flush(ctx))
	}
	require.NoError(t, b.PublishEvent(ctx, job, subjects.EventState, api.StateChange{State: api.JobCompleted, Attempt: 1}))
}

func wantText(from, n int) string {
	var s strings.Builder
	for i := from; i < n; i++ {
		s.WriteString(tokenText(i))
	}
	return s.String()
}

// followed is what one follower received: every token event, in order.
type followed struct {
	toks []api.Token
	seqs []uint64
	end  bool
}

func (f followed) text() string {
	var s strings.Builder
	for _, tk := range f.toks {
		s.WriteString(tk.Text)
	}
	return s.String()
}

// requireExactly says f saw tokens from..n-1, each once, in order, each
// with its own id and text, one token per event.
func (f followed) requireExactly(t *testing.T, from, n int) {
	t.Helper()
	require.Len(t, f.toks, n-from)
	for k, tk := range f.toks {
		require.Equal(t, from+k, tk.Index, "token order")
		require.Equal(t, int32(from+k), tk.ID)
		require.Equal(t, 1, tk.Attempt)
		require.Empty(t, tk.More, "a follower sees no chunk")
		require.Empty(t, tk.MoreIDs)
	}
	require.Equal(t, wantText(from, n), f.text())
	require.True(t, f.end, "the follow ends with the job")
}

func follow(t *testing.T, b *bus.Bus, job string, from uint64, onEvent func(api.Event)) followed {
	t.Helper()
	f, err := followErr(b, job, from, onEvent)
	require.NoError(t, err)
	return f
}

// followErr is follow for a goroutine of the test: it reports, not fails.
func followErr(b *bus.Bus, job string, from uint64, onEvent func(api.Event)) (followed, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var f followed
	err := b.Follow(ctx, job, from, func(ev api.Event) error {
		if onEvent != nil {
			onEvent(ev)
		}
		switch {
		case ev.Token != nil:
			f.toks, f.seqs = append(f.toks, *ev.Token), append(f.seqs, ev.Seq)
		case ev.Terminal():
			f.end = true
		}
		return nil
	})
	return f, err
}

// A model faster than the bus: tokens that come while a message is in
// flight go out together, so a burst takes far fewer messages than tokens.
func TestTokenPublisherCoalescesABurst(t *testing.T) {
	f := busfix.Start(t)
	const n = 5000
	publishBursts(t, f.Bus, "burst", n, n)
	msgs := tokenMessages(t, f.Bus, "burst")
	require.LessOrEqual(t, msgs, n/20, "%d tokens in %d messages", n, msgs)
	follow(t, f.Bus, "burst", 0, nil).requireExactly(t, 0, n)
}

// A model slower than the bus: each token is acknowledged before the next
// comes, so each goes out alone, at once: the follower sees every token
// before the next is published and before any Flush.
func TestTokenPublisherSendsASlowModelsTokensAlone(t *testing.T) {
	f := busfix.Start(t)
	const n = 30
	follower := busfix.Connect(t, f.URL)
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait) // after cancel: cleanups run last first
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	require.NoError(t, f.Bus.PublishEvent(ctx, "slow", subjects.EventNarration, api.Narration{Human: "start"}))
	seen := make(chan api.Token, n)
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = follower.Follow(ctx, "slow", 0, func(ev api.Event) error {
			if ev.Token != nil {
				seen <- *ev.Token
			}
			return nil
		})
	}()
	tp, err := f.Bus.Tokens("slow")
	require.NoError(t, err)
	t.Cleanup(tp.Close)
	for i := 0; i < n; i++ {
		require.NoError(t, tp.Publish(api.Token{Index: i, ID: int32(i), Text: tokenText(i), Attempt: 1}))
		select {
		case tk := <-seen:
			require.Equal(t, api.Token{Index: i, ID: int32(i), Text: tokenText(i), Attempt: 1}, tk)
		case <-ctx.Done():
			t.Fatalf("token %d was not sent before the next one", i)
		}
	}
	require.NoError(t, tp.Flush(ctx))
	require.NoError(t, f.Bus.PublishEvent(ctx, "slow", subjects.EventState, api.StateChange{State: api.JobCompleted}))
	require.Equal(t, n, tokenMessages(t, f.Bus, "slow"), "one message per token")
}

// Live followers (one, and several on their own connections) and a late
// one replaying the stored stream all reassemble the same text from
// chunks of every size.
func TestChunkedTokensReassembleInEveryFollower(t *testing.T) {
	for _, followers := range []int{1, 4} {
		t.Run(fmt.Sprintf("%d followers", followers), func(t *testing.T) {
			f := busfix.Start(t)
			job := "many"
			const n = 4000
			ctx := context.Background()
			require.NoError(t, f.Bus.PublishEvent(ctx, job, subjects.EventNarration, api.Narration{Human: "start"}))
			got := make([]followed, followers)
			errs := make([]error, followers)
			var ready, done sync.WaitGroup
			t.Cleanup(done.Wait)
			for i := range got {
				b := busfix.Connect(t, f.URL)
				ready.Add(1)
				done.Add(1)
				go func() {
					defer done.Done()
					once := sync.OnceFunc(ready.Done)
					defer once()
					got[i], errs[i] = followErr(b, job, 0, func(ev api.Event) {
						if ev.Narration != nil {
							once() // attached: what follows is live
						}
					})
				}()
			}
			ready.Wait()
			publishBursts(t, f.Bus, job, n, 1, 700, 3, 2500, 40)
			done.Wait()
			msgs := tokenMessages(t, f.Bus, job)
			require.Less(t, msgs, n/10, "the bursts are chunked")
			for i, g := range got {
				require.NoError(t, errs[i])
				g.requireExactly(t, 0, n)
			}
			follow(t, f.Bus, job, 0, nil).requireExactly(t, 0, n)
		})
	}
}

// A resume from the sequence of a chunk in the middle of the stream yields
// every token from that chunk's first index on, once; all the tokens of a
// chunk carry its sequence.
func TestResumeFromTheMiddleOfAChunk(t *testing.T) {
	f := busfix.Start(t)
	const n = 3000
	publishBursts(t, f.Bus, "mid", n, 600)
	seqs, stored := storedTokens(t, f.Bus, "mid")
	mid := -1
	for k := len(stored) / 2; k < len(stored); k++ {
		if stored[k].Len() > 1 {
			mid = k
			break
		}
	}
	require.NotEqual(t, -1, mid, "a chunk past the middle of the stream")
	chunk := stored[mid]
	got := follow(t, busfix.Connect(t, f.URL), "mid", seqs[mid], nil)
	got.requireExactly(t, chunk.Index, n)
	for k := 0; k < chunk.Len(); k++ {
		require.Equal(t, seqs[mid], got.seqs[k], "token %d came in the chunk at %d", chunk.Index+k, seqs[mid])
	}
}

// A follower that stops amid a chunk still gets the chunk's other tokens,
// so resuming after the Seq of the last event it saw misses nothing and
// repeats nothing.
func TestStopAmidAChunkThenResumeAfterIt(t *testing.T) {
	f := busfix.Start(t)
	const n = 3000
	publishBursts(t, f.Bus, "stop", n, 900)
	_, stored := storedTokens(t, f.Bus, "stop")
	var stopAt int // an index inside a chunk, not its last
	for _, tk := range stored {
		if tk.Index > n/3 && tk.Len() > 2 {
			stopAt = tk.Index + 1
			break
		}
	}
	require.NotZero(t, stopAt)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	var first followed
	var last uint64
	require.NoError(t, f.Bus.Follow(ctx, "stop", 0, func(ev api.Event) error {
		last = ev.Seq
		if ev.Token == nil {
			return nil
		}
		first.toks = append(first.toks, *ev.Token)
		if ev.Token.Index == stopAt {
			return bus.ErrFollowEnded
		}
		return nil
	}))
	require.Greater(t, len(first.toks), stopAt+1, "the chunk's rest came after the stop")
	rest := follow(t, busfix.Connect(t, f.URL), "stop", last+1, nil)
	all := followed{toks: append(first.toks, rest.toks...), end: rest.end}
	all.requireExactly(t, 0, n)
}

// A resent chunk may repeat indices already stored, and land behind later
// ones: each index is still delivered once, in order.
func TestFollowSplitsChunksThatRepeatIndices(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	subject, err := f.Bus.Space.JobEvent("resent", subjects.EventToken)
	require.NoError(t, err)
	chunk := func(first, last int) api.Token {
		c := api.Token{Index: first, ID: int32(first), Text: fmt.Sprintf("t%d ", first)}
		for i := first + 1; i <= last; i++ {
			c.More, c.MoreIDs = append(c.More, fmt.Sprintf("t%d ", i)), append(c.MoreIDs, int32(i))
		}
		return c
	}
	for _, c := range []api.Token{chunk(0, 3), chunk(2, 6), chunk(9, 11), chunk(5, 8), chunk(1, 2), chunk(10, 10)} {
		data, err := json.Marshal(c)
		require.NoError(t, err)
		_, err = f.Bus.JS.Publish(ctx, subject, data)
		require.NoError(t, err)
	}
	require.NoError(t, f.Bus.PublishEvent(ctx, "resent", subjects.EventState, api.StateChange{State: api.JobCompleted}))
	got := follow(t, f.Bus, "resent", 0, nil)
	var idx []int
	for _, tk := range got.toks {
		idx = append(idx, tk.Index)
		require.Equal(t, int32(tk.Index), tk.ID)
	}
	require.Equal(t, []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, idx)
	require.Equal(t, "t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 ", got.text())
}

// The bus restarts while chunks are in flight and while tokens wait: what
// a reconnect lost is sent again, and every follower still sees each token
// once, in order.
func TestTokenPublisherRidesOutARestart(t *testing.T) {
	dir := t.TempDir()
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: dir, Listen: "127.0.0.1:-1", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(func() { srv.Shutdown() })
	u, err := url.Parse(srv.ClientURL())
	require.NoError(t, err)
	b := busfix.Connect(t, srv.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	require.NoError(t, b.EnsureStreams(ctx, bus.DefaultRetention()))
	tp, err := b.Tokens("restart")
	require.NoError(t, err)
	t.Cleanup(tp.Close)
	publish := func(from, to int) {
		for i := from; i < to; i++ {
			require.NoError(t, tp.Publish(api.Token{Index: i, ID: int32(i), Text: tokenText(i), Attempt: 1}))
		}
	}
	const n = 4000
	publish(0, 1000)
	srv.Shutdown()
	publish(1000, 3000)
	srv, err = bus.StartServer(bus.ServerConfig{DataDir: dir, Listen: u.Host, Log: zerolog.Nop()})
	require.NoError(t, err)
	publish(3000, n)
	require.NoError(t, tp.Flush(ctx))
	require.NoError(t, b.PublishEvent(ctx, "restart", subjects.EventState, api.StateChange{State: api.JobCompleted}))
	got := follow(t, busfix.Connect(t, srv.ClientURL()), "restart", 0, nil)
	got.requireExactly(t, 0, n)
}

// A bus that does not come back: Flush gives up when its context ends,
// stopping the publisher, and later tokens are refused rather than lost.
func TestTokenPublisherFlushGivesUpWithItsContext(t *testing.T) {
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(srv.Shutdown)
	b := busfix.Connect(t, srv.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	require.NoError(t, b.EnsureStreams(ctx, bus.DefaultRetention()))
	tp, err := b.Tokens("gone")
	require.NoError(t, err)
	t.Cleanup(tp.Close)
	require.NoError(t, tp.Publish(api.Token{Index: 0, Text: "a"}))
	srv.Shutdown()
	for i := 1; i < 100; i++ {
		require.NoError(t, tp.Publish(api.Token{Index: i, Text: "b"}))
	}
	fctx, fcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer fcancel()
	start := time.Now()
	require.ErrorIs(t, tp.Flush(fctx), context.DeadlineExceeded)
	require.Less(t, time.Since(start), 3*time.Second)
	require.Error(t, tp.Publish(api.Token{Index: 100, Text: "c"}))
}

// A held publisher stores nothing until Release, and never makes its
// generation wait: the tokens made meanwhile go out together when it is
// released, and the followers see them as if sent one by one.
func TestTokenPublisherHoldsTokensUntilReleased(t *testing.T) {
	f := busfix.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	tp, err := f.Bus.Tokens("held")
	require.NoError(t, err)
	t.Cleanup(tp.Close)
	tp.Hold()
	const n = 50
	for i := 0; i < n; i++ {
		require.NoError(t, tp.Publish(api.Token{Index: i, ID: int32(i), Text: tokenText(i), Attempt: 1}))
	}
	require.ErrorContains(t, tp.Flush(ctx), "never released", "a held publisher has stored nothing to flush")
	require.Zero(t, tokenMessages(t, f.Bus, "held"), "nothing is sent while held")
	tp.Release()
	const more = 20
	for i := n; i < n+more; i++ {
		require.NoError(t, tp.Publish(api.Token{Index: i, ID: int32(i), Text: tokenText(i), Attempt: 1}))
	}
	require.NoError(t, tp.Flush(ctx))
	_, stored := storedTokens(t, f.Bus, "held")
	require.Equal(t, 0, stored[0].Index)
	require.Len(t, stored[0].More, n-1, "what was held goes out as one chunk")
	require.NoError(t, f.Bus.PublishEvent(ctx, "held", subjects.EventState, api.StateChange{State: api.JobCompleted, Attempt: 1}))
	follow(t, f.Bus, "held", 0, nil).requireExactly(t, 0, n+more)
}

// A held publisher closed before its release (the job was not the
// worker's) drops what it held: nothing is ever stored, and the
// generation's next token is refused, which stops it.
func TestTokenPublisherClosedWhileHeldSendsNothing(t *testing.T) {
	f := busfix.Start(t)
	tp, err := f.Bus.Tokens("notours")
	require.NoError(t, err)
	tp.Hold()
	for i := 0; i < 5; i++ {
		require.NoError(t, tp.Publish(api.Token{Index: i, Text: "x", Attempt: 1}))
	}
	tp.Close()
	tp.Release() // too late: nothing goes out
	require.Error(t, tp.Publish(api.Token{Index: 5, Text: "x", Attempt: 1}))
	require.Zero(t, tokenMessages(t, f.Bus, "notours"))
}
