package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/testutil/tcpproxy"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/stretchr/testify/require"
)

var (
	chaosDuration = flag.Duration("chaos.duration", 0, "how long TestChaos injects faults (default 2m; env RBEE_CHAOS_DURATION)")
	chaosSeed     = flag.Int64("chaos.seed", 0, "seed of TestChaos's faults and prompts (default random, printed; env RBEE_CHAOS_SEED)")
)

// The chaos test's settings, in one place.
const (
	chaosDefaultDuration = 2 * time.Minute
	// chaosDrain bounds the wait, after the last fault, for every job to end.
	chaosDrain = 30 * time.Second
	// chaosCLIClients keepers submit and follow jobs, one at a time each; a
	// gateway client does the same over HTTP.
	chaosCLIClients = 5
	// Each client waits this long between its jobs, so a run submits a few
	// hundred jobs rather than thousands.
	chaosThinkMin, chaosThinkMax = 500 * time.Millisecond, 2500 * time.Millisecond
	// chaosClaimSlack is how long after a failure's time a worker it says
	// died may still be seen alive: the watcher's scan interval and a busy
	// machine's scheduling, not the queen's detection delay (a death is
	// only reported after it happened).
	chaosClaimSlack = 1500 * time.Millisecond
	// chaosLostWindow is how far before a "hive H was lost" the hive must
	// have been down or cut for the claim to hold: a heartbeat TTL and the
	// queen's detection, with room.
	chaosLostWindow = 10 * time.Second
)

// chaosHives are the two hives: one straight on the queen's bus port, one
// through a proxy that the test cuts. Targets are the workers kept on each.
var chaosHives = []struct {
	name    string
	proxied bool
	workers int
}{{"direct", false, 2}, {"proxied", true, 1}}

// A handful of prompts, so the golden outputs are cheap; their lengths
// spread from a few tokens to a few hundred, so faults land both between
// and inside generations.
var chaosPrompts = []struct {
	text      string
	maxTokens int
}{
	{"hello world", 16}, {"the bee is", 64}, {"a quick test", 8},
	{"bees make honey", 256}, {"once upon a time", 32}, {"the sky", 1900},
}

// TestChaos submits jobs over two hives and several workers while it kills
// workers, hives and the queen with SIGKILL and cuts a hive's bus
// connection, then checks that nothing was lost, duplicated, mis-answered
// or mis-explained, and that nothing is left running. Replay a run with
// -chaos.seed; run longer with -chaos.duration.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("the chaos test runs for minutes")
	}
	if runtime.GOOS != "linux" {
		t.Skip("the chaos test watches processes through /proc")
	}
	duration, seed := chaosSettings(t)
	t.Logf("chaos: seed %d (replay with -chaos.seed %d), faults for %s, drain up to %s", seed, seed, duration, chaosDrain)

	ch := newChaos(t, seed)
	ch.setUp()
	ch.sanity()
	started := time.Now()
	ch.run(duration)
	t.Logf("chaos: faults and load for %s, drained after %s", duration, time.Since(started).Round(time.Second))
	ch.check()
}

func chaosSettings(t *testing.T) (time.Duration, int64) {
	duration := *chaosDuration
	if duration == 0 {
		if v := os.Getenv("RBEE_CHAOS_DURATION"); v != "" {
			d, err := time.ParseDuration(v)
			require.NoError(t, err, "RBEE_CHAOS_DURATION")
			duration = d
		}
	}
	if duration <= 0 {
		duration = chaosDefaultDuration
	}
	seed := *chaosSeed
	if seed == 0 {
		if v := os.Getenv("RBEE_CHAOS_SEED"); v != "" {
			s, err := strconv.ParseInt(v, 10, 64)
			require.NoError(t, err, "RBEE_CHAOS_SEED")
			seed = s
		}
	}
	if seed == 0 {
		seed = time.Now().UnixNano() % 1_000_000_000
	}
	return duration, seed
}

// submission is one job a client submitted, and what the client was told.
type submission struct {
	client string
	prompt int
	jobID  string
	at     time.Time
	// told is the outcome the client saw: completed, failed, cancelled,
	// hung (still waiting when the drain ended) or "exit N".
	told   string
	text   string // the output the client received, when completed
	detail string
}

// fault is one injected fault.
type fault struct {
	kind   string // kill-worker, kill-hive, kill-queen, cut-bus
	target string
	pid    int
	at     time.Time
	down   time.Duration // until the hive or queen was back, or the cut healed
	note   string
}

type chaos struct {
	t     *testing.T
	c     *cluster
	seed  int64
	rng   *rand.Rand // the fault loop's only
	proxy *tcpproxy.Proxy
	watch *procWatch
	b     *bus.Bus

	mu          sync.Mutex
	subs        []*submission
	attempted   int
	unreachable int
	refused     map[string]int
	faults      []fault
	cuts        [][2]time.Time
	notes       []string
	golden      map[string]string
}

