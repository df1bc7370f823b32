package auth

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Default ports of a cluster node: the standard NATS ports, so `nats`
// tools and upstream documentation apply as they are.
const (
	DefaultClientPort  = 4222
	DefaultClusterPort = 6222
	DefaultLeafPort    = 7422
)

// ClusterNode is one nats-server of a cluster: its name, the host the
// other servers, hives and clients reach it at, and its ports.
type ClusterNode struct {
	Name                              string
	Host                              string
	ClientPort, ClusterPort, LeafPort int
}

// ClientURL is where programs connect to the node.
func (n ClusterNode) ClientURL(tls bool) string {
	scheme := "nats"
	if tls {
		scheme = "tls"
	}
	return scheme + "://" + net.JoinHostPort(n.Host, strconv.Itoa(n.ClientPort))
}

// LeafURL is where a hive behind NAT dials the node.
func (n ClusterNode) LeafURL(tls bool) string {
	scheme := "nats-leaf"
	if tls {
		scheme = "tls"
	}
	return scheme + "://" + net.JoinHostPort(n.Host, strconv.Itoa(n.LeafPort))
}

// bind is the address a node listens on: its host when that is loopback
// (nodes of a test cluster share a machine), every address otherwise (a
// machine's name may resolve to an address it does not own behind NAT).
func (n ClusterNode) bind(port int) string {
	if ip := net.ParseIP(n.Host); (ip != nil && ip.IsLoopback()) || n.Host == "localhost" {
		return net.JoinHostPort(n.Host, strconv.Itoa(port))
	}
	return net.JoinHostPort("0.0.0.0", strconv.Itoa(port))
}

// ClusterLayout names the nodes of a cluster from a list of hosts: node i
// is "rbee-<i>" and takes the base ports, plus one for each earlier node on
// the same host, so several nodes fit on one machine for a test.
func ClusterLayout(hosts []string, clientPort, clusterPort, leafPort int) ([]ClusterNode, error) {
	if len(hosts) == 0 {
		return nil, errors.New("a cluster needs at least one server host")
	}
	seen := map[string]int{}
	nodes := make([]ClusterNode, 0, len(hosts))
	for i, h := range hosts {
		h = strings.TrimSpace(h)
		if h == "" || strings.ContainsAny(h, " /:") && net.ParseIP(h) == nil {
			return nil, fmt.Errorf("server host %q is not a host name or IP address", h)
		}
		k := seen[h]
		seen[h]++
		nodes = append(nodes, ClusterNode{
			Name: "rbee-" + strconv.Itoa(i+1), Host: h,
			ClientPort: clientPort + k, ClusterPort: clusterPort + k, LeafPort: leafPort + k,
		})
	}
	return nodes, nil
}

// ClusterSpec is what `rbee cluster config` writes a configuration from.
type ClusterSpec struct {
	// Name is the NATS cluster's name (default "rbee").
	Name  string
	Nodes []ClusterNode
	// StoreDir is where each node keeps its JetStream files, in a
	// directory named after the node (so nodes sharing a machine do not
	// share files).
	StoreDir string
	// TLSDir holds the CA and each node's certificate ("" = plain TCP,
	// loopback test clusters only).
	TLSDir string
	// RouteSecret authenticates the servers to one another on their
	// routes; clients never learn it.
	RouteSecret string
	// Authorization is the block auth.ServerConfig renders: the same
	// roles on every node.
	Authorization []byte
}

// RouteSecret reads the routes' shared secret from path, making one the
// first time, so a configuration made again (after issuing a credential)
// keeps the nodes that still run the old one able to route to the new.
func RouteSecret(path string) (string, error) {
	if b, err := os.ReadFile(path); err == nil && len(bytes.TrimSpace(b)) >= 32 {
		return string(bytes.TrimSpace(b)), nil
	}
	buf := make([]byte, 24)
	if _, err := rand.Read(buf); err != nil {
		return "", err
	}
	secret := hex.EncodeToString(buf)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", err
	}
	return secret, writeAtomic(path, []byte(secret+"\n"))
}

