package hive_test

import (
	"context"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

func TestRegistersWithCapabilities(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	entries := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "h1")
	startHive(t, fix, "h1", func(c *hive.Config) { c.NvidiaSMI = fakeNvidiaSMI(t); c.LogPath = "/var/log/h1.log" })

	st := hiveStatusOf(t, awaitEntry(t, entries, 5*time.Second, "hive entry", isPut))
	require.Equal(t, "h1", st.ID)
	require.Equal(t, os.Getpid(), st.PID)
	require.NotEmpty(t, st.Version)
	require.NotEmpty(t, st.Capabilities.Hostname)
	require.Positive(t, st.Capabilities.CPU.Threads)
	require.Positive(t, st.Capabilities.RAMTotal)
	require.Positive(t, st.RAMFree)
	require.Contains(t, st.Capabilities.Backends, "cpu")
	require.Len(t, st.Capabilities.GPUs, 2, "GPUs from the fake nvidia-smi")
	require.Equal(t, "NVIDIA H100 80GB HBM3", st.Capabilities.GPUs[1].Name)
	require.Empty(t, st.Models)
	require.Empty(t, st.Workers)
	require.Equal(t, "/var/log/h1.log", st.LogPath)

	// It keeps beating: a later entry has a later beat time.
	next := hiveStatusOf(t, awaitEntry(t, entries, 3*testBeat, "next beat", isPut))
	require.True(t, next.BeatAt.After(st.BeatAt))
	require.Equal(t, st.StartedAt, next.StartedAt)

	var caps api.Capabilities
	mustCall(t, fix.Bus, "h1", api.HiveEpCapabilities, nil, &caps)
	require.Len(t, caps.GPUs, 2)
	require.False(t, caps.DetectedAt.Before(st.Capabilities.DetectedAt))
	var status api.HiveStatus
	mustCall(t, fix.Bus, "h1", api.HiveEpStatus, nil, &status)
	require.Equal(t, "h1", status.ID)
	require.Equal(t, caps.DetectedAt, status.Capabilities.DetectedAt, "the re-detection is what the hive reports now")
}

func TestSecondHiveWithSameIDIsRefused(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	startHive(t, fix, "dup", nil)
	err := hive.Run(context.Background(), hive.Config{ID: "dup", DataDir: t.TempDir(), NATSURL: fix.URL, Heartbeat: testBeat, Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrDuplicate)
	require.Contains(t, err.Error(), "hive dup is already registered by another live process")
	// The first one is unharmed.
	var st api.HiveStatus
	mustCall(t, fix.Bus, "dup", api.HiveEpStatus, nil, &st)
	require.Equal(t, os.Getpid(), st.PID)
}

func TestBadConfigIsRefusedBeforeTheBus(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  hive.Config
		want string
	}{
		{"id with dot", hive.Config{ID: "a.b", DataDir: "x"}, "--id"},
		{"empty id", hive.Config{DataDir: "x"}, "--id"},
		{"no data", hive.Config{ID: "a"}, "--data"},
		{"negative beat", hive.Config{ID: "a", DataDir: "x", Heartbeat: -time.Second}, "--heartbeat"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := hive.Run(context.Background(), tc.cfg)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestCleanShutdownRemovesEntryAtOnce(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	entries := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "bye")
	r := startHive(t, fix, "bye", nil)
	awaitEntry(t, entries, 5*time.Second, "hive entry", isPut)

	r.Cancel()
	stopped := time.Now()
	require.NoError(t, r.wait(t, 10*time.Second))
	e := awaitEntry(t, entries, 2*time.Second, "delete", func(e jetstream.KeyValueEntry) bool { return !isPut(e) })
	took := time.Since(stopped)
	t.Logf("clean shutdown removed the entry after %s", took)
	require.Equal(t, jetstream.KeyValueDelete, e.Operation(), "a goodbye is a delete, not an expiry")
	require.Less(t, took, time.Second, "removed at once, not after the TTL")
}

func TestShutdownEndpoint(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	n := listen(t, fix.Bus)
	entries := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "ep")
	r := startHive(t, fix, "ep", nil)
	awaitEntry(t, entries, 5*time.Second, "hive entry", isPut)

	mustCall(t, fix.Bus, "ep", api.HiveEpShutdown, api.ShutdownRequest{JobID: "job-1"}, nil)
	require.NoError(t, r.wait(t, 10*time.Second), "Run returns nil after a requested shutdown")
	awaitEntry(t, entries, 2*time.Second, "delete", func(e jetstream.KeyValueEntry) bool { return e.Operation() == jetstream.KeyValueDelete })
	onJob := n.await(t, time.Second, "on the job", func(ev api.Narration) bool { return ev.JobID == "job-1" && ev.Human == "hive ep shutting down" })
	require.Equal(t, api.Actor{Component: "hive", ID: "ep"}, onJob.Actor)
	n.await(t, time.Second, "on the cluster", func(ev api.Narration) bool { return ev.JobID == "" && ev.Human == "hive ep shutting down" })
	err := call(t, fix.Bus, "ep", api.HiveEpStatus, nil, nil, time.Second)
	require.ErrorIs(t, err, bus.ErrNoResponder, "the service is gone")
}

func TestIgnoreShutdownHook(t *testing.T) {
	t.Parallel()
	fix := busfix.Start(t)
	entries := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "stubborn")
	startHive(t, fix, "stubborn", func(c *hive.Config) { c.IgnoreShutdown = true })
	awaitEntry(t, entries, 5*time.Second, "hive entry", isPut)

	mustCall(t, fix.Bus, "stubborn", api.HiveEpShutdown, api.ShutdownRequest{}, nil)
	asked := time.Now()
	// Still beating after the request, and still serving.
	e := awaitEntry(t, entries, 2*time.Second, "a beat after the request", func(e jetstream.KeyValueEntry) bool {
		return isPut(e) && hiveStatusOf(t, e).BeatAt.After(asked.Add(testBeat))
	})
	require.Equal(t, "stubborn", hiveStatusOf(t, e).ID)
	mustCall(t, fix.Bus, "stubborn", api.HiveEpStatus, nil, nil)
}

