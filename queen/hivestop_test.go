package queen_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/queen"
	"github.com/stretchr/testify/require"
)

// fakeHive is a hive that is alive but has not beaten into this queen's
// bus yet (it is reconnecting after the queen's start): it starts beating
// when told, and on a shutdown request stops beating, says goodbye and
// answers.
type fakeHive struct {
	t        *testing.T
	b        *bus.Bus
	name     string
	hb       *bus.Heartbeat
	mu       sync.Mutex
	stopBeat context.CancelFunc
	beating  chan error
	shutdown chan struct{}
}

func newFakeHive(t *testing.T, b *bus.Bus, name string) *fakeHive {
	t.Helper()
	h := &fakeHive{t: t, b: b, name: name, shutdown: make(chan struct{}, 1)}
	h.hb = b.NewHeartbeat(b.Space.HivesBucket(), name, 200*time.Millisecond, func() ([]byte, error) {
		// PID 0: the queen can never signal a process for this hive.
		return json.Marshal(api.HiveStatus{ID: name, Version: "test", StartedAt: time.Now(), BeatAt: time.Now()})
	})
	subject, err := b.Space.Hive(name, api.HiveEpShutdown)
	require.NoError(t, err)
	sub, err := b.NC.Subscribe(subject, func(m *nats.Msg) {
		h.stop()
		_ = m.Respond([]byte("{}"))
		h.shutdown <- struct{}{}
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	t.Cleanup(h.stop)
	return h
}

// start registers and beats; a shutdown request that comes at once waits
// until the beats run, so it stops them.
func (h *fakeHive) start() {
	h.mu.Lock()
	defer h.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(h.t, h.hb.Register(ctx))
	rctx, stop := context.WithCancel(context.Background())
	h.stopBeat, h.beating = stop, make(chan error, 1)
	go func() { h.beating <- h.hb.Run(rctx, nil) }()
}

// stop ends the beats, then deletes the entry (a beat after the delete
// would register the hive again). The delete is unconditional: a beat
// cancelled mid-flight leaves the heartbeat's own revision behind.
func (h *fakeHive) stop() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopBeat == nil {
		return
	}
	h.stopBeat()
	<-h.beating
	h.stopBeat = nil
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := h.b.KV(ctx, h.b.Space.HivesBucket())
	if err == nil {
		err = kv.Delete(ctx, h.name)
	}
	if err != nil {
		h.t.Errorf("fake hive %s: goodbye: %v", h.name, err)
	}
}

func terminal(t *testing.T, evs []api.Event) *api.StateChange {
	t.Helper()
	for _, ev := range evs {
		if ev.Terminal() {
			return ev.State
		}
	}
	t.Fatalf("no terminal state in %d events", len(evs))
	return nil
}

// A queen that has just started (an ephemeral one, started by `rbee hive
// stop` itself) has not heard yet from a live hive that is reconnecting to
// its bus. `hive stop` must not take that silence for "not running": it
// waits for the hive's beat, or for the registry to settle, then decides.
func TestHiveStopWaitsForTheRegistryBeforeSayingNotRunning(t *testing.T) {
	t.Parallel()
	_, b := startQueen(t, func(c *queen.Config) { c.LivenessGrace = 10 * time.Second })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpHiveAdd), api.HiveAddRequest{Name: "h1"}, nil))
	hive := newFakeHive(t, b, "h1")

	// The hive's first beat comes once the stop job has looked the hive
	// up: a queen that decides at once has decided by then.
	narration := make(chan *nats.Msg, 64)
	sub, err := b.NC.ChanSubscribe(b.Space.AllNarration(), narration)
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	args, _ := json.Marshal(map[string]string{"name": "h1"})
	job := submit(t, b, api.Operation{Kind: api.OpHiveStop, Args: args}, 0)
	for resolved := false; !resolved; {
		select {
		case m := <-narration:
			var n api.Narration
			require.NoError(t, json.Unmarshal(m.Data, &n))
			resolved = n.JobID == job && n.Action == "resolve"
		case <-ctx.Done():
			t.Fatal("the stop job never looked the hive up")
		}
	}
	hive.start()

	evs := followAll(t, b, job)
	for _, ev := range evs {
		if ev.Narration != nil {
			t.Logf("%s %s", ev.Narration.Time.Format("15:04:05.000"), ev.Narration.Human)
		}
	}
	final := terminal(t, evs)
	require.Equal(t, api.JobCompleted, final.State, final.Error)
	var res map[string]string
	require.NoError(t, json.Unmarshal(final.Result, &res))
	require.Equal(t, "shutdown", res["stopped"], "the live hive was asked to stop, not reported as not running")
	select {
	case <-hive.shutdown:
	default:
		t.Fatal("the hive got no shutdown request")
	}
}

// A hive that really is not running is reported so once the registry has
// settled: the wait is bounded by the liveness grace.
func TestHiveStopOfAStoppedHiveAnswersOnceTheRegistrySettles(t *testing.T) {
	t.Parallel()
	grace := 2 * time.Second
	_, b := startQueen(t, func(c *queen.Config) { c.LivenessGrace = grace })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, b.Call(ctx, b.Space.Queen(api.EpHiveAdd), api.HiveAddRequest{Name: "h1"}, nil))
	args, _ := json.Marshal(map[string]string{"name": "h1"})
	job := submit(t, b, api.Operation{Kind: api.OpHiveStop, Args: args}, 0)
	final := terminal(t, followAll(t, b, job))
	require.Equal(t, api.JobCompleted, final.State, final.Error)
	var res map[string]string
	require.NoError(t, json.Unmarshal(final.Result, &res))
	require.Equal(t, "not running", res["stopped"])
}