// NodeConfig renders the nats-server configuration of node i of spec. Each
// node has its certificate made in spec.TLSDir.
func NodeConfig(spec ClusterSpec, i int) ([]byte, error) {
	if i < 0 || i >= len(spec.Nodes) {
		return nil, fmt.Errorf("no node %d in a cluster of %d", i, len(spec.Nodes))
	}
	name := spec.Name
	if name == "" {
		name = "rbee"
	}
	n := spec.Nodes[i]
	var tlsBlock string
	if spec.TLSDir != "" {
		cert, key, err := NodeTLS(spec.TLSDir, n.Name, []string{n.Host})
		if err != nil {
			return nil, err
		}
		// verify on routes: a server joins only with a certificate of the
		// cluster's CA (the route secret is the second lock). Clients and
		// leaf nodes present keys, not certificates.
		tlsBlock = fmt.Sprintf("cert_file: %q, key_file: %q, ca_file: %q", cert, key, CAFile(spec.TLSDir))
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# nats-server configuration of %s, node %d of %d of the rbee cluster %q,\n", n.Name, i+1, len(spec.Nodes), name)
	b.WriteString("# made by `rbee cluster config`. Run it with: nats-server -c <this file>\n")
	fmt.Fprintf(&b, "server_name: %q\n", n.Name)
	fmt.Fprintf(&b, "listen: %q\n", n.bind(n.ClientPort))
	if tlsBlock != "" {
		fmt.Fprintf(&b, "tls { %s, timeout: 5 }\n", tlsBlock)
	}
	// A client's heartbeat, a job's token and a registry write are small;
	// a request carries at most a prompt, which the gateway bounds below this.
	b.WriteString("max_payload: 8MB\n")
	fmt.Fprintf(&b, "jetstream { store_dir: %q }\n", filepath.Join(spec.StoreDir, n.Name))
	b.WriteString("cluster {\n")
	fmt.Fprintf(&b, "  name: %q\n", name)
	fmt.Fprintf(&b, "  listen: %q\n", n.bind(n.ClusterPort))
	fmt.Fprintf(&b, "  authorization { user: \"route\", password: %q, timeout: 5 }\n", spec.RouteSecret)
	if tlsBlock != "" {
		fmt.Fprintf(&b, "  tls { %s, verify: true, timeout: 5 }\n", tlsBlock)
	}
	b.WriteString("  routes: [\n")
	for j, peer := range spec.Nodes {
		if j == i {
			continue
		}
		fmt.Fprintf(&b, "    \"nats-route://route:%s@%s\"\n", spec.RouteSecret, net.JoinHostPort(peer.Host, strconv.Itoa(peer.ClusterPort)))
	}
	b.WriteString("  ]\n}\n")
	// Hives behind NAT dial out to this port; they log in with their own
	// keys, checked against the authorization below like any client's.
	b.WriteString("leafnodes {\n")
	fmt.Fprintf(&b, "  listen: %q\n", n.bind(n.LeafPort))
	if tlsBlock != "" {
		fmt.Fprintf(&b, "  tls { %s, timeout: 5 }\n", tlsBlock)
	}
	b.WriteString("}\n")
	// A leaf of the global account is denied $JS.API.>, $KV.> and $OBJ.>
	// unless the hub serves its JetStream to leaves in the default domain.
	b.WriteString("default_js_domain: { \"$G\": \"\" }\n")
	b.Write(spec.Authorization)
	return b.Bytes(), nil
}

// ClusterURLs is the comma-separated list of the nodes' client URLs every
// program is given, so each reconnects to whichever node is up.
func ClusterURLs(nodes []ClusterNode, tls bool) string {
	urls := make([]string, len(nodes))
	for i, n := range nodes {
		urls[i] = n.ClientURL(tls)
	}
	return strings.Join(urls, ",")
}
