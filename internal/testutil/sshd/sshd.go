// Package sshd runs a real OpenSSH server on loopback for tests, so that the
// SSH code is exercised against the implementation it will meet in the field
// rather than against a mock.
//
// Each Server is private to one test: its own host key, user key,
// authorized_keys, known_hosts and port, all under t.TempDir(), and it is
// stopped by t.Cleanup. Logins go to the current user (root in CI).
package sshd

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// SSHDPath is where Debian's openssh-server puts the daemon. sshd insists on
// being started by absolute path (it re-executes itself).
const SSHDPath = "/usr/sbin/sshd"

// Server is a running sshd. All fields are read-only.
type Server struct {
	// Host is the listen address, always 127.0.0.1.
	Host string
	// Port is the TCP port sshd listens on.
	Port int
	// User is the account tests log in as (the current user).
	User string
	// HostKey is the server's (first) host key, ED25519 unless
	// StartWithHostKeys said otherwise.
	HostKey ssh.PublicKey
	// UserKeyPath is an unencrypted ED25519 private key authorised to log in.
	UserKeyPath string
	// KnownHostsPath is a known_hosts file holding exactly HostKey for
	// "[127.0.0.1]:Port".
	KnownHostsPath string
	// ConfigPath is the sshd_config the daemon runs with.
	ConfigPath string
	// Dir is the server's private temporary directory.
	Dir string
	// BinDir is an empty directory for tests to install binaries into on
	// the "remote" side; refer to them by absolute path in commands (no PATH
	// changes are made).
	BinDir string

	cmd  *exec.Cmd
	log  *syncBuffer
	done chan struct{}
}

// Addr returns "127.0.0.1:Port".
func (s *Server) Addr() string { return net.JoinHostPort(s.Host, strconv.Itoa(s.Port)) }

// Log returns what sshd has logged so far (LogLevel VERBOSE, on stderr);
// Start also dumps it when the test fails.
func (s *Server) Log() string { return s.log.String() }

// Start starts a fresh sshd for t (skipping t when OpenSSH is not
// installed, failing it when that happens under CI=true) and
// returns once the port answers with an SSH banner. It is stopped when t
// finishes.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartWithHostKeys(t, "ed25519")
}

// StartWithHostKeys is Start with one host key per ssh-keygen type given
// ("ed25519", "ecdsa", "rsa"), like a stock server that has all three.
// HostKey and KnownHostsPath hold only the first one, which is how a client
// that learnt one key type meets a server offering several.
func StartWithHostKeys(t testing.TB, keyTypes ...string) *Server {
	t.Helper()
	if len(keyTypes) == 0 {
		keyTypes = []string{"ed25519"}
	}
	requireInstalled(t)

	u, err := user.Current()
	if err != nil {
		t.Fatalf("sshd: current user: %v", err)
	}
	if os.Geteuid() == 0 {
		// Privilege separation needs this directory and refuses to start
		// without it; on a box where sshd never ran as a service nothing
		// has created it.
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatalf("sshd: create privilege separation dir: %v", err)
		}
	}

	dir := t.TempDir()
	s := &Server{
		Host:           "127.0.0.1",
		User:           u.Username,
		Dir:            dir,
		BinDir:         filepath.Join(dir, "bin"),
		UserKeyPath:    filepath.Join(dir, "user_ed25519"),
		KnownHostsPath: filepath.Join(dir, "known_hosts"),
		ConfigPath:     filepath.Join(dir, "sshd_config"),
	}
	if err := os.Mkdir(s.BinDir, 0o755); err != nil {
		t.Fatalf("sshd: %v", err)
	}
	var hostKeyLines []string
	for i, typ := range keyTypes {
		p := filepath.Join(dir, "host_"+typ)
		keygen(t, p, typ, "rbee-test-host")
		hostKeyLines = append(hostKeyLines, "HostKey "+p)
		if i == 0 {
			s.HostKey = readPub(t, p+".pub")
		}
	}
	keygen(t, s.UserKeyPath, "ed25519", "rbee-test-user")
	userPub, err := os.ReadFile(s.UserKeyPath + ".pub")
	if err != nil {
		t.Fatalf("sshd: %v", err)
	}
	authKeys := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(authKeys, userPub, 0o600); err != nil {
		t.Fatalf("sshd: %v", err)
	}

	// A free port can be taken by someone else between our probe and sshd's
	// bind; retry with another one rather than flake.
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port := freePort(t)
		cfg := fmt.Sprintf(`# written by internal/testutil/sshd
ListenAddress 127.0.0.1:%d
%s
PidFile %s
AuthorizedKeysFile %s
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
LogLevel VERBOSE
UseDNS no
PrintMotd no
MaxStartups 100
MaxSessions 100
`, port, strings.Join(hostKeyLines, "\n"), filepath.Join(dir, "sshd.pid"), authKeys)
		if err := os.WriteFile(s.ConfigPath, []byte(cfg), 0o644); err != nil {
			t.Fatalf("sshd: %v", err)
		}
		s.Port = port
		if lastErr = s.launch(); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("sshd: could not start: %v", lastErr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sshd log (%s):\n%s", s.Addr(), s.Log())
		}
		s.stop()
	})

	line := knownhosts.Line([]string{s.Addr()}, s.HostKey) + "\n"
	if err := os.WriteFile(s.KnownHostsPath, []byte(line), 0o600); err != nil {
		t.Fatalf("sshd: %v", err)
	}
	return s
}

