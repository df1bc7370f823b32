package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// queensLeaseTTL is the lease TTL the two-queen tests run with: short, so a
// failover is quick, and long enough for a renewal every second to ride out
// a busy machine.
const queensLeaseTTL = 3 * time.Second

// queenProc is one queen-rbee of several on an external bus, with its own
// data directory, gateway and JSON log.
type queenProc struct {
	t       *testing.T
	id      string
	gateway string
	log     string
	cmd     *exec.Cmd
	done    chan struct{}
}

// startQueenOn starts queen id on the cluster's external bus. Its data
// directory is under the cluster's home, so stopAll ends whatever outlives
// the test.
func (c *cluster) startQueenOn(id, gateway string) *queenProc {
	c.t.Helper()
	data := filepath.Join(c.home, "queens", id)
	q := &queenProc{t: c.t, id: id, gateway: gateway, log: filepath.Join(data, "queen.log"), done: make(chan struct{})}
	q.cmd = exec.Command(filepath.Join(c.bin, "queen-rbee"), "--data", data, "--nats", c.url(), "--gateway", gateway,
		"--queen-id", id, "--lease-ttl", queensLeaseTTL.String(), "--log-file", q.log)
	q.cmd.Env = c.env
	require.NoError(c.t, q.cmd.Start())
	go func() { _ = q.cmd.Wait(); close(q.done) }()
	c.t.Cleanup(func() {
		_ = q.cmd.Process.Signal(syscall.SIGCONT)
		_ = q.cmd.Process.Kill()
		<-q.done
	})
	return q
}

var leaderGauge = regexp.MustCompile(`(?m)^rbee_queen_(leader|lease_epoch)\{queen="([^"]+)"\} (\d+)`)