func newChaos(t *testing.T, seed int64) *chaos {
	c := newCluster(t).withDaemons()
	ch := &chaos{
		t: t, c: c, seed: seed, rng: seeded(seed, 0),
		watch: newProcWatch(c.home), refused: map[string]int{}, golden: map[string]string{},
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); ch.watch.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	proxy, err := tcpproxy.Listen(fmt.Sprintf("127.0.0.1:%d", c.port))
	require.NoError(t, err)
	t.Cleanup(func() { _ = proxy.Close() })
	ch.proxy = proxy
	return ch
}

// nats are the keeper's arguments during the run: an explicit bus URL, so a
// keeper started while the queen is down reports it unreachable (exit 3)
// instead of starting an ephemeral queen of its own.
func (ch *chaos) nats(args ...string) []string {
	return append([]string{"--nats", ch.c.url()}, args...)
}

func (ch *chaos) rbee(d time.Duration, args ...string) result {
	return cliRun(context.Background(), ch.c.bin, ch.c.env, d, ch.nats(args...)...)
}

// setUp starts the queen, both hives with the tiny model, and the workers.
// The proxied hive is started by the queen like any local hive, from a bin
// dir whose rbee-hive points the real one (and so its workers) at the proxy.
func (ch *chaos) setUp() {
	t, c := ch.t, ch.c
	wrapped := t.TempDir()
	script := fmt.Sprintf("#!/bin/sh\nexec '%s' \"$@\" --nats 'nats://%s'\n", filepath.Join(c.bin, "rbee-hive"), ch.proxy.Addr())
	require.NoError(t, os.WriteFile(filepath.Join(wrapped, "rbee-hive"), []byte(script), 0o755))

	c.startQueen()
	for _, h := range chaosHives {
		if h.proxied {
			c.mustRbee("hive", "add", h.name, "--bin-dir", wrapped)
		} else {
			c.mustRbee("hive", "add", h.name)
		}
		c.mustRbee("hive", "start", h.name)
		c.mustRbee("model", "synth", "--hive", h.name, "--size", "tiny", "tiny")
		for range h.workers {
			c.mustRbee("worker", "spawn", "--hive", h.name, "-m", "tiny")
		}
	}
	require.GreaterOrEqual(t, ch.proxy.Live(), 4, "the proxied hive and its worker reach the bus through the proxy")
	for _, h := range chaosHives {
		require.True(t, ch.watch.await(5*time.Second, func() bool {
			return len(ch.liveWorkers(h.name)) >= h.workers
		}), "the watcher sees %d worker(s) of hive %s", h.workers, h.name)
	}
	ch.b = c.connect()
	for _, p := range chaosPrompts {
		g := greedy(t, p.text, p.maxTokens)
		ch.golden[goldenKey(p.text, p.maxTokens)] = g
		t.Logf("chaos: prompt %q, max %d tokens: greedy answer of %d bytes", p.text, p.maxTokens, len(g))
	}
}

// seeded is the random source of one stream of choices (the faults, one
// client) of a run.
func seeded(seed int64, stream uint64) *rand.Rand {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[0:], uint64(seed))
	binary.LittleEndian.PutUint64(key[8:], stream)
	return rand.New(rand.NewChaCha8(key))
}

func goldenKey(prompt string, maxTokens int) string {
	return fmt.Sprintf("%d\x00%s", maxTokens, prompt)
}

// expected is the greedy output of a request run alone.
func (ch *chaos) expected(prompt string, maxTokens int) string {
	k := goldenKey(prompt, maxTokens)
	if g, ok := ch.golden[k]; ok {
		return g
	}
	g := greedy(ch.t, prompt, maxTokens)
	ch.golden[k] = g
	return g
}

// sanity checks, before any fault, that both clients get the greedy answer
// from both hives, so a mismatch later is the faults' doing.
func (ch *chaos) sanity() {
	t := ch.t
	for _, h := range chaosHives {
		p := chaosPrompts[len(chaosPrompts)-1]
		began := time.Now()
		r := ch.rbee(60*time.Second, "-q", "infer", "--hive", h.name, "-m", "tiny", "--temperature", "0", "--max-tokens", strconv.Itoa(p.maxTokens), p.text)
		require.Equal(t, 0, r.code, r.stderr)
		require.Equal(t, ch.expected(p.text, p.maxTokens)+"\n", r.stdout, "hive %s answers greedily", h.name)
		t.Logf("chaos: hive %s: %q in %s", h.name, p.text, time.Since(began).Round(time.Millisecond))
	}
	s := &submission{client: "sanity", prompt: 1}
	ch.gatewayOnce(context.Background(), s)
	require.Equal(t, "completed", s.told, s.detail)
	require.Equal(t, ch.expected(chaosPrompts[1].text, chaosPrompts[1].maxTokens), s.text, "the gateway answers greedily")
}

