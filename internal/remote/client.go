package remote

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// Run runs cmd through the remote user's login shell and returns its output.
// A non-zero exit returns *ExitError (with the exit code and stderr tail),
// which wraps ErrCommandNotFound for exit 127. Cancelling ctx kills the
// session and returns ctx's error; whatever output arrived is still returned.
func (c *Client) Run(ctx context.Context, cmd string) (stdout, stderr string, err error) {
	return c.exec(ctx, cmd, nil)
}

func (c *Client) exec(ctx context.Context, cmd string, stdin io.Reader) (string, string, error) {
	if err := ctx.Err(); err != nil {
		return "", "", err
	}
	sess, err := c.conn.NewSession()
	if err != nil {
		return "", "", fmt.Errorf("open SSH session on %s: %w", c.target, err)
	}
	defer sess.Close()

	// The shell reports its pid first: sshd puts each command in its own
	// session, so that pid is also the process group to kill on cancel.
	// (SSH "signal" requests cannot do it: OpenSSH ignores them for root
	// logins, which run without privilege separation.)
	var errOut lockedBuffer
	out := &pidLine{}
	sess.Stdout, sess.Stderr, sess.Stdin = out, &errOut, stdin
	if err := sess.Start("echo $$\n" + cmd); err != nil {
		return "", "", fmt.Errorf("start remote command on %s: %w", c.target, err)
	}
	done := make(chan error, 1)
	go func() { done <- sess.Wait() }()

	select {
	case err = <-done:
	case <-ctx.Done():
		if pid := out.shellPid(); pid > 1 {
			kctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			p := strconv.Itoa(pid)
			_, _, _ = c.exec(kctx, "kill -s KILL -- -"+p+" 2>/dev/null || kill -s KILL "+p, nil)
			cancel()
		}
		_ = sess.Signal(ssh.SIGKILL)
		_ = sess.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
		return out.String(), errOut.String(), fmt.Errorf("remote command on %s: %w", c.target, ctx.Err())
	}

	stdout, stderr := out.String(), errOut.String()
	if err == nil {
		return stdout, stderr, nil
	}
	var ee *ssh.ExitError
	if errors.As(err, &ee) {
		xe := &ExitError{Target: c.target.String(), Cmd: cmd, Code: ee.ExitStatus(), Stderr: tail(stderr, 20, 2048)}
		if ee.Signal() != "" {
			xe.Code, xe.Signal = -1, ee.Signal()
		}
		return stdout, stderr, xe
	}
	var me *ssh.ExitMissingError
	if errors.As(err, &me) {
		return stdout, stderr, fmt.Errorf("remote command on %s ended without an exit status; the connection may have dropped: %w", c.target, err)
	}
	return stdout, stderr, fmt.Errorf("remote command on %s: %w", c.target, err)
}

// lockedBuffer lets a cancelled Run return partial output while the SSH
// library may still be writing to it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// pidLine consumes the "echo $$" line that exec prepends and passes the rest
// of stdout through. If the first line is not a pid (a login shell that
// prints a banner, say), it is kept as output.
type pidLine struct {
	mu   sync.Mutex
	out  bytes.Buffer
	head []byte
	done bool
	pid  int
}

func (p *pidLine) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(b)
	if !p.done {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			p.head = append(p.head, b...)
			if len(p.head) > 32 { // no pid is that long
				p.done = true
				p.out.Write(p.head)
			}
			return n, nil
		}
		p.head = append(p.head, b[:i]...)
		b = b[i+1:]
		p.done = true
		if pid, err := strconv.Atoi(string(p.head)); err == nil && pid > 0 {
			p.pid = pid
		} else {
			p.out.Write(p.head)
			p.out.WriteByte('\n')
		}
	}
	p.out.Write(b)
	return n, nil
}

func (p *pidLine) shellPid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

func (p *pidLine) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.done {
		return string(p.head)
	}
	return p.out.String()
}

