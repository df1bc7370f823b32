package busfix

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/tcpproxy"
	"github.com/stretchr/testify/require"
)

// Cluster is n real nats-servers, in process, routed to each other on
// loopback, with JetStream and the contract's streams and buckets kept
// on every server: what reads and writes meet when a stream's leader is
// one server and its copies are on others.
//
// The last server is the far one: every route to or from it runs through
// a proxy, so FarLatency can make it a server across a slow link, whose
// copies learn of each write later than the others do.
type Cluster struct {
	Servers []*server.Server
	// Bus is a client of the first server.
	Bus *bus.Bus
	far []*tcpproxy.Proxy
}

// StartCluster starts an n-server cluster (n ≥ 2), shut down with the test.
func StartCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	require.GreaterOrEqual(t, n, 2)
	c := &Cluster{Servers: make([]*server.Server, n)}
	routePorts := freePorts(t, n)
	// The far server reaches server i through toNear[i], and is reached
	// through fromNear. The others advertise the proxy the far server
	// dials them by, and it advertises its own, so no server learns a
	// direct way to or from it: a server dials what others advertise.
	farIdx := n - 1
	fromNear := c.proxy(t, addr(routePorts[farIdx]))
	toNear := make([]*tcpproxy.Proxy, farIdx)
	for i := range toNear {
		toNear[i] = c.proxy(t, addr(routePorts[i]))
	}
	opts := func(i int) *server.Options {
		o := &server.Options{
			ServerName: fmt.Sprintf("s%d", i),
			Host:       "127.0.0.1",
			Port:       -1,
			JetStream:  true,
			StoreDir:   t.TempDir(),
			NoLog:      true,
			NoSigs:     true,
			Cluster:    server.ClusterOpts{Name: "rbee-test", Host: "127.0.0.1", Port: routePorts[i]},
		}
		if i == farIdx {
			o.Cluster.Advertise = fromNear.Addr()
			for _, p := range toNear {
				o.Routes = append(o.Routes, routeURL(p.Addr()))
			}
		} else {
			o.Cluster.Advertise = toNear[i].Addr()
			for j := range farIdx {
				o.Routes = append(o.Routes, routeURL(addr(routePorts[j])))
			}
		}
		return o
	}
	// The near servers find each other first, by their own ports, so
	// none of them goes through a proxy to reach another.
	for i := range farIdx {
		c.start(t, opts(i))
	}
	c.awaitRoutes(t, c.Servers[:farIdx], farIdx-1)
	c.start(t, opts(farIdx))
	c.awaitRoutes(t, c.Servers, n-1)

	c.Bus = Connect(t, c.Servers[0].ClientURL())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		try, cancelTry := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.Bus.JS.AccountInfo(try)
		cancelTry()
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the cluster's JetStream did not come up: %v", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	require.NoError(t, c.Bus.EnsureStreams(ctx, bus.DefaultRetention()))
	return c
}

// Far is the index of the far server.
func (c *Cluster) Far() int { return len(c.Servers) - 1 }

// FarLatency makes every byte between the far server and the others take
// d each way from now on (0: at once).
func (c *Cluster) FarLatency(d time.Duration) {
	for _, p := range c.far {
		p.SetLatency(d)
	}
}

// Leader is the index of the server that leads stream, once it has a
// leader and a copy on every server.
func (c *Cluster) Leader(t testing.TB, stream string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		s, err := c.Bus.JS.Stream(ctx, stream)
		var info *jetstream.StreamInfo
		if err == nil {
			info, err = s.Info(ctx)
		}
		if err == nil && info.Cluster != nil && len(info.Cluster.Replicas) == len(c.Servers)-1 {
			for i, srv := range c.Servers {
				if srv.Name() == info.Cluster.Leader {
					return i
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("stream %s has no leader and copies on every server: %v", stream, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// NearLeader is Leader, after asking the far server to hand the
// stream's leadership to the first server if it holds it: a test that
// reads through the far server then reads across the slow link.
func (c *Cluster) NearLeader(t testing.TB, stream string) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l := c.Leader(t, stream)
		if l != c.Far() {
			return l
		}
		require.True(t, time.Now().Before(deadline), "the far server still leads %s", stream)
		req, err := json.Marshal(map[string]any{"placement": map[string]string{"preferred": c.Servers[0].Name()}})
		require.NoError(t, err)
		_, _ = c.Bus.NC.Request("$JS.API.STREAM.LEADER.STEPDOWN."+stream, req, 5*time.Second)
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) start(t testing.TB, o *server.Options) {
	t.Helper()
	s, err := server.NewServer(o)
	require.NoError(t, err)
	go s.Start()
	t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	require.True(t, s.ReadyForConnections(10*time.Second), "server %s did not start", o.ServerName)
	for i := range c.Servers {
		if c.Servers[i] == nil {
			c.Servers[i] = s
			return
		}
	}
}

func (c *Cluster) awaitRoutes(t testing.TB, servers []*server.Server, peers int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for _, s := range servers {
		for remotes(s) < peers {
			require.True(t, time.Now().Before(deadline), "server %s is routed to %d servers, want %d", s.Name(), remotes(s), peers)
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// remotes counts the servers s has a route to (a pair may have several).
func remotes(s *server.Server) int {
	rz, err := s.Routez(nil)
	if err != nil {
		return 0
	}
	ids := map[string]bool{}
	for _, r := range rz.Routes {
		ids[r.RemoteID] = true
	}
	return len(ids)
}

func (c *Cluster) proxy(t testing.TB, target string) *tcpproxy.Proxy {
	t.Helper()
	p, err := tcpproxy.Listen(target)
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.Close() })
	c.far = append(c.far, p)
	return p
}

func addr(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

func routeURL(hostport string) *url.URL { return &url.URL{Scheme: "nats", Host: hostport} }

func freePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		ports[i] = l.Addr().(*net.TCPAddr).Port
		require.NoError(t, l.Close())
	}
	return ports
}