// run drives the load and the faults for d, then drains.
func (ch *chaos) run(d time.Duration) {
	until := time.Now().Add(d)
	drainCtx, stopClients := context.WithCancel(context.Background())
	defer stopClients()
	var clients sync.WaitGroup
	for i := range chaosCLIClients {
		clients.Add(1)
		go func() {
			defer clients.Done()
			ch.cliClient(drainCtx, i, until)
		}()
	}
	clients.Add(1)
	go func() {
		defer clients.Done()
		ch.gatewayClient(drainCtx, until)
	}()
	ch.injectFaults(until)

	// Drain: every client's last job ends, and every job in the store is
	// terminal, or the bound passes.
	deadline := time.Now().Add(chaosDrain)
	finished := make(chan struct{})
	go func() { clients.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(time.Until(deadline)):
	}
	for time.Now().Before(deadline) && !ch.allTerminal() {
		time.Sleep(time.Second)
	}
	stopClients()
	<-finished
}

func (ch *chaos) allTerminal() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	all, err := ch.listJobs(ctx)
	if err != nil {
		return false
	}
	for _, j := range all {
		if !j.State.Terminal() {
			return false
		}
	}
	return true
}

func (ch *chaos) listJobs(ctx context.Context) ([]api.Job, error) {
	store, err := jobs.Open(ctx, ch.b, api.Actor{Component: "e2e"}, 0)
	if err != nil {
		return nil, err
	}
	return store.List(ctx, "")
}

func (ch *chaos) note(format string, args ...any) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	ch.notes = append(ch.notes, fmt.Sprintf(format, args...))
}

// --- load ---

func (ch *chaos) cliClient(ctx context.Context, i int, until time.Time) {
	rng := seeded(ch.seed, uint64(i+1))
	name := fmt.Sprintf("cli-%d", i)
	for time.Now().Before(until) && ctx.Err() == nil {
		k := rng.IntN(len(chaosPrompts))
		p := chaosPrompts[k]
		ch.mu.Lock()
		ch.attempted++
		ch.mu.Unlock()
		r := cliRun(ctx, ch.c.bin, ch.c.env, 30*time.Second,
			ch.nats("--json", "infer", "--detach", "-m", "tiny", "--temperature", "0", "--max-tokens", strconv.Itoa(p.maxTokens), p.text)...)
		var reply api.SubmitReply
		switch {
		case r.code == 3:
			ch.mu.Lock()
			ch.unreachable++
			ch.mu.Unlock()
			time.Sleep(500 * time.Millisecond)
			continue
		case r.code != 0 || json.Unmarshal([]byte(strings.TrimSpace(r.stdout)), &reply) != nil || reply.JobID == "":
			ch.refuse(fmt.Sprintf("exit %d: %s", r.code, lastLine(r.stderr)))
			time.Sleep(500 * time.Millisecond)
			continue
		}
		s := &submission{client: name, prompt: k, jobID: reply.JobID, at: time.Now()}
		ch.mu.Lock()
		ch.subs = append(ch.subs, s)
		ch.mu.Unlock()
		ch.attach(ctx, s)
		time.Sleep(chaosThinkMin + time.Duration(rng.Int64N(int64(chaosThinkMax-chaosThinkMin))))
	}
}

// attach follows a job to its end as a keeper, again while the queen is
// unreachable, and records what the keeper said.
func (ch *chaos) attach(ctx context.Context, s *submission) {
	for {
		r := cliRun(ctx, ch.c.bin, ch.c.env, 120*time.Second, ch.nats("--json", "jobs", "attach", s.jobID)...)
		text, final := keeperEvents(r.stdout)
		switch {
		case r.code == 3 && ctx.Err() == nil:
			time.Sleep(500 * time.Millisecond)
			continue
		case r.code == 0:
			s.told, s.text = "completed", text
		case r.code == 1 && final != nil:
			s.told, s.detail = string(final.State), final.Error
		case r.code == -1:
			s.told, s.detail = "hung", "no end within the drain"
		default:
			s.told, s.detail = fmt.Sprintf("exit %d", r.code), lastLine(r.stderr)
		}
		return
	}
}

// keeperEvents reads a keeper's --json output: the token text it showed,
// and the terminal state it ended on.
func keeperEvents(out string) (string, *api.StateChange) {
	var text strings.Builder
	var final *api.StateChange
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var ev api.Event
		if json.Unmarshal(sc.Bytes(), &ev) != nil {
			continue
		}
		switch {
		case ev.Token != nil:
			text.WriteString(ev.Token.Text)
		case ev.Terminal():
			final = ev.State
		}
	}
	return text.String(), final
}

func (ch *chaos) gatewayClient(ctx context.Context, until time.Time) {
	rng := seeded(ch.seed, 1000)
	for time.Now().Before(until) && ctx.Err() == nil {
		s := &submission{client: "gateway", prompt: rng.IntN(len(chaosPrompts))}
		ch.mu.Lock()
		ch.attempted++
		ch.mu.Unlock()
		ch.gatewayOnce(ctx, s)
		if s.jobID != "" {
			ch.mu.Lock()
			ch.subs = append(ch.subs, s)
			ch.mu.Unlock()
		}
		time.Sleep(chaosThinkMin + time.Duration(rng.Int64N(int64(chaosThinkMax-chaosThinkMin))))
	}
}

