// Package bench measures what rbee's bus costs, how fast failure is seen and
// how far one queen scales, with the real programs, the real nats-server and
// the real llama.cpp. cmd/rbee-bench runs it and writes docs/BENCHMARKS.md.
package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/rbee-dev/rbee/internal/llamalib"
)

// Options say which benchmarks run and how big.
type Options struct {
	// Only lists the benchmarks to run (1-Count); empty runs all.
	Only map[int]bool
	// Quick shrinks every size, for a smoke run.
	Quick bool
	// Out is where the Markdown report goes ("" = nowhere).
	Out string
	// Stdout receives each table as it finishes, Log progress lines.
	Stdout, Log io.Writer
	// Self is the rbee-bench executable (for its serve-bus mode).
	Self string
	// Root is the module root (binaries are built from it).
	Root string
}

// Table is one benchmark's result.
type Table struct {
	ID     int
	Title  string
	Intro  string
	Header []string
	Rows   [][]string
	Notes  []string
	// Extra tables of the same benchmark.
	More []*Table
}

// Target is one claim of the issue and whether this run upholds it.
type Target struct {
	Bench int
	Claim string
	// Holds is nil when it could not be measured.
	Holds  *bool
	Detail string
}

func holds(b bool) *bool { return &b }

// env is what every benchmark shares: the temp root, the built programs,
// the processes started.
type env struct {
	opts     Options
	root     string
	bin      string
	buildErr map[string]error
	libDir   string
	procs    *procSet
	targets  []Target
}

