package sshd_test

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/rbee-dev/rbee/internal/testutil/sshd"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// TestStartAndLogin checks the harness end to end with the stock OpenSSH
// client, so a harness bug cannot hide behind a bug in internal/remote.
func TestStartAndLogin(t *testing.T) {
	s := sshd.Start(t)
	if s.Host != "127.0.0.1" || s.Port == 0 || s.User == "" || s.HostKey == nil {
		t.Fatalf("incomplete server: %+v", s)
	}

	kh, err := os.ReadFile(s.KnownHostsPath)
	if err != nil {
		t.Fatal(err)
	}
	wantPrefix := "[127.0.0.1]:" + strconv.Itoa(s.Port) + " ssh-ed25519 "
	if !strings.HasPrefix(string(kh), wantPrefix) {
		t.Fatalf("known_hosts = %q, want prefix %q", kh, wantPrefix)
	}

	if _, err := exec.LookPath("ssh"); err != nil {
		t.Skip("no ssh client")
	}
	cfg := s.WriteClientConfig("testbox")
	out, err := exec.Command("ssh", "-F", cfg, "-o", "BatchMode=yes", "testbox", "echo", "hello-from-sshd").CombinedOutput()
	if err != nil {
		t.Fatalf("ssh: %v\n%s\nsshd log:\n%s", err, out, s.Log())
	}
	if !bytes.Contains(out, []byte("hello-from-sshd")) {
		t.Fatalf("ssh output %q", out)
	}
}

func TestTwoServersAreIndependent(t *testing.T) {
	a, b := sshd.Start(t), sshd.Start(t)
	if a.Port == b.Port {
		t.Fatalf("same port %d", a.Port)
	}
	if bytes.Equal(a.HostKey.Marshal(), b.HostKey.Marshal()) {
		t.Fatal("servers share a host key")
	}
	// b's known_hosts must not vouch for a.
	cb, err := knownhosts.New(b.KnownHostsPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := cb(a.Addr(), &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: a.Port}, a.HostKey); err == nil {
		t.Fatal("b's known_hosts accepted a's key")
	}
}

func TestGenerateKey(t *testing.T) {
	p := t.TempDir() + "/k"
	pub := sshd.GenerateKey(t, p)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.ParsePrivateKey(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(signer.PublicKey().Marshal(), pub.Marshal()) {
		t.Fatal("public key mismatch")
	}
}