// gatewayOnce runs one OpenAI completion. A request that never got a job id
// back (the queen was down, or died before answering) is not a submission;
// a job it created anyway is still checked, found in the store.
func (ch *chaos) gatewayOnce(ctx context.Context, s *submission) {
	p := chaosPrompts[s.prompt]
	body, _ := json.Marshal(map[string]any{"model": "tiny", "prompt": p.text, "max_tokens": p.maxTokens, "temperature": 0})
	rctx, cancel := context.WithTimeout(ctx, 120*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(rctx, http.MethodPost, "http://"+ch.c.gateway+"/v1/completions", bytes.NewReader(body))
	if err != nil {
		panic(err)
	}
	req.Header.Set("Content-Type", "application/json")
	s.at = time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			ch.mu.Lock()
			ch.unreachable++
			ch.mu.Unlock()
		} else {
			ch.refuse("gateway: " + strings.TrimPrefix(err.Error(), "Post \"http://"+ch.c.gateway+"/v1/completions\": "))
		}
		s.told, s.detail = "unreachable", err.Error()
		return
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	s.jobID = resp.Header.Get("X-Rbee-Job")
	if s.jobID == "" {
		ch.refuse(fmt.Sprintf("gateway %d: %s", resp.StatusCode, lastLine(string(raw))))
		return
	}
	var out struct {
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
		Error *struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	switch {
	case err != nil:
		// The gateway lives in the queen: a killed queen cuts the answer.
		s.told, s.detail = "cut off", err.Error()
	case json.Unmarshal(raw, &out) != nil:
		s.told, s.detail = fmt.Sprintf("http %d", resp.StatusCode), lastLine(string(raw))
	case resp.StatusCode == http.StatusOK && len(out.Choices) == 1:
		s.told, s.text = "completed", out.Choices[0].Text
	case out.Error != nil:
		s.told, s.detail = "failed", out.Error.Message
	default:
		s.told, s.detail = fmt.Sprintf("http %d", resp.StatusCode), lastLine(string(raw))
	}
}

func (ch *chaos) refuse(why string) {
	if len(why) > 60 {
		why = why[:60] + "…"
	}
	ch.mu.Lock()
	defer ch.mu.Unlock()
	ch.refused[why]++
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	l := lines[len(lines)-1]
	if len(l) > 140 {
		l = l[:140] + "…"
	}
	return l
}

// --- faults ---

func (ch *chaos) liveWorkers(hive string) []procRecord {
	var out []procRecord
	for _, w := range ch.watch.live("llm-worker-rbee", "") {
		if hive == "" || w.Hive == hive {
			out = append(out, w)
		}
	}
	return out
}

// injectFaults injects one fault at a time, at seeded random moments, each
// with its recovery (a restart, a heal, replacement workers), until until.
func (ch *chaos) injectFaults(until time.Time) {
	start := time.Now()
	for {
		gap := 2*time.Second + time.Duration(ch.rng.Int64N(int64(4*time.Second)))
		if time.Now().Add(gap).After(until) {
			return
		}
		time.Sleep(gap)
		var f fault
		switch n := ch.rng.IntN(100); {
		case n < 35:
			f = ch.killWorker()
		case n < 55:
			f = ch.killHive()
		case n < 75:
			f = ch.killQueen()
		default:
			f = ch.cutBus()
		}
		ch.replenish()
		ch.t.Logf("chaos: %s +%5.1fs %-11s %-28s down %-6s %s", f.at.Format("15:04:05.000"), f.at.Sub(start).Seconds(), f.kind, f.target, f.down.Round(100*time.Millisecond), f.note)
		ch.mu.Lock()
		ch.faults = append(ch.faults, f)
		ch.mu.Unlock()
	}
}

// killWorker kills a worker that is generating, when the draw says so and
// one is, else any live worker: a kill of an idle worker tests little.
func (ch *chaos) killWorker() fault {
	f := fault{kind: "kill-worker", at: time.Now()}
	preferBusy, pick := ch.rng.IntN(100) < 70, ch.rng.IntN(1<<30)
	live := ch.liveWorkers("")
	if preferBusy {
		if busy := ch.busyWorkers(live); len(busy) > 0 {
			live = busy
			f.note = "was generating"
		}
	}
	if len(live) == 0 {
		f.note = "no worker alive; none killed"
		return f
	}
	v := live[pick%len(live)]
	f.target, f.pid = v.ID+"@"+v.Hive, v.PID
	f.at = time.Now()
	_ = syscall.Kill(v.PID, syscall.SIGKILL)
	if !ch.watch.await(5*time.Second, func() bool { return len(ch.watch.live("llm-worker-rbee", v.ID)) == 0 }) {
		f.note = "still alive 5s after SIGKILL"
	}
	return f
}

// busyWorkers are those of live that the queen says hold a slot.
func (ch *chaos) busyWorkers(live []procRecord) []procRecord {
	r := ch.rbee(10*time.Second, "--json", "worker", "list")
	if r.code != 0 {
		return nil
	}
	busy := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(r.stdout))
	for sc.Scan() {
		var w api.WorkerStatus
		if json.Unmarshal(sc.Bytes(), &w) == nil && w.SlotsBusy > 0 {
			busy[w.ID] = true
		}
	}
	var out []procRecord
	for _, w := range live {
		if busy[w.ID] {
			out = append(out, w)
		}
	}
	return out
}

