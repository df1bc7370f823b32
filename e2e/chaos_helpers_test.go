package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/stretchr/testify/require"
)

// --- the truth about processes ---

// procRecord is one rbee daemon process as seen from /proc: what it is, and
// when it was first seen alive and first seen gone.
type procRecord struct {
	PID  int
	Kind string // the program: queen-rbee, rbee-hive, llm-worker-rbee
	ID   string // --id: the hive's or the worker's id
	Hive string // --hive: a worker's hive
	Seen time.Time
	Gone time.Time // zero while alive
}

func (r *procRecord) aliveAt(t time.Time) bool {
	return !r.Seen.After(t) && (r.Gone.IsZero() || r.Gone.After(t))
}

// procWatch scans /proc for the cluster's daemons (those whose command line
// names the cluster's home) and keeps when each was alive: the ground truth
// a failure reason such as "worker W died" is checked against. A worker is
// watched through its own process, not through anything rbee reports.
type procWatch struct {
	marker []byte
	every  time.Duration

	mu    sync.Mutex
	byPID map[int]*procRecord
	all   []*procRecord
	scans int
}

func newProcWatch(marker string) *procWatch {
	return &procWatch{marker: []byte(marker), every: 100 * time.Millisecond, byPID: map[int]*procRecord{}}
}

// run scans until ctx ends.
func (w *procWatch) run(ctx context.Context) {
	t := time.NewTicker(w.every)
	defer t.Stop()
	for {
		w.scan()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (w *procWatch) scan() {
	now := time.Now()
	entries, _ := os.ReadDir("/proc")
	alive := map[int]bool{}
	type found struct{ kind, id, hive string }
	seen := map[int]found{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, w.marker) || zombie(pid) {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		kind := filepath.Base(argv[0])
		switch kind {
		case "queen-rbee", "rbee-hive", "llm-worker-rbee":
		default:
			continue
		}
		alive[pid] = true
		seen[pid] = found{kind, flagValue(argv, "--id"), flagValue(argv, "--hive")}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.scans++
	for pid, f := range seen {
		r, ok := w.byPID[pid]
		if ok && r.Kind == f.kind && r.ID == f.id {
			continue
		}
		if ok {
			// The same pid is now another program (a fork seen before
			// its exec): that one ended.
			r.Gone = now
		}
		r = &procRecord{PID: pid, Kind: f.kind, ID: f.id, Hive: f.hive, Seen: now}
		w.byPID[pid] = r
		w.all = append(w.all, r)
	}
	for pid, r := range w.byPID {
		if !alive[pid] {
			r.Gone = now
			delete(w.byPID, pid)
		}
	}
}

func zombie(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}

func flagValue(argv []string, name string) string {
	for i, a := range argv {
		if a == name && i+1 < len(argv) {
			return argv[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// live returns the live processes of a kind (and, when id is not empty,
// with that id), sorted by id then pid, so a seeded choice among them is
// as repeatable as the cluster allows.
func (w *procWatch) live(kind, id string) []procRecord {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []procRecord
	for _, r := range w.byPID {
		if r.Kind == kind && (id == "" || r.ID == id) {
			out = append(out, *r)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].ID != out[j].ID {
			return out[i].ID < out[j].ID
		}
		return out[i].PID < out[j].PID
	})
	return out
}

// records returns every process ever seen with kind and id.
func (w *procWatch) records(kind, id string) []procRecord {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []procRecord
	for _, r := range w.all {
		if r.Kind == kind && r.ID == id {
			out = append(out, *r)
		}
	}
	return out
}

// await polls (scans are the events here) until cond holds for the live
// processes or d passes.
func (w *procWatch) await(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(w.every)
	}
	return cond()
}

// coveredBy reports whether some process of the records was alive at every
// moment of [from, to]: one process alive throughout, or a chain of them
// with no moment between one's end and the next's start.
func coveredBy(recs []procRecord, from, to time.Time) bool {
	sort.Slice(recs, func(i, j int) bool { return recs[i].Seen.Before(recs[j].Seen) })
	at := from
	for _, r := range recs {
		if r.Seen.After(at) {
			break
		}
		if r.Gone.IsZero() || !r.Gone.Before(to) {
			return true
		}
		if r.Gone.After(at) {
			at = r.Gone
		}
	}
	return false
}

// markedProcesses lists every process but this one whose command line or
// environment names marker (as proc.KillMarked finds them), zombies aside.
func markedProcesses(marker string) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() || zombie(pid) {
			continue
		}
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(filepath.Join("/proc", e.Name(), f))
			if err == nil && bytes.Contains(b, []byte(marker)) {
				cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
				out = append(out, fmt.Sprintf("pid %d: %s", pid, strings.ReplaceAll(strings.TrimRight(string(cmdline), "\x00"), "\x00", " ")))
				break
			}
		}
	}
	return out
}

// --- the keeper, run from goroutines ---

// cliRun runs the keeper with the given environment and bound, and never
// touches t (it runs on the chaos test's goroutines). code is -1 when the
// bound or ctx ended it.
func cliRun(ctx context.Context, bin string, env []string, d time.Duration, args ...string) result {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "rbee"), args...)
	cmd.Env = env
	cmd.WaitDelay = 2 * time.Second
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		code = -1
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		code = -1
		errb.WriteString(err.Error())
	}
	return result{out.String(), errb.String(), code}
}