// launch runs sshd on s.Port and waits for its banner. On failure sshd is
// stopped and its log is in the error.
func (s *Server) launch() error {
	s.log = &syncBuffer{}
	s.done = make(chan struct{})
	// -D: stay in the foreground so we own the process; -e: log to stderr.
	s.cmd = exec.Command(SSHDPath, "-D", "-e", "-f", s.ConfigPath)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	// Own process group, so a ^C aimed at `go test` is not what stops it
	// half-way; Cleanup does.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		return err
	}
	go func() { _ = s.cmd.Wait(); close(s.done) }()

	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("sshd exited: %v\n%s", s.cmd.ProcessState, s.Log())
		default:
		}
		if banner(s.Addr()) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.stop()
	return fmt.Errorf("sshd did not answer on %s within 15s\n%s", s.Addr(), s.Log())
}

// banner reports whether addr greets us like an SSH server.
func banner(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "SSH-2.0-")
}

func (s *Server) stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.done
	}
}

// WriteClientConfig writes an ssh_config(5) file into the server's
// directory with a Host entry named alias that points at this server (host,
// port, user, identity, known_hosts) and returns its path. It works both for
// remote.WithConfigFile and for `ssh -F path alias`.
func (s *Server) WriteClientConfig(alias string) string {
	p := filepath.Join(s.Dir, "ssh_config."+alias)
	cfg := fmt.Sprintf(`Host %s
  HostName %s
  Port %d
  User %s
  IdentityFile %s
  IdentitiesOnly yes
  UserKnownHostsFile %s
  StrictHostKeyChecking yes
`, alias, s.Host, s.Port, s.User, s.UserKeyPath, s.KnownHostsPath)
	if err := os.WriteFile(p, []byte(cfg), 0o600); err != nil {
		panic(fmt.Sprintf("sshd: write client config: %v", err))
	}
	return p
}

// GenerateKey writes a fresh unencrypted ED25519 private key (OpenSSH
// format, 0600) to path and returns its public half. Tests use it for keys
// the server must reject.
func GenerateKey(t testing.TB, path string) ssh.PublicKey {
	t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatalf("generate key: %v", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "rbee-test")
	if err != nil {
		t.Fatalf("marshal key: %v", err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatalf("write key: %v", err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatalf("public key: %v", err)
	}
	return sp
}

func keygen(t testing.TB, path, keyType, comment string) {
	t.Helper()
	out, err := exec.Command("ssh-keygen", "-q", "-t", keyType, "-N", "", "-C", comment, "-f", path).CombinedOutput()
	if err != nil {
		t.Fatalf("sshd: ssh-keygen %s: %v\n%s", path, err, out)
	}
}

func readPub(t testing.TB, path string) ssh.PublicKey {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("sshd: %v", err)
	}
	k, _, _, _, err := ssh.ParseAuthorizedKey(b)
	if err != nil {
		t.Fatalf("sshd: parse %s: %v", path, err)
	}
	return k
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("sshd: find free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// syncBuffer is a bytes.Buffer safe for sshd's writer and the test's reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