func (ch *chaos) killHive() fault {
	h := chaosHives[ch.rng.IntN(len(chaosHives))].name
	f := fault{kind: "kill-hive", target: h, at: time.Now()}
	live := ch.watch.live("rbee-hive", h)
	if len(live) == 0 {
		f.note = "hive not running; none killed"
		ch.restartHive(&f, h)
		return f
	}
	f.pid = live[0].PID
	f.at = time.Now()
	_ = syscall.Kill(f.pid, syscall.SIGKILL)
	ch.watch.await(5*time.Second, func() bool { return len(ch.watch.live("rbee-hive", h)) == 0 })
	// Past the heartbeat TTL, so the queen has seen it go and starts it
	// again instead of answering "already running".
	time.Sleep(4*time.Second + time.Duration(ch.rng.Int64N(int64(3*time.Second))))
	ch.restartHive(&f, h)
	return f
}

func (ch *chaos) restartHive(f *fault, h string) {
	for try := 0; try < 5; try++ {
		r := ch.rbee(60*time.Second, "hive", "start", h)
		if ch.watch.await(3*time.Second, func() bool { return len(ch.watch.live("rbee-hive", h)) > 0 }) {
			f.down = time.Since(f.at)
			return
		}
		f.note = fmt.Sprintf("hive start: exit %d: %s", r.code, lastLine(r.stderr))
		time.Sleep(2 * time.Second)
	}
	ch.note("hive %s could not be started again after %s: %s", h, f.at.Format(time.TimeOnly), f.note)
}

func (ch *chaos) killQueen() fault {
	f := fault{kind: "kill-queen", at: time.Now()}
	b, err := os.ReadFile(cliutil.QueenPIDFile(ch.c.home))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	queens := ch.watch.live("queen-rbee", "")
	if err != nil || len(queens) != 1 || queens[0].PID != pid {
		f.note = fmt.Sprintf("pid file says %q, watcher sees %v; none killed", b, queens)
		return f
	}
	f.pid, f.target = pid, "queen"
	down := time.Second + time.Duration(ch.rng.Int64N(int64(19*time.Second)))
	f.at = time.Now()
	_ = syscall.Kill(pid, syscall.SIGKILL)
	ch.watch.await(5*time.Second, func() bool { return len(ch.watch.live("queen-rbee", "")) == 0 })
	time.Sleep(time.Until(f.at.Add(down)))
	for try := 0; try < 3; try++ {
		r := cliRun(context.Background(), ch.c.bin, ch.c.env, 60*time.Second, "queen", "start")
		if r.code == 0 && len(ch.watch.live("queen-rbee", "")) == 1 {
			f.down = time.Since(f.at)
			f.note = fmt.Sprintf("restarted after %s", down.Round(100*time.Millisecond))
			return f
		}
		f.note = fmt.Sprintf("queen start: exit %d: %s", r.code, lastLine(r.stderr))
		time.Sleep(time.Second)
	}
	ch.note("the queen could not be started again after %s: %s", f.at.Format(time.TimeOnly), f.note)
	return f
}

func (ch *chaos) cutBus() fault {
	f := fault{kind: "cut-bus", target: "proxied", at: time.Now()}
	down := 2*time.Second + time.Duration(ch.rng.Int64N(int64(3*time.Second)))
	ch.proxy.Cut()
	time.Sleep(down)
	ch.proxy.Heal()
	f.down = time.Since(f.at)
	ch.mu.Lock()
	ch.cuts = append(ch.cuts, [2]time.Time{f.at, time.Now()})
	ch.mu.Unlock()
	return f
}

// replenish spawns workers where faults left a hive short of its target,
// so the load keeps several workers on both hives.
func (ch *chaos) replenish() {
	for _, h := range chaosHives {
		for n := len(ch.liveWorkers(h.name)); n < h.workers; n++ {
			r := ch.rbee(90*time.Second, "worker", "spawn", "--hive", h.name, "-m", "tiny")
			if r.code != 0 {
				ch.note("replacement worker on %s at %s: exit %d: %s", h.name, time.Now().Format(time.TimeOnly), r.code, lastLine(r.stderr))
				break
			}
		}
	}
}

func (ch *chaos) cutDuring(hive string, from, to time.Time) bool {
	if hive != "proxied" {
		return false
	}
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for _, c := range ch.cuts {
		if c[0].Before(to) && c[1].After(from) {
			return true
		}
	}
	return false
}

// --- the checks ---

// invariant collects the violations of one promise.
type invariant struct {
	name       string
	checked    int
	violations []string
}

func (iv *invariant) fail(format string, args ...any) {
	iv.violations = append(iv.violations, fmt.Sprintf(format, args...))
}

