package hive

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rs/zerolog"
)

// A hive behind NAT joins the bus as a leaf node: it embeds a nats-server
// that dials out to the hub's leaf-node listener (Config.Leaf) and listens
// on loopback, at a free port, for the hive itself and its workers. The
// machine opens no inbound port, and everything the hive and its workers
// say on the bus crosses one outbound connection. The leaf has no
// JetStream: KV, streams, consumers and the work queue are the hub's,
// reached over the link (bus.ServerConfig.Leaf).
//
// Who may do what is decided at the hub, which authorizes the link as the
// hive's user (its nkey, the one in Credentials.KeyFile) and holds
// everything crossing it to that user's permissions, which also cover the
// hive's workers (`rbee creds server-config`). The local leaf still asks
// for a credential, because loopback is shared by every user of the
// machine: an open listener would let any local process speak as the
// hive. It accepts the hive's own key and nothing else, so workers use the
// hive's key file (a per-worker key from the queen is known to the queen's
// embedded bus only, and a worker's inbox must be one the hive's user may
// receive on at the hub). A hive that reaches the hub with a token or a
// user instead guards its leaf with a random token of its own, handed to
// its workers in their environment.

// Settings of the leaf, in one place.
const (
	// leafJoinTimeout bounds the wait for the first link to the hub at
	// start: a hub that cannot be reached (or refuses the hive) is
	// reported rather than waited for.
	leafJoinTimeout = 15 * time.Second
	// leafWatchInterval is how often the link is looked at, so the hive
	// beats as soon as it is back rather than at its next interval.
	leafWatchInterval = 100 * time.Millisecond
	// hubJetStreamWait bounds the wait, once the link is up, for the
	// hub's JetStream to be reachable across it (hubJetStream).
	hubJetStreamWait = 5 * time.Second
)

// hubJetStream is a subject of the hub's JetStream API: the leaf knows
// the hub serves it once the hub's interest in it has crossed the link.
const hubJetStream = "$JS.API.INFO"

// leaf is the hive's own bus server, a leaf node of the hub.
type leaf struct {
	srv *bus.Server
	// local is what the hive and its workers present to the leaf.
	local bus.Credentials
	// refused is set when the hub refused the link's credentials;
	// describe names them.
	refused  atomic.Bool
	describe string
	log      zerolog.Logger
}