// --- what the jobs stream holds ---

// jobStream is everything the jobs stream holds for one job.
type jobStream struct {
	states    []api.StateChange
	tokens    map[int]string
	copies    int      // tokens stored more than once (same index)
	conflicts []string // an index stored twice with different text
	retries   []api.Narration
}

// text is the job's output as a follower assembles it: tokens in index
// order from 0, each once, up to the first gap. Every attempt of a greedy
// request generates the same tokens, so copies from an earlier attempt
// change nothing; a copy that differs is a conflict.
func (s *jobStream) text() string {
	var b strings.Builder
	for i := 0; ; i++ {
		t, ok := s.tokens[i]
		if !ok {
			return b.String()
		}
		b.WriteString(t)
	}
}

func (s *jobStream) count(state api.JobState) int {
	n := 0
	for _, st := range s.states {
		if st.State == state {
			n++
		}
	}
	return n
}

func (s *jobStream) terminals() []api.JobState {
	var out []api.JobState
	for _, st := range s.states {
		if st.State.Terminal() {
			out = append(out, st.State)
		}
	}
	return out
}

// readJobsStream reads the whole jobs stream once, from its first message
// to its last, and groups the events by job. Unlike Follow it does not stop
// at a job's terminal event, so a second completion is seen.
func readJobsStream(ctx context.Context, b *bus.Bus) (map[string]*jobStream, error) {
	stream, err := b.JS.Stream(ctx, b.Space.JobsStream())
	if err != nil {
		return nil, err
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]*jobStream{}
	if info.State.Msgs == 0 {
		return out, nil
	}
	last := info.State.LastSeq
	cons, err := b.JS.OrderedConsumer(ctx, b.Space.JobsStream(), jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, err
	}
	it, err := cons.Messages()
	if err != nil {
		return nil, err
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	for {
		msg, err := it.Next()
		if err != nil {
			return nil, fmt.Errorf("reading the jobs stream up to sequence %d: %w", last, err)
		}
		md, err := msg.Metadata()
		if err != nil {
			continue
		}
		if job, _, ok := b.Space.JobIDFromSubject(msg.Subject()); ok {
			if ev, err := bus.DecodeEvent(b.Space, msg); err == nil {
				s := out[job]
				if s == nil {
					s = &jobStream{tokens: map[int]string{}}
					out[job] = s
				}
				s.add(ev)
			}
		}
		if md.Sequence.Stream >= last {
			return out, nil
		}
	}
}

func (s *jobStream) add(ev api.Event) {
	switch {
	case ev.State != nil:
		s.states = append(s.states, *ev.State)
	case ev.Token != nil:
		// A stored token event may be a chunk of several tokens.
		for k := range ev.Token.Len() {
			tk := ev.Token.At(k)
			if prev, dup := s.tokens[tk.Index]; dup {
				s.copies++
				if prev != tk.Text {
					s.conflicts = append(s.conflicts, fmt.Sprintf("token %d: %q then %q", tk.Index, prev, tk.Text))
				}
				continue
			}
			s.tokens[tk.Index] = tk.Text
		}
	case ev.Narration != nil:
		if strings.Contains(ev.Narration.Human, "retrying the job") {
			s.retries = append(s.retries, *ev.Narration)
		}
	}
}

// --- checking what a failure says ---

// claim is one statement a failure reason makes about a process.
type claim struct {
	kind string // "died" or "worker-lost" (a worker), "lost" (a hive), "none-online" (every hive)
	id   string
	hive string
}

// claimsIn finds the statements about processes in a failure reason: the
// queen's "worker W on hive H died", "worker W on hive H was lost", "hive H
// was lost" and "no online hive has model M" (or "no hive is online").
func claimsIn(reason string) []claim {
	var out []claim
	if strings.Contains(reason, "no online hive has model") || strings.Contains(reason, "no hive is online") {
		out = append(out, claim{kind: "none-online"})
	}
	f := strings.Fields(reason)
	for i := range f {
		switch {
		case f[i] == "worker" && i+5 < len(f) && f[i+2] == "on" && f[i+3] == "hive" && strings.HasPrefix(f[i+5], "died"):
			out = append(out, claim{kind: "died", id: f[i+1], hive: f[i+4]})
		case f[i] == "worker" && i+6 < len(f) && f[i+2] == "on" && f[i+3] == "hive" && f[i+5] == "was" && strings.HasPrefix(f[i+6], "lost"):
			out = append(out, claim{kind: "worker-lost", id: f[i+1], hive: f[i+4]})
		case f[i] == "hive" && (i == 0 || f[i-1] != "on") && i+3 < len(f) && f[i+2] == "was" && strings.HasPrefix(f[i+3], "lost"):
			out = append(out, claim{kind: "lost", id: strings.TrimRight(f[i+1], ",:;")})
		}
	}
	return out
}

// normalReason replaces the ids in a failure reason so reasons group.
func normalReason(reason string, ids []string) string {
	if i := strings.IndexByte(reason, '\n'); i >= 0 {
		reason = reason[:i]
	}
	for _, id := range ids {
		if id != "" {
			reason = strings.ReplaceAll(reason, id, "…")
		}
	}
	if len(reason) > 110 {
		reason = reason[:110] + "…"
	}
	return reason
}

// sortedKeys returns a map's keys, sorted.
func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// The checker's own rules, without a cluster: what a reason claims, and
// when a hive counts as up throughout a window.
func TestChaosCheckerRules(t *testing.T) {
	claims := []struct {
		reason string
		want   []claim
	}{
		{"worker direct-tiny-1a2b on hive direct died", []claim{{kind: "died", id: "direct-tiny-1a2b", hive: "direct"}}},
		{"worker w1 on hive h1 died before sending a token; retrying the job on another worker (attempt 2)", []claim{{kind: "died", id: "w1", hive: "h1"}}},
		{"hive proxied was lost while starting the worker", []claim{{kind: "lost", id: "proxied"}}},
		{"the last worker for tiny is gone and no new one could be started: hive h2 was lost, try again", []claim{{kind: "lost", id: "h2"}}},
		{"no online hive has model tiny", []claim{{kind: "none-online"}}},
		{"worker w2 on hive proxied was lost: no heartbeat since 21:14:57", []claim{{kind: "worker-lost", id: "w2", hive: "proxied"}}},
		{"worker w3 on hive direct died (signal: killed)", []claim{{kind: "died", id: "w3", hive: "direct"}}},
		{"timed out after 2s", nil},
		{"worker w1 on hive h1 exited", nil},
	}
	for _, c := range claims {
		require.Equal(t, c.want, claimsIn(c.reason), c.reason)
	}

	t0 := time.Now()
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	cover := []struct {
		name     string
		recs     []procRecord
		from, to int
		want     bool
	}{
		{"one alive throughout", []procRecord{{Seen: at(0)}}, 5, 10, true},
		{"started inside the window", []procRecord{{Seen: at(6)}}, 5, 10, false},
		{"gone inside the window", []procRecord{{Seen: at(0), Gone: at(7)}}, 5, 10, false},
		{"restarted inside the window", []procRecord{{Seen: at(0), Gone: at(7)}, {Seen: at(8)}}, 5, 10, false},
		{"gone after the window", []procRecord{{Seen: at(0), Gone: at(11)}}, 5, 10, true},
		{"gone before, a new one throughout", []procRecord{{Seen: at(0), Gone: at(2)}, {Seen: at(3)}}, 5, 10, true},
		{"none", nil, 5, 10, false},
	}
	for _, c := range cover {
		require.Equal(t, c.want, coveredBy(c.recs, at(c.from), at(c.to)), c.name)
	}

	s := &jobStream{tokens: map[int]string{}}
	for _, ev := range []api.Event{
		{Token: &api.Token{Index: 1, Text: "b"}}, {Token: &api.Token{Index: 0, Text: "a"}},
		{Token: &api.Token{Index: 1, Text: "b"}}, {Token: &api.Token{Index: 3, Text: "d"}},
		{State: &api.StateChange{State: api.JobCompleted}}, {State: &api.StateChange{State: api.JobCompleted}},
	} {
		s.add(ev)
	}
	require.Equal(t, "ab", s.text(), "in index order, each once, up to the first gap")
	require.Equal(t, 1, s.copies)
	require.Empty(t, s.conflicts)
	require.Equal(t, 2, s.count(api.JobCompleted))
}