func (ch *chaos) check() {
	t := ch.t
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	all, err := ch.listJobs(ctx)
	require.NoError(t, err, "reading the job records")
	streams, err := readJobsStream(ctx, ch.b)
	require.NoError(t, err, "reading the jobs stream")

	terminal := &invariant{name: "every job terminal"}
	golden := &invariant{name: "every completed output = greedy run alone"}
	told := &invariant{name: "every client told the job's outcome"}
	reasons := &invariant{name: "every failure (and retry) reason true"}
	once := &invariant{name: "no job completed (or ended) twice"}
	slots := &invariant{name: "no slot held"}
	procs := &invariant{name: "no process left"}

	ch.mu.Lock()
	subs := append([]*submission(nil), ch.subs...)
	ch.mu.Unlock()
	byID := map[string]api.Job{}
	for _, j := range all {
		byID[j.ID] = j
	}
	ids := ch.knownIDs(all)
	counts := map[string]int{}
	failedBy := map[string]int{}
	unverifiable := 0
	untracked := 0
	tracked := map[string]bool{}
	for _, s := range subs {
		tracked[s.jobID] = true
	}

	for _, j := range all {
		terminal.checked++
		if !j.State.Terminal() {
			terminal.fail("job %s (%s) is %s: worker %q hive %q attempts %d, created %s", j.ID, j.Op.Kind, j.State, j.Worker, j.Hive, j.Attempts, j.CreatedAt.Local().Format(time.TimeOnly))
		}
		st := streams[j.ID]
		if st != nil {
			once.checked++
			if n := st.count(api.JobCompleted); n > 1 {
				once.fail("job %s: %d completed events", j.ID, n)
			} else if ends := st.terminals(); len(ends) > 1 {
				once.fail("job %s: ended %d times: %v", j.ID, len(ends), ends)
			}
			for _, c := range st.conflicts {
				once.fail("job %s: two different answers stored: %s", j.ID, c)
			}
		}
		if j.State == api.JobFailed {
			ch.checkReason(reasons, j, &unverifiable)
		}
		if j.Op.Kind != api.OpInfer {
			continue
		}
		if !tracked[j.ID] {
			untracked++
		}
		counts[string(j.State)]++
		if j.State == api.JobFailed {
			failedBy[normalReason(j.Error, ids)]++
		}
		if j.State != api.JobCompleted {
			continue
		}
		var args api.InferArgs
		if err := json.Unmarshal(j.Op.Args, &args); err != nil {
			golden.fail("job %s: arguments unreadable: %v", j.ID, err)
			continue
		}
		want := ch.expected(args.Prompt, args.Sampling.MaxTokens)
		golden.checked++
		if st == nil {
			golden.fail("job %s completed with no events in the jobs stream", j.ID)
		} else if got := st.text(); got != want {
			golden.fail("job %s (%q, %d tokens) stream: %s", j.ID, args.Prompt, args.Sampling.MaxTokens, diff(want, got))
		}
		// The record holds no copy of the text: the stream is the text.
	}

	for _, s := range subs {
		j, ok := byID[s.jobID]
		told.checked++
		if !ok {
			terminal.fail("job %s (submitted by %s at %s) has no record", s.jobID, s.client, s.at.Format(time.TimeOnly))
			continue
		}
		p := chaosPrompts[s.prompt]
		switch {
		case s.told == "completed":
			if j.State != api.JobCompleted {
				told.fail("job %s: %s was told completed, the record says %s (%s)", s.jobID, s.client, j.State, j.Error)
			}
			if want := ch.expected(p.text, p.maxTokens); s.text != want {
				golden.fail("job %s as %s received it: %s", s.jobID, s.client, diff(want, s.text))
			}
		case s.told == string(api.JobFailed) || s.told == string(api.JobCancelled):
			if j.State == api.JobCompleted {
				told.fail("job %s: %s was told %s (%s), the record says completed", s.jobID, s.client, s.told, s.detail)
			}
		case s.told == "cut off":
		case s.told == "hung":
			if j.State.Terminal() {
				told.fail("job %s: %s never heard that it ended (%s at %s)", s.jobID, s.client, j.State, timeOf(j.FinishedAt))
			}
		default:
			told.fail("job %s: %s ended with %s: %s (record: %s)", s.jobID, s.client, s.told, s.detail, j.State)
		}
	}

	for jobID, st := range streams {
		for _, n := range st.retries {
			for _, cl := range claimsIn(n.Human) {
				if cl.kind != "died" {
					continue
				}
				reasons.checked++
				if ch.aliveAfter(cl.id, n.Time) {
					reasons.fail("job %s retried at %s saying %q, but worker %s was alive", jobID, n.Time.Local().Format("15:04:05.000"), n.Human, cl.id)
				}
			}
		}
	}

	ch.checkSlots(slots)
	ch.checkProcesses(procs)

	ch.report(counts, failedBy, untracked, unverifiable, len(all))
	failed := false
	for _, iv := range []*invariant{terminal, golden, told, reasons, once, slots, procs} {
		if len(iv.violations) == 0 {
			t.Logf("chaos: ok    %-42s (%d checked)", iv.name, iv.checked)
			continue
		}
		failed = true
		shown := iv.violations
		if len(shown) > 15 {
			shown = append(shown[:15:15], fmt.Sprintf("… and %d more", len(iv.violations)-15))
		}
		t.Errorf("chaos: FAIL  %s: %d violation(s) of %d checked (seed %d):\n  %s", iv.name, len(iv.violations), iv.checked, ch.seed, strings.Join(shown, "\n  "))
	}
	if failed {
		t.Logf("chaos: replay with -chaos.seed %d (the fault schedule repeats; the cluster's timing does not)", ch.seed)
	}
}

