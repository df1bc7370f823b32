package bus_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// startLeaf starts a leaf of the hub at hubLeafURL that lets in only the
// holder of keyFile, as a hive's is, and waits for its link to the hub.
func startLeaf(t *testing.T, hubLeafURL, keyFile string) *bus.Server {
	t.Helper()
	kp, err := auth.ReadKeyFile(keyFile)
	require.NoError(t, err)
	pub, err := kp.PublicKey()
	require.NoError(t, err)
	leaf, err := bus.StartServer(bus.ServerConfig{
		Listen: "127.0.0.1:-1", ServerName: "leaf", NkeyUsers: []string{pub},
		Leaf: &bus.LeafRemote{URLs: []string{hubLeafURL}, Credentials: bus.Credentials{KeyFile: keyFile}},
		Log:  zerolog.Nop(),
	})
	require.NoError(t, err)
	t.Cleanup(leaf.Shutdown)
	return leaf
}

func awaitLink(t *testing.T, leaf *bus.Server) {
	t.Helper()
	require.Eventually(t, func() bool { return leaf.LeafConnections() == 1 }, 10*time.Second, 20*time.Millisecond, "the leaf did not join its hub")
}

func connectTo(t *testing.T, url, keyFile string) *bus.Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var cr bus.Credentials
	if keyFile != "" {
		cr.KeyFile = keyFile
	}
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: url, Name: "leaf-test", Credentials: cr, Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(b.NC.Close)
	return b
}

func newKeyFile(t *testing.T, name string, p auth.Principal) string {
	t.Helper()
	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	seed, err := kp.Seed()
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), name+".nk")
	require.NoError(t, auth.WriteKeyFile(path, name, p, seed, nil))
	return path
}