// startLeaf starts the hive's leaf server and waits, boundedly, until its
// link to the hub is up.
func startLeaf(ctx context.Context, cfg Config, log zerolog.Logger) (*leaf, error) {
	l := &leaf{log: log, describe: cfg.Credentials.Describe()}
	serverLog := log
	if log.GetLevel() > zerolog.ErrorLevel {
		// The refusal below is heard at error level: a quieter logger
		// would hear nothing.
		serverLog = log.Level(zerolog.ErrorLevel)
	}
	sc := bus.ServerConfig{
		Listen:     "127.0.0.1:-1",
		ServerName: "rbee-hive-" + cfg.ID,
		Leaf:       &bus.LeafRemote{URLs: cfg.Leaf, Credentials: cfg.Credentials},
		// The hub's refusal reaches us only as a log line of the leaf
		// server: note it, so the hive can say why it cannot join.
		Log: serverLog.Hook(zerolog.HookFunc(func(e *zerolog.Event, _ zerolog.Level, msg string) {
			switch {
			case strings.Contains(msg, "Authorization Violation"):
				l.refused.Store(true)
			case strings.Contains(msg, "default_js_domain"):
				// nats-server's warning, at every start, that the
				// option serving the hub's JetStream to this leaf is
				// meant for old configurations: chosen here, and
				// nothing an operator can act on.
				e.Discard()
			}
		})),
	}
	if cfg.Credentials.KeyFile != "" {
		kp, err := auth.ReadKeyFile(cfg.Credentials.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("%w: reading the credentials %s: %v", bus.ErrRefused, cfg.Credentials.KeyFile, err)
		}
		pub, err := kp.PublicKey()
		if err != nil {
			return nil, err
		}
		sc.NkeyUsers = []string{pub}
		l.local = bus.Credentials{KeyFile: cfg.Credentials.KeyFile}
	} else {
		var b [24]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, err
		}
		l.local = bus.Credentials{Token: hex.EncodeToString(b[:])}
		sc.Credentials = l.local
	}
	srv, err := bus.StartServer(sc)
	if err != nil {
		return nil, fmt.Errorf("hive %s: starting its leaf bus: %w", cfg.ID, err)
	}
	l.srv = srv
	joinCtx, cancel := context.WithTimeout(ctx, leafJoinTimeout)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	hub := strings.Join(cfg.Leaf, ",")
	for srv.LeafConnections() == 0 {
		// A refusal is the hub's answer to this key (unknown, revoked):
		// redialling will not change it, so the hive says so at once.
		if l.refused.Load() {
			srv.Shutdown()
			return nil, fmt.Errorf("%w: the hub at %s refused the leaf connection of hive %s (%s)", bus.ErrRefused, hub, cfg.ID, cfg.Credentials.Describe())
		}
		select {
		case <-joinCtx.Done():
			srv.Shutdown()
			return nil, fmt.Errorf("%w: hive %s could not join the hub at %s through a leaf connection within %s", bus.ErrUnreachable, cfg.ID, hub, leafJoinTimeout)
		case <-t.C:
		}
	}
	// The link being up is not the hub's interest having crossed it: a
	// JetStream request sent in between (the hive opens its buckets at
	// once) meets no responders, as seen under load by a few ms. Wait
	// for it, boundedly: a hub without JetStream never shows it, and the
	// hive's first request then says so.
	interest, cancelInterest := context.WithTimeout(joinCtx, hubJetStreamWait)
	defer cancelInterest()
	for !srv.Interest(hubJetStream) && interest.Err() == nil {
		select {
		case <-interest.Done():
		case <-t.C:
		}
	}
	log.Info().Str("hub", hub).Str("local", srv.ClientURL()).Msg("joined the hub through a leaf connection")
	return l, nil
}

// URL is where the hive's workers reach the bus.
func (l *leaf) URL() string { return l.srv.ClientURL() }

// workerCredentials are the arguments and environment that let a worker
// into the leaf (see the comment at the top of this file).
func (l *leaf) workerCredentials() (args, env []string) {
	if l.local.KeyFile != "" {
		return []string{"--" + cliutil.FlagCreds, l.local.KeyFile}, nil
	}
	return nil, cliutil.CredentialEnv(l.local)
}

// watch reports the link's losses and returns, and calls back when it is
// back (the hive beats at once), until ctx ends or the hub refuses the
// hive's key (revoked), which it returns: the hive can no longer be
// itself on the bus, as one whose direct connection is refused. nats-server
// redials the hub by itself; the hive's and its workers' connections to
// the leaf never drop, so no reconnect handler of theirs would tell them.
func (l *leaf) watch(ctx context.Context, back func()) error {
	t := time.NewTicker(leafWatchInterval)
	defer t.Stop()
	up, since := true, time.Now()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if l.refused.Load() {
			return fmt.Errorf("%w: the hub refused this hive's leaf connection (%s)", bus.ErrRefused, l.describe)
		}
		switch now := l.srv.LeafConnections() > 0; {
		case up && !now:
			up, since = false, time.Now()
			l.log.Warn().Msg("lost the link to the hub; redialling")
		case !up && now:
			up = true
			l.log.Info().Dur("down", time.Since(since).Round(time.Millisecond)).Msg("the link to the hub is back")
			back()
		}
	}
}

// Shutdown stops the leaf server: the hive's last word has crossed by then.
func (l *leaf) Shutdown() {
	if l != nil {
		l.srv.Shutdown()
	}
}
