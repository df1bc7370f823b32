package sshd

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// EnvCI is the variable CI systems set (CI=true); with it, a missing sshd
// fails the tests instead of skipping them, so CI can never silently not
// run the SSH tests.
const EnvCI = "CI"

// requireInstalled skips t, saying what to install, when OpenSSH's server
// or ssh-keygen is missing, and fails it instead under CI. A test never
// installs anything itself: changing the system is for .ci/run or for the
// person running the tests, who then sees it happen.
func requireInstalled(t testing.TB) {
	t.Helper()
	switch fail, msg := missingVerdict(SSHDPath, exec.LookPath, os.Getenv(EnvCI)); {
	case msg == "":
	case fail:
		t.Fatal(msg)
	default:
		t.Skip(msg)
	}
}

// missingVerdict decides what a test needing sshd does: nothing (msg
// empty), skip with msg, or fail with msg (fail true) when ci, the value of
// $CI, says this is CI ("true", "1": any true strconv.ParseBool value).
func missingVerdict(sshdPath string, lookPath func(string) (string, error), ci string) (fail bool, msg string) {
	var missing string
	if _, err := os.Stat(sshdPath); err != nil {
		missing = sshdPath
	} else if _, err := lookPath("ssh-keygen"); err != nil {
		missing = "ssh-keygen"
	}
	if missing == "" {
		return false, ""
	}
	const install = "install OpenSSH (Debian/Ubuntu: apt-get install openssh-server openssh-client; .ci/run does this)"
	if isCI, err := strconv.ParseBool(ci); err == nil && isCI {
		return true, fmt.Sprintf("sshd: %s is missing and %s=%s, so the SSH tests must run, not skip: %s", missing, EnvCI, ci, install)
	}
	return false, fmt.Sprintf("sshd: %s is missing, so this test, which needs a real OpenSSH server, is skipped; %s to run it (with %s=true it fails instead)", missing, install, EnvCI)
}