// A leaf has no JetStream of its own: everything a hive and its workers do
// with JetStream (KV writes, reads and watches, job streams, work-queue
// pulls and acknowledgements) and with services reaches the hub's over the
// one leaf connection. The leaf lets in only the key it was given.
func TestALeafUsesTheHubsJetStream(t *testing.T) {
	hub, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", LeafListen: "127.0.0.1:-1", ServerName: "hub", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(hub.Shutdown)
	require.NotEmpty(t, hub.LeafURL())
	hiveKey := newKeyFile(t, "hive-h1", auth.Principal{Role: auth.RoleHive, Hive: "h1"})
	leaf := startLeaf(t, hub.LeafURL(), hiveKey)
	awaitLink(t, leaf)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	queen := connectTo(t, hub.ClientURL(), "")
	require.NoError(t, queen.EnsureStreams(ctx, bus.DefaultRetention()))
	local := connectTo(t, leaf.ClientURL(), hiveKey)
	testThroughLeaf(ctx, t, queen, local, "h1")

	// Only the hive's key gets in: none, or another key, is refused.
	_, err = bus.Connect(ctx, bus.ConnectConfig{URL: leaf.ClientURL(), Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrRefused)
	_, err = bus.Connect(ctx, bus.ConnectConfig{URL: leaf.ClientURL(), Credentials: bus.Credentials{KeyFile: newKeyFile(t, "other", auth.Principal{Role: auth.RoleClient})}, Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrRefused)
}

// testThroughLeaf exercises, from a client of the leaf, what a hive and
// its workers do on the bus, with the queen's side on the hub.
func testThroughLeaf(ctx context.Context, t *testing.T, queen, local *bus.Bus, hive string) {
	t.Helper()
	space := local.Space
	// KV: the hive's heartbeat, written on the leaf, is seen by the
	// queen's watch on the hub; the queen's write is read on the leaf.
	hivesQ, err := queen.KV(ctx, space.HivesBucket())
	require.NoError(t, err)
	watch, err := hivesQ.Watch(ctx, hive, jetstream.UpdatesOnly())
	require.NoError(t, err)
	defer func() { _ = watch.Stop() }()
	hb := local.NewHeartbeat(space.HivesBucket(), hive, 200*time.Millisecond, func() ([]byte, error) { return []byte(`{"id":"` + hive + `"}`), nil })
	require.NoError(t, hb.Register(ctx))
	select {
	case e := <-watch.Updates():
		require.NotNil(t, e)
		require.Equal(t, hive, e.Key())
	case <-ctx.Done():
		t.Fatal("the queen did not see the beat written on the leaf")
	}
	require.NoError(t, hb.Beat(ctx))
	workersL, err := local.KV(ctx, space.WorkersBucket())
	require.NoError(t, err)
	workerKey := subjects.WorkerKey(hive, "w1")
	_, err = workersL.Put(ctx, workerKey, []byte(`{"state":"ready"}`))
	require.NoError(t, err)
	e, err := workersL.Get(ctx, workerKey)
	require.NoError(t, err)
	require.Equal(t, `{"state":"ready"}`, string(e.Value()))
	// A hive hears its workers' beats on their keys' subjects as they
	// are stored (its role makes no consumer of the workers bucket).
	beats, err := local.NC.SubscribeSync(subjects.KVSubject(space.WorkersBucket(), subjects.WorkerKey(hive, "*")))
	require.NoError(t, err)
	defer func() { _ = beats.Unsubscribe() }()
	require.NoError(t, local.NC.Flush())
	require.Eventually(t, func() bool {
		if _, err := queen.JS.Publish(ctx, subjects.KVSubject(space.WorkersBucket(), subjects.WorkerKey(hive, "w2")), []byte(`{}`)); err != nil {
			return false
		}
		_, err := beats.NextMsg(200 * time.Millisecond)
		return err == nil
	}, 5*time.Second, 10*time.Millisecond, "a beat stored on the hub reached the hive's subscription on the leaf")

	// The work queue: the queen enqueues on the hub; a worker on the leaf
	// makes its consumer, pulls, and acknowledges, and the request is gone.
	modelKey := "tiny"
	subject, err := space.Infer(modelKey)
	require.NoError(t, err)
	_, err = queen.JS.Publish(ctx, subject, []byte(`{"job":"j1"}`))
	require.NoError(t, err)
	consName, err := space.InferConsumer(modelKey)
	require.NoError(t, err)
	cons, err := local.JS.CreateOrUpdateConsumer(ctx, space.InferStream(), jetstream.ConsumerConfig{Durable: consName, FilterSubject: subject, AckPolicy: jetstream.AckExplicitPolicy})
	require.NoError(t, err)
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	require.NoError(t, err)
	var pulled int
	for msg := range batch.Messages() {
		pulled++
		require.Equal(t, `{"job":"j1"}`, string(msg.Data()))
		require.NoError(t, msg.DoubleAck(ctx))
	}
	require.NoError(t, batch.Error())
	require.Equal(t, 1, pulled)
	info, err := queen.JS.Stream(ctx, space.InferStream())
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		si, err := info.Info(ctx)
		return err == nil && si.State.Msgs == 0
	}, 5*time.Second, 20*time.Millisecond, "the acknowledged request left the work queue")

	// A job's events published on the leaf are stored on the hub and
	// followed from there.
	tp, err := local.Tokens("j1")
	require.NoError(t, err)
	for i := range 3 {
		require.NoError(t, tp.Publish(tokenAt(i)))
	}
	require.NoError(t, tp.Flush(ctx))
	ord, err := queen.JS.OrderedConsumer(ctx, space.JobsStream(), jetstream.OrderedConsumerConfig{FilterSubjects: []string{"rbee.job.j1.>"}})
	require.NoError(t, err)
	got, err := ord.Fetch(3, jetstream.FetchMaxWait(5*time.Second))
	require.NoError(t, err)
	n := 0
	for range got.Messages() {
		n++
	}
	require.Positive(t, n, "the leaf's token events are in the hub's stream")

	// Services: the queen calls the hive's endpoint on the leaf, and a
	// reply reaches the leaf's own inbox.
	group, err := space.HiveGroup(hive)
	require.NoError(t, err)
	sub, err := local.NC.Subscribe(group+".status", func(m *nats.Msg) { _ = m.Respond([]byte("ok")) })
	require.NoError(t, err)
	defer func() { _ = sub.Unsubscribe() }()
	require.NoError(t, local.NC.Flush())
	require.Eventually(t, func() bool {
		reply, err := queen.NC.Request(group+".status", nil, time.Second)
		return err == nil && string(reply.Data) == "ok"
	}, 5*time.Second, 50*time.Millisecond, "the hub reached a service on the leaf")
}

