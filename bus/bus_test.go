package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

func publishJob(t *testing.T, b *bus.Bus, job string, tokens int, terminal bool) {
	t.Helper()
	publishJobFrom(t, b, job, 0, tokens, terminal)
}

// publishJobFrom publishes tokens first..first+tokens-1: a job never reuses
// a token index, and the stream drops a repeated one as a duplicate.
func publishJobFrom(t *testing.T, b *bus.Bus, job string, first, tokens int, terminal bool) {
	t.Helper()
	ctx := context.Background()
	n := b.Narrator(api.Actor{Component: "test"}, "", "")
	require.NoError(t, n.Narrate(ctx, api.Narration{JobID: job, Action: "start", Human: "starting"}))
	tp, err := b.Tokens(job)
	require.NoError(t, err)
	for i := first; i < first+tokens; i++ {
		require.NoError(t, tp.Publish(api.Token{Index: i, Text: fmt.Sprintf("t%d ", i)}))
	}
	require.NoError(t, tp.Flush(ctx))
	if terminal {
		require.NoError(t, b.PublishEvent(ctx, job, subjects.EventState, api.StateChange{State: api.JobCompleted}))
	}
}

func collect(t *testing.T, b *bus.Bus, job string, from uint64) []api.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var evs []api.Event
	require.NoError(t, b.Follow(ctx, job, from, func(ev api.Event) error {
		evs = append(evs, ev)
		return nil
	}))
	return evs
}

func TestFollowReplaysInOrderAndEndsOnTerminalState(t *testing.T) {
	f := busfix.Start(t)
	publishJob(t, f.Bus, "job1", 50, true)
	publishJob(t, f.Bus, "job2", 5, true) // another job's events must not leak in
	evs := collect(t, f.Bus, "job1", 0)
	require.Len(t, evs, 52)
	require.Equal(t, "narration", evs[0].Kind)
	for i := 0; i < 50; i++ {
		require.Equal(t, i, evs[i+1].Token.Index)
	}
	require.True(t, evs[51].Terminal())
}

func TestTwoFollowersSeeTheSameEventsInTheSameOrder(t *testing.T) {
	f := busfix.Start(t)
	other := busfix.Connect(t, f.URL)
	var wg sync.WaitGroup
	results := make([][]api.Event, 2)
	for i, b := range []*bus.Bus{f.Bus, other} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = b.Follow(ctx, "shared", 0, func(ev api.Event) error {
				results[i] = append(results[i], ev)
				return nil
			})
		}()
	}
	// Live: the followers attach before the events exist.
	time.Sleep(100 * time.Millisecond)
	publishJob(t, f.Bus, "shared", 200, true)
	wg.Wait()
	require.Len(t, results[0], 202)
	require.Equal(t, results[0], results[1])
}

func TestResumeFromSequenceHasNoGapsOrDuplicates(t *testing.T) {
	f := busfix.Start(t)
	publishJob(t, f.Bus, "resume", 100, false)
	// First client reads 40 events, then "disconnects".
	var first []api.Event
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, f.Bus.Follow(ctx, "resume", 0, func(ev api.Event) error {
		first = append(first, ev)
		if len(first) == 40 {
			return bus.ErrFollowEnded
		}
		return nil
	}))
	publishJobFrom(t, f.Bus, "resume", 100, 0, true)
	// A new connection resumes after the last sequence it saw.
	other := busfix.Connect(t, f.URL)
	rest := collect(t, other, "resume", first[len(first)-1].Seq+1)
	all := append(first, rest...)
	var tokens []int
	for _, ev := range all {
		if ev.Token != nil {
			tokens = append(tokens, ev.Token.Index)
		}
	}
	require.Len(t, tokens, 100)
	for i, idx := range tokens {
		require.Equal(t, i, idx, "token order")
	}
	require.True(t, all[len(all)-1].Terminal())
}

// TestQuietJobIsNotCutOff: the original ended streams after 2 s of silence.
// A job quiet for longer than any idle timer must still be followed: the
// 70 s gap the issue names outlasts the follower consumer's 30 s inactivity
// threshold twice and the ordered consumer's heartbeat and reset timers many
// times. It runs in parallel with the rest, so it costs the suite little.
func TestQuietJobIsNotCutOff(t *testing.T) {
	t.Parallel()
	gap := 70 * time.Second
	f := busfix.Start(t)
	publishJob(t, f.Bus, "quiet", 3, false)
	got := make(chan []api.Event, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), gap+30*time.Second)
		defer cancel()
		var evs []api.Event
		err := f.Bus.Follow(ctx, "quiet", 0, func(ev api.Event) error {
			evs = append(evs, ev)
			return nil
		})
		if err != nil {
			t.Errorf("follow ended with %v", err)
		}
		got <- evs
	}()
	time.Sleep(gap)
	select {
	case evs := <-got:
		t.Fatalf("follow returned during a quiet gap after %d events", len(evs))
	default:
	}
	publishJobFrom(t, f.Bus, "quiet", 3, 2, true)
	evs := <-got
	require.True(t, evs[len(evs)-1].Terminal())
	require.Len(t, evs, 1+3+1+2+1)
}

