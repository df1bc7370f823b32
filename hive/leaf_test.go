package hive_test

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
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

// A hub that does not know the hive's key refuses its leaf connection, and
// the hive says so at once (bus.ErrRefused: the command exits 3 with how
// to get a key) instead of redialling until its join times out.
func TestAHiveWhoseKeyTheHubRefusesSaysSo(t *testing.T) {
	known := newHiveKey(t, "known")
	kp, err := auth.ReadKeyFile(known)
	require.NoError(t, err)
	pub, err := kp.PublicKey()
	require.NoError(t, err)
	hub, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", LeafListen: "127.0.0.1:-1", NkeyUsers: []string{pub}, Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(hub.Shutdown)
	began := time.Now()
	err = hive.Run(context.Background(), hive.Config{
		ID: "stranger", DataDir: t.TempDir(), Leaf: []string{hub.LeafURL()},
		Credentials: bus.Credentials{KeyFile: newHiveKey(t, "stranger")}, Log: zerolog.Nop(),
	})
	require.ErrorIs(t, err, bus.ErrRefused)
	require.Contains(t, err.Error(), "refused the leaf connection of hive stranger")
	require.Less(t, time.Since(began), 10*time.Second, "said at once, not after the join timeout")
}

func newHiveKey(t *testing.T, hiveID string) string {
	t.Helper()
	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	seed, err := kp.Seed()
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), hiveID+".nk")
	require.NoError(t, auth.WriteKeyFile(path, auth.HiveName(hiveID), auth.Principal{Role: auth.RoleHive, Hive: hiveID}, seed, nil))
	return path
}

// A hive's key revoked while it runs: the hub refuses the link when it is
// dialled again, and the hive stops saying so, as one whose own connection
// is refused does (rather than redialling, refused, four times a second).
func TestAHiveWhoseKeyIsRevokedStops(t *testing.T) {
	key := newHiveKey(t, "doomed")
	kp, err := auth.ReadKeyFile(key)
	require.NoError(t, err)
	pub, err := kp.PublicKey()
	require.NoError(t, err)
	dir := t.TempDir()
	conf := filepath.Join(dir, "hub.conf")
	write := func(users string) {
		require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf("listen: \"127.0.0.1:-1\"\njetstream { store_dir: %q }\nleafnodes { listen: \"127.0.0.1:-1\" }\ndefault_js_domain: { \"$G\": \"\" }\nauthorization { users = [ %s ] }\n", filepath.Join(dir, "js"), users)), 0o600))
	}
	admin := newHiveKey(t, "admin")
	akp, err := auth.ReadKeyFile(admin)
	require.NoError(t, err)
	apub, err := akp.PublicKey()
	require.NoError(t, err)
	write(fmt.Sprintf("{ nkey: %q }, { nkey: %q }", apub, pub))
	opts, err := server.ProcessConfigFile(conf)
	require.NoError(t, err)
	opts.NoSigs, opts.NoLog = true, true
	srv, err := server.NewServer(opts)
	require.NoError(t, err)
	go srv.Start()
	require.True(t, srv.ReadyForConnections(10*time.Second))
	t.Cleanup(srv.Shutdown)
	b := busfix.ConnectAs(t, srv.ClientURL(), bus.Credentials{KeyFile: admin})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, b.EnsureStreams(ctx, bus.DefaultRetention()))

	proxy, err := tcpproxy.Listen(fmt.Sprintf("127.0.0.1:%d", opts.LeafNode.Port))
	require.NoError(t, err)
	t.Cleanup(func() { _ = proxy.Close() })
	h := startHive(t, &busfix.Fixture{}, "doomed", func(c *hive.Config) {
		c.NATSURL, c.Leaf = "", []string{"nats-leaf://" + proxy.Addr()}
		c.Credentials = bus.Credentials{KeyFile: key}
	})
	write(fmt.Sprintf("{ nkey: %q }", apub))
	require.NoError(t, srv.Reload())
	// nats-server v2.15.2 re-checks its clients on a reload but not its
	// leaf connections: a revoked leaf keeps its link until it redials.
	proxy.Cut()
	proxy.Heal()
	err = h.wait(t, 30*time.Second)
	require.ErrorIs(t, err, bus.ErrRefused)
	require.Contains(t, err.Error(), key, "names the credentials tried")
}