func tokenAt(i int) api.Token { return api.Token{Index: i, Text: fmt.Sprintf("t%d ", i)} }

// hubLeafStanza is what an upstream nats-server needs besides rbee's
// authorization to let hives join as leaf nodes (the report's stanza).
const hubLeafStanza = `leafnodes { listen: "127.0.0.1:-1" }
default_js_domain: { "$G": "" }
`

// withCallerInboxes adds, to every hive's publish permission, the inboxes
// of those who call hives and workers (the queen, clients). A leaf gets a
// reply only where its user may publish: allow_responses, which lets a
// directly connected hive answer, does not carry across a leaf connection
// (the hub advertises interest in a subject to a leaf only where the leaf's
// user may publish to it, so the answer never leaves the leaf). This is
// what the configuration writer must add for hives that join as leaves.
func withCallerInboxes(conf []byte, callers []string) []byte {
	var inboxes string
	for _, pub := range callers {
		inboxes += fmt.Sprintf("%q, ", auth.InboxPrefix(pub)+".>")
	}
	out := ""
	inHive := false
	for _, line := range strings.SplitAfter(string(conf), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "# ") {
			inHive = strings.Contains(line, "(hive")
		}
		if inHive && strings.HasPrefix(strings.TrimSpace(line), "publish: { allow: [") {
			line = strings.Replace(line, "allow: [", "allow: ["+inboxes, 1)
		}
		out += line
	}
	return []byte(out)
}

// A hub configured from `rbee creds server-config` with a leafnodes block
// authorizes a leaf as the hive its key belongs to: the hive's (and its
// workers') work goes through, another hive's subjects do not, and a key
// the hub does not know never joins.
func TestALeafIsHeldToItsHivesPermissions(t *testing.T) {
	dir := t.TempDir()
	store, err := auth.OpenStore(filepath.Join(dir, "creds"))
	require.NoError(t, err)
	issue := func(name string, p auth.Principal) string {
		_, _, err := store.Issue(name, p)
		require.NoError(t, err)
		return store.KeyFile(name)
	}
	queenKey := issue(auth.QueenName, auth.Principal{Role: auth.RoleQueen})
	hiveKey := issue(auth.HiveName("h1"), auth.Principal{Role: auth.RoleHive, Hive: "h1"})
	creds, err := store.List()
	require.NoError(t, err)
	var callers []string
	for _, c := range creds {
		if c.Principal.Role == auth.RoleQueen || c.Principal.Role == auth.RoleClient {
			callers = append(callers, c.PublicKey)
		}
	}
	conf := filepath.Join(dir, "hub.conf")
	require.NoError(t, os.WriteFile(conf, append([]byte(fmt.Sprintf(
		"listen: \"127.0.0.1:-1\"\njetstream { store_dir: %q }\n"+hubLeafStanza, filepath.Join(dir, "js"))),
		withCallerInboxes(auth.ServerConfig(subjects.Default(), creds), callers)...), 0o600))
	opts, err := server.ProcessConfigFile(conf)
	require.NoError(t, err)
	opts.NoSigs, opts.NoLog = true, true
	srv, err := server.NewServer(opts)
	require.NoError(t, err)
	go srv.Start()
	require.True(t, srv.ReadyForConnections(10*time.Second))
	t.Cleanup(srv.Shutdown)
	hubLeaf := fmt.Sprintf("nats-leaf://127.0.0.1:%d", opts.LeafNode.Port)

	leaf := startLeaf(t, hubLeaf, hiveKey)
	awaitLink(t, leaf)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	queen := connectTo(t, srv.ClientURL(), queenKey)
	require.NoError(t, queen.EnsureStreams(ctx, bus.DefaultRetention()))
	local := connectTo(t, leaf.ClientURL(), hiveKey)
	testThroughLeaf(ctx, t, queen, local, "h1")

	// Another hive's registry entry: the leaf is not allowed to send it,
	// so the hub never stores it (the leaf drops it; the hub would cut a
	// leaf that sent it).
	space := local.Space
	hives, err := queen.KV(ctx, space.HivesBucket())
	require.NoError(t, err)
	require.NoError(t, local.NC.Publish(subjects.KVSubject(space.HivesBucket(), "h2"), []byte(`{"id":"h2"}`)))
	// Nor does the hub send it another hive's requests.
	theirs, err := local.NC.SubscribeSync("rbee.hive.h2.>")
	require.NoError(t, err)
	require.NoError(t, local.NC.Flush())
	time.Sleep(500 * time.Millisecond) // interest crosses the link, if it would
	require.NoError(t, queen.NC.Publish("rbee.hive.h2.shutdown", []byte(`{}`)))
	require.NoError(t, queen.NC.Flush())
	_, err = theirs.NextMsg(time.Second)
	require.ErrorIs(t, err, nats.ErrTimeout, "a request for hive h2 reached hive h1's leaf")
	_, err = hives.Get(ctx, "h2")
	require.ErrorIs(t, err, jetstream.ErrKeyNotFound, "hive h1's leaf wrote hive h2's entry")
	require.Equal(t, 1, leaf.LeafConnections(), "the link is still up: the leaf sent nothing it may not")

	// A key the hub does not know never joins.
	stranger := startLeaf(t, hubLeaf, newKeyFile(t, "stranger", auth.Principal{Role: auth.RoleHive, Hive: "h9"}))
	time.Sleep(2 * time.Second)
	require.Zero(t, stranger.LeafConnections(), "the hub let in a leaf with a key it does not know")
}

