package bench

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// ServeBus runs an embedded nats-server with JetStream (bus.StartServer, the
// queen's own) until SIGTERM or SIGINT: `rbee-bench serve-bus --data DIR
// --listen HOST:PORT`.
func ServeBus(args []string) error {
	fs := flag.NewFlagSet("serve-bus", flag.ContinueOnError)
	data := fs.String("data", "", "JetStream directory")
	listen := fs.String("listen", "127.0.0.1:4222", "client address")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *data == "" {
		return fmt.Errorf("--data is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := bus.StartServer(bus.ServerConfig{DataDir: *data, Listen: *listen, ServerName: "rbee-bench-bus", Log: zerolog.Nop()})
	if err != nil {
		return err
	}
	<-ctx.Done()
	srv.Shutdown()
	return nil
}

// simulator beats registry entries like real hives and workers: each entry
// is rewritten once per interval with its status JSON and a TTL of three
// intervals, published to the bucket's subject as bus.Heartbeat does, spread
// evenly over the interval.
type simulator struct {
	js       []jetstream.JetStream
	hives    []string
	workers  []string
	interval time.Duration
	ttl      time.Duration
	space    subjects.Space

	mu      sync.Mutex
	stopped map[string]time.Time
	beats   atomic.Int64
	errs    atomic.Int64
	lagged  atomic.Int64
}

func (s *simulator) stop(id string) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	s.stopped[id] = now
	return now
}

func (s *simulator) isStopped(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.stopped[id]
	return ok
}

func hiveStatus(id string, workers []string, started time.Time) api.HiveStatus {
	return api.HiveStatus{
		ID: id, Version: "bench", PID: 4242, StartedAt: started, BeatAt: time.Now().UTC(),
		Capabilities: api.Capabilities{
			Hostname: id + ".example", OS: "linux", Arch: "amd64",
			CPU:      api.CPU{Model: "AMD EPYC 9554 64-Core Processor", Cores: 64, Threads: 128},
			RAMTotal: 256 << 30, RAMFree: 200 << 30, Backends: []string{"cpu"}, DetectedAt: started,
		},
		RAMFree: 200 << 30, Workers: workers,
		Models: []api.ModelBrief{{ID: "tiny", Key: "tiny", EstimatedMemory: 12 << 20}, {ID: "llama-3.2-1b", Key: "llama-3_2-1b-1a2b3c4d", EstimatedMemory: 1 << 30}},
	}
}

func workerStatus(id, hive string, started time.Time) api.WorkerStatus {
	return api.WorkerStatus{
		ID: id, Hive: hive, Model: "tiny", ModelKey: "tiny", Device: "cpu", SlotsTotal: 1, MemoryUsed: 40 << 20,
		State: api.WorkerReady, TokensServed: 12345, TokensPerSec: 1234.5, PID: 4243, Version: "bench",
		StartedAt: started, BeatAt: time.Now().UTC(),
	}
}

// run beats until ctx ends. The interval is cut into 100 ticks; each tick
// beats the entries of its slot.
func (s *simulator) run(ctx context.Context) {
	const ticks = 100
	type entry struct {
		subject string
		id      string
		value   func() ([]byte, error)
	}
	started := time.Now().UTC()
	var entries []entry
	for i, h := range s.hives {
		var ws []string
		if i < len(s.workers) {
			ws = []string{s.workers[i]}
		}
		entries = append(entries, entry{subjects.KVSubject(s.space.HivesBucket(), h), h, func() ([]byte, error) { return json.Marshal(hiveStatus(h, ws, started)) }})
	}
	for i, w := range s.workers {
		h := s.hives[i%len(s.hives)]
		entries = append(entries, entry{subjects.KVSubject(s.space.WorkersBucket(), subjects.WorkerKey(h, w)), w, func() ([]byte, error) { return json.Marshal(workerStatus(w, h, started)) }})
	}
	rand.Shuffle(len(entries), func(i, j int) { entries[i], entries[j] = entries[j], entries[i] })
	step := s.interval / ticks
	next := time.Now()
	for tick := 0; ; tick++ {
		next = next.Add(step)
		for i := tick % ticks; i < len(entries); i += ticks {
			en := entries[i]
			if s.isStopped(en.id) {
				continue
			}
			data, err := en.value()
			if err != nil {
				s.errs.Add(1)
				continue
			}
			msg := nats.NewMsg(en.subject)
			msg.Data = data
			if _, err := s.js[i%len(s.js)].PublishMsgAsync(msg, jetstream.WithMsgTTL(s.ttl)); err != nil {
				s.errs.Add(1)
				continue
			}
			s.beats.Add(1)
		}
		d := time.Until(next)
		if d < 0 {
			s.lagged.Add(1)
			d = 0
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
	}
}

type scaleResult struct {
	entries          int
	queenCPU, srvCPU float64
	queenRSS, srvRSS uint64
	beatRate         float64
	detect           []time.Duration
	undetected       int
	falseLost        int
	registered       string
	err              error
}

// benchScale runs a real queen against a separate bus process and N
// simulated registry entries (half hives, half workers, one worker per
// hive) beating at the default interval.
func benchScale(ctx context.Context, e *env) (*Table, error) {
	if e.opts.Self == "" {
		return nil, fmt.Errorf("no rbee-bench executable for the serve-bus process")
	}
	sizes := []int{100, 1000, 10_000}
	window := 10 * time.Second
	probes := 3
	if e.opts.Quick {
		window = 4 * time.Second
		probes = 2
	}
	interval := bus.DefaultHeartbeatInterval
	bound := 3*interval + time.Second
	t := &Table{
		Intro: fmt.Sprintf("A real queen-rbee (`--nats URL`) against a nats-server in its own process (`rbee-bench serve-bus`, the same bus.StartServer the queen embeds), with N simulated registry entries: N/2 hives and N/2 workers whose heartbeats are their real status JSON (api.HiveStatus, api.WorkerStatus), published like bus.Heartbeat to `$KV.rbee_hives.<hive>` / `$KV.rbee_workers.<hive>.<worker>` with a per-message TTL of %s, every %s, spread evenly over the interval. "+
			"CPU is utime+stime from /proc/PID/stat over a %s window once all entries are registered (1.0 = one core); RSS is VmRSS at the end of the window. "+
			"Detection: %d simulated hives stop beating at random moments; the time until the queen's `hive-get` endpoint reports them `lost` (polled every 100 ms). Bound: 3 intervals + 1 s = %s.",
			bus.TTLForInterval(interval), interval, window, probes, bound),
		Header: []string{"entries", "beats/s sent", "queen CPU (cores)", "queen RSS", "server CPU (cores)", "server RSS", "detection p50", "detection max", "within bound", "note"},
	}
	var results []scaleResult
	for _, n := range sizes {
		if ctx.Err() != nil {
			break
		}
		r := scaleOnce(ctx, e, n, interval, window, probes)
		results = append(results, r)
		note := r.registered
		if r.err != nil {
			note = r.err.Error()
		}
		if r.undetected > 0 {
			note += fmt.Sprintf("; %d of %d stopped hives never shown lost within 10 s", r.undetected, probes)
		}
		if r.falseLost > 0 {
			note += fmt.Sprintf("; %d beating hives shown lost (beats arrived late)", r.falseLost)
		}
		ds := durations(r.detect)
		within := "—"
		if r.undetected > 0 {
			within = "no"
		} else if len(r.detect) > 0 {
			within = yesNo(r.undetected == 0 && ds.max() <= float64(bound.Milliseconds()))
		}
		t.Rows = append(t.Rows, []string{thousands(int64(n)), num(r.beatRate), cores(r.queenCPU), mib(r.queenRSS), cores(r.srvCPU), mib(r.srvRSS), ms(ds.p50()), ms(ds.max()), within, note})
		e.logf("scale %d: queen %.2f cores %s, server %.2f cores, detection %s", n, r.queenCPU, mib(r.queenRSS), r.srvCPU, ms(ds.max()))
	}
	t.Notes = append(t.Notes,
		"The simulator, the server and the queen share the machine's cores; when they saturate it, beats go out late and the numbers show the machine's limit as much as the queen's.",
		"The queen's registry (queen/registry.go) decodes every beat, but publishes a new snapshot (a copy of every entry) only for a change the scheduler acts on at once; beats that only refresh figures are folded into one snapshot per 250 ms. Its cost per second is O(beats + entries × 4), not O(beats × entries).")
	for i := 1; i < len(results); i++ {
		a, b := results[i-1], results[i]
		if a.queenCPU <= 0 || b.queenCPU <= 0 {
			continue
		}
		t.Notes = append(t.Notes, fmt.Sprintf("From %s to %s entries (%.0f× the beats) the queen's CPU grew %.1f× (%.3f → %.3f cores).",
			thousands(int64(a.entries)), thousands(int64(b.entries)), float64(b.entries)/float64(a.entries), b.queenCPU/a.queenCPU, a.queenCPU, b.queenCPU))
	}
	for _, r := range results {
		if r.entries != 10_000 {
			continue
		}
		ok := r.err == nil && r.queenCPU >= 0 && r.queenCPU < 0.5 && len(r.detect) > 0 && r.undetected == 0 && durations(r.detect).max() <= float64(bound.Milliseconds())
		detail := fmt.Sprintf("queen %s cores, detection max %s (bound %s)", cores(r.queenCPU), ms(durations(r.detect).max()), bound)
		if r.undetected > 0 {
			detail = fmt.Sprintf("queen %s cores (RSS %s); %d of %d stopped hives not shown lost within 10 s (bound %s)", cores(r.queenCPU), mib(r.queenRSS), r.undetected, r.undetected+len(r.detect), bound)
		}
		if r.err != nil {
			detail += "; " + r.err.Error()
		}
		e.target(Target{Bench: 5, Claim: "10,000 entries at 1 Hz: queen < 0.5 core, detection within 3 intervals + 1 s", Holds: holds(ok), Detail: detail})
	}
	return t, nil
}

func cores(v float64) string {
	if v < 0 {
		return "—"
	}
	return fmt.Sprintf("%.3f", v)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func scaleOnce(ctx context.Context, e *env, n int, interval, window time.Duration, probes int) (r scaleResult) {
	r.entries = n
	r.queenCPU, r.srvCPU = -1, -1
	port, err := freePort()
	if err != nil {
		r.err = err
		return r
	}
	dir := e.dir(fmt.Sprintf("scale-%d", n))
	url := "nats://127.0.0.1:" + strconv.Itoa(port)
	srv, err := e.procs.start("serve-bus", e.opts.Self, []string{"serve-bus", "--data", dir, "--listen", "127.0.0.1:" + strconv.Itoa(port)}, nil, filepath.Join(dir, "bus.log"))
	if err != nil {
		r.err = err
		return r
	}
	defer srv.stop(5 * time.Second)
	probe, err := connectBus(ctx, url, "bench-probe", 15*time.Second)
	if err != nil {
		r.err = fmt.Errorf("serve-bus did not come up: %w; %s", err, logTail(srv))
		return r
	}
	probe.NC.Close()
	c, _, err := e.startQueen(ctx, queenSpec{NATSURL: url})
	if err != nil {
		r.err = err
		return r
	}
	defer c.close()

	sim := &simulator{interval: interval, ttl: bus.TTLForInterval(interval), space: c.b.Space, stopped: map[string]time.Time{}}
	for i := 0; i < n/2; i++ {
		sim.hives = append(sim.hives, fmt.Sprintf("simh%05d", i))
		sim.workers = append(sim.workers, fmt.Sprintf("simw%05d", i))
	}
	for i := 0; i < 4; i++ {
		b, err := connectBus(ctx, url, "bench-sim", 5*time.Second)
		if err != nil {
			r.err = err
			return r
		}
		defer b.NC.Close()
		js, err := jetstream.New(b.NC, jetstream.WithPublishAsyncMaxPending(4096), jetstream.WithPublishAsyncErrHandler(func(jetstream.JetStream, *nats.Msg, error) { sim.errs.Add(1) }))
		if err != nil {
			r.err = err
			return r
		}
		sim.js = append(sim.js, js)
	}
	sctx, stopSim := context.WithCancel(ctx)
	defer stopSim()
	go sim.run(sctx)

	// Wait until the queen lists every simulated hive and worker.
	t0 := time.Now()
	var online, workers int
	ok := waitFor(ctx, 20*time.Second, 500*time.Millisecond, func() bool {
		online, workers = queenCounts(ctx, c)
		return online >= n/2 && workers >= n/2
	})
	r.registered = fmt.Sprintf("all registered %s after the first beat", time.Since(t0).Round(100*time.Millisecond))
	if !ok {
		r.registered = fmt.Sprintf("after 20 s the queen listed %d of %d hives online and %d of %d workers", online, n/2, workers, n/2)
	}

	// The measurement window.
	b0, q, s := sim.beats.Load(), startCPU(c.queen.Pid), startCPU(srv.Pid)
	w0 := time.Now()
	select {
	case <-ctx.Done():
		r.err = ctx.Err()
		return r
	case <-time.After(window):
	}
	r.queenCPU, r.srvCPU = q.cores(), s.cores()
	r.beatRate = float64(sim.beats.Load()-b0) / time.Since(w0).Seconds()
	r.queenRSS, _ = rss(c.queen.Pid)
	r.srvRSS, _ = rss(srv.Pid)
	if backlog := watchBacklog(ctx, c); backlog > uint64(n/10) && r.beatRate > 0 {
		r.registered += fmt.Sprintf("; the queen's registry watch is %s beats (%.1f s) behind the bus: it cannot apply them as fast as they come", thousands(int64(backlog)), float64(backlog)/r.beatRate)
	}

	// Detection: stop a few hives at random moments, watch the queen.
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := 0; i < probes; i++ {
		id := sim.hives[(i*7919+13)%len(sim.hives)]
		time.Sleep(time.Duration(rand.Int64N(int64(interval))))
		stopped := sim.stop(id)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lost bool
			waitFor(ctx, 10*time.Second, 100*time.Millisecond, func() bool {
				var v api.HiveView
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				if err := c.b.Call(cctx, c.b.Space.Queen(api.EpHiveGet), api.HiveRequest{Name: id}, &v); err != nil {
					return false
				}
				lost = v.State == api.HiveLost
				return lost
			})
			mu.Lock()
			defer mu.Unlock()
			if lost {
				r.detect = append(r.detect, time.Since(stopped))
			} else {
				r.undetected++
			}
		}()
	}
	wg.Wait()
	// Beating hives the queen shows as lost: beats arrived after their TTL.
	var list api.HiveListReply
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	if err := c.b.Call(cctx, c.b.Space.Queen(api.EpHiveList), nil, &list); err == nil {
		for _, h := range list.Hives {
			if h.State == api.HiveLost && !sim.isStopped(h.Name) {
				r.falseLost++
			}
		}
	}
	cancel()
	if lag := sim.lagged.Load(); lag > 0 {
		r.registered += fmt.Sprintf("; the simulator ran late on %d ticks", lag)
	}
	if errs := sim.errs.Load(); errs > 0 {
		r.registered += fmt.Sprintf("; %d beats failed to publish", errs)
	}
	return r
}

// queenCounts is how many hives the queen lists online and workers it lists.
func queenCounts(ctx context.Context, c *cluster) (online, workers int) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var hl api.HiveListReply
	if err := c.b.Call(cctx, c.b.Space.Queen(api.EpHiveList), nil, &hl); err == nil {
		for _, h := range hl.Hives {
			if h.State == api.HiveOnline {
				online++
			}
		}
	}
	var wl api.WorkerListReply
	if err := c.b.Call(cctx, c.b.Space.Queen(api.EpWorkerList), api.HiveRequest{}, &wl); err == nil {
		workers = len(wl.Workers)
	}
	return online, workers
}

// watchBacklog is how many registry updates were written after the last one
// the consumers of the registry buckets (the queen's watches) received.
func watchBacklog(ctx context.Context, c *cluster) uint64 {
	var total uint64
	for _, bucket := range []string{c.b.Space.HivesBucket(), c.b.Space.WorkersBucket()} {
		st, err := c.b.JS.Stream(ctx, subjects.KVStream(bucket))
		if err != nil {
			continue
		}
		last := st.CachedInfo().State.LastSeq
		lister := st.ListConsumers(ctx)
		for ci := range lister.Info() {
			if last > ci.Delivered.Stream {
				total += last - ci.Delivered.Stream
			}
		}
	}
	return total
}
