package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// natsNodes is a real cluster of upstream nats-server processes (built from
// the module rbee embeds) on loopback, configured as `rbee cluster config`
// configures one: routes, JetStream, rbee's authorization, TLS.
type natsNodes struct {
	e     *env
	home  string
	dir   string
	bin   string
	spec  auth.ClusterSpec
	procs []*process
	urls  string
	ca    string
}

// natsServer builds upstream nats-server once.
func (e *env) natsServer() (string, error) {
	path := filepath.Join(e.bin, "nats-server")
	if exists(path) {
		return path, nil
	}
	cmd := exec.Command("go", "build", "-o", path, "github.com/nats-io/nats-server/v2")
	cmd.Dir = e.opts.Root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build nats-server: %v: %s", err, out)
	}
	return path, nil
}

// startNATSNodes starts an n-node cluster whose authorization comes from
// the credentials store of a queen home (made here, as `rbee cluster
// config` makes it) and whose CA is where that queen's programs look.
func (e *env) startNATSNodes(ctx context.Context, home string, n int) (*natsNodes, error) {
	bin, err := e.natsServer()
	if err != nil {
		return nil, err
	}
	nn := &natsNodes{e: e, home: home, dir: e.dir("nats-cluster"), bin: bin}
	for i := range n {
		var ports [3]int
		for k := range ports {
			if ports[k], err = freePort(); err != nil {
				return nil, err
			}
		}
		nn.spec.Nodes = append(nn.spec.Nodes, auth.ClusterNode{Name: "rbee-" + strconv.Itoa(i+1), Host: "127.0.0.1", ClientPort: ports[0], ClusterPort: ports[1], LeafPort: ports[2]})
	}
	nn.spec.StoreDir = filepath.Join(nn.dir, "jetstream")
	nn.spec.TLSDir = queen.TLSDir(home)
	if nn.spec.RouteSecret, err = auth.RouteSecret(filepath.Join(nn.dir, "route.secret")); err != nil {
		return nil, err
	}
	store, err := auth.OpenStore(queen.CredentialsDir(home))
	if err != nil {
		return nil, err
	}
	for name, role := range map[string]auth.Role{auth.QueenName: auth.RoleQueen, auth.ClientName: auth.RoleClient} {
		if _, err := store.Ensure(name, auth.Principal{Role: role}); err != nil {
			return nil, err
		}
	}
	if err := nn.writeConfigs(); err != nil {
		return nil, err
	}
	nn.urls = auth.ClusterURLs(nn.spec.Nodes, true)
	nn.ca = auth.CAFile(nn.spec.TLSDir)
	nn.procs = make([]*process, n)
	for i := range n {
		if err := nn.start(i); err != nil {
			return nil, err
		}
	}
	return nn, nn.awaitJetStream(ctx, 60*time.Second)
}

// writeConfigs renders every node's configuration from the store as it
// is now.
func (nn *natsNodes) writeConfigs() error {
	store, err := auth.OpenStore(queen.CredentialsDir(nn.home))
	if err != nil {
		return err
	}
	creds, err := store.List()
	if err != nil {
		return err
	}
	space, err := subjects.New("")
	if err != nil {
		return err
	}
	nn.spec.Authorization = auth.ServerConfig(space, creds)
	for i, n := range nn.spec.Nodes {
		conf, err := auth.NodeConfig(nn.spec, i)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(nn.dir, n.Name+".conf"), conf, 0o600); err != nil {
			return err
		}
	}
	return nil
}

func (nn *natsNodes) start(i int) error {
	n := nn.spec.Nodes[i]
	p, err := nn.e.procs.start("nats-server "+n.Name, nn.bin, []string{"-c", filepath.Join(nn.dir, n.Name+".conf")}, nil, filepath.Join(nn.dir, n.Name+".log"))
	if err != nil {
		return err
	}
	nn.procs[i] = p
	return nil
}

// kill stops node i at once (SIGKILL), as a machine losing power would.
func (nn *natsNodes) kill(i int) {
	if p := nn.procs[i]; p != nil {
		p.kill(syscall.SIGKILL)
		<-p.Done()
		nn.procs[i] = nil
	}
}