func TestHeartbeatExpiresAndDuplicateRefused(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	value := func() ([]byte, error) { return json.Marshal(map[string]string{"id": "h1"}) }
	hb := f.Bus.NewHeartbeat(f.Bus.Space.HivesBucket(), "h1", 300*time.Millisecond, value)
	require.NoError(t, hb.Register(ctx))
	require.Equal(t, time.Second, hb.TTL())

	// A second process with the same id is refused while the first lives.
	dup := f.Bus.NewHeartbeat(f.Bus.Space.HivesBucket(), "h1", 300*time.Millisecond, value)
	require.ErrorIs(t, dup.Register(ctx), bus.ErrDuplicate)

	kv, err := f.Bus.KV(ctx, f.Bus.Space.HivesBucket())
	require.NoError(t, err)
	w, err := kv.Watch(ctx, "h1", jetstream.UpdatesOnly())
	require.NoError(t, err)
	defer func() { _ = w.Stop() }()

	// Beats keep it alive past its TTL.
	for i := 0; i < 8; i++ {
		time.Sleep(300 * time.Millisecond)
		require.NoError(t, hb.Beat(ctx))
	}
	for len(w.Updates()) > 0 {
		e := <-w.Updates()
		require.Equal(t, jetstream.KeyValuePut, e.Operation())
	}
	// Beats stop: the entry expires within the TTL plus granularity.
	stopped := time.Now()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case e := <-w.Updates():
			if e.Operation() == jetstream.KeyValuePut {
				continue
			}
			require.Less(t, time.Since(stopped), 3*time.Second)
			// Now the id is free again.
			require.NoError(t, dup.Register(ctx))
			return
		case <-deadline:
			t.Fatal("heartbeat entry did not expire")
		}
	}
}

func TestDeregisterRemovesAtOnce(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	hb := f.Bus.NewHeartbeat(f.Bus.Space.HivesBucket(), "h2", time.Second, func() ([]byte, error) { return []byte(`{}`), nil })
	require.NoError(t, hb.Register(ctx))
	require.NoError(t, hb.Beat(ctx))
	require.NoError(t, hb.Deregister(ctx))
	kv, err := f.Bus.KV(ctx, f.Bus.Space.HivesBucket())
	require.NoError(t, err)
	_, err = kv.Get(ctx, "h2")
	require.ErrorIs(t, err, jetstream.ErrKeyNotFound)
}

// A beat that comes after the leaving (a worker's last state change racing
// its shutdown) does not bring the entry back: the worker would look alive
// for a TTL after it exited.
func TestABeatAfterDeregisterDoesNotBringTheEntryBack(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	hb := f.Bus.NewHeartbeat(f.Bus.Space.WorkersBucket(), "h1.w1", time.Second, func() ([]byte, error) { return []byte(`{}`), nil })
	require.NoError(t, hb.Register(ctx))
	require.NoError(t, hb.Deregister(ctx))
	require.NoError(t, hb.Beat(ctx))
	kv, err := f.Bus.KV(ctx, f.Bus.Space.WorkersBucket())
	require.NoError(t, err)
	_, err = kv.Get(ctx, "h1.w1")
	require.True(t, errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted), "entry back after the leaving: %v", err)
}

func TestNonLoopbackListenRequiresCredentials(t *testing.T) {
	_, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "0.0.0.0:-1", Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrCredentialsRequired)
	// Credentials alone are not enough: they would cross the network in
	// the clear.
	_, err = bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "0.0.0.0:-1", Credentials: bus.Credentials{Token: "s3cret"}, Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrTLSRequired)
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", Credentials: bus.Credentials{Token: "s3cret"}, Log: zerolog.Nop()})
	require.NoError(t, err)
	defer srv.Shutdown()
	ctx := context.Background()
	_, err = bus.Connect(ctx, bus.ConnectConfig{URL: srv.ClientURL(), Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrRefused, "no token, no connection, and the error says it was refused, not unreachable")
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: srv.ClientURL(), Credentials: bus.Credentials{Token: "s3cret"}, Log: zerolog.Nop()})
	require.NoError(t, err)
	b.NC.Close()
}