// leading reads the queen's own word on whether it leads, and its term's
// epoch, from its gateway's metrics (-1: it does not answer). The gateway
// speaks for this queen alone; the bus endpoints answer for any.
func (q *queenProc) leading() (leads int, epoch uint64) {
	client := http.Client{Timeout: time.Second}
	resp, err := client.Get("http://" + q.gateway + "/metrics")
	if err != nil {
		return -1, 0
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	leads = -1
	for _, m := range leaderGauge.FindAllStringSubmatch(string(body), -1) {
		if m[2] != q.id {
			continue
		}
		n, _ := strconv.ParseUint(m[3], 10, 64)
		if m[1] == "leader" {
			leads = int(n)
		} else {
			epoch = n
		}
	}
	return leads, epoch
}

// awaitRole waits until the queen says it leads (1) or stands by (0).
func (q *queenProc) awaitRole(want int, within time.Duration) uint64 {
	q.t.Helper()
	var epoch uint64
	eventually(q.t, within, func() bool {
		var leads int
		leads, epoch = q.leading()
		return leads == want
	}, "queen %s did not %s within %s", q.id, map[int]string{0: "stand by", 1: "lead"}[want], within)
	return epoch
}

// logLine is one line of a queen's JSON log.
type logLine struct {
	Message string `json:"message"`
	Epoch   uint64 `json:"epoch"`
	Effect  string `json:"effect"`
	Job     string `json:"job"`
}

// logLines reads the queen's log from byte offset from.
func (q *queenProc) logLines(from int) []logLine {
	q.t.Helper()
	data, err := os.ReadFile(q.log)
	require.NoError(q.t, err)
	var out []logLine
	offset := 0
	for _, raw := range strings.SplitAfter(string(data), "\n") {
		var l logLine
		if offset >= from && strings.HasSuffix(raw, "\n") && json.Unmarshal([]byte(raw), &l) == nil {
			out = append(out, l)
		}
		offset += len(raw)
	}
	return out
}

func (q *queenProc) logSize() int {
	fi, err := os.Stat(q.log)
	require.NoError(q.t, err)
	return int(fi.Size())
}

// effects are the leader effects (fenced and allowed) in the queen's log from
// offset from.
func (q *queenProc) effects(from int, refused bool) []logLine {
	want := "leader effect"
	if refused {
		want = "leader effect refused: the lease is lost"
	}
	var out []logLine
	for _, l := range q.logLines(from) {
		if l.Message == want {
			out = append(out, l)
		}
	}
	return out
}

func (q *queenProc) logged(from int, message string) bool {
	for _, l := range q.logLines(from) {
		if l.Message == message {
			return true
		}
	}
	return false
}

// twoQueens readies the set-up both tests share: an external bus, queen-a
// leading, queen-b standing by (its gateway is the cluster's), and a hive
// started directly on the bus, as the queen would start it, so it belongs
// to neither queen and outlives both.
func twoQueens(t *testing.T) (c *cluster, a, b *queenProc) {
	c = newCluster(t).withDaemons()
	c.env = append(c.env, "RBEE_NATS_URL="+c.url())
	c.startExternalBus()
	a = c.startQueenOn("queen-a", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	a.awaitRole(1, 30*time.Second)
	b = c.startQueenOn("queen-b", c.gateway)
	b.awaitRole(0, 30*time.Second)
	r := c.mustRbee("status")
	require.Regexp(t, `answered by queen queen-a, which leads|answered by queen queen-b, standing by; queen queen-a leads`, r.stdout, "status names the leader")

	hive := exec.Command(filepath.Join(c.bin, "rbee-hive"), "--id", "local", "--nats", c.url(), "--data", filepath.Join(c.home, "hives", "local"))
	hive.Env = c.env
	require.NoError(t, hive.Start())
	hiveDone := make(chan struct{})
	go func() { _ = hive.Wait(); close(hiveDone) }()
	t.Cleanup(func() {
		_ = hive.Process.Signal(syscall.SIGTERM)
		select {
		case <-hiveDone:
		case <-time.After(15 * time.Second):
			_ = hive.Process.Kill()
			<-hiveDone
		}
	})
	eventually(t, 30*time.Second, func() bool {
		r := c.rbee("--json", "hive", "get", "local")
		var v api.HiveView
		return r.code == 0 && json.Unmarshal([]byte(r.stdout), &v) == nil && v.State == api.HiveOnline
	}, "the hive did not come online")
	return c, a, b
}

// jobRecord reads a job's record straight from the bus: a paused queen
// still holds its share of the queen endpoints' queue group, so a request
// there may wait for it.
func jobRecord(t *testing.T, b *bus.Bus, id string) api.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := b.KV(ctx, b.Space.JobsBucket())
	require.NoError(t, err)
	e, err := kv.Get(ctx, id)
	require.NoError(t, err)
	j, err := jobs.Decode(e)
	require.NoError(t, err)
	return j
}

func connectOpen(t *testing.T, url string) *bus.Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: url, Name: "e2e", Reconnect: true, Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(func() { b.NC.Close() })
	return b
}

// sseCompletion streams a completion through a gateway and returns its text
// once the stream is done; first is closed at the first text.
func sseCompletion(ctx context.Context, gateway, body string, first chan<- struct{}) (string, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+gateway+"/v1/completions", strings.NewReader(body))
	if err != nil {
		return "", "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", "", err
	}
	defer resp.Body.Close()
	job := resp.Header.Get("X-Rbee-Job")
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return "", job, fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	sc := bufio.NewScanner(resp.Body)
	var text strings.Builder
	for sc.Scan() {
		data, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			return text.String(), job, nil
		}
		var chunk struct {
			Choices []struct {
				Text string `json:"text"`
			} `json:"choices"`
			Error *struct {
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(data), &chunk); err != nil {
			return text.String(), job, err
		}
		if chunk.Error != nil {
			return text.String(), job, fmt.Errorf("the stream ended in an error: %s", chunk.Error.Message)
		}
		for _, ch := range chunk.Choices {
			if text.Len() == 0 && ch.Text != "" && first != nil {
				close(first)
				first = nil
			}
			text.WriteString(ch.Text)
		}
	}
	return text.String(), job, fmt.Errorf("the stream broke before [DONE]: %v", sc.Err())
}

