package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/stretchr/testify/require"
)

// natsCluster is a real cluster of upstream nats-server processes (built
// from the module at the version rbee embeds), laid out by `rbee cluster
// config` on loopback ports, with TLS and rbee's authorization.
type natsCluster struct {
	c     *cluster
	dir   string
	nodes []auth.ClusterNode
	procs []*natsNode
}

type natsNode struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// startNATSCluster writes an n-node configuration with `rbee cluster
// config` and starts every node; the cluster's programs (c.env, c.url,
// c.connect) use it from then on. Credentials issued later need the
// configuration made again and the nodes reloaded (reload).
func (c *cluster) startNATSCluster(n int) *natsCluster {
	c.t.Helper()
	binaries.Path(c.t, binaries.NATSServer)
	nc := &natsCluster{c: c, dir: c.t.TempDir()}
	client, route, leaf := freePortRun(c.t, n), freePortRun(c.t, n), freePortRun(c.t, n)
	hosts := strings.TrimSuffix(strings.Repeat("127.0.0.1,", n), ",")
	c.mustRbee("cluster", "config", "--servers", hosts, "--out", nc.dir,
		"--client-port", strconv.Itoa(client), "--cluster-port", strconv.Itoa(route), "--leaf-port", strconv.Itoa(leaf))
	var err error
	nc.nodes, err = auth.ClusterLayout(strings.Split(hosts, ","), client, route, leaf)
	require.NoError(c.t, err)
	c.natsURLs, c.caFile = auth.ClusterURLs(nc.nodes, true), auth.CAFile(filepath.Join(nc.dir, "tls"))
	c.env = append(c.env, "RBEE_NATS_URL="+c.natsURLs, "RBEE_NATS_CA="+c.caFile)
	nc.procs = make([]*natsNode, n)
	for i := range nc.nodes {
		nc.start(i)
	}
	c.t.Cleanup(func() {
		for i := range nc.procs {
			nc.kill(i)
		}
	})
	nc.awaitJetStream()
	return nc
}

// awaitJetStream waits until the cluster's JetStream answers (its servers
// have elected a meta leader), so what the test starts next meets a
// cluster, not one still forming.
func (nc *natsCluster) awaitJetStream() {
	nc.c.t.Helper()
	b := nc.c.connect()
	eventually(nc.c.t, 60*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := b.JS.AccountInfo(ctx)
		return err == nil
	}, "the cluster's JetStream did not come up")
}