func timeOf(t *time.Time) string {
	if t == nil {
		return "?"
	}
	return t.Local().Format("15:04:05.000")
}

// checkReason checks what a failed job's error says about processes
// against the watcher's record of them.
func (ch *chaos) checkReason(iv *invariant, j api.Job, unverifiable *int) {
	cls := claimsIn(j.Error)
	if len(cls) == 0 {
		return
	}
	at := j.CreatedAt
	if j.FinishedAt != nil {
		at = *j.FinishedAt
	}
	for _, cl := range cls {
		iv.checked++
		switch cl.kind {
		case "died":
			if len(ch.watch.records("llm-worker-rbee", cl.id)) == 0 {
				*unverifiable++
				continue
			}
			if ch.aliveAfter(cl.id, at) {
				iv.fail("job %s failed at %s with %q, but worker %s (pid %v) was alive then (%s)", j.ID, at.Local().Format("15:04:05.000"), j.Error, cl.id, ch.pids(cl.id), ch.lifeOf("llm-worker-rbee", cl.id))
			}
		case "worker-lost":
			// Lost is true of a dead worker and of one cut off from the bus.
			from := at.Add(-chaosLostWindow)
			if len(ch.watch.records("llm-worker-rbee", cl.id)) == 0 {
				*unverifiable++
				continue
			}
			if ch.aliveAfter(cl.id, at) && !ch.cutDuring(cl.hive, from, at) {
				iv.fail("job %s failed at %s with %q, but worker %s ran and was connected throughout the %s before (%s)", j.ID, at.Local().Format("15:04:05.000"), j.Error, cl.id, chaosLostWindow, ch.lifeOf("llm-worker-rbee", cl.id))
			}
		case "none-online":
			from := at.Add(-chaosLostWindow)
			for _, h := range chaosHives {
				if coveredBy(ch.watch.records("rbee-hive", h.name), from, at) && !ch.cutDuring(h.name, from, at) {
					iv.fail("job %s failed at %s with %q, but hive %s ran and was connected throughout the %s before (%s)", j.ID, at.Local().Format("15:04:05.000"), j.Error, h.name, chaosLostWindow, ch.lifeOf("rbee-hive", h.name))
					break
				}
			}
		case "lost":
			from := at.Add(-chaosLostWindow)
			if coveredBy(ch.watch.records("rbee-hive", cl.id), from, at) && !ch.cutDuring(cl.id, from, at) {
				iv.fail("job %s failed at %s with %q, but hive %s ran and was connected throughout the %s before (%s)", j.ID, at.Local().Format("15:04:05.000"), j.Error, cl.id, chaosLostWindow, ch.lifeOf("rbee-hive", cl.id))
			}
		}
	}
}

// aliveAfter reports whether worker id was alive chaosClaimSlack after at.
func (ch *chaos) aliveAfter(id string, at time.Time) bool {
	for _, r := range ch.watch.records("llm-worker-rbee", id) {
		if r.aliveAt(at.Add(chaosClaimSlack)) {
			return true
		}
	}
	return false
}

func (ch *chaos) pids(id string) []int {
	var out []int
	for _, r := range ch.watch.records("llm-worker-rbee", id) {
		out = append(out, r.PID)
	}
	return out
}

func (ch *chaos) lifeOf(kind, id string) string {
	var parts []string
	for _, r := range ch.watch.records(kind, id) {
		gone := "still alive"
		if !r.Gone.IsZero() {
			gone = "gone " + r.Gone.Local().Format("15:04:05.000")
		}
		parts = append(parts, fmt.Sprintf("pid %d seen %s, %s", r.PID, r.Seen.Local().Format("15:04:05.000"), gone))
	}
	return strings.Join(parts, "; ")
}

// checkSlots waits, boundedly, for every worker to report its slots free.
func (ch *chaos) checkSlots(iv *invariant) {
	var busy []string
	ok := ch.watch.await(15*time.Second, func() bool {
		r := ch.rbee(20*time.Second, "--json", "worker", "list")
		if r.code != 0 {
			busy = []string{"worker list: " + lastLine(r.stderr)}
			return false
		}
		busy = busy[:0]
		iv.checked = 0
		sc := bufio.NewScanner(strings.NewReader(r.stdout))
		for sc.Scan() {
			var w api.WorkerStatus
			if json.Unmarshal(sc.Bytes(), &w) != nil {
				continue
			}
			iv.checked++
			if w.SlotsBusy > 0 {
				busy = append(busy, fmt.Sprintf("worker %s on %s: %d of %d slots busy (%s)", w.ID, w.Hive, w.SlotsBusy, w.SlotsTotal, w.State))
			}
		}
		return len(busy) == 0
	})
	if !ok {
		for _, b := range busy {
			iv.fail("%s", b)
		}
	}
}

