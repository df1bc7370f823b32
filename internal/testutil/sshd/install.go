package sshd

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	installMu  sync.Mutex
	installErr error
	installed  bool
)

// ensureInstalled makes SSHDPath exist. Only root can install, and CI runs
// as root, so there a missing sshd is installed rather than skipped: the
// SSH tests must never silently not run in CI.
func ensureInstalled(t testing.TB) {
	t.Helper()
	installMu.Lock()
	defer installMu.Unlock()
	if installed {
		return
	}
	if installErr != nil {
		t.Fatalf("sshd: %v", installErr)
	}
	if _, err := os.Stat(SSHDPath); err == nil {
		installed = true
		return
	}
	if os.Geteuid() != 0 {
		t.Skipf("sshd: %s is missing and we are not root, so cannot install it; run `apt-get install openssh-server` (or run the tests as root) to enable the real-sshd tests", SSHDPath)
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		t.Skipf("sshd: %s is missing and there is no apt-get to install it with; install OpenSSH server to enable the real-sshd tests", SSHDPath)
	}

	// Test binaries of several packages run in parallel and may all get
	// here; an flock serialises them (apt's own lock would just fail).
	unlock, err := lockFile("/tmp/rbee-testutil-sshd-install.lock")
	if err != nil {
		installErr = err
		t.Fatalf("sshd: %v", err)
	}
	defer unlock()
	if _, err := os.Stat(SSHDPath); err == nil {
		installed = true
		return
	}

	start := time.Now()
	t.Logf("sshd: %s missing; installing openssh-server with apt-get", SSHDPath)
	out, err := aptGet("install", "-y", "--no-install-recommends", "openssh-server")
	if err != nil {
		// Usually stale or absent package lists (slim images ship none).
		t.Logf("sshd: install failed (%v), running apt-get update and retrying", err)
		if uout, uerr := aptGet("update"); uerr != nil {
			installErr = fmt.Errorf("apt-get update: %v\n%s", uerr, uout)
			t.Fatalf("sshd: %v", installErr)
		}
		out, err = aptGet("install", "-y", "--no-install-recommends", "openssh-server")
	}
	if err == nil {
		_, err = os.Stat(SSHDPath)
	}
	if err != nil {
		installErr = fmt.Errorf("install openssh-server: %v\n%s", err, out)
		t.Fatalf("sshd: %v", installErr)
	}
	t.Logf("sshd: installed openssh-server in %s", time.Since(start).Round(time.Millisecond))
	installed = true
}

func aptGet(args ...string) ([]byte, error) {
	cmd := exec.Command("apt-get", append([]string{"-q", "-o", "DPkg::Lock::Timeout=300"}, args...)...)
	// Never prompt. (Whether the package's postinst starts a system sshd is
	// up to the image: containers normally have a policy-rc.d that forbids
	// it, and without an init there is no runlevel to start it in.)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	return cmd.CombinedOutput()
}

func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open install lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}
