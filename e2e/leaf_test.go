package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/internal/testutil/tcpproxy"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

// leafHubStanza is what an upstream nats-server needs, besides rbee's
// authorization, to let hives join as leaf nodes: a leaf-node listener,
// and JetStream served to leaves in the default domain (a leaf of the
// global account is otherwise denied $JS.API.>, $KV.> and $OBJ.>).
const leafHubStanza = `leafnodes { listen: %q }
default_js_domain: { "$G": "" }
`

// leafHub is an upstream-configured NATS hub run in the test process: the
// cluster's bus port for the queen and the keeper, a leaf-node port for
// hives, and rbee's authorization from `rbee creds server-config`.
type leafHub struct {
	srv      *server.Server
	leafAddr string
}

// startLeafHub issues the queen's, the client's and each hive's credential
// into the queen's store (as `rbee creds issue` does) and starts a hub
// configured from them.
func (c *cluster) startLeafHub(hives ...string) *leafHub {
	c.t.Helper()
	store, err := auth.OpenStore(queen.CredentialsDir(c.home))
	require.NoError(c.t, err)
	_, err = store.Ensure(auth.QueenName, auth.Principal{Role: auth.RoleQueen})
	require.NoError(c.t, err)
	_, err = store.Ensure(auth.ClientName, auth.Principal{Role: auth.RoleClient})
	require.NoError(c.t, err)
	for _, h := range hives {
		_, err = store.Ensure(auth.HiveName(h), auth.Principal{Role: auth.RoleHive, Hive: h})
		require.NoError(c.t, err)
	}
	creds, err := store.List()
	require.NoError(c.t, err)
	dir := c.t.TempDir()
	hub := &leafHub{leafAddr: fmt.Sprintf("127.0.0.1:%d", freePort(c.t))}
	conf := fmt.Sprintf("listen: \"127.0.0.1:%d\"\njetstream { store_dir: %q }\n", c.port, filepath.Join(dir, "js")) +
		fmt.Sprintf(leafHubStanza, hub.leafAddr) +
		string(auth.ServerConfig(subjects.Default(), creds))
	path := filepath.Join(dir, "hub.conf")
	require.NoError(c.t, os.WriteFile(path, []byte(conf), 0o600))
	opts, err := server.ProcessConfigFile(path)
	require.NoError(c.t, err)
	opts.NoSigs, opts.NoLog = true, true
	hub.srv, err = server.NewServer(opts)
	require.NoError(c.t, err)
	go hub.srv.Start()
	require.True(c.t, hub.srv.ReadyForConnections(10*time.Second))
	c.t.Cleanup(hub.srv.Shutdown)
	return hub
}

// startHubQueen starts a queen on the hub (it finds its key in its store)
// and points every keeper at the hub.
func (c *cluster) startHubQueen() {
	c.t.Helper()
	c.env = append(c.env, "RBEE_NATS_URL="+c.url())
	q := exec.Command(filepath.Join(c.bin, "queen-rbee"), "--data", c.home, "--nats", c.url(), "--gateway", c.gateway)
	q.Env = c.env
	out := &syncBuffer{}
	q.Stdout, q.Stderr = out, out
	require.NoError(c.t, q.Start())
	c.t.Cleanup(func() { _ = q.Process.Kill(); _ = q.Wait() })
	var last result
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if last = c.rbee("status"); last.code == 0 {
			return
		}
	}
	c.t.Fatalf("the queen did not answer on the hub: %s\nqueen:\n%s", last.stderr, tail(out.String(), 20))
}

