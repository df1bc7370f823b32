package auth_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

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

// secured is a real embedded server guarded by an authority, with the
// queen connected and the streams made, as a queen leaves them.
type secured struct {
	t     *testing.T
	store *auth.Store
	auth  *auth.Authority
	srv   *bus.Server
	queen *bus.Bus
	space subjects.Space
}

func newSecured(t *testing.T) *secured {
	t.Helper()
	store, err := auth.OpenStore(filepath.Join(t.TempDir(), "creds"))
	require.NoError(t, err)
	a, err := auth.NewAuthority(store, subjects.Default(), zerolog.Nop())
	require.NoError(t, err)
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", Authority: a, Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(srv.Shutdown)
	s := &secured{t: t, store: store, auth: a, srv: srv, space: subjects.Default()}
	s.queen, _ = s.connect(s.issue(auth.QueenName, auth.Principal{Role: auth.RoleQueen}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, s.queen.EnsureStreams(ctx, bus.DefaultRetention()))
	return s
}

// issue makes a credential and returns its key file.
func (s *secured) issue(name string, p auth.Principal) string {
	s.t.Helper()
	_, seed, err := s.store.Issue(name, p)
	require.NoError(s.t, err)
	path := filepath.Join(s.t.TempDir(), name+".nk")
	require.NoError(s.t, auth.WriteKeyFile(path, name, p, seed, nil))
	return path
}

// connect opens a connection with the key in keyFile; violations are the
// permission errors the server sends it.
func (s *secured) connect(keyFile string) (b *bus.Bus, violations <-chan string) {
	s.t.Helper()
	return connectURL(s.t, s.srv.ClientURL(), keyFile)
}

func connectURL(t *testing.T, url, keyFile string) (b *bus.Bus, violations <-chan string) {
	t.Helper()
	ch := make(chan string, 64)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := bus.Connect(ctx, bus.ConnectConfig{
		URL: url, Name: filepath.Base(keyFile), Credentials: bus.Credentials{KeyFile: keyFile}, Log: zerolog.Nop(),
		Extra: []nats.Option{nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				select {
				case ch <- err.Error():
				default:
				}
			}
		})},
	})
	require.NoError(t, err)
	t.Cleanup(b.NC.Close)
	return b, ch
}

// refused waits for the server to refuse what the connection did on subject.
func refused(t *testing.T, violations <-chan string, subject string) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case v := <-violations:
			if strings.Contains(v, `"`+subject+`"`) {
				return
			}
		case <-deadline:
			t.Fatalf("the server did not refuse %s", subject)
		}
	}
}

func publishRefused(t *testing.T, b *bus.Bus, violations <-chan string, subject string) {
	t.Helper()
	require.NoError(t, b.NC.Publish(subject, []byte(`{"state":"completed"}`)))
	require.NoError(t, b.NC.Flush())
	refused(t, violations, subject)
}

func subscribeRefused(t *testing.T, b *bus.Bus, violations <-chan string, subject string) {
	t.Helper()
	sub, err := b.NC.SubscribeSync(subject)
	require.NoError(t, err)
	defer func() { _ = sub.Unsubscribe() }()
	require.NoError(t, b.NC.Flush())
	refused(t, violations, subject)
}