func TestUnreachableFailsFast(t *testing.T) {
	start := time.Now()
	_, err := bus.Connect(context.Background(), bus.ConnectConfig{URL: "nats://127.0.0.1:1", Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrUnreachable)
	require.Less(t, time.Since(start), 2*time.Second)
}

func TestFollowLeavesNoConsumerBehind(t *testing.T) {
	f := busfix.Start(t)
	publishJob(t, f.Bus, "tidy", 3, true)
	collect(t, f.Bus, "tidy", 0)
	ctx := context.Background()
	stream, err := f.Bus.JS.Stream(ctx, f.Bus.Space.JobsStream())
	require.NoError(t, err)
	info, err := stream.Info(ctx)
	require.NoError(t, err)
	require.Zero(t, info.State.Consumers, "a finished follower removes its consumer")
}

// A token resent after a reconnect can be stored behind later ones, and
// twice when the first copy was stored after all: followers still see each
// index once, in order.
func TestFollowOrdersTokensByIndexAndDropsCopies(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	subject, err := f.Bus.Space.JobEvent("shuffled", subjects.EventToken)
	require.NoError(t, err)
	for _, i := range []int{0, 2, 3, 1, 2, 5, 4, 1} {
		data, _ := json.Marshal(api.Token{Index: i, Text: fmt.Sprintf("t%d ", i)})
		_, err := f.Bus.JS.Publish(ctx, subject, data)
		require.NoError(t, err)
	}
	require.NoError(t, f.Bus.PublishEvent(ctx, "shuffled", subjects.EventState, api.StateChange{State: api.JobCompleted}))
	var text strings.Builder
	for _, ev := range collect(t, f.Bus, "shuffled", 0) {
		if ev.Token != nil {
			text.WriteString(ev.Token.Text)
		}
	}
	require.Equal(t, "t0 t1 t2 t3 t4 t5 ", text.String())
}

// A beat stored while its acknowledgement was lost (a link cut as it went
// out) leaves the heartbeat one revision behind; its goodbye still deletes
// the entry, which is still its own. An entry another process has taken
// over is left alone.
func TestDeregisterAfterABeatWhoseAckWasLost(t *testing.T) {
	f := busfix.Start(t)
	ctx := context.Background()
	hb := f.Bus.NewHeartbeat(f.Bus.Space.HivesBucket(), "h3", time.Second, func() ([]byte, error) { return []byte(`{}`), nil })
	require.NoError(t, hb.Register(ctx))
	stream, err := f.Bus.JS.Stream(ctx, subjects.KVStream(f.Bus.Space.HivesBucket()))
	require.NoError(t, err)
	subject := subjects.KVSubject(f.Bus.Space.HivesBucket(), "h3")
	rewrite := func(instance string) {
		last, err := stream.GetLastMsgForSubject(ctx, subject)
		require.NoError(t, err)
		msg := nats.NewMsg(subject)
		msg.Data = last.Data
		msg.Header.Set("Rbee-Instance", last.Header.Get("Rbee-Instance"))
		if instance != "" {
			msg.Header.Set("Rbee-Instance", instance)
		}
		_, err = f.Bus.JS.PublishMsg(ctx, msg)
		require.NoError(t, err)
	}
	kv, err := f.Bus.KV(ctx, f.Bus.Space.HivesBucket())
	require.NoError(t, err)

	rewrite("") // the lost-ack beat: this process's value, a revision it does not know
	require.NoError(t, hb.Deregister(ctx))
	_, err = kv.Get(ctx, "h3")
	require.ErrorIs(t, err, jetstream.ErrKeyNotFound, "the goodbye deleted the entry")

	other := f.Bus.NewHeartbeat(f.Bus.Space.HivesBucket(), "h4", time.Second, func() ([]byte, error) { return []byte(`{}`), nil })
	require.NoError(t, other.Register(ctx))
	subject = subjects.KVSubject(f.Bus.Space.HivesBucket(), "h4")
	rewrite("someone-else")
	require.NoError(t, other.Deregister(ctx))
	_, err = kv.Get(ctx, "h4")
	require.NoError(t, err, "another process's entry stays")
}

// A beat sent into a link that died unseen is never answered. Once the
// connection is back, Reconnected gives that beat up, and the next one
// goes at once: waiting out the beat's own timeout (the interval and a
// second in Run) could let the entry's TTL run out on a live component. A
// suite run saw a worker judged lost three seconds after its last stored
// beat, as the cluster server it was connected to was killed; a beat lost
// with that server is one way to get there.
func TestABeatLostWithItsConnectionIsGivenUpOnReconnect(t *testing.T) {
	f := busfix.Start(t)
	proxy := f.Proxy(t)
	var hb atomic.Pointer[bus.Heartbeat]
	reconnected := make(chan struct{}, 1)
	ctx := context.Background()
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: "nats://" + proxy.Addr(), Name: t.Name(), Reconnect: true, Log: zerolog.Nop(),
		OnReconnect: func() {
			if h := hb.Load(); h != nil {
				h.Reconnected()
			}
			select {
			case reconnected <- struct{}{}:
			default:
			}
		}})
	require.NoError(t, err)
	t.Cleanup(b.NC.Close)
	hb.Store(b.NewHeartbeat(b.Space.WorkersBucket(), "h1.w9", time.Second, func() ([]byte, error) { return []byte(`{}`), nil }))
	require.NoError(t, hb.Load().Register(ctx))

	proxy.Stall()
	beat := make(chan error, 1)
	go func() {
		bctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		beat <- hb.Load().Beat(bctx)
	}()
	select {
	case err := <-beat:
		t.Fatalf("a beat into a dead link returned: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	proxy.Cut()
	proxy.Heal()
	select {
	case <-reconnected:
	case <-time.After(10 * time.Second):
		t.Fatal("the connection did not come back")
	}
	select {
	case err := <-beat:
		require.Error(t, err, "the lost beat is given up, not reported stored")
	case <-time.After(10 * time.Second):
		t.Fatal("the lost beat was still waited for after the reconnect")
	}
	require.NoError(t, hb.Load().Beat(ctx), "the next beat is stored")
}
