package sshd

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMissingVerdict checks what a test needing sshd does when OpenSSH is
// missing: skip with what to install outside CI, fail under CI=true, so CI
// can never silently skip the SSH tests.
func TestMissingVerdict(t *testing.T) {
	present := filepath.Join(t.TempDir(), "sshd")
	if err := os.WriteFile(present, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	absent := filepath.Join(t.TempDir(), "no-sshd")
	found := func(string) (string, error) { return "/usr/bin/ssh-keygen", nil }
	notFound := func(string) (string, error) { return "", errors.New("not found") }
	for _, tc := range []struct {
		name     string
		sshd     string
		lookPath func(string) (string, error)
		ci       string
		fail     bool
		contains []string // empty: the test goes ahead
	}{
		{"installed", present, found, "", false, nil},
		{"installed in CI", present, found, "true", false, nil},
		{"no sshd", absent, found, "", false, []string{absent, "is skipped", "apt-get install openssh-server", "CI=true"}},
		{"no sshd, CI=false", absent, found, "false", false, []string{"is skipped"}},
		{"no sshd, CI unparsable", absent, found, "yes please", false, []string{"is skipped"}},
		{"no sshd in CI", absent, found, "true", true, []string{absent, "must run", "CI=true", ".ci/run"}},
		{"no sshd, CI=1", absent, found, "1", true, []string{"must run"}},
		{"no ssh-keygen", present, notFound, "", false, []string{"ssh-keygen is missing", "is skipped"}},
		{"no ssh-keygen in CI", present, notFound, "true", true, []string{"ssh-keygen is missing", "must run"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fail, msg := missingVerdict(tc.sshd, tc.lookPath, tc.ci)
			if len(tc.contains) == 0 {
				if msg != "" || fail {
					t.Fatalf("got fail=%v %q, want the test to go ahead", fail, msg)
				}
				return
			}
			if fail != tc.fail {
				t.Errorf("fail = %v, want %v (%s)", fail, tc.fail, msg)
			}
			for _, s := range tc.contains {
				if !strings.Contains(msg, s) {
					t.Errorf("message %q lacks %q", msg, s)
				}
			}
		})
	}
}
