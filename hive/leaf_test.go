package hive_test

import (
	"context"
	"net/url"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/internal/testutil/tcpproxy"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// A hive that joins through a leaf connection registers and answers on the
// hub; when its link is cut for longer than the heartbeat TTL its entry
// expires, and when the link is back it registers again at once (it does
// not wait for a reconnect that its own connection, to its leaf, never
// has); a stop says goodbye across the link.
func TestAHiveJoinsThroughALeafAndComesBackAfterACut(t *testing.T) {
	hub, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", LeafListen: "127.0.0.1:-1", ServerName: "hub", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(hub.Shutdown)
	b := busfix.Connect(t, hub.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, b.EnsureStreams(ctx, bus.DefaultRetention()))
	u, err := url.Parse(hub.LeafURL())
	require.NoError(t, err)
	proxy, err := tcpproxy.Listen(u.Host)
	require.NoError(t, err)
	t.Cleanup(func() { _ = proxy.Close() })

	entries := watchKey(t, b, b.Space.HivesBucket(), "leafy")
	h := startHive(t, &busfix.Fixture{}, "leafy", func(c *hive.Config) {
		c.NATSURL, c.Leaf = "", []string{"nats-leaf://" + proxy.Addr()}
	})
	first := hiveStatusOf(t, awaitEntry(t, entries, 10*time.Second, "the hive's first beat", isPut))
	var st api.HiveStatus
	mustCall(t, b, "leafy", api.HiveEpStatus, struct{}{}, &st)
	require.Equal(t, first.PID, st.PID, "the hive answers from behind its leaf")
	require.Equal(t, 2, proxy.Live(), "one connection to the hub (both its ends counted)")

	proxy.Cut()
	cut := time.Now()
	awaitEntry(t, entries, 10*time.Second, "the entry's expiry", func(e jetstream.KeyValueEntry) bool {
		return e.Operation() == jetstream.KeyValuePurge
	})
	proxy.Heal()
	healed := time.Now()
	back := hiveStatusOf(t, awaitEntry(t, entries, 10*time.Second, "the hive's return", isPut))
	require.Equal(t, first.StartedAt, back.StartedAt, "the same hive, not a restart")
	require.Less(t, time.Since(healed), 5*time.Second, "back soon after the heal (cut for %s)", healed.Sub(cut).Round(time.Millisecond))
	mustCall(t, b, "leafy", api.HiveEpStatus, struct{}{}, &st)

	h.Cancel()
	require.NoError(t, h.wait(t, 30*time.Second))
	awaitEntry(t, entries, 10*time.Second, "the hive's goodbye", func(e jetstream.KeyValueEntry) bool {
		return e.Operation() == jetstream.KeyValueDelete
	})
}

// --leaf and --nats are exclusive.
func TestLeafAndNATSAreExclusive(t *testing.T) {
	err := hive.Run(context.Background(), hive.Config{ID: "h", DataDir: t.TempDir(), NATSURL: "nats://127.0.0.1:4222", Leaf: []string{"nats-leaf://127.0.0.1:7422"}})
	require.ErrorContains(t, err, "exclusive")
}