// checkProcesses stops the hives and the queen as a person would and
// expects every process of the cluster to be gone; the cluster's cleanup
// then kills whatever is left.
func (ch *chaos) checkProcesses(iv *invariant) {
	for _, h := range chaosHives {
		if r := ch.rbee(60*time.Second, "hive", "stop", h.name); r.code != 0 {
			ch.note("hive stop %s: exit %d: %s", h.name, r.code, lastLine(r.stderr))
		}
	}
	if r := cliRun(context.Background(), ch.c.bin, ch.c.env, 60*time.Second, "queen", "stop"); r.code != 0 {
		ch.note("queen stop: exit %d: %s", r.code, lastLine(r.stderr))
	}
	var left []string
	ch.watch.await(20*time.Second, func() bool {
		left = markedProcesses(ch.c.home)
		return len(left) == 0
	})
	iv.checked = len(ch.watch.all)
	for _, p := range left {
		iv.fail("%s%s", p, ch.stacksOf(p))
	}
}

// stacksOf makes a worker left running (described as markedProcesses
// does) print its goroutines, and returns the end of its log, where they
// land: a worker that outlived its hive is stuck somewhere, and a
// randomized run that found it may not find it again.
func (ch *chaos) stacksOf(proc string) string {
	var pid int
	if _, err := fmt.Sscanf(proc, "pid %d:", &pid); err != nil || !strings.Contains(proc, "llm-worker-rbee") {
		return ""
	}
	argv := strings.Fields(proc)
	logPath := filepath.Join(ch.c.home, "hives", flagValue(argv, "--hive"), "workers", flagValue(argv, "--id")+".log")
	// A Go program prints every goroutine on SIGQUIT, then exits.
	_ = syscall.Kill(pid, syscall.SIGQUIT)
	ch.watch.await(10*time.Second, func() bool { return zombie(pid) })
	b, err := os.ReadFile(logPath)
	if err != nil {
		return fmt.Sprintf("\n  (no log: %v)", err)
	}
	const tail = 48 << 10
	if len(b) > tail {
		b = b[len(b)-tail:]
	}
	return "\n  its log's end:\n" + string(b)
}

// knownIDs are the ids that vary between runs, replaced when reasons group.
func (ch *chaos) knownIDs(all []api.Job) []string {
	seen := map[string]bool{}
	ch.watch.mu.Lock()
	for _, r := range ch.watch.all {
		if r.ID != "" && r.Kind == "llm-worker-rbee" {
			seen[r.ID] = true
		}
	}
	ch.watch.mu.Unlock()
	for _, j := range all {
		seen[j.ID] = true
		if j.Worker != "" {
			seen[j.Worker] = true
		}
	}
	ids := sortedKeys(seen)
	// Longest first, so no id is replaced inside another.
	sort.SliceStable(ids, func(i, j int) bool { return len(ids[i]) > len(ids[j]) })
	return ids
}

// diff says where got departs from want.
func diff(want, got string) string {
	i := 0
	for i < len(want) && i < len(got) && want[i] == got[i] {
		i++
	}
	clip := func(s string) string {
		if len(s) > 40 {
			return s[:40] + "…"
		}
		return s
	}
	return fmt.Sprintf("differs at byte %d of %d (got %d): want %q, got %q", i, len(want), len(got), clip(want[i:]), clip(got[i:]))
}

// report prints the run as a table.
func (ch *chaos) report(counts, failedBy map[string]int, untracked, unverifiable, records int) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	var b strings.Builder
	row := func(k string, v any) { fmt.Fprintf(&b, "  | %-62s | %8v |\n", k, v) }
	b.WriteString("chaos: the run\n")
	row("submissions attempted", ch.attempted)
	row("submitted (job id known)", len(ch.subs))
	row("not submitted: queen unreachable", ch.unreachable)
	for _, k := range sortedKeys(ch.refused) {
		row("not submitted: "+k, ch.refused[k])
	}
	row("job records (all kinds)", records)
	row("infer jobs whose submitter never got the id", untracked)
	row("infer jobs completed", counts[string(api.JobCompleted)])
	row("infer jobs failed", counts[string(api.JobFailed)])
	for _, k := range sortedKeys(failedBy) {
		row("  failed: "+k, failedBy[k])
	}
	row("infer jobs cancelled", counts[string(api.JobCancelled)])
	row("infer jobs queued at the end", counts[string(api.JobQueued)])
	row("infer jobs running at the end", counts[string(api.JobRunning)])
	told := map[string]int{}
	for _, s := range ch.subs {
		told[s.told]++
	}
	for _, k := range sortedKeys(told) {
		row("clients told: "+k, told[k])
	}
	byKind := map[string]int{}
	for _, f := range ch.faults {
		byKind[f.kind]++
	}
	for _, k := range []string{"kill-worker", "kill-hive", "kill-queen", "cut-bus"} {
		row("faults: "+k, byKind[k])
	}
	row("failure claims about processes the watcher never saw", unverifiable)
	for _, n := range ch.notes {
		fmt.Fprintf(&b, "  note: %s\n", n)
	}
	ch.t.Log(b.String())
}