func (e *env) logf(format string, args ...any) {
	if e.opts.Log != nil {
		fmt.Fprintf(e.opts.Log, "[bench %s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
	}
}

func (e *env) target(t Target) { e.targets = append(e.targets, t) }

func (e *env) dir(name string) string {
	d, err := os.MkdirTemp(e.root, name+"-")
	if err != nil {
		panic(err)
	}
	return d
}

// binary is the path of a built program, or why it is missing.
func (e *env) binary(name string) (string, error) {
	if err, ok := e.buildErr[name]; ok && err != nil {
		return "", fmt.Errorf("%s did not build: %v", name, err)
	}
	return filepath.Join(e.bin, name), nil
}

var programs = []string{"queen-rbee", "rbee-hive", "llm-worker-rbee", "rbee"}

func (e *env) build() {
	e.buildErr = map[string]error{}
	for _, p := range programs {
		cmd := exec.Command("go", "build", "-o", filepath.Join(e.bin, p), "./cmd/"+p)
		cmd.Dir = e.opts.Root
		out, err := cmd.CombinedOutput()
		if err != nil {
			msg := strings.TrimSpace(string(out))
			if i := strings.IndexByte(msg, '\n'); i > 0 && len(msg) > 300 {
				msg = msg[:300] + "…"
			}
			e.buildErr[p] = fmt.Errorf("%v: %s", err, msg)
			e.logf("building %s failed: %s", p, msg)
		}
	}
}

type benchmark struct {
	id    int
	title string
	run   func(ctx context.Context, e *env) (*Table, error)
}

var benchmarks = []benchmark{
	{1, "Orchestration overhead", benchOverhead},
	{2, "Token stream", benchStream},
	{3, "Job throughput of the control plane", benchJobs},
	{4, "Failure detection", benchFailure},
	{5, "Scale of one queen", benchScale},
	{6, "Footprint", benchFootprint},
	{7, "Recovery at the boundaries", benchRecovery},
	{8, "Concurrency", benchConcurrency},
	{9, "Security", benchSecurity},
	{10, "Many machines", benchManyMachines},
}

// handWritten starts the part of the report that is written by hand and
// kept across runs.
// Count is how many benchmarks there are, numbered from 1.
var Count = len(benchmarks)

const handWritten = "<!-- Below: written by hand, kept by the bench. -->"

// Run runs the selected benchmarks, prints each table when it finishes and
// writes the report. Every process and temp directory it made is gone when
// it returns, also when ctx is cancelled.
func Run(ctx context.Context, opts Options) error {
	if opts.Stdout == nil {
		opts.Stdout = io.Discard
	}
	root, err := os.MkdirTemp("", "rbee-bench-")
	if err != nil {
		return err
	}
	e := &env{opts: opts, root: root, bin: filepath.Join(root, "bin")}
	defer os.RemoveAll(root)
	e.libDir, _ = llamalib.Find("")
	extra := []string{"RBEE_LOG_LEVEL=warn"}
	if e.libDir != "" {
		extra = append(extra, llamalib.EnvVar+"="+e.libDir)
	}
	e.procs = &procSet{env: childEnv(extra...), marker: root}
	defer e.procs.stopAll()

	started := time.Now()
	m := describeMachine(e.libDir)
	fmt.Fprintln(opts.Stdout, m.markdown())
	e.logf("building the programs into %s", e.bin)
	e.build()

	var tables []*Table
	for _, b := range benchmarks {
		if len(opts.Only) > 0 && !opts.Only[b.id] {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		e.logf("benchmark %d: %s", b.id, b.title)
		t0 := time.Now()
		t, err := safeRun(ctx, e, b)
		if t == nil {
			t = &Table{}
		}
		t.ID, t.Title = b.id, b.title
		if err != nil {
			t.Notes = append(t.Notes, "**Not measured (or only in part):** "+err.Error())
		}
		t.Notes = append(t.Notes, fmt.Sprintf("Took %s.", time.Since(t0).Round(100*time.Millisecond)))
		e.expectTargets(b.id, err)
		// Stop whatever this benchmark left running before the next one.
		e.procs.stopAll()
		tables = append(tables, t)
		fmt.Fprintln(opts.Stdout, t.markdown())
	}
	targets := e.targetsMarkdown()
	fmt.Fprintln(opts.Stdout, targets)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if opts.Out != "" {
		var b strings.Builder
		b.WriteString("# Benchmarks\n\n")
		b.WriteString("Written by `go tool task bench` (`go run ./cmd/rbee-bench`); do not edit by hand. ")
		b.WriteString("Each benchmark runs the real programs (built from this tree), the real nats-server and the real llama.cpp on one machine; nothing is mocked. ")
		b.WriteString("Medians are p50; p99 is the nearest-rank 99th percentile (with fewer than 100 samples it is the worst but one or the worst).\n\n")
		mode := "default sizes"
		if opts.Quick {
			mode = "`-quick` (reduced sizes)"
		}
		old, _ := os.ReadFile(opts.Out)
		kept := keptSections(string(old), opts.Only)
		fmt.Fprintf(&b, "Run with %s; the whole run took %s.", mode, time.Since(started).Round(time.Second))
		if len(kept.sections) > 0 {
			fmt.Fprintf(&b, " Benchmarks %s are kept from an earlier run (this one ran only %s; its machine section is this run's).", joinIDs(kept.ids), joinIDs(onlyIDs(opts.Only)))
		}
		b.WriteString("\n\n")
		b.WriteString(m.markdown())
		b.WriteString("\n")
		b.WriteString(mergeTargets(targets, kept.targetRows))
		b.WriteString("\n")
		byID := map[int]string{}
		for _, t := range tables {
			byID[t.ID] = t.markdown() + "\n"
		}
		for id, sec := range kept.sections {
			byID[id] = sec
		}
		for _, bm := range benchmarks {
			b.WriteString(byID[bm.id])
		}
		if err := os.MkdirAll(filepath.Dir(opts.Out), 0o755); err != nil {
			return err
		}
		// Runs that are not the bench's own (the chaos test's long run,
		// an A/B against an older tree) are recorded by hand below the
		// marker; a new report keeps them.
		if i := strings.Index(string(old), handWritten); i >= 0 {
			b.WriteString(string(old[i:]))
		}
		if err := os.WriteFile(opts.Out, []byte(b.String()), 0o644); err != nil {
			return err
		}
		e.logf("wrote %s", opts.Out)
	}
	return nil
}

// kept is what a partial run keeps of the report it rewrites: the sections
// and target rows of the benchmarks it did not run.
type kept struct {
	ids        []int
	sections   map[int]string
	targetRows []string
}

// keptSections reads the report old for the benchmarks not in only (all
// are run when only is empty, so nothing is kept).
func keptSections(old string, only map[int]bool) kept {
	k := kept{sections: map[int]string{}}
	if len(only) == 0 {
		return k
	}
	if i := strings.Index(old, handWritten); i >= 0 {
		old = old[:i]
	}
	lines := strings.SplitAfter(old, "\n")
	cur, inTargets := 0, false
	for _, line := range lines {
		var id int
		if strings.HasPrefix(line, "## ") {
			cur, inTargets = 0, strings.HasPrefix(line, "## Targets")
			if _, err := fmt.Sscanf(line, "## %d.", &id); err == nil && !only[id] {
				cur = id
				k.ids = append(k.ids, id)
			}
		}
		if cur != 0 {
			k.sections[cur] += line
		}
		if _, err := fmt.Sscanf(line, "| %d |", &id); inTargets && err == nil && !only[id] {
			k.targetRows = append(k.targetRows, line)
		}
	}
	sort.Ints(k.ids)
	return k
}

// mergeTargets adds the kept rows to this run's targets table, in
// benchmark order.
func mergeTargets(table string, rows []string) string {
	if len(rows) == 0 {
		return table
	}
	lines := strings.SplitAfter(strings.TrimRight(table, "\n"), "\n")
	var head, body []string
	for _, l := range lines {
		var id int
		if _, err := fmt.Sscanf(l, "| %d |", &id); err == nil {
			body = append(body, strings.TrimRight(l, "\n")+"\n")
		} else {
			head = append(head, strings.TrimRight(l, "\n")+"\n")
		}
	}
	for _, r := range rows {
		body = append(body, strings.TrimRight(r, "\n")+"\n")
	}
	idOf := func(l string) int {
		var id int
		_, _ = fmt.Sscanf(l, "| %d |", &id)
		return id
	}
	sort.SliceStable(body, func(i, j int) bool { return idOf(body[i]) < idOf(body[j]) })
	return strings.Join(head, "") + strings.Join(body, "")
}

func onlyIDs(only map[int]bool) []int {
	var ids []int
	for id := range only {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	return ids
}

func joinIDs(ids []int) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.Itoa(id)
	}
	return strings.Join(s, ", ")
}

func safeRun(ctx context.Context, e *env, b benchmark) (t *Table, err error) {
	defer func() {
		if p := recover(); p != nil {
			buf := make([]byte, 4096)
			buf = buf[:runtime.Stack(buf, false)]
			err = fmt.Errorf("panic: %v\n%s", p, buf)
		}
	}()
	return b.run(ctx, e)
}

func (t *Table) markdown() string {
	var b strings.Builder
	if t.Title != "" {
		fmt.Fprintf(&b, "## %d. %s\n\n", t.ID, t.Title)
	}
	t.body(&b)
	return b.String()
}

func (t *Table) body(b *strings.Builder) {
	if t.Intro != "" {
		b.WriteString(t.Intro + "\n\n")
	}
	if len(t.Header) > 0 {
		b.WriteString("| " + strings.Join(t.Header, " | ") + " |\n")
		seps := make([]string, len(t.Header))
		for i := range seps {
			seps[i] = "---"
		}
		b.WriteString("|" + strings.Join(seps, "|") + "|\n")
		for _, r := range t.Rows {
			for len(r) < len(t.Header) {
				r = append(r, "")
			}
			b.WriteString("| " + strings.Join(r, " | ") + " |\n")
		}
		b.WriteString("\n")
	}
	for _, m := range t.More {
		m.body(b)
	}
	for _, n := range t.Notes {
		b.WriteString("- " + n + "\n")
	}
	if len(t.Notes) > 0 {
		b.WriteString("\n")
	}
}

func (e *env) targetsMarkdown() string {
	var b strings.Builder
	b.WriteString("## Targets\n\n| # | target | holds | measured |\n|---|---|---|---|\n")
	ts := append([]Target(nil), e.targets...)
	sort.SliceStable(ts, func(i, j int) bool { return ts[i].Bench < ts[j].Bench })
	for _, t := range ts {
		h := "not measured"
		if t.Holds != nil {
			h = "no"
			if *t.Holds {
				h = "**yes**"
			}
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s |\n", t.Bench, t.Claim, h, t.Detail)
	}
	if len(ts) == 0 {
		b.WriteString("| | (no benchmark with a target ran) | | |\n")
	}
	return b.String()
}

// expected are the targets per benchmark, listed as not measured
// when a benchmark could not produce them.
var expected = map[int][]string{
	1: {"tokens/s of B and C ≥ 0.97 of A on the larger model", "tokens/s of B ≥ 0.95 of A on the tiny model", "added TTFT ≤ 1 ms p50 with a warm worker, also for an outside client"},
	2: {"≥ 500,000 tokens/s to one follower"},
	3: {"10,000 jobs submitted at once all complete, none lost or run twice"},
	4: {"killed hive and killed worker seen lost: p99 ≤ 3 heartbeat intervals + 1 s"},
	5: {"10,000 entries at 1 Hz: queen < 0.5 core, detection within 3 intervals + 1 s"},
	7: {"a queen restart fails no job whose worker lives", "a failed spawn fails every waiter within 1 s"},
}

func (e *env) expectTargets(id int, err error) {
	for _, t := range e.targets {
		if t.Bench == id {
			return
		}
	}
	why := "not measured"
	if err != nil {
		why = err.Error()
		if len(why) > 200 {
			why = why[:200] + "…"
		}
	}
	for _, claim := range expected[id] {
		e.target(Target{Bench: id, Claim: claim, Detail: why})
	}
}
