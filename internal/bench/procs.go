package bench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rbee-dev/rbee/internal/proc"
)

// process is a child the bench started, in a process group of its own, so
// killing the group also takes whatever it forked without a new session.
type process struct {
	Name    string
	Pid     int
	Log     string
	Started time.Time
	cmd     *exec.Cmd
	done    chan struct{}
	err     error
}

// Done is closed when the process has exited.
func (p *process) Done() <-chan struct{} { return p.done }

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends sig to the whole process group.
func (p *process) kill(sig syscall.Signal) { _ = syscall.Kill(-p.Pid, sig) }

// stop asks the group to end (SIGTERM) and kills it after grace.
func (p *process) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	p.kill(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	p.kill(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
	}
}

// procSet owns every process the bench starts, so one call stops them all,
// on a normal end, an error or a signal.
type procSet struct {
	mu    sync.Mutex
	procs []*process
	env   []string
	// marker is a path every child's command line or working data mentions
	// (the bench's temp root); processes that escaped the groups (hives
	// start workers in sessions of their own) are found by it.
	marker string
}

// start runs path with args, output to logPath, in a new process group.
func (s *procSet) start(name, path string, args []string, extraEnv []string, logPath string) (*process, error) {
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(path, args...)
	cmd.Env = append(append([]string(nil), s.env...), extraEnv...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{Name: name, Pid: cmd.Process.Pid, Log: logPath, Started: started, cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	s.mu.Lock()
	s.procs = append(s.procs, p)
	s.mu.Unlock()
	return p, nil
}

// stopAll stops every group started, then kills any process left whose
// command line mentions the marker.
func (s *procSet) stopAll() {
	s.mu.Lock()
	procs := s.procs
	s.procs = nil
	s.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() { defer wg.Done(); p.stop(3 * time.Second) }()
	}
	wg.Wait()
	if s.marker != "" {
		proc.KillMarked(s.marker)
	}
}

// childEnv is this process's environment without any RBEE_ setting, so a
// user's shell cannot point the bench's processes at a real cluster.
func childEnv(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "RBEE_") {
			continue
		}
		out = append(out, kv)
	}
	return append(out, extra...)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// clkTck is USER_HZ, 100 on every Linux the bench runs on.
const clkTck = 100

// cpuSeconds is the user+system CPU time a process has used.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// After the command name: state is field 3, utime 14, stime 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / clkTck, nil
}

// rss is a process's resident set size (VmRSS).
func rss(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				kb, err := strconv.ParseUint(f[0], 10, 64)
				return kb << 10, err
			}
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

// cpuMeter measures the CPU a process uses over a window, as a fraction of
// one core.
type cpuMeter struct {
	pid   int
	t0    time.Time
	c0    float64
	valid bool
}

func startCPU(pid int) *cpuMeter {
	c, err := cpuSeconds(pid)
	return &cpuMeter{pid: pid, t0: time.Now(), c0: c, valid: err == nil}
}

func (m *cpuMeter) cores() float64 {
	c, err := cpuSeconds(m.pid)
	if err != nil || !m.valid {
		return -1
	}
	return (c - m.c0) / time.Since(m.t0).Seconds()
}

// waitFor polls cond every step until it holds, ctx ends or d passes.
func waitFor(ctx context.Context, d, step time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(step)
	}
}

// children lists the pids whose parent is ppid.
func children(ppid int) []int {
	var out []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			out = append(out, pid)
		}
	}
	return out
}

// logTail is the end of a process's log, for an error message (the temp
// directory holding the log is gone after the run).
func logTail(p *process) string {
	b, err := os.ReadFile(p.Log)
	if err != nil || len(b) == 0 {
		return "its log is empty"
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 3 {
		lines = lines[len(lines)-3:]
	}
	s := strings.Join(lines, " / ")
	if len(s) > 600 {
		s = s[len(s)-600:]
	}
	return "log: `" + strings.ReplaceAll(s, "|", "\\|") + "`"
}
