package bus

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// ErrUnreachable is returned when no NATS server answers at the address.
var ErrUnreachable = errors.New("bus unreachable")

// Bus is one component's connection to the rbee bus: the core connection,
// JetStream, and the names of its cluster.
type Bus struct {
	NC    *nats.Conn
	JS    jetstream.JetStream
	Space subjects.Space
	Log   zerolog.Logger
	// consumersExpire: see ConnectConfig.ConsumersExpire.
	consumersExpire bool
}

// ConnectConfig says how to reach the bus.
type ConnectConfig struct {
	// URL of the NATS server(s), comma-separated. Ignored when InProcess
	// options are given.
	URL         string
	Credentials Credentials
	// Name identifies the client in server monitoring ("queen-rbee", ...).
	Name      string
	Namespace string
	// Timeout bounds the first connection attempt (default 2 s): a command
	// that cannot reach the queen must say so quickly, never hang.
	Timeout time.Duration
	// Reconnect keeps a daemon connected across server restarts. Short-lived
	// clients (the keeper) also reconnect, so a queen restart does not cut a
	// followed stream.
	Reconnect bool
	// Extra options, e.g. an in-process server connection.
	Extra []nats.Option
	// OnReconnect is called after every reconnect (hives re-register).
	OnReconnect func()
	// OnDisconnect is called once each time the connection is lost, with
	// the (redacted) URL of the server it was connected to; not when the
	// connection is closed on purpose. Like OnReconnect it runs on the
	// connection's callback goroutine, in order, and must not block.
	OnDisconnect func(url string)
	Log          zerolog.Logger
	// ConsumersExpire makes followers leave their consumers to expire
	// instead of deleting them: a client's permissions allow no deletes.
	ConsumersExpire bool
}

// Connect opens a connection and JetStream context. Disconnects and
// reconnects surface as log lines.
func Connect(ctx context.Context, cfg ConnectConfig) (*Bus, error) {
	space, err := subjects.New(cfg.Namespace)
	if err != nil {
		return nil, err
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	log := cfg.Log
	// The server a connection was on is no longer known once it is lost:
	// remember it at connect and every reconnect.
	var current atomic.Pointer[string]
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.Timeout(cfg.Timeout),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if nc.IsClosed() {
				// Close reports a disconnect too; a goodbye is no loss.
				log.Info().Msg("disconnected from NATS")
				return
			}
			if err != nil {
				log.Warn().Err(err).Msg("disconnected from NATS")
			} else {
				log.Info().Msg("disconnected from NATS")
			}
			if cfg.OnDisconnect != nil {
				url := ""
				if u := current.Load(); u != nil {
					url = *u
				}
				cfg.OnDisconnect(url)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			url := nc.ConnectedUrlRedacted()
			current.Store(&url)
			log.Info().Str("url", url).Msg("reconnected to NATS")
			if cfg.OnReconnect != nil {
				cfg.OnReconnect()
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			ev := log.Warn().Err(err)
			if sub != nil {
				ev = ev.Str("subject", sub.Subject)
			}
			ev.Msg("NATS async error")
		}),
	}
	if cfg.Reconnect {
		opts = append(opts, nats.MaxReconnects(-1), nats.ReconnectWait(250*time.Millisecond), nats.ReconnectJitter(100*time.Millisecond, time.Second))
	} else {
		opts = append(opts, nats.NoReconnect())
	}
	credOpts, err := cfg.Credentials.Options()
	if err != nil {
		return nil, err
	}
	opts = append(opts, credOpts...)
	url := cfg.URL
	if url == "" {
		url = nats.DefaultURL
	}
	if !loopbackOnly(url) && len(cfg.Extra) == 0 && !cfg.Credentials.Empty() {
		// An rbee credential never crosses a network in the clear.
		opts = append(opts, func(o *nats.Options) error { o.Secure = true; return nil })
	}
	opts = append(opts, cfg.Extra...)
	type result struct {
		nc  *nats.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		nc, err := nats.Connect(url, opts...)
		done <- result{nc, err}
	}()
	var nc *nats.Conn
	select {
	case r := <-done:
		if r.err != nil {
			if errors.Is(r.err, nats.ErrAuthorization) || errors.Is(r.err, nats.ErrNkeysNotSupported) {
				what := "refused " + cfg.Credentials.Describe()
				if cfg.Credentials.Empty() {
					what = "asks for credentials and none were given"
				}
				return nil, fmt.Errorf("%w: the bus at %s %s (%v)", ErrRefused, redact(url), what, r.err)
			}
			return nil, fmt.Errorf("%w: cannot connect to NATS at %s: %v", ErrUnreachable, redact(url), r.err)
		}
		nc = r.nc
		url := nc.ConnectedUrlRedacted()
		current.CompareAndSwap(nil, &url)
	case <-ctx.Done():
		go func() {
			if r := <-done; r.nc != nil {
				r.nc.Close()
			}
		}()
		return nil, fmt.Errorf("%w: connecting to NATS at %s: %v", ErrUnreachable, redact(url), ctx.Err())
	}
	// An acknowledgement that never comes (the server died for good) fails
	// its token after this long instead of holding the job forever.
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncTimeout(10*time.Second))
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("JetStream: %w", err)
	}
	return &Bus{NC: nc, JS: js, Space: space, Log: log, consumersExpire: cfg.ConsumersExpire}, nil
}

// loopbackOnly reports whether every server of a comma-separated URL list
// is on this machine.
func loopbackOnly(urls string) bool {
	for _, u := range strings.Split(urls, ",") {
		u = strings.TrimSpace(u)
		if i := strings.Index(u, "://"); i >= 0 {
			u = u[i+3:]
		}
		if i := strings.LastIndex(u, "@"); i >= 0 {
			u = u[i+1:]
		}
		host, _, err := net.SplitHostPort(u)
		if err != nil {
			host = u
		}
		if !isLoopback(strings.Trim(host, "[]")) {
			return false
		}
	}
	return true
}

func redact(url string) string {
	// Credentials in a URL never belong in a message.
	if i, j := strings.Index(url, "://"), strings.LastIndex(url, "@"); i >= 0 && j > i {
		return url[:i+3] + "***" + url[j:]
	}
	return url
}

// Close drains the connection so buffered publishes reach the server.
func (b *Bus) Close() {
	if b == nil || b.NC == nil {
		return
	}
	if err := b.NC.Drain(); err != nil {
		b.NC.Close()
		return
	}
	// Drain is asynchronous; wait for it, boundedly.
	deadline := time.Now().Add(5 * time.Second)
	for !b.NC.IsClosed() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	b.NC.Close()
}