// Two queens on one bus; the leader is killed (-9) while two jobs stream and
// three wait. The standby leads within one lease TTL plus a second, and
// schedules (it starts a worker no queen had started); the waiting jobs run
// in the order they were submitted; the streaming ones complete, one of them
// to a client of the survivor's gateway that sees the whole answer; every
// job completes once, on its first attempt.
func TestQueensStandbyTakesOverFromAKilledLeader(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c, a, b := twoQueens(t)
	c.mustRbee("model", "synth", "--hive", "local", "--size", "large", "large")
	c.mustRbee("model", "synth", "--hive", "local", "--size", "tiny", "tiny")
	c.mustRbee("worker", "spawn", "--hive", "local", "-m", "large", "--slots", "2")

	// Two long jobs take both slots: one through queen-b's gateway, one
	// from a keeper.
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	type sseResult struct {
		text, job string
		err       error
	}
	sseFirst, sseDone := make(chan struct{}), make(chan sseResult, 1)
	go func() {
		text, job, err := sseCompletion(ctx, b.gateway, fmt.Sprintf(`{"model":"large","stream":true,"temperature":0,"max_tokens":%d,"prompt":%q}`, longTokens, longPrompt), sseFirst)
		sseDone <- sseResult{text, job, err}
	}()
	long := c.start(longInfer()...)
	select {
	case <-sseFirst:
	case <-time.After(90 * time.Second):
		t.Fatal("the gateway's client got no token")
	}
	eventually(t, 90*time.Second, func() bool { return long.stdout.String() != "" }, "the keeper's long job got no token")

	// Three short jobs wait for a slot, submitted one after the other.
	const shortTokens = 40
	var waiting []string
	var keepers []*runningKeeper
	for i := range 3 {
		k := c.start("infer", "-m", "large", "--temperature", "0", "--max-tokens", strconv.Itoa(shortTokens), fmt.Sprintf("waiting job %d", i))
		keepers = append(keepers, k)
		waiting = append(waiting, k.jobID(t))
	}
	obs := connectOpen(t, c.url())
	for _, id := range waiting {
		require.Equal(t, api.JobQueued, jobRecord(t, obs, id).State, "job %s should wait while the long ones stream", id)
	}

	leads, epochA := a.leading()
	require.Equal(t, 1, leads, "queen-a leads before the kill")
	require.NoError(t, a.cmd.Process.Kill())
	killed := time.Now()
	epochB := b.awaitRole(1, queensLeaseTTL+5*time.Second)
	takeover := time.Since(killed)
	t.Logf("queen-b led %s after queen-a was killed (lease TTL %s)", takeover.Round(time.Millisecond), queensLeaseTTL)
	require.Less(t, takeover, queensLeaseTTL+time.Second, "the standby took over later than one lease TTL plus a second")
	require.Greater(t, epochB, epochA)
	<-a.done
	r := c.mustRbee("status")
	require.Contains(t, r.stdout, "answered by queen queen-b, which leads", r.stdout)

	// The new leader schedules: a model no worker serves gets one.
	spawned := time.Now()
	tiny, tinyJob, err := sseCompletion(ctx, b.gateway, `{"model":"tiny","stream":true,"temperature":0,"max_tokens":8,"prompt":"hello"}`, nil)
	require.NoError(t, err)
	require.NotEmpty(t, tiny)
	t.Logf("a job that needed a new worker completed %s after it was sent", time.Since(spawned).Round(time.Millisecond))
	var spawnedBy []uint64
	for _, e := range b.effects(0, false) {
		if e.Effect == "spawn" && e.Job == tinyJob {
			spawnedBy = append(spawnedBy, e.Epoch)
		}
	}
	require.Equal(t, []uint64{epochB}, spawnedBy, "queen-b's term started the worker, once")

	// Everything completes, once, and the waiting jobs started in order.
	res := <-sseDone
	require.NoError(t, res.err)
	require.Equal(t, longGreedy.text, res.text, "the survivor's gateway client saw the whole answer")
	require.Equal(t, 0, long.wait(t, 3*time.Minute), long.stderr.String())
	require.Equal(t, longGreedy.text+"\n", long.stdout.String(), "the keeper saw the whole answer")
	for i, k := range keepers {
		require.Equal(t, 0, k.wait(t, 2*time.Minute), "waiting job %d: %s", i, k.stderr.String())
	}
	all := append([]string{res.job, long.jobID(t)}, waiting...)
	var started []time.Time
	for _, id := range all {
		j := jobRecord(t, obs, id)
		require.Equal(t, api.JobCompleted, j.State, "%s: %s", id, j.Error)
		require.Equal(t, 1, j.Attempts, "%s ran once", id)
		require.NotNil(t, j.StartedAt)
		started = append(started, *j.StartedAt)
	}
	for i := 3; i < len(started); i++ {
		require.False(t, started[i].Before(started[i-1]), "waiting job %d started before the one submitted ahead of it", i-2)
	}
}

