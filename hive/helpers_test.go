package hive_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/internal/testutil/inproc"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// testBeat is the heartbeat interval of every test hive.
const testBeat = 300 * time.Millisecond

// running is a hive started in-process.
type running struct{ *inproc.Daemon }

func (r *running) wait(t *testing.T, d time.Duration) error { return r.Wait(t, d) }

// startHive runs hive.Run in-process on fix's bus and waits until it serves.
func startHive(t *testing.T, fix *busfix.Fixture, id string, mod func(*hive.Config)) *running {
	t.Helper()
	cfg := hive.Config{
		ID: id, DataDir: t.TempDir(), NATSURL: fix.URL, Heartbeat: testBeat,
		WorkerBin: filepath.Join(t.TempDir(), "no-worker-here"),
		Log:       zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	}
	if mod != nil {
		mod(&cfg)
	}
	ready := make(chan struct{})
	cfg.Ready = func() { close(ready) }
	d, _ := inproc.Start(t, "hive "+id, func(ctx context.Context) error { return hive.Run(ctx, cfg) }, ready, 20*time.Second)
	return &running{d}
}

// call calls one endpoint of a hive.
func call(t *testing.T, b *bus.Bus, hiveID, ep string, req, out any, timeout time.Duration) error {
	t.Helper()
	subject, err := b.Space.Hive(hiveID, ep)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return b.Call(ctx, subject, req, out)
}

func mustCall(t *testing.T, b *bus.Bus, hiveID, ep string, req, out any) {
	t.Helper()
	require.NoError(t, call(t, b, hiveID, ep, req, out, 2*time.Minute))
}

// requireCode asserts an endpoint error's code and that its message
// contains every part.
func requireCode(t *testing.T, err error, code int, parts ...string) {
	t.Helper()
	require.Error(t, err)
	require.Equal(t, code, api.CodeOf(err), "%v", err)
	for _, p := range parts {
		require.Contains(t, err.Error(), p)
	}
}

// watchKey watches one key of a bucket from now on (its current value
// included) and delivers every entry on the returned channel.
func watchKey(t *testing.T, b *bus.Bus, bucket, key string) <-chan jetstream.KeyValueEntry {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	kv, err := b.KV(ctx, bucket)
	require.NoError(t, err)
	w, err := kv.Watch(ctx, key, jetstream.IncludeHistory())
	require.NoError(t, err)
	out := make(chan jetstream.KeyValueEntry, 1024)
	go func() {
		defer close(out)
		for e := range w.Updates() {
			if e != nil {
				out <- e
			}
		}
	}()
	return out
}

// awaitEntry waits for an entry on ch satisfying ok.
func awaitEntry(t *testing.T, ch <-chan jetstream.KeyValueEntry, d time.Duration, what string, ok func(jetstream.KeyValueEntry) bool) jetstream.KeyValueEntry {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case e, open := <-ch:
			require.True(t, open, "watch ended waiting for %s", what)
			if ok(e) {
				return e
			}
		case <-timer.C:
			t.Fatalf("no %s within %s", what, d)
		}
	}
}

func isPut(e jetstream.KeyValueEntry) bool { return e.Operation() == jetstream.KeyValuePut }

func hiveStatusOf(t *testing.T, e jetstream.KeyValueEntry) api.HiveStatus {
	t.Helper()
	var st api.HiveStatus
	require.NoError(t, json.Unmarshal(e.Value(), &st))
	return st
}

func workerStatusOf(t *testing.T, e jetstream.KeyValueEntry) api.WorkerStatus {
	t.Helper()
	var st api.WorkerStatus
	require.NoError(t, json.Unmarshal(e.Value(), &st))
	return st
}

// narrations collects narration events published on the cluster subject
// and on every job's narration subject (core subscriptions: live only).
type narrations struct {
	mu     sync.Mutex
	events []api.Narration
	added  chan struct{}
}

func listen(t *testing.T, b *bus.Bus) *narrations {
	t.Helper()
	n := &narrations{added: make(chan struct{}, 1)}
	for _, subject := range []string{b.Space.ClusterNarration(), b.Space.AllNarration()} {
		sub, err := b.NC.Subscribe(subject, func(m *nats.Msg) {
			var ev api.Narration
			if json.Unmarshal(m.Data, &ev) != nil {
				return
			}
			n.mu.Lock()
			n.events = append(n.events, ev)
			n.mu.Unlock()
			select {
			case n.added <- struct{}{}:
			default:
			}
		})
		require.NoError(t, err)
		t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	require.NoError(t, b.NC.Flush())
	return n
}

// await waits for a narration satisfying ok.
func (n *narrations) await(t *testing.T, d time.Duration, what string, ok func(api.Narration) bool) api.Narration {
	t.Helper()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	seen := 0
	for {
		n.mu.Lock()
		evs := n.events[seen:]
		seen = len(n.events)
		n.mu.Unlock()
		for _, ev := range evs {
			if ok(ev) {
				return ev
			}
		}
		select {
		case <-n.added:
		case <-deadline.C:
			t.Fatalf("no narration %s within %s", what, d)
		}
	}
}

func containing(s string) func(api.Narration) bool {
	return func(ev api.Narration) bool { return strings.Contains(ev.Human, s) }
}

// fakeNvidiaSMI is the e2e stand-in reporting two GPUs.
func fakeNvidiaSMI(t *testing.T) string {
	t.Helper()
	return filepath.Join(binaries.Root(t), "e2e", "testdata", "fake-nvidia-smi")
}

// llamaLib is the llama.cpp library directory scripts/llama-libs.sh fills;
// tests that run real workers skip without it.
func llamaLib(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(binaries.Root(t), ".deps", "llama")
	if _, err := os.Stat(filepath.Join(dir, "libllama.so")); err != nil {
		t.Skipf("llama.cpp libraries not installed in %s (run scripts/llama-libs.sh)", dir)
	}
	return dir
}
