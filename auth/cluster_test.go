package auth

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

// Every node's configuration is one upstream nats-server accepts as it
// is, and says what the cluster needs: its own name, routes to every other
// node (never to itself) with the route secret, JetStream in a store of its
// own, TLS verified both ways on routes, a leaf listener whose leaves get
// JetStream, and rbee's authorization.
func TestNodeConfigsAreWhatUpstreamNATSServerReads(t *testing.T) {
	dir := t.TempDir()
	nodes, err := ClusterLayout([]string{"127.0.0.1", "127.0.0.1", "10.0.0.3"}, 4222, 6222, 7422)
	require.NoError(t, err)
	require.Equal(t, 4223, nodes[1].ClientPort, "nodes sharing a host get consecutive ports")
	require.Equal(t, 4222, nodes[2].ClientPort)
	secret, err := RouteSecret(filepath.Join(dir, "route.secret"))
	require.NoError(t, err)
	again, err := RouteSecret(filepath.Join(dir, "route.secret"))
	require.NoError(t, err)
	require.Equal(t, secret, again, "a configuration made again keeps the routes' secret")

	store, err := OpenStore(filepath.Join(dir, "creds"))
	require.NoError(t, err)
	_, err = store.Ensure(QueenName, Principal{Role: RoleQueen})
	require.NoError(t, err)
	creds, err := store.List()
	require.NoError(t, err)
	space, err := subjects.New("")
	require.NoError(t, err)
	spec := ClusterSpec{Nodes: nodes, StoreDir: filepath.Join(dir, "js"), TLSDir: filepath.Join(dir, "tls"), RouteSecret: secret, Authorization: ServerConfig(space, creds)}
	for i, n := range nodes {
		conf, err := NodeConfig(spec, i)
		require.NoError(t, err)
		path := filepath.Join(dir, n.Name+".conf")
		require.NoError(t, os.WriteFile(path, conf, 0o600))
		opts, err := server.ProcessConfigFile(path)
		require.NoError(t, err, "%s", conf)
		require.Equal(t, n.Name, opts.ServerName)
		require.Equal(t, "rbee", opts.Cluster.Name)
		require.Equal(t, filepath.Join(dir, "js", n.Name), opts.StoreDir)
		require.True(t, opts.JetStream)
		require.Len(t, opts.Routes, len(nodes)-1)
		for _, r := range opts.Routes {
			require.NotEqual(t, n.ClusterPort, r.Port(), "no route to itself")
			p, _ := r.User.Password()
			require.Equal(t, secret, p)
		}
		require.NotNil(t, opts.Cluster.TLSConfig, "routes speak TLS")
		require.Equal(t, tls.RequireAndVerifyClientCert, opts.Cluster.TLSConfig.ClientAuth, "a route presents a certificate of the cluster CA")

		require.NotNil(t, opts.TLSConfig, "clients speak TLS")
		require.NotNil(t, opts.LeafNode.TLSConfig, "leaves speak TLS")
		require.Equal(t, n.LeafPort, opts.LeafNode.Port)
		require.Equal(t, "", opts.JsAccDefaultDomain["$G"], "leaves get the hub's JetStream")
		require.Contains(t, opts.JsAccDefaultDomain, "$G")
		require.NotEmpty(t, opts.Nkeys, "rbee's authorization")
		if n.Host == "10.0.0.3" {
			require.Equal(t, "0.0.0.0", opts.Host, "a machine's node listens on every address")
		} else {
			require.Equal(t, "127.0.0.1", opts.Host)
		}
		require.False(t, strings.Contains(string(conf), "seed"), "no key's secret in a server's configuration")
	}
}