func TestAClientCanFollowButNotForgeDeleteOrCommand(t *testing.T) {
	s := newSecured(t)
	client, violations := s.connect(s.issue("laptop", auth.Principal{Role: auth.RoleClient}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// What a client is for works: following a job's events, reading the
	// namespace, calling the queen (nobody serves it here, and the bus
	// says so at once: the request was let through).
	watch, err := s.queen.NC.SubscribeSync("rbee.job.j1.>")
	require.NoError(t, err)
	require.NoError(t, s.queen.NC.Flush())
	followCtx, stopFollow := context.WithCancel(ctx)
	defer stopFollow()
	go func() {
		_ = client.Follow(followCtx, "j1", 0, func(api.Event) error { return nil })
	}()
	_, err = client.NC.Request(s.space.Queen("status"), nil, time.Second)
	require.ErrorIs(t, err, nats.ErrNoResponders)
	tap, err := client.NC.SubscribeSync("rbee.>")
	require.NoError(t, err)
	require.NoError(t, client.NC.Flush())

	// What it is not for is refused by the server.
	for _, kind := range []subjects.EventKind{subjects.EventState, subjects.EventToken, subjects.EventNarration} {
		subj, _ := s.space.JobEvent("j1", kind)
		publishRefused(t, client, violations, subj)
	}
	shutdown, _ := s.space.Hive("h1", "shutdown")
	publishRefused(t, client, violations, shutdown)
	drain, _ := s.space.Worker("h1", "w1", "drain")
	publishRefused(t, client, violations, drain)
	for _, key := range []string{
		subjects.KVSubject(s.space.JobsBucket(), "j1"),
		subjects.KVSubject(s.space.HivesBucket(), "h1"),
		subjects.KVSubject(s.space.WorkersBucket(), subjects.WorkerKey("h1", "w1")),
		subjects.KVSubject(s.space.InventoryBucket(), "h1"),
	} {
		publishRefused(t, client, violations, key)
	}
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	require.Error(t, client.JS.DeleteStream(short, s.space.JobsStream()))
	refused(t, violations, "$JS.API.STREAM.DELETE."+s.space.JobsStream())
	short2, cancelShort2 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort2()
	require.Error(t, client.JS.DeleteConsumer(short2, s.space.InferStream(), "infer-tiny"))
	refused(t, violations, "$JS.API.CONSUMER.DELETE."+s.space.InferStream()+".infer-tiny")
	// Nor can it read anyone else's replies.
	subscribeRefused(t, client, violations, "_INBOX.>")
	subscribeRefused(t, client, violations, auth.InboxPrefix("UOTHER")+".>")

	// None of the forgeries reached the job's subjects.
	_, err = watch.NextMsg(200 * time.Millisecond)
	require.ErrorIs(t, err, nats.ErrTimeout, "a forged event reached the job's subjects")
	// The client's tap saw none either, but a real event it does.
	state, _ := s.space.JobEvent("j1", subjects.EventState)
	require.NoError(t, s.queen.NC.Publish(state, []byte("real")))
	msg, err := tap.NextMsg(2 * time.Second)
	require.NoError(t, err)
	require.Equal(t, "real", string(msg.Data))
}

func TestAHiveActsOnlyForItselfAndItsWorkers(t *testing.T) {
	s := newSecured(t)
	h1, violations := s.connect(s.issue(auth.HiveName("h1"), auth.Principal{Role: auth.RoleHive, Hive: "h1"}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// Its own: its endpoints, its heartbeat, its workers' keys.
	own, err := h1.NC.SubscribeSync("rbee.hive.h1.status")
	require.NoError(t, err)
	_, err = h1.JS.Publish(ctx, subjects.KVSubject(s.space.HivesBucket(), "h1"), []byte("{}"))
	require.NoError(t, err)
	_, err = h1.JS.Publish(ctx, subjects.KVSubject(s.space.WorkersBucket(), subjects.WorkerKey("h1", "w1")), []byte("{}"))
	require.NoError(t, err)
	require.NoError(t, s.queen.NC.Publish("rbee.hive.h1.status", []byte("hi")))
	_, err = own.NextMsg(2 * time.Second)
	require.NoError(t, err)

	// Another hive's: refused.
	subscribeRefused(t, h1, violations, "rbee.hive.h2.>")
	publishRefused(t, h1, violations, "rbee.hive.h2.shutdown")
	publishRefused(t, h1, violations, subjects.KVSubject(s.space.HivesBucket(), "h2"))
	publishRefused(t, h1, violations, subjects.KVSubject(s.space.WorkersBucket(), subjects.WorkerKey("h2", "w9")))
	publishRefused(t, h1, violations, "rbee.worker.h2.w9.drain")
	publishRefused(t, h1, violations, s.space.WorkerCredentials("h2"))
	// And the job events only workers write.
	tok, _ := s.space.JobEvent("j1", subjects.EventToken)
	publishRefused(t, h1, violations, tok)
}

func TestAWorkerWritesOnlyItsOwnKey(t *testing.T) {
	s := newSecured(t)
	w1, violations := s.connect(s.issue(auth.WorkerName("h1", "w1"), auth.Principal{Role: auth.RoleWorker, Hive: "h1", Worker: "w1", ModelKey: "tiny"}))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := w1.JS.Publish(ctx, subjects.KVSubject(s.space.WorkersBucket(), subjects.WorkerKey("h1", "w1")), []byte("{}"))
	require.NoError(t, err)
	tok, _ := s.space.JobEvent("j1", subjects.EventToken)
	require.NoError(t, w1.NC.Publish(tok, []byte("{}")))

	publishRefused(t, w1, violations, subjects.KVSubject(s.space.WorkersBucket(), subjects.WorkerKey("h1", "w2")))
	publishRefused(t, w1, violations, subjects.KVSubject(s.space.HivesBucket(), "h1"))
	subscribeRefused(t, w1, violations, "rbee.worker.h1.w2.>")
	// Its model's work queue only.
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	_, err = w1.JS.CreateOrUpdateConsumer(short, s.space.InferStream(), jetstream.ConsumerConfig{Durable: "infer-other", FilterSubject: "rbee.infer.other"})
	require.Error(t, err)
	refused(t, violations, "$JS.API.CONSUMER.CREATE."+s.space.InferStream()+".infer-other.rbee.infer.other")
	_, err = w1.JS.CreateOrUpdateConsumer(ctx, s.space.InferStream(), jetstream.ConsumerConfig{Durable: "infer-tiny", FilterSubject: "rbee.infer.tiny", AckPolicy: jetstream.AckExplicitPolicy})
	require.NoError(t, err)
}

func TestConnectionsWithoutGoodCredentialsAreRefused(t *testing.T) {
	s := newSecured(t)
	connect := func(cr bus.Credentials) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		b, err := bus.Connect(ctx, bus.ConnectConfig{URL: s.srv.ClientURL(), Credentials: cr, Log: zerolog.Nop()})
		if err == nil {
			b.NC.Close()
		}
		return err
	}
	err := connect(bus.Credentials{})
	require.ErrorIs(t, err, bus.ErrRefused)
	require.Contains(t, err.Error(), "none were given")

	// A key the store never issued.
	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	seed, _ := kp.Seed()
	stranger := filepath.Join(t.TempDir(), "stranger.nk")
	require.NoError(t, auth.WriteKeyFile(stranger, "stranger", auth.Principal{Role: auth.RoleClient}, seed, nil))
	err = connect(bus.Credentials{KeyFile: stranger})
	require.ErrorIs(t, err, bus.ErrRefused)
	require.Contains(t, err.Error(), stranger, "the message names the credentials tried")

	// A revoked one: refused at the next connect, and its open
	// connection closed.
	key := s.issue("laptop", auth.Principal{Role: auth.RoleClient})
	require.NoError(t, connect(bus.Credentials{KeyFile: key}))
	open, _ := s.connect(key)
	closed := make(chan struct{})
	open.NC.SetClosedHandler(func(*nats.Conn) { close(closed) })
	open.NC.SetDisconnectErrHandler(func(*nats.Conn, error) {})
	_, err = s.store.Revoke("laptop")
	require.NoError(t, err)
	err = connect(bus.Credentials{KeyFile: key})
	require.ErrorIs(t, err, bus.ErrRefused)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go s.auth.Run(ctx, 50*time.Millisecond)
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		// nats.go closes a connection the server keeps refusing; until
		// then it is at least not connected.
		require.False(t, open.NC.IsConnected(), "a revoked credential's connection is still open")
	}
}
