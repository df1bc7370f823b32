// Package busfix gives tests a real embedded NATS server with JetStream and
// the streams and buckets of the contract, cleaned up with the test.
package busfix

import (
	"context"
	"net/url"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/tcpproxy"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// Fixture is a started server and one connected client.
type Fixture struct {
	Server *bus.Server
	Bus    *bus.Bus
	URL    string
}

// Start starts a server listening on a free loopback port (so subprocesses
// can connect too), connects, and creates the streams.
func Start(t testing.TB) *Fixture {
	t.Helper()
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: t.TempDir(), Listen: "127.0.0.1:-1", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(srv.Shutdown)
	b := Connect(t, srv.ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, b.EnsureStreams(ctx, bus.DefaultRetention()))
	return &Fixture{Server: srv, Bus: b, URL: srv.ClientURL()}
}

// Connect opens one more client to url, closed with the test.
func Connect(t testing.TB, url string) *bus.Bus {
	t.Helper()
	return ConnectAs(t, url, bus.Credentials{})
}

// ConnectAs opens one more client to url with credentials cr, closed with
// the test.
func ConnectAs(t testing.TB, url string, cr bus.Credentials) *bus.Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: url, Name: t.Name(), Credentials: cr, Reconnect: true, Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(func() { b.NC.Close() })
	return b
}

// Proxy starts a proxy to the server, closed with the test: a client that
// connects through it ("nats://" + its Addr) can be cut off and healed.
func (f *Fixture) Proxy(t testing.TB) *tcpproxy.Proxy {
	t.Helper()
	u, err := url.Parse(f.URL)
	require.NoError(t, err)
	p, err := tcpproxy.Listen(u.Host)
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close() })
	return p
}