// start runs node i (again) on its configuration and store.
func (nc *natsCluster) start(i int) {
	t := nc.c.t
	t.Helper()
	n := nc.nodes[i]
	log, err := os.OpenFile(filepath.Join(nc.dir, n.Name+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	require.NoError(t, err)
	defer log.Close()
	cmd := exec.Command(binaries.Path(t, binaries.NATSServer), "-c", filepath.Join(nc.dir, n.Name+".conf"))
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	p := &natsNode{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	nc.procs[i] = p
	addr := net.JoinHostPort(n.Host, strconv.Itoa(n.ClientPort))
	eventually(t, 20*time.Second, func() bool {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}, "nats-server %s did not listen on %s; its log: %s", n.Name, addr, nc.log(i))
}

// kill stops node i at once, as a machine losing power would.
func (nc *natsCluster) kill(i int) {
	p := nc.procs[i]
	if p == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	nc.procs[i] = nil
}

// reload makes the configuration again (after credentials were issued)
// and has every running node read it.
func (nc *natsCluster) reload() {
	nc.c.t.Helper()
	hosts := strings.TrimSuffix(strings.Repeat("127.0.0.1,", len(nc.nodes)), ",")
	n0 := nc.nodes[0]
	nc.c.mustRbee("cluster", "config", "--servers", hosts, "--out", nc.dir,
		"--client-port", strconv.Itoa(n0.ClientPort), "--cluster-port", strconv.Itoa(n0.ClusterPort), "--leaf-port", strconv.Itoa(n0.LeafPort))
	for _, p := range nc.procs {
		if p != nil {
			require.NoError(nc.c.t, p.cmd.Process.Signal(syscall.SIGHUP))
		}
	}
}

func (nc *natsCluster) log(i int) string {
	b, _ := os.ReadFile(filepath.Join(nc.dir, nc.nodes[i].Name+".log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// index is the node named name.
func (nc *natsCluster) index(name string) int {
	for i, n := range nc.nodes {
		if n.Name == name {
			return i
		}
	}
	nc.c.t.Fatalf("no node %q", name)
	return -1
}

// streamInfo reads a stream's state as the cluster sees it now.
func (nc *natsCluster) streamInfo(js jetstream.JetStream, name string) (*jetstream.StreamInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, name)
	if err != nil {
		return nil, err
	}
	return s.Info(ctx)
}

// leader is the node that leads stream name.
func (nc *natsCluster) leader(js jetstream.JetStream, name string) int {
	nc.c.t.Helper()
	var leader string
	eventually(nc.c.t, 20*time.Second, func() bool {
		info, err := nc.streamInfo(js, name)
		if err == nil && info.Cluster != nil {
			leader = info.Cluster.Leader
		}
		return leader != ""
	}, "stream %s has no leader", name)
	return nc.index(leader)
}

// caughtUp reports whether every replica of stream name is online and
// current, with the leader's messages.
func (nc *natsCluster) caughtUp(js jetstream.JetStream, name string) error {
	info, err := nc.streamInfo(js, name)
	if err != nil {
		return err
	}
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return fmt.Errorf("%s has no leader", name)
	}
	if len(info.Cluster.Replicas) != len(nc.nodes)-1 {
		return fmt.Errorf("%s has %d followers", name, len(info.Cluster.Replicas))
	}
	for _, r := range info.Cluster.Replicas {
		if !r.Current || r.Offline || r.Lag > 0 {
			return fmt.Errorf("%s: replica %s current=%v offline=%v lag=%d", name, r.Name, r.Current, r.Offline, r.Lag)
		}
	}
	return nil
}

// The streams and buckets of the contract, by stream name.
func contractStreams(c *cluster) []string {
	s := c.connect().Space
	return []string{
		s.JobsStream(), s.InferStream(), s.RequestsStream(),
		"KV_" + s.HivesBucket(), "KV_" + s.WorkersBucket(), "KV_" + s.JobsBucket(), "KV_" + s.InventoryBucket(),
	}
}

// startClusterQueen starts a queen on the NATS cluster (no embedded bus).
func (c *cluster) startClusterQueen() *exec.Cmd {
	c.t.Helper()
	queen := exec.Command(filepath.Join(c.bin, "queen-rbee"), "--data", c.home, "--gateway", c.gateway)
	queen.Env = c.env
	queen.Stdout, queen.Stderr = os.Stderr, os.Stderr
	require.NoError(c.t, queen.Start())
	done := make(chan struct{})
	go func() { _ = queen.Wait(); close(done) }()
	c.t.Cleanup(func() { _ = queen.Process.Kill(); <-done })
	eventually(c.t, 30*time.Second, func() bool { return c.rbee("status").code == 0 }, "the queen did not answer on the cluster")
	return queen
}

// A three-node cluster laid out by `rbee cluster config` carries rbee with
// three copies of everything, and losing any one server, the leader of
// the job event stream or of the work queue included, while a job streams
// costs nothing: every job completes with the text of a run without the
// fault, the client sees no token lost or twice, the registry stays one
// hive and one worker, and the node that comes back catches up.
func TestClusterRidesOutTheLossOfAnyOneServer(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c := newCluster(t).withDaemons()
	c.mustRbee("creds", "issue", "hive", "local")
	nc := c.startNATSCluster(3)
	c.startClusterQueen()
	b := c.connect()
	streams := contractStreams(c)
	for _, name := range streams {
		info, err := nc.streamInfo(b.JS, name)
		require.NoError(t, err, name)
		require.Equal(t, 3, info.Config.Replicas, "%s keeps a copy on each of the three servers", name)
	}
	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "start", "local")
	c.mustRbee("model", "synth", "--hive", "local", "--size", "large", "large")
	c.mustRbee("worker", "spawn", "--hive", "local", "-m", "large", "--slots", "2")

	for _, victim := range []string{b.Space.JobsStream(), b.Space.InferStream()} {
		t.Logf("killing the leader of %s while a job streams", victim)
		k := c.start(longInfer()...)
		eventually(t, 90*time.Second, func() bool { return k.stdout.String() != "" }, "no token arrived")
		lost := nc.leader(b.JS, victim)
		nc.kill(lost)
		// A job submitted after the loss goes through the new leaders.
		after := c.start(longInfer()...)
		for _, run := range []*runningKeeper{k, after} {
			require.Equal(t, 0, run.wait(t, 3*time.Minute), run.stderr.String())
			require.Equal(t, longGreedy.text+"\n", run.stdout.String(), "the client's answer equals a run without the fault")
			j := c.job(run.jobID(t))
			require.Equal(t, 1, j.Attempts, "the job ran once")
		}
		r := c.mustRbee("--json", "hive", "list")
		hives := strings.Split(strings.TrimSpace(r.stdout), "\n")
		require.Len(t, hives, 1, "one hive in the registry: %s", r.stdout)
		require.Contains(t, hives[0], `"state":"online"`)
		require.Len(t, c.workers(), 1, "one worker in the registry")

		nc.start(lost)
		for _, name := range streams {
			eventually(t, 60*time.Second, func() bool { return nc.caughtUp(b.JS, name) == nil },
				"%s did not catch up on %s: %v", nc.nodes[lost].Name, name, nc.caughtUp(b.JS, name))
		}
	}
}

// With two of three servers gone the cluster has no quorum: a submit is
// refused at once with a message that says so (no hang, nothing half
// written), and everything resumes when a second server returns: the jobs
// from before are intact and a new one runs.
func TestClusterWithoutQuorumRefusesWritesAndResumes(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.mustRbee("creds", "issue", "hive", "local")
	nc := c.startNATSCluster(3)
	c.startClusterQueen()
	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "start", "local")
	c.mustRbee("model", "synth", "--hive", "local", "tiny")
	short := []string{"infer", "-m", "tiny", "--temperature", "0", "--max-tokens", "16", "hello"}
	before := c.mustRbee(short...)
	beforeID := jobIDFrom(t, before.stderr)

	nc.kill(1)
	nc.kill(2)
	start := time.Now()
	r := c.rbeeWithin(30*time.Second, short...)
	require.Equal(t, 1, r.code, "stdout:\n%s\nstderr:\n%s", r.stdout, r.stderr)
	require.Contains(t, r.stderr, "no quorum", "the refusal says why")
	require.Less(t, time.Since(start), 15*time.Second, "refused, not left hanging")
	// What a person runs next answers too, saying what it cannot read.
	st := c.rbeeWithin(30*time.Second, "status")
	require.Equal(t, 0, st.code, "stdout:\n%s\nstderr:\n%s", st.stdout, st.stderr)
	require.Contains(t, st.stdout, "warning: job records cannot be read now")
	require.Contains(t, st.stdout, "no quorum")

	nc.start(1)
	eventually(t, 60*time.Second, func() bool { return c.rbee(short...).code == 0 }, "writes did not resume with two servers of three")
	again := c.mustRbee(short...)
	require.Equal(t, before.stdout, again.stdout, "the same request gives the same answer after the outage")
	j := c.job(beforeID)
	require.Equal(t, "completed", string(j.State), "the job from before the outage is intact")
}

// A queen started while its cluster's JetStream cannot answer (here two of
// three servers are down: no meta leader) waits for it, saying so, past
// the 15 s a single try of its setup may take, and serves once a second
// server is back, instead of exiting for a service manager to retry.
func TestClusterQueenWaitsForItsJetStream(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	nc := c.startNATSCluster(3)
	nc.kill(1)
	nc.kill(2)
	queen := exec.Command(filepath.Join(c.bin, "queen-rbee"), "--data", c.home, "--gateway", "off")
	queen.Env = c.env
	logs := &syncBuffer{}
	queen.Stdout, queen.Stderr = logs, logs
	started := time.Now()
	require.NoError(t, queen.Start())
	done := make(chan struct{})
	go func() { _ = queen.Wait(); close(done) }()
	t.Cleanup(func() { _ = queen.Process.Kill(); <-done })
	eventually(t, 30*time.Second, func() bool { return strings.Contains(logs.String(), "waiting for it") }, "the queen did not say it waits: %s", logs)
	select {
	case <-done:
		t.Fatalf("the queen exited: %s", logs)
	case <-time.After(time.Until(started.Add(17 * time.Second))):
	}
	nc.start(1)
	eventually(t, 60*time.Second, func() bool { return c.rbee("status").code == 0 }, "the queen did not serve once the cluster had a quorum: %s", logs)
}

// A cluster of two servers cannot place the three copies a queen chooses
// by default: the first stream settles on one copy and says so once, the
// streams and buckets made side by side after it (and the lease bucket)
// keep that one copy too, and the queen serves.
func TestClusterOfTwoKeepsOneCopyOfEverything(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	nc := c.startNATSCluster(2)
	queen := exec.Command(filepath.Join(c.bin, "queen-rbee"), "--data", c.home, "--gateway", "off")
	queen.Env = c.env
	logs := &syncBuffer{}
	queen.Stdout, queen.Stderr = logs, logs
	require.NoError(t, queen.Start())
	done := make(chan struct{})
	go func() { _ = queen.Wait(); close(done) }()
	t.Cleanup(func() { _ = queen.Process.Kill(); <-done })
	eventually(t, 60*time.Second, func() bool { return c.rbee("status").code == 0 }, "the queen did not serve on two servers: %s", logs)

	const fellBack = "keeping one copy until a queen starts with them all up"
	require.Equal(t, 1, strings.Count(logs.String(), fellBack), "the fallback is said once: %s", logs)
	b := c.connect()
	for _, name := range append(contractStreams(c), "KV_"+b.Space.LeasesBucket()) {
		info, err := nc.streamInfo(b.JS, name)
		require.NoError(t, err, name)
		require.Equal(t, 1, info.Config.Replicas, "%s keeps one copy", name)
	}
}