// Beyond loopback a hub's leaf listener speaks TLS: a leaf given the CA
// joins over it (a CA makes the link TLS even for a nats-leaf:// URL), and
// one without the CA cannot verify the hub and never joins.
func TestALeafJoinsAHubOverTLS(t *testing.T) {
	dir := t.TempDir()
	tlsCfg, err := auth.ServerTLS(dir, nil)
	require.NoError(t, err)
	hub, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", LeafListen: "127.0.0.1:-1", TLS: tlsCfg, ServerName: "hub", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(hub.Shutdown)
	hiveKey := newKeyFile(t, "hive-h1", auth.Principal{Role: auth.RoleHive, Hive: "h1"})
	kp, err := auth.ReadKeyFile(hiveKey)
	require.NoError(t, err)
	pub, err := kp.PublicKey()
	require.NoError(t, err)
	start := func(cr bus.Credentials) *bus.Server {
		leaf, err := bus.StartServer(bus.ServerConfig{
			Listen: "127.0.0.1:-1", NkeyUsers: []string{pub},
			Leaf: &bus.LeafRemote{URLs: []string{hub.LeafURL()}, Credentials: cr}, Log: zerolog.Nop(),
		})
		require.NoError(t, err)
		t.Cleanup(leaf.Shutdown)
		return leaf
	}
	leaf := start(bus.Credentials{CAFile: auth.CAFile(dir)})
	awaitLink(t, leaf)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	queen, err := bus.Connect(ctx, bus.ConnectConfig{URL: hub.ClientURL(), Credentials: bus.Credentials{CAFile: auth.CAFile(dir)}, Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(queen.NC.Close)
	require.NoError(t, queen.EnsureStreams(ctx, bus.DefaultRetention()))
	local := connectTo(t, leaf.ClientURL(), hiveKey)
	hives, err := local.KV(ctx, local.Space.HivesBucket())
	require.NoError(t, err)
	_, err = hives.Put(ctx, "h1", []byte(`{}`))
	require.NoError(t, err, "a KV write crosses the TLS link")

	blind := start(bus.Credentials{})
	time.Sleep(2 * time.Second)
	require.Zero(t, blind.LeafConnections(), "a leaf that cannot verify the hub joined it")
}
