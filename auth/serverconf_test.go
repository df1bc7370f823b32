package auth_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// A nats-server configured from `rbee creds server-config` alone enforces
// the same roles as the embedded bus, with each hive's key standing in for
// its workers (such a server cannot learn of new keys as workers start).
func TestServerConfigEnforcesTheRolesOnAServerRbeeDoesNotEmbed(t *testing.T) {
	dir := t.TempDir()
	store, err := auth.OpenStore(filepath.Join(dir, "creds"))
	require.NoError(t, err)
	space := subjects.Default()
	issue := func(name string, p auth.Principal) string {
		_, _, err := store.Issue(name, p)
		require.NoError(t, err)
		return store.KeyFile(name)
	}
	queenKey := issue(auth.QueenName, auth.Principal{Role: auth.RoleQueen})
	clientKey := issue(auth.ClientName, auth.Principal{Role: auth.RoleClient})
	hiveKey := issue(auth.HiveName("h1"), auth.Principal{Role: auth.RoleHive, Hive: "h1"})
	creds, err := store.List()
	require.NoError(t, err)
	conf := filepath.Join(dir, "nats.conf")
	require.NoError(t, os.WriteFile(conf, append([]byte(fmt.Sprintf("listen: \"127.0.0.1:-1\"\njetstream { store_dir: %q }\n", filepath.Join(dir, "js"))),
		auth.ServerConfig(space, creds)...), 0o600))
	opts, err := server.ProcessConfigFile(conf)
	require.NoError(t, err)
	opts.NoSigs, opts.NoLog = true, true
	srv, err := server.NewServer(opts)
	require.NoError(t, err)
	go srv.Start()
	require.True(t, srv.ReadyForConnections(10*time.Second))
	t.Cleanup(srv.Shutdown)
	url := srv.ClientURL()
	connect := func(key string) (*bus.Bus, <-chan string) { return connectURL(t, url, key) }

	queen, _ := connect(queenKey)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, queen.EnsureStreams(ctx, bus.DefaultRetention()))

	client, violations := connect(clientKey)
	state, _ := space.JobEvent("j1", subjects.EventState)
	publishRefused(t, client, violations, state)
	publishRefused(t, client, violations, subjects.KVSubject(space.JobsBucket(), "j1"))

	// The hive's key does its workers' work, for its own workers only.
	hive, hv := connect(hiveKey)
	_, err = hive.JS.Publish(ctx, subjects.KVSubject(space.WorkersBucket(), subjects.WorkerKey("h1", "w1")), []byte("{}"))
	require.NoError(t, err)
	_, err = hive.JS.CreateOrUpdateConsumer(ctx, space.InferStream(), jetstream.ConsumerConfig{Durable: "infer-tiny", FilterSubject: "rbee.infer.tiny", AckPolicy: jetstream.AckExplicitPolicy})
	require.NoError(t, err)
	require.NoError(t, hive.NC.Publish("rbee.job.j1.token", []byte("{}")))
	publishRefused(t, hive, hv, subjects.KVSubject(space.WorkersBucket(), subjects.WorkerKey("h2", "w1")))
	publishRefused(t, hive, hv, subjects.KVSubject(space.HivesBucket(), "h2"))
	subscribeRefused(t, hive, hv, "rbee.hive.h2.>")
	// Its answers reach its callers' inboxes even across a leaf link,
	// where allow_responses does not carry; never another hive's.
	clientPub, err := auth.ReadKeyFile(clientKey)
	require.NoError(t, err)
	clientID, err := clientPub.PublicKey()
	require.NoError(t, err)
	require.NoError(t, hive.NC.Publish(auth.InboxPrefix(clientID)+".x", nil))
	require.NoError(t, hive.NC.Flush())
	select {
	case v := <-hv:
		t.Fatalf("a hive's answer to a client's inbox was refused: %s", v)
	case <-time.After(200 * time.Millisecond):
	}

	_, err = bus.Connect(ctx, bus.ConnectConfig{URL: url, Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrRefused)
}