// A leader that is paused (SIGSTOP) past the lease TTL loses the lease to
// the standby, which then fails a job at its deadline. Resumed (SIGCONT),
// the old leader steps down without acting: its own deadline for that job,
// long due, is refused by the fence, and its log shows no effect of its
// term after the pause.
func TestQueensPausedLeaderStepsDownWithoutActing(t *testing.T) {
	t.Parallel()
	requireLongGreedy(t)
	c, a, b := twoQueens(t)
	c.mustRbee("model", "synth", "--hive", "local", "--size", "large", "large")
	c.mustRbee("worker", "spawn", "--hive", "local", "-m", "large", "--slots", "1")
	obs := connectOpen(t, c.url())

	// A long job holds the one slot; a second one, as long, waits behind
	// it with a deadline that falls while queen-a is paused (were it to
	// get the slot first, it would still outlast the deadline).
	first := c.start(longInfer()...)
	eventually(t, 60*time.Second, func() bool { return first.stdout.String() != "" }, "the first job got no token")
	// Detached, so that only the queens' deadline ends it (a keeper that
	// follows cancels at its own): the keeper gives the queen its timeout
	// plus 5 s.
	id := strings.TrimSpace(c.mustRbee(longInfer("--detach", "--timeout", "1s")...).stdout)
	leads, epochA := a.leading()
	require.Equal(t, 1, leads)

	require.NoError(t, a.cmd.Process.Signal(syscall.SIGSTOP))
	paused := a.logSize()
	stopped := time.Now()
	epochB := b.awaitRole(1, queensLeaseTTL+5*time.Second)
	t.Logf("queen-b led %s after queen-a was paused (lease TTL %s)", time.Since(stopped).Round(time.Millisecond), queensLeaseTTL)
	require.Greater(t, epochB, epochA)
	eventually(t, 30*time.Second, func() bool { return jobRecord(t, obs, id).State.Terminal() }, "the job outlived its deadline")
	j := jobRecord(t, obs, id)
	require.Equal(t, api.JobFailed, j.State, "%+v", j)
	require.Equal(t, api.ReasonTimeout, j.Reason, j.Error)
	var timedOutBy []uint64
	for _, e := range b.effects(0, false) {
		if e.Effect == "timeout" && e.Job == id {
			timedOutBy = append(timedOutBy, e.Epoch)
		}
	}
	require.Equal(t, []uint64{epochB}, timedOutBy, "queen-b's term failed the job at its deadline")
	require.Contains(t, j.Error, "timed out after 6s")

	// Resumed, queen-a finds its renewal refused and ends its term.
	require.NoError(t, a.cmd.Process.Signal(syscall.SIGCONT))
	eventually(t, 2*queensLeaseTTL, func() bool { return a.logged(paused, "the scheduler term ended") }, "the resumed leader did not end its term")
	require.True(t, a.logged(paused, "lost the scheduler lease (it expired or another queen took it): standing by"))
	require.Empty(t, a.effects(paused, false), "the resumed leader acted on a lease it had lost")
	for _, e := range a.effects(paused, true) {
		require.Equal(t, epochA, e.Epoch, "a refusal names the old term")
	}
	a.awaitRole(0, 5*time.Second)
	leads, epoch := b.leading()
	require.Equal(t, 1, leads, "queen-b still leads")
	require.Equal(t, epochB, epoch, "queen-b's term went on")
	j = jobRecord(t, obs, id)
	require.Equal(t, api.JobFailed, j.State)
	require.Equal(t, api.ReasonTimeout, j.Reason)
}
