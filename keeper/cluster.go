package keeper

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/urfave/cli/v2"
)

// --- cluster ---

// clusterCommand writes what a NATS cluster of upstream nats-server needs
// to carry rbee across machines. Like `creds`, it works on local files
// only: the cluster's authorization comes from the credentials the queen's
// data directory holds.
func clusterCommand() *cli.Command {
	return &cli.Command{
		Name:  "cluster",
		Usage: "lay out a NATS cluster (upstream nats-server) for rbee across machines",
		Subcommands: []*cli.Command{{
			Name: "config",
			Usage: "write the nats-server configuration of every server of a cluster (routes, JetStream, rbee's authorization, TLS); " +
				"make it again after issuing or revoking credentials",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "servers", Required: true, Usage: "comma-separated hosts (names or addresses) of the servers, one per node; three survive the loss of one"},
				&cli.StringFlag{Name: "out", Required: true, Usage: "directory to write the configurations, certificates and route secret into; copy it to the same path on every server"},
				&cli.StringFlag{Name: "store", Usage: "where each server keeps its JetStream files (default: <out>/jetstream)"},
				&cli.IntFlag{Name: "client-port", Value: auth.DefaultClientPort, Usage: "port programs connect to"},
				&cli.IntFlag{Name: "cluster-port", Value: auth.DefaultClusterPort, Usage: "port the servers route to one another on"},
				&cli.IntFlag{Name: "leaf-port", Value: auth.DefaultLeafPort, Usage: "port hives behind NAT dial out to"},
				&cli.BoolFlag{Name: "plain", Usage: "no TLS (only when every server is on loopback: a test cluster on one machine)"},
			},
			Action: clusterConfig,
		}},
	}
}

func clusterConfig(c *cli.Context) error {
	if c.NArg() > 0 {
		return usage("rbee cluster config takes no arguments; name the servers with --servers")
	}
	for _, f := range []string{"client-port", "cluster-port", "leaf-port"} {
		if p := c.Int(f); p <= 0 || p > 65535 {
			return usage("--%s must be a port (1-65535), not %d", f, p)
		}
	}
	nodes, err := auth.ClusterLayout(strings.Split(c.String("servers"), ","), c.Int("client-port"), c.Int("cluster-port"), c.Int("leaf-port"))
	if err != nil {
		return usage("%v", err)
	}
	plain := c.Bool("plain")
	if plain {
		for _, n := range nodes {
			if ip := net.ParseIP(n.Host); n.Host != "localhost" && (ip == nil || !ip.IsLoopback()) {
				return usage("--plain sends keys and prompts across the network unencrypted; it is for servers on loopback only, not %s", n.Host)
			}
		}
	}
	space, err := subjects.New(c.String(cliutil.FlagNamespace))
	if err != nil {
		return usage("%v", err)
	}
	out, err := filepath.Abs(c.String("out"))
	if err != nil {
		return err
	}
	store := c.String("store")
	if store == "" {
		store = filepath.Join(out, "jetstream")
	}
	if store, err = filepath.Abs(store); err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o700); err != nil {
		return err
	}
	creds, err := credsStore()
	if err != nil {
		return err
	}
	if _, err := creds.Ensure(auth.QueenName, auth.Principal{Role: auth.RoleQueen}); err != nil {
		return err
	}
	if _, err := creds.Ensure(auth.ClientName, auth.Principal{Role: auth.RoleClient}); err != nil {
		return err
	}
	issued, err := creds.List()
	if err != nil {
		return err
	}
	secret, err := auth.RouteSecret(filepath.Join(out, "route.secret"))
	if err != nil {
		return err
	}
	spec := auth.ClusterSpec{Nodes: nodes, StoreDir: store, RouteSecret: secret, Authorization: auth.ServerConfig(space, issued)}
	if !plain {
		spec.TLSDir = filepath.Join(out, "tls")
	}
	for i, n := range nodes {
		conf, err := auth.NodeConfig(spec, i)
		if err != nil {
			return err
		}
		path := filepath.Join(out, n.Name+".conf")
		// The file holds the route secret: for the server's user only.
		if err := os.WriteFile(path, conf, 0o600); err != nil {
			return err
		}
		if err := os.Chmod(path, 0o600); err != nil {
			return err
		}
		fmt.Printf("on %s: nats-server -c %s\n", n.Host, path)
	}
	fmt.Printf("programs connect with: --nats %s\n", auth.ClusterURLs(nodes, !plain))
	if !plain {
		fmt.Printf("and verify the servers with: --nats-ca %s\n", auth.CAFile(spec.TLSDir))
	}
	leaf := make([]string, len(nodes))
	for i, n := range nodes {
		leaf[i] = n.LeafURL(!plain)
	}
	fmt.Printf("hives behind NAT dial out to: %s\n", strings.Join(leaf, ","))
	return nil
}