// startLeafHive starts rbee-hive name joining the hub through a leaf
// connection that crosses proxy, with its own key.
func (c *cluster) startLeafHive(name string, proxy *tcpproxy.Proxy) {
	c.t.Helper()
	logFile := filepath.Join(c.home, "logs", "hive-"+name+".log")
	require.NoError(c.t, os.MkdirAll(filepath.Dir(logFile), 0o755))
	h := exec.Command(filepath.Join(c.bin, "rbee-hive"), "--id", name, "--leaf", "nats-leaf://"+proxy.Addr(),
		"--creds", c.keyFile(auth.HiveName(name)), "--data", filepath.Join(c.home, "hives", name), "--log-file", logFile)
	// Its bus is its leaf: not the hub URL the keepers are given.
	h.Env = append(append([]string{}, c.env...), "RBEE_NATS_URL=")
	stderr := &syncBuffer{}
	h.Stderr = stderr
	require.NoError(c.t, h.Start())
	done := make(chan struct{})
	go func() { _ = h.Wait(); close(done) }()
	c.t.Cleanup(func() {
		_ = h.Process.Kill()
		<-done
		if c.t.Failed() {
			b, _ := os.ReadFile(logFile)
			c.t.Logf("hive %s's log:\n%s\nstderr:\n%s", name, tail(string(b), 40), stderr.String())
		}
	})
	eventually(c.t, 30*time.Second, func() bool { return c.hiveState(name) == "online" }, "hive %s did not come online through its leaf", name)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// hiveViews is the queen's view of the hives (`rbee hive list`).
func (c *cluster) hiveViews() []api.HiveView {
	c.t.Helper()
	r := c.mustRbee("--json", "hive", "list")
	var out []api.HiveView
	sc := bufio.NewScanner(strings.NewReader(r.stdout))
	for sc.Scan() {
		var v api.HiveView
		require.NoError(c.t, json.Unmarshal(sc.Bytes(), &v), sc.Text())
		out = append(out, v)
	}
	return out
}

func (c *cluster) hiveState(name string) string {
	c.t.Helper()
	for _, v := range c.hiveViews() {
		if v.Name == name {
			return v.State
		}
	}
	return ""
}

// requireOneEntry requires the queen to list hive name exactly once, in
// state.
func (c *cluster) requireOneEntry(name, state string) {
	c.t.Helper()
	n := 0
	for _, v := range c.hiveViews() {
		if v.Name == name {
			n++
			require.Equal(c.t, state, v.State, "hive %s", name)
		}
	}
	require.Equal(c.t, 1, n, "hive %s is listed once", name)
}

// clusterNarration collects what the queen says about the cluster (hives
// online, lost), as a person running `nats sub rbee.cluster.narration`
// would see it.
type clusterNarration struct {
	mu    sync.Mutex
	lines []string
}

func (c *cluster) watchClusterNarration() *clusterNarration {
	c.t.Helper()
	b := c.connect()
	n := &clusterNarration{}
	sub, err := b.NC.Subscribe(b.Space.ClusterNarration(), func(m *nats.Msg) {
		var ev api.Narration
		if json.Unmarshal(m.Data, &ev) == nil {
			n.mu.Lock()
			n.lines = append(n.lines, ev.Human)
			n.mu.Unlock()
		}
	})
	require.NoError(c.t, err)
	require.NoError(c.t, b.NC.Flush())
	c.t.Cleanup(func() { _ = sub.Unsubscribe() })
	return n
}

// mark is where the lines said from now on begin.
func (n *clusterNarration) mark() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.lines)
}

// count is how many lines since mark contain s.
func (n *clusterNarration) count(since int, s string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	k := 0
	for _, l := range n.lines[since:] {
		if strings.Contains(l, s) {
			k++
		}
	}
	return k
}

func (n *clusterNarration) since(mark int) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return strings.Join(n.lines[mark:], "\n")
}

// A hive behind NAT joins through one outbound leaf connection (here
// across a loopback TCP proxy the test cuts) to a hub that enforces rbee's
// roles, and serves the greedy answer; its worker's traffic shares the
// link. Cutting the link for 5 s: the queen sees the hive lost once and
// back once, lists it once, the job streaming through it either completes
// with its own answer or fails saying why, and the hive serves again.
func TestLeafHiveServesThroughOneLinkAndRidesOutACut(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	hub := c.startLeafHub("leafy")
	c.startHubQueen()
	said := c.watchClusterNarration()
	proxy, err := tcpproxy.Listen(hub.leafAddr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = proxy.Close() })
	c.startLeafHive("leafy", proxy)
	c.mustRbee("model", "synth", "--hive", "leafy", "--size", "large", "large")
	c.mustRbee("worker", "spawn", "--hive", "leafy", "-m", "large")
	require.Equal(t, 2, proxy.Live(), "the hive and its worker reach the hub over one connection (both its ends counted)")

	prompt := "hello world, the bee is"
	r := c.mustRbee("infer", "-m", "large", "--temperature", "0", "--max-tokens", "32", prompt)
	require.Equal(t, greedyOn(t, "large", prompt, 32)+"\n", r.stdout)
	require.Contains(t, r.stderr, "on hive leafy")

	k := c.start(longInfer()...)
	eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived through the leaf")
	from := said.mark()
	proxy.Cut()
	time.Sleep(5 * time.Second)
	proxy.Heal()

	code := k.wait(t, 2*time.Minute)
	t.Logf("the job streaming across the cut: exit %d: %s", code, lastLine(k.stderr.String()))
	if code == 0 {
		require.Equal(t, longGreedy.text+"\n", k.stdout.String(), "a job that completes across the cut has its own answer")
	} else {
		require.Equal(t, 1, code, k.stderr.String())
		require.Regexp(t, `job failed: .*(worker \S+ on hive leafy|hive leafy)`, k.stderr.String(), "the failure names what was lost")
	}
	eventually(t, 30*time.Second, func() bool { return said.count(from, "hive leafy is online") >= 1 }, "the queen did not see hive leafy back:\n%s", said.since(from))
	// A settle for a second loss or return to show, were there one.
	time.Sleep(2 * time.Second)
	require.Equal(t, 1, said.count(from, "hive leafy lost"), "lost once:\n%s", said.since(from))
	require.Equal(t, 1, said.count(from, "hive leafy is online"), "back once:\n%s", said.since(from))
	c.requireOneEntry("leafy", "online")

	r = c.mustRbee("infer", "-m", "large", "--temperature", "0", "--max-tokens", "32", prompt)
	require.Equal(t, greedyOn(t, "large", prompt, 32)+"\n", r.stdout, "the hive serves again after the cut")
}