// reload renders the configurations again (a credential was issued) and
// has every node read them, returning once keyFile is let in.
func (nn *natsNodes) reload(ctx context.Context, keyFile string) error {
	if err := nn.writeConfigs(); err != nil {
		return err
	}
	for _, p := range nn.procs {
		if p != nil {
			p.kill(syscall.SIGHUP)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		b, err := bus.Connect(ctx, bus.ConnectConfig{URL: nn.urls, Name: "rbee-bench", Credentials: bus.Credentials{KeyFile: keyFile, CAFile: nn.ca}, Timeout: time.Second, Log: zerolog.Nop()})
		if err == nil {
			b.NC.Close()
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("the cluster did not let %s in after a reload: %w", keyFile, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (nn *natsNodes) connect(ctx context.Context, name string) (*bus.Bus, error) {
	return bus.Connect(ctx, bus.ConnectConfig{
		URL: nn.urls, Name: name, Reconnect: true, Timeout: 2 * time.Second, Log: zerolog.Nop(),
		Credentials: bus.Credentials{KeyFile: filepath.Join(queen.CredentialsDir(nn.home), auth.QueenName+".nk"), CAFile: nn.ca},
	})
}

// awaitJetStream waits for the cluster's JetStream to answer (a meta
// leader elected).
func (nn *natsNodes) awaitJetStream(ctx context.Context, within time.Duration) error {
	var b *bus.Bus
	var last error
	ok := waitFor(ctx, within, 100*time.Millisecond, func() bool {
		if b == nil {
			if b, last = nn.connect(ctx, "rbee-bench-probe"); last != nil {
				return false
			}
		}
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, last = b.JS.AccountInfo(actx)
		return last == nil
	})
	if b != nil {
		b.NC.Close()
	}
	if !ok {
		return fmt.Errorf("the cluster's JetStream did not come up: %v", last)
	}
	return nil
}

// leader is the index of the node leading stream.
func (nn *natsNodes) leader(ctx context.Context, js jetstream.JetStream, stream string) (int, error) {
	info, err := streamInfo(ctx, js, stream)
	if err != nil {
		return -1, err
	}
	if info.Cluster == nil {
		return -1, fmt.Errorf("%s has no cluster", stream)
	}
	for i, n := range nn.spec.Nodes {
		if n.Name == info.Cluster.Leader {
			return i, nil
		}
	}
	return -1, fmt.Errorf("%s has no leader", stream)
}

// caughtUp waits until every replica of every stream is current.
func (nn *natsNodes) caughtUp(ctx context.Context, js jetstream.JetStream, streams []string, within time.Duration) error {
	var last error
	if waitFor(ctx, within, 100*time.Millisecond, func() bool {
		for _, st := range streams {
			info, err := streamInfo(ctx, js, st)
			if err != nil {
				last = err
				return false
			}
			if info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != len(nn.spec.Nodes)-1 {
				last = fmt.Errorf("%s: not all replicas known", st)
				return false
			}
			for _, r := range info.Cluster.Replicas {
				if !r.Current || r.Offline {
					last = fmt.Errorf("%s: replica %s not current", st, r.Name)
					return false
				}
			}
		}
		return true
	}) {
		return nil
	}
	return fmt.Errorf("not caught up within %s: %v", within, last)
}

func streamInfo(ctx context.Context, js jetstream.JetStream, name string) (*jetstream.StreamInfo, error) {
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	s, err := js.Stream(cctx, name)
	if err != nil {
		return nil, err
	}
	return s.Info(cctx)
}

// startClusterQueen starts a queen on a fresh three-node cluster; hives it
// starts get their keys let in by a reload.
func (e *env) startClusterQueen(ctx context.Context) (*cluster, *natsNodes, error) {
	home := e.dir("queen")
	nn, err := e.startNATSNodes(ctx, home, 3)
	if err != nil {
		return nil, nil, err
	}
	c, _, err := e.startQueen(ctx, queenSpec{Home: home, NATSURL: nn.urls, Args: []string{"--nats-ca", nn.ca}})
	if err != nil {
		return nil, nil, err
	}
	c.issued = func(keyFile string) error { return nn.reload(ctx, keyFile) }
	return c, nn, nil
}

// benchManyMachines measures rbee on a real three-node NATS cluster (R3,
// TLS, rbee's authorization) next to the embedded bus, in one run.
func benchManyMachines(ctx context.Context, e *env) (*Table, error) {
	n, rounds, kills, queenKills, regN := 128, 40, 10, 5, 10_000
	if e.opts.Quick {
		n, rounds, kills, queenKills, regN = 64, 3, 2, 1, 1_000
	}
	t := &Table{
		Intro: fmt.Sprintf("A queen on a real three-node cluster of upstream nats-server v2.15 (three processes on this machine's loopback, laid out as `rbee cluster config` lays one out: routes, JetStream with every stream and bucket at 3 replicas, rbee's authorization, TLS on clients and routes) next to a queen with the embedded bus (one server, 1 replica, no TLS on loopback), each with a hive and a warm 1-slot worker of the tiny model. "+
			"**Overhead**: the keeper's path (benchmark 1's B), %d tokens greedy, the two interleaved in each of %d rounds (order rotated, one warm-up round).", n, rounds),
		Header: []string{"bus", "TTFT p50", "TTFT p99", "tokens/s p50", "tok/s ÷ embedded", "added TTFT p50"},
	}
	embedded, _, err := e.startQueen(ctx, queenSpec{})
	if err != nil {
		return t, fmt.Errorf("embedded: %w", err)
	}
	defer embedded.close()
	clustered, nn, err := e.startClusterQueen(ctx)
	if err != nil {
		return t, fmt.Errorf("cluster: %w", err)
	}
	defer clustered.close()
	names := []string{"embedded", "3-node cluster, R3, TLS"}
	clusters := []*cluster{embedded, clustered}
	for i, c := range clusters {
		if err := c.readyTiny(ctx); err != nil {
			return t, fmt.Errorf("%s: %w", names[i], err)
		}
	}
	ttft, rate, errs := interleave(ctx, clusters, names, "tiny", n, rounds)
	for i, name := range names {
		if len(ttft[i]) == 0 {
			t.Rows = append(t.Rows, []string{name, "not measured"})
			continue
		}
		rel, added := "", ""
		if i > 0 {
			rel, added = ratio(rate[i].p50(), rate[0].p50()), ms(ttft[i].p50()-ttft[0].p50())
		}
		t.Rows = append(t.Rows, []string{name, ms(ttft[i].p50()), ms(ttft[i].p99()), num(rate[i].p50()), rel, added})
	}
	if len(errs) > 0 {
		t.Notes = append(t.Notes, "Failed jobs: "+strings.Join(errs, "; "))
	}
	b := clustered.b
	streams := []string{b.Space.JobsStream(), b.Space.InferStream(), b.Space.RequestsStream(),
		subjects.KVStream(b.Space.JobsBucket()), subjects.KVStream(b.Space.WorkersBucket()), subjects.KVStream(b.Space.HivesBucket())}

	fo, err := streamLeaderFailover(ctx, clustered, nn, streams, kills)
	t.More = append(t.More, fo)
	if err != nil {
		fo.Notes = append(fo.Notes, "**Not measured (or only in part):** "+err.Error())
	}
	st, err := clusterStream(ctx, e, embedded, nn)
	t.More = append(t.More, st)
	if err != nil {
		st.Notes = append(st.Notes, "**Not measured (or only in part):** "+err.Error())
	}
	qf, err := queenFailover(ctx, e, clustered, nn, queenKills)
	t.More = append(t.More, qf)
	if err != nil {
		qf.Notes = append(qf.Notes, "**Not measured (or only in part):** "+err.Error())
	}
	reg, err := registryAtScale(ctx, []*cluster{embedded, clustered}, names, regN)
	t.More = append(t.More, reg)
	if err != nil {
		reg.Notes = append(reg.Notes, "**Not measured (or only in part):** "+err.Error())
	}
	t.Notes = append(t.Notes,
		"All three nats-server processes, the queens, hives, workers and the bench share this machine's two cores, so every figure here carries the cost of three servers' replication on the cores that also decode; on three machines each server has its own. The TLS handshake is paid once per connection; what remains per message is the encryption and the quorum's round trips (loopback here, the network's there).")
	return t, nil
}

// readyTiny starts hive local with a warm worker of the tiny model.
func (c *cluster) readyTiny(ctx context.Context) error {
	if _, _, err := c.startHive(ctx, "local"); err != nil {
		return err
	}
	if err := c.synth(ctx, "local", "tiny", "tiny"); err != nil {
		return err
	}
	_, err := c.spawnWorker(ctx, "local", "tiny")
	return err
}

// interleave runs the keeper's path on every cluster in each round, the
// order rotated, after one warm-up round, and returns TTFT (ms) and
// tokens/s per cluster.
func interleave(ctx context.Context, clusters []*cluster, names []string, model string, n, rounds int) (ttft, rate []sample, errs []string) {
	ttft, rate = make([]sample, len(clusters)), make([]sample, len(clusters))
	for r := -1; r < rounds && ctx.Err() == nil; r++ {
		for k := range clusters {
			i := (k + max(r, 0)) % len(clusters)
			g, err := clusters[i].inferBus(ctx, model, n)
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", names[i], err))
				continue
			}
			if r >= 0 {
				ttft[i] = append(ttft[i], float64(g.ttft)/float64(time.Millisecond))
				rate[i] = append(rate[i], g.decode)
			}
		}
	}
	if len(errs) > 5 {
		errs = append(errs[:5], fmt.Sprintf("… and %d more", len(errs)-5))
	}
	return ttft, rate, errs
}

// streamLeaderFailover kills the server leading the job event stream while
// a job streams, kills times, and measures from the kill to the next token
// reaching a follower (the keeper's path); the node is started again and
// caught up before the next kill.
func streamLeaderFailover(ctx context.Context, c *cluster, nn *natsNodes, streams []string, kills int) (*Table, error) {
	const tokens = 1500
	t := &Table{
		Title:  "Failover of the job stream's leader",
		Intro:  fmt.Sprintf("A job of %d tokens streams to a follower (`bus.Follow`, as `rbee infer` does) while the server leading `RBEE_JOBS` is killed with SIGKILL after the 5th token; %d kills, the node started again and every stream caught up in between. Failover = the longest pause in the follower's tokens from the kill on (tokens stored before the kill arrive at once; the pause is the stream without a leader, until the follower's consumer runs on the new one). Each job is checked: completed, every token index exactly once.", tokens, kills),
		Header: []string{"kills", "failover p50", "failover p99", "max", "jobs completed", "tokens lost", "duplicated"},
	}
	var fo sample
	completed, lost, dups := 0, 0, 0
	var errs []string
	for k := 0; k < kills && ctx.Err() == nil; k++ {
		d, res, err := failoverOnce(ctx, c, nn, tokens)
		if err != nil {
			errs = append(errs, err.Error())
		} else {
			fo = append(fo, float64(d)/float64(time.Millisecond))
		}
		if res.completed {
			completed++
		}
		lost += res.lost
		dups += res.dups
		if err := nn.caughtUp(ctx, c.b.JS, streams, 90*time.Second); err != nil {
			errs = append(errs, err.Error())
			break
		}
	}
	if len(fo) == 0 {
		return t, fmt.Errorf("no failover measured: %s", strings.Join(errs, "; "))
	}
	t.Rows = append(t.Rows, []string{strconv.Itoa(len(fo)), ms(fo.p50()), ms(fo.p99()), ms(fo.max()), fmt.Sprintf("%d of %d", completed, kills), strconv.Itoa(lost), strconv.Itoa(dups)})
	t.Notes = append(t.Notes, "Most of a failover is the election: the surviving servers notice the leader gone (missed heartbeats) and elect another after a randomised timeout (nats-server's Raft waits 4 to 9 s by default), then the follower's ordered consumer is made again on the new leader. This is nats-server's own clock, not this machine's cores.")
	if len(errs) > 0 {
		t.Notes = append(t.Notes, "Errors: "+strings.Join(errs, "; "))
	}
	c.e.target(Target{Bench: 10, Claim: "every job completes through a stream leader's death, no token lost or duplicated", Holds: holds(completed == kills && lost == 0 && dups == 0),
		Detail: fmt.Sprintf("%d of %d completed, %d lost, %d duplicated", completed, kills, lost, dups)})
	return t, nil
}

type failoverResult struct {
	completed  bool
	lost, dups int
}

func failoverOnce(ctx context.Context, c *cluster, nn *natsNodes, tokens int) (time.Duration, failoverResult, error) {
	var res failoverResult
	raw, _ := json.Marshal(inferArgs("tiny", tokens))
	var reply api.SubmitReply
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	err := c.b.Call(cctx, c.b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}, &reply)
	cancel()
	if err != nil {
		return 0, res, fmt.Errorf("submit: %w", err)
	}
	var (
		mu       sync.Mutex
		killedAt time.Time
		after    time.Time
		last     time.Time
		stall    time.Duration
		seen     = map[int]int{}
		victim   = -1
		final    *api.StateChange
	)
	fctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	err = c.b.Follow(fctx, reply.JobID, 0, func(ev api.Event) error {
		if ev.Token != nil {
			now := time.Now()
			mu.Lock()
			seen[ev.Token.Index]++
			if !killedAt.IsZero() {
				// The stream stalls from the kill until a leader is
				// elected; tokens of a chunk stored before it arrive
				// together, so the failover is the longest pause.
				if gap := now.Sub(last); gap > stall {
					stall = gap
				}
				after = now
			}
			last = now
			n := len(seen)
			mu.Unlock()
			if n == 5 && victim < 0 {
				if v, err := nn.leader(ctx, c.b.JS, c.b.Space.JobsStream()); err == nil {
					victim = v
					mu.Lock()
					killedAt = time.Now()
					last = killedAt
					mu.Unlock()
					nn.kill(v)
				}
			}
		}
		if ev.Terminal() {
			final = ev.State
		}
		return nil
	})
	if victim >= 0 {
		if serr := nn.start(victim); serr != nil && err == nil {
			err = serr
		}
	}
	if err != nil {
		// Say what the job did meanwhile: a follower that waits for an end
		// the job reached is a bug of the follow, one that waits for a job
		// still running a bug of its end.
		var j api.Job
		jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if jerr := c.b.Call(jctx, c.b.Space.Queen(api.EpJobGet), api.JobRequest{ID: reply.JobID}, &j); jerr == nil {
			mu.Lock()
			got := len(seen)
			mu.Unlock()
			return 0, res, fmt.Errorf("follow of job %s (%s, attempt %d, %q; %d tokens seen): %w", reply.JobID, j.State, j.Attempts, j.Error, got, err)
		}
		return 0, res, fmt.Errorf("follow of job %s: %w", reply.JobID, err)
	}
	res.completed = final != nil && final.State == api.JobCompleted
	for i := range tokens {
		switch seen[i] {
		case 0:
			if res.completed {
				res.lost++
			}
		case 1:
		default:
			res.dups += seen[i] - 1
		}
	}
	if victim < 0 {
		return 0, res, errors.New("the job ended before the kill")
	}
	if after.IsZero() {
		return 0, res, errors.New("no token after the kill")
	}
	if !res.completed {
		return stall, res, fmt.Errorf("job %s did not complete: %+v", reply.JobID, final)
	}
	return stall, res, nil
}

// clusterStream is benchmark 2's token stream on the cluster (R3) beside
// the embedded bus, one publisher to 1, 10 and 100 followers.
func clusterStream(ctx context.Context, e *env, embedded *cluster, nn *natsNodes) (*Table, error) {
	type level struct{ followers, tokens int }
	levels := []level{{1, 20_000}, {10, 5_000}, {100, 1_000}}
	if e.opts.Quick {
		levels = []level{{1, 5_000}, {10, 1_000}, {100, 200}}
	}
	t := &Table{
		Title:  "Token stream with three replicas",
		Intro:  "Benchmark 2's token stream (one publisher, followers attached with `bus.Follow`, one connection each) on the three-node cluster beside the embedded bus, one round each. Rate = tokens a follower received / time from the first publish to its last token.",
		Header: []string{"bus", "followers", "tokens per job", "publisher acked tokens/s", "per-follower tokens/s p50", "slowest follower tokens/s", "lost", "duplicates"},
	}
	buses := []struct {
		name string
		dial func(name string) (*bus.Bus, error)
	}{
		{"embedded", func(name string) (*bus.Bus, error) {
			return bus.Connect(ctx, bus.ConnectConfig{URL: embedded.natsURL, Name: name, Credentials: embedded.creds(auth.QueenName), Timeout: 2 * time.Second, Log: zerolog.Nop()})
		}},
		{"3-node cluster, R3, TLS", func(name string) (*bus.Bus, error) { return nn.connect(ctx, name) }},
	}
	for _, bs := range buses {
		pub, err := bs.dial("bench-publisher")
		if err != nil {
			return t, err
		}
		defer pub.NC.Close()
		conns := make([]*bus.Bus, 100)
		for i := range conns {
			if conns[i], err = bs.dial(fmt.Sprintf("bench-follower-%d", i)); err != nil {
				return t, err
			}
			defer conns[i].NC.Close()
		}
		for _, lv := range levels {
			run, err := streamOnce(ctx, pub, conns[:lv.followers], lv.tokens)
			if err != nil {
				return t, fmt.Errorf("%s, %d followers: %w", bs.name, lv.followers, err)
			}
			rates := sample(run.rates)
			t.Rows = append(t.Rows, []string{bs.name, strconv.Itoa(lv.followers), thousands(int64(lv.tokens)), num(run.pubRate), num(rates.p50()), num(rates.pct(0)), strconv.Itoa(run.lost), strconv.Itoa(run.dups)})
		}
	}
	return t, nil
}

// registryAtScale writes n worker heartbeats (the registry's entries, with
// a heartbeat's TTL) of a made-up hive into the workers bucket of each bus
// and reads them back as a starting queen does (a watch of the bucket),
// then says goodbye for each.
func registryAtScale(ctx context.Context, clusters []*cluster, names []string, n int) (*Table, error) {
	t := &Table{
		Title:  "The registry at scale",
		Intro:  fmt.Sprintf("%s worker heartbeats (a worker's real entry, about 400 bytes, with a heartbeat's TTL) of a made-up hive written to `rbee_workers` as fast as acknowledgements come back (async publishes, at most 256 in flight), then read back whole by a new watch, as a queen starting does. The queens' registries follow the entries meanwhile, as they would.", thousands(int64(n))),
		Header: []string{"bus", "entries", "writes/s", "watch loads all in", "entries/s read"},
	}
	for i, c := range clusters {
		w, r, err := registryOnce(ctx, c.b, n)
		if err != nil {
			return t, fmt.Errorf("%s: %w", names[i], err)
		}
		t.Rows = append(t.Rows, []string{names[i], thousands(int64(n)), num(float64(n) / w.Seconds()), ms(float64(r) / float64(time.Millisecond)), num(float64(n) / r.Seconds())})
	}
	return t, nil
}

func registryOnce(ctx context.Context, b *bus.Bus, n int) (write, read time.Duration, err error) {
	const hive = "benchreg"
	st := workerStatus("x", hive, time.Now())
	data, _ := json.Marshal(st)
	bucket := b.Space.WorkersBucket()
	t0 := time.Now()
	var futures []jetstream.PubAckFuture
	for i := range n {
		msg := nats.NewMsg(subjects.KVSubject(bucket, subjects.WorkerKey(hive, fmt.Sprintf("w%05d", i))))
		msg.Data = data
		f, err := b.JS.PublishMsgAsync(msg, jetstream.WithMsgTTL(30*time.Second))
		if err != nil {
			return 0, 0, err
		}
		futures = append(futures, f)
	}
	select {
	case <-b.JS.PublishAsyncComplete():
	case <-time.After(2 * time.Minute):
		return 0, 0, errors.New("writes not acknowledged within 2 minutes")
	}
	for _, f := range futures {
		select {
		case err := <-f.Err():
			return 0, 0, err
		default:
		}
	}
	write = time.Since(t0)
	kv, err := b.KV(ctx, bucket)
	if err != nil {
		return write, 0, err
	}
	t1 := time.Now()
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	w, err := kv.Watch(wctx, subjects.WorkerKey(hive, "*"))
	if err != nil {
		return write, 0, err
	}
	got := 0
	for e := range w.Updates() {
		if e == nil {
			break
		}
		got++
	}
	read = time.Since(t1)
	_ = w.Stop()
	for i := range n {
		_ = kv.Delete(ctx, subjects.WorkerKey(hive, fmt.Sprintf("w%05d", i)))
	}
	if got < n {
		return write, read, fmt.Errorf("the watch loaded %d of %d entries", got, n)
	}
	return write, read, nil
}

// queenFailover runs a second queen on the cluster and kills whichever
// leads, reps times, with a job submitted right after the kill for a model
// no worker serves (so only a scheduler can start it): from the kill to
// the scheduler's first decision (the lease expiring, a standby taking
// over and reconciling), and to the job's first token (plus a worker's
// start and model load).
func queenFailover(ctx context.Context, e *env, first *cluster, nn *natsNodes, reps int) (*Table, error) {
	t := &Table{
		Title:  "Queen failover",
		Intro:  fmt.Sprintf("Two queens on the cluster (lease TTL %s, the default); the one that leads is killed with SIGKILL and at once a job is submitted through the other for a model no worker serves, so nothing but a scheduler can start it. %d kills, the dead queen started again as the standby in between.", queen.DefaultLeaseTTL, reps),
		Header: []string{"kills", "kill → scheduler acts p50", "max", "kill → first token p50", "max"},
	}
	home := e.dir("queen2")
	for _, d := range []func(string) string{queen.CredentialsDir, queen.TLSDir} {
		if err := os.Symlink(d(first.home), d(home)); err != nil {
			return t, err
		}
	}
	second, _, err := e.startQueen(ctx, queenSpec{Home: home, NATSURL: nn.urls, Args: []string{"--nats-ca", nn.ca}})
	if err != nil {
		return t, fmt.Errorf("second queen: %w", err)
	}
	defer second.close()
	if err := bothAnswer(ctx, second); err != nil {
		return t, err
	}
	if err := first.synth(ctx, "local", "tiny2", "tiny"); err != nil {
		return t, err
	}
	queens := []*cluster{first, second}
	var sched, tok sample
	var errs []string
	for r := 0; r < reps && ctx.Err() == nil; r++ {
		leader, err := leadingQueen(ctx, queens)
		if err != nil {
			return t, err
		}
		survivor := queens[1-leader]
		if err := stopWorkersOf(ctx, survivor, "tiny2"); err != nil {
			return t, err
		}
		queens[leader].queen.kill(syscall.SIGKILL)
		<-queens[leader].queen.Done()
		killed := time.Now()
		s, f, err := firstScheduled(ctx, survivor, "tiny2")
		if err != nil {
			errs = append(errs, err.Error())
		} else {
			sched = append(sched, float64(s.Sub(killed))/float64(time.Millisecond))
			tok = append(tok, float64(f.Sub(killed))/float64(time.Millisecond))
		}
		if _, err := queens[leader].restartQueen(ctx); err != nil {
			return t, err
		}
		if err := bothAnswer(ctx, queens[leader]); err != nil {
			return t, err
		}
	}
	if len(sched) == 0 {
		return t, fmt.Errorf("no failover measured: %s", strings.Join(errs, "; "))
	}
	t.Rows = append(t.Rows, []string{strconv.Itoa(len(sched)), ms(sched.p50()), ms(sched.max()), ms(tok.p50()), ms(tok.max())})
	t.Notes = append(t.Notes, fmt.Sprintf("The lease's TTL is the floor: a standby learns of a dead leader only when its lease expires (at most %s after its last renewal, which came up to a third of that before the kill), tries to take it as it should expire, and the server removes it at its next age check, up to 250 ms later. The rest is this machine: a reconcile of the job records, then a worker's start and model load for the first token.", queen.DefaultLeaseTTL))
	if len(errs) > 0 {
		t.Notes = append(t.Notes, "Errors: "+strings.Join(errs, "; "))
	}
	ttl := float64(queen.DefaultLeaseTTL) / float64(time.Millisecond)
	e.target(Target{Bench: 10, Claim: "a standby schedules within one lease TTL + 1 s of the leader's death", Holds: holds(sched.max() <= ttl+1000),
		Detail: fmt.Sprintf("max %s (TTL %s)", ms(sched.max()), queen.DefaultLeaseTTL)})
	return t, nil
}

// bothAnswer waits until two queens answer status on c's bus: either may
// answer any request, so the one just started is serving only once its
// own answer has come.
func bothAnswer(ctx context.Context, c *cluster) error {
	answered := map[string]bool{}
	if !waitFor(ctx, 30*time.Second, 20*time.Millisecond, func() bool {
		var st api.Status
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if c.b.Call(cctx, c.b.Space.Queen(api.EpStatus), nil, &st) == nil {
			answered[st.Queen] = true
		}
		return len(answered) == 2 || c.queen.exited()
	}) || c.queen.exited() {
		return fmt.Errorf("a queen did not answer: %s", logTail(c.queen))
	}
	return nil
}

// leadingQueen is the index of the queen that leads, by the queen ids in
// their data directories and the leader any of them names.
func leadingQueen(ctx context.Context, queens []*cluster) (int, error) {
	var leader string
	ok := waitFor(ctx, 30*time.Second, 100*time.Millisecond, func() bool {
		var st api.Status
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if queens[0].b.Call(cctx, queens[0].b.Space.Queen(api.EpStatus), nil, &st) != nil {
			return false
		}
		leader = st.Leader
		return leader != ""
	})
	if !ok {
		return -1, errors.New("no queen leads")
	}
	for i, q := range queens {
		if id, err := os.ReadFile(filepath.Join(q.home, "queen-id")); err == nil && strings.TrimSpace(string(id)) == leader {
			return i, nil
		}
	}
	return -1, fmt.Errorf("the leader %q is neither queen", leader)
}

// stopWorkersOf stops every worker of model.
func stopWorkersOf(ctx context.Context, c *cluster, model string) error {
	var reply api.WorkerListReply
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.b.Call(cctx, c.b.Space.Queen(api.EpWorkerList), api.HiveRequest{}, &reply); err != nil {
		return err
	}
	for _, w := range reply.Workers {
		if w.Model == model {
			if err := c.stopWorker(ctx, w.ID); err != nil {
				return err
			}
		}
	}
	return nil
}

// firstScheduled submits a short job for model and returns when the
// scheduler first narrated a decision on it and when its first token came.
func firstScheduled(ctx context.Context, c *cluster, model string) (sched, first time.Time, err error) {
	raw, _ := json.Marshal(inferArgs(model, 8))
	var reply api.SubmitReply
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	err = c.b.Call(cctx, c.b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: api.OpInfer, Args: raw}}, &reply)
	cancel()
	if err != nil {
		return sched, first, fmt.Errorf("submit: %w", err)
	}
	fctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	err = c.b.Follow(fctx, reply.JobID, 0, func(ev api.Event) error {
		if ev.Narration != nil && ev.Narration.Action == "schedule" && sched.IsZero() {
			sched = time.Now()
		}
		if ev.Token != nil && first.IsZero() {
			first = time.Now()
		}
		return nil
	})
	if err == nil && (sched.IsZero() || first.IsZero()) {
		err = fmt.Errorf("job %s: no scheduling decision or no token", reply.JobID)
	}
	return sched, first, err
}