func TestReRegistersAfterBusRestart(t *testing.T) {
	t.Parallel()
	dataDir := t.TempDir()
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: dataDir, Listen: "127.0.0.1:-1", Log: zerolog.Nop()})
	require.NoError(t, err)
	serverURL := srv.ClientURL()
	u, err := url.Parse(serverURL)
	require.NoError(t, err)
	// A cleanup, not a defer: the hive (cleaned up later, so stopped first)
	// must still reach the bus to leave.
	t.Cleanup(func() { srv.Shutdown() })
	fix := &busfix.Fixture{Server: srv, Bus: busfix.Connect(t, serverURL), URL: serverURL}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, fix.Bus.EnsureStreams(ctx, bus.DefaultRetention()))
	startHive(t, fix, "phoenix", nil)

	kv, err := fix.Bus.KV(ctx, fix.Bus.Space.HivesBucket())
	require.NoError(t, err)
	before, err := kv.Get(ctx, "phoenix")
	require.NoError(t, err)

	// The bus goes away for longer than the entry's TTL, then comes back
	// on the same port and data: the entry has expired meanwhile.
	srv.Shutdown()
	down := time.Now()
	time.Sleep(bus.TTLForInterval(testBeat) + 500*time.Millisecond) // an outage, not an event to await
	srv, err = bus.StartServer(bus.ServerConfig{DataDir: dataDir, Listen: u.Host, Log: zerolog.Nop()})
	require.NoError(t, err)
	up := time.Now()
	t.Logf("bus down for %s", up.Sub(down).Round(time.Millisecond))

	// The hive finds out by itself and beats into the registry again.
	entries := watchKey(t, fix.Bus, fix.Bus.Space.HivesBucket(), "phoenix")
	e := awaitEntry(t, entries, 10*time.Second, "a beat after the restart", func(e jetstream.KeyValueEntry) bool {
		return isPut(e) && hiveStatusOf(t, e).BeatAt.After(up)
	})
	require.Greater(t, e.Revision(), before.Revision())
	t.Logf("re-registered %s after the bus came back", time.Since(up).Round(time.Millisecond))
	var st api.HiveStatus
	mustCall(t, fix.Bus, "phoenix", api.HiveEpStatus, nil, &st)
	require.Equal(t, "phoenix", st.ID)
}