// Start launches cmd (a shell command line) on the remote machine detached
// from the SSH session -- in its own session and process group, immune to
// hangup, stdin from /dev/null, stdout and stderr to logPath (truncated;
// its directory is created) -- and returns its pid. The process outlives
// this Client. Kill signals its whole process group.
func (c *Client) Start(ctx context.Context, cmd, logPath string) (int, error) {
	if strings.TrimSpace(cmd) == "" {
		return 0, errors.New("start: empty command")
	}
	if logPath == "" {
		logPath = "/dev/null"
	}
	// The background job must be a simple command: "a && b &" would
	// background a subshell and $! would be its pid, not the daemon's.
	// setsid is missing on macOS; there the process shares our group.
	detached := "nohup sh -c " + shellQuote(cmd) + " > " + shellPath(logPath) + " 2>&1 < /dev/null &"
	script := "mkdir -p -- " + shellPath(path.Dir(logPath)) + " || exit 1\n" +
		"if command -v setsid >/dev/null 2>&1; then setsid " + detached + " else " + detached + " fi\n" +
		"echo $!"
	out, _, err := c.exec(ctx, script, nil)
	if err != nil {
		return 0, fmt.Errorf("start %q on %s: %w", abbrev(cmd, 80), c.target, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("start %q on %s: could not read its pid from %q", abbrev(cmd, 80), c.target, out)
	}
	return pid, nil
}

var sigName = regexp.MustCompile(`^([A-Z][A-Z0-9+-]*|[0-9]+)$`)

// Kill sends sig ("TERM", "SIGKILL", "9", ...; "" means TERM) to pid's
// process group -- which for a Start-ed process is the process and anything
// it spawned -- falling back to pid alone. A process that is already gone
// is not an error: the caller wanted it not running, and it is not.
func (c *Client) Kill(ctx context.Context, pid int, sig string) error {
	if pid <= 1 {
		return fmt.Errorf("kill: refusing pid %d", pid)
	}
	sig = strings.TrimPrefix(strings.ToUpper(strings.TrimSpace(sig)), "SIG")
	if sig == "" {
		sig = "TERM"
	}
	if !sigName.MatchString(sig) {
		return fmt.Errorf("kill: invalid signal %q", sig)
	}
	p := strconv.Itoa(pid)
	script := "kill -s " + sig + " -- -" + p + " 2>/dev/null || kill -s " + sig + " " + p + " 2>/dev/null || ! kill -0 " + p + " 2>/dev/null"
	if _, _, err := c.exec(ctx, script, nil); err != nil {
		return fmt.Errorf("kill -%s %d on %s: %w", sig, pid, c.target, err)
	}
	return nil
}

// Alive reports whether pid is a running process on the remote machine.
// Zombies count as dead: a detached process is reparented to init, and some
// inits (containers) never reap, which would otherwise make a killed hive
// look alive forever.
func (c *Client) Alive(ctx context.Context, pid int) (bool, error) {
	if pid <= 0 {
		return false, fmt.Errorf("alive: invalid pid %d", pid)
	}
	p := strconv.Itoa(pid)
	script := "if kill -0 " + p + " 2>/dev/null || [ -d /proc/" + p + " ]; then " +
		"if [ -r /proc/" + p + "/stat ] && [ \"$(sed 's/^.*) //' /proc/" + p + "/stat | cut -c1)\" = Z ]; then echo dead; else echo alive; fi; " +
		"else echo dead; fi"
	out, _, err := c.exec(ctx, script, nil)
	if err != nil {
		return false, fmt.Errorf("check pid %d on %s: %w", pid, c.target, err)
	}
	switch strings.TrimSpace(out) {
	case "alive":
		return true, nil
	case "dead":
		return false, nil
	}
	return false, fmt.Errorf("check pid %d on %s: unexpected output %q", pid, c.target, out)
}

// Tail returns the last lines lines of the remote file at path (lines <= 0
// means 10, tail's default). A missing file is an error.
func (c *Client) Tail(ctx context.Context, path string, lines int) (string, error) {
	if lines <= 0 {
		lines = 10
	}
	if path == "" {
		return "", errors.New("tail: empty path")
	}
	out, _, err := c.exec(ctx, "tail -n "+strconv.Itoa(lines)+" -- "+shellPath(path), nil)
	if err != nil {
		return "", fmt.Errorf("tail %s on %s: %w", path, c.target, err)
	}
	return out, nil
}

// Sha256 returns the lowercase hex SHA-256 of the remote file at path, using
// sha256sum (or shasum -a 256 where that is all there is, e.g. macOS).
func (c *Client) Sha256(ctx context.Context, path string) (string, error) {
	if path == "" {
		return "", errors.New("sha256: empty path")
	}
	out, _, err := c.exec(ctx, sha256Script(shellPath(path)), nil)
	if err != nil {
		return "", fmt.Errorf("sha256 of %s on %s: %w", path, c.target, err)
	}
	return parseSum(out)
}

// Reading the file on stdin keeps odd file names out of the output.
func sha256Script(quoted string) string {
	return "{ if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi; } < " + quoted
}

var hexSum = regexp.MustCompile(`^[0-9a-f]{64}$`)

func parseSum(out string) (string, error) {
	f := strings.Fields(out)
	if len(f) == 0 || !hexSum.MatchString(strings.ToLower(f[0])) {
		return "", fmt.Errorf("unexpected checksum output %q", out)
	}
	return strings.ToLower(f[0]), nil
}

// Upload copies the local file to remotePath with permission bits mode (0
// means the local file's), creating parent directories. The data goes to a
// temporary file next to the target, is checked against the local SHA-256
// on the remote, and only then renamed over remotePath, so a running binary
// is replaced atomically and a corrupted copy never takes its place.
func (c *Client) Upload(ctx context.Context, localPath, remotePath string, mode os.FileMode) error {
	if remotePath == "" || strings.HasSuffix(remotePath, "/") {
		return fmt.Errorf("upload: invalid remote path %q", remotePath)
	}
	f, err := os.Open(localPath)
	if err != nil {
		return fmt.Errorf("upload: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("upload: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("upload: %s is not a regular file", localPath)
	}
	if mode == 0 {
		mode = st.Mode()
	}

	var rnd [6]byte
	_, _ = rand.Read(rnd[:])
	tmp := remotePath + ".rbee-upload-" + hex.EncodeToString(rnd[:])
	qTmp, qDst := shellPath(tmp), shellPath(remotePath)

	// The file's sum is taken first and handed to the remote script,
	// which checks the copy and renames it in the same command: one SSH
	// session per file. Each session costs whatever the remote user's
	// shell does at start (bash runs ~/.bashrc for sshd; a pyenv init
	// there takes 0.6 s), so `rbee hive install` with its two binaries
	// and 22 libraries took 25 s on loopback when the rename was a
	// second session.
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return fmt.Errorf("upload: reading %s: %w", localPath, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("upload: %w", err)
	}
	want := hex.EncodeToString(h.Sum(nil))
	script := "mkdir -p -- " + shellPath(path.Dir(remotePath)) +
		" && cat > " + qTmp +
		" && chmod " + strconv.FormatUint(uint64(mode.Perm()), 8) + " " + qTmp +
		" && sum=$(" + sha256Script(qTmp) + ") && echo \"$sum\"" +
		" && [ \"${sum%% *}\" = " + want + " ] && mv -f -- " + qTmp + " " + qDst +
		" || { rc=$?; rm -f -- " + qTmp + "; exit $rc; }"
	out, _, err := c.exec(ctx, script, f)
	if err != nil {
		if got, serr := parseSum(out); serr == nil && got != want {
			return fmt.Errorf("upload %s to %s:%s: checksum mismatch (local sha256 %s, remote %s); the copy was discarded", localPath, c.target, remotePath, want, got)
		}
		c.cleanup(qTmp)
		return fmt.Errorf("upload %s to %s:%s: %w", localPath, c.target, remotePath, err)
	}
	// The script renames the copy only once its sum is want.
	return nil
}

// cleanup removes a temp file best-effort, with its own short deadline
// because the caller's context may be the reason we are cleaning up.
func (c *Client) cleanup(quoted string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _, _ = c.exec(ctx, "rm -f -- "+quoted, nil)
}

// Remove deletes the remote file at path (not directories). A missing file
// is not an error.
func (c *Client) Remove(ctx context.Context, path string) error {
	if path == "" {
		return errors.New("remove: empty path")
	}
	if _, _, err := c.exec(ctx, "rm -f -- "+shellPath(path), nil); err != nil {
		return fmt.Errorf("remove %s on %s: %w", path, c.target, err)
	}
	return nil
}

// shellQuote single-quotes s for any POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// shellPath quotes a remote path, except that a leading ~ becomes "$HOME" so
// the remote shell expands it (a quoted ~ would be a literal directory).
func shellPath(p string) string {
	switch {
	case p == "~":
		return `"$HOME"`
	case strings.HasPrefix(p, "~/"):
		rest := strings.TrimLeft(p[2:], "/")
		if rest == "" {
			return `"$HOME"`
		}
		return `"$HOME"/` + shellQuote(rest)
	default:
		return shellQuote(p)
	}
}

// Quote single-quotes s for a POSIX shell command line.
func Quote(s string) string { return shellQuote(s) }

// QuotePath quotes a remote path so that a leading ~ still means the remote
// user's home.
func QuotePath(p string) string { return shellPath(p) }
