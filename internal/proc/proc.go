// Package proc is the one place rbee starts and stops local processes: the
// queen spawning a local hive, a hive spawning its workers.
package proc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Spec describes a process to start.
type Spec struct {
	Path string
	Args []string
	// Env is added to the current environment.
	Env []string
	// LogPath receives stdout and stderr (appended). Required: a detached
	// process must leave a trail someone can read when it fails.
	LogPath string
	// DieWithParent asks the kernel to send the child SIGTERM when the
	// parent dies, however it dies (kill -9 included): a worker is
	// useless without the hive that owns it, and a new hive would not
	// know of it. Linux only; elsewhere the child outlives its parent.
	DieWithParent bool
}

// Process is a started child. Done is closed when it has exited; Err then
// holds how.
type Process struct {
	Pid  int
	Log  string
	done chan struct{}
	err  error
}

// Start launches spec in a session of its own, so it survives the parent
// (and a Ctrl-C in the parent's terminal does not reach it), with stdin from
// /dev/null and output to the log file. The parent still reaps it, so an
// unexpected exit is seen at once through Done.
func Start(spec Spec) (*Process, error) {
	if err := os.MkdirAll(filepath.Dir(spec.LogPath), 0o755); err != nil {
		return nil, fmt.Errorf("log directory: %w", err)
	}
	logf, err := os.OpenFile(spec.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log %s: %w", spec.LogPath, err)
	}
	defer logf.Close()
	cmd := exec.Command(spec.Path, spec.Args...)
	cmd.Env = append(os.Environ(), spec.Env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if spec.DieWithParent {
		dieWithParent(cmd.SysProcAttr)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.Path, err)
	}
	p := &Process{Pid: cmd.Process.Pid, Log: spec.LogPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// ExitErr says how the process ended; only valid after Done.
func (p *Process) ExitErr() error { return p.err }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM, waits up to grace, then SIGKILL, and waits for the
// exit. It returns which signal ended the process ("" if it had already
// exited).
func (p *Process) Stop(ctx context.Context, grace time.Duration) (string, error) {
	if p.Exited() {
		return "", nil
	}
	_ = syscall.Kill(p.Pid, syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
		return "SIGTERM", nil
	case <-t.C:
	case <-ctx.Done():
	}
	_ = syscall.Kill(p.Pid, syscall.SIGKILL)
	select {
	case <-p.done:
		return "SIGKILL", nil
	case <-time.After(5 * time.Second):
		return "SIGKILL", fmt.Errorf("process %d did not exit after SIGKILL", p.Pid)
	}
}

// Alive reports whether a process with pid exists and is not a zombie. It
// works for processes this one did not start (a hive started by an earlier
// queen).
func Alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if err := syscall.Kill(pid, 0); err != nil && !errors.Is(err, syscall.EPERM) {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // no procfs: trust kill(0)
	}
	// The state follows the parenthesised command name.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		return stat[i+2] != 'Z'
	}
	return true
}

// Terminate stops a process by pid that this process may not have started:
// SIGTERM, then SIGKILL after grace. It reports the signal that ended it.
func Terminate(ctx context.Context, pid int, grace time.Duration) (string, error) {
	if !Alive(pid) {
		return "", nil
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	if waitGone(ctx, pid, grace) {
		return "SIGTERM", nil
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if waitGone(ctx, pid, 5*time.Second) {
		return "SIGKILL", nil
	}
	return "SIGKILL", fmt.Errorf("process %d did not exit after SIGKILL", pid)
}

func waitGone(ctx context.Context, pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if !Alive(pid) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return !Alive(pid)
}

// Tail returns the last n lines of a file as plain text, for error messages
// that must show why a process failed. Terminal escape sequences are removed:
// a log written by an older build, or by a library that colours its output,
// must not put raw ESC bytes into an error a person reads or a JSON field.
func Tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > max {
		_, _ = f.Seek(st.Size()-max, io.SeekStart)
	}
	data, _ := io.ReadAll(f)
	data = ansiEscape.ReplaceAll(data, nil)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ansiEscape matches CSI sequences (colours, cursor moves: ESC [ params
// final) and any other lone ESC.
var ansiEscape = regexp.MustCompile(`\x1b(\[[0-?]*[ -/]*[@-~])?`)

// KillMarked SIGKILLs every process but this one whose command line or
// environment mentions marker (a temporary directory unique to a test or a
// bench run): the last resort that leaves nothing running after a run that
// failed half-way, whatever started the processes. Linux /proc only.
func KillMarked(marker string) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(filepath.Join("/proc", e.Name(), f))
			if err == nil && bytes.Contains(b, []byte(marker)) {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
}
