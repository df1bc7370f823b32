package binaries

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// envChild makes this test binary, re-run by TestMainRemovesBuiltPrograms,
// build one program and write its directory to the file the variable names.
// (Not an RBEE_* name: Main removes those it does not know.)
const envChild = "BINARIES_TEST_CHILD"

// TestMainRemovesBuiltPrograms runs a test process that builds a program
// and checks that nothing of it is left once that process has exited.
func TestMainRemovesBuiltPrograms(t *testing.T) {
	d := runChild(t, "TestChildBuildsOneProgram", envChild)
	if filepath.Base(d) == "." || d == "" {
		t.Fatalf("the child reported %q", d)
	}
	if _, err := os.Stat(d); !os.IsNotExist(err) {
		t.Fatalf("%s is still there after the tests ended (stat: %v); each test run would leave ~200 MB behind", d, err)
	}
}

// runChild runs this test binary's test name in a child process, with env
// added to the environment and reportVar naming a file for the child to
// write, and returns what the child wrote there.
func runChild(t *testing.T, name, reportVar string, env ...string) string {
	t.Helper()
	report := filepath.Join(t.TempDir(), "report")
	cmd := exec.Command(os.Args[0], "-test.run=^"+name+"$", "-test.count=1")
	cmd.Env = append(append(os.Environ(), reportVar+"="+report), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child test process %s: %v\n%s", name, err, out)
	}
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("the child %s did not report: %v", name, err)
	}
	return string(b)
}

// TestChildBuildsOneProgram is the child of TestMainRemovesBuiltPrograms.
func TestChildBuildsOneProgram(t *testing.T) {
	report := os.Getenv(envChild)
	if report == "" {
		t.Skip("only run as TestMainRemovesBuiltPrograms's child")
	}
	p := Path(t, "rbee")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("built program missing: %v", err)
	}
	if err := os.WriteFile(report, []byte(filepath.Dir(p)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// envSettingsChild makes this test binary, re-run by
// TestMainRunsWithoutThePersonsSettings, write what it sees of rbee's
// settings to the file the variable names.
const envSettingsChild = "BINARIES_TEST_SETTINGS_CHILD"

// TestMainRunsWithoutThePersonsSettings runs a test process with a
// person's rbee settings in its environment (a credential, an API key, a
// home) and checks that its tests, and so the
// programs they start, see none of them, while the settings that choose
// what is tested pass.
func TestMainRunsWithoutThePersonsSettings(t *testing.T) {
	personHome := filepath.Join(t.TempDir(), "person")
	reported := runChild(t, "TestChildReportsSettings", envSettingsChild,
		"RBEE_CREDS=/person/client.creds", "RBEE_API_KEY=person-key", "RBEE_HOME="+personHome,
		"RBEE_CHAOS_SEED=7", "RBEE_LLAMA_LIB=/opt/llama-cuda")
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(reported), "\n") {
		k, v, _ := strings.Cut(line, "=")
		got[k] = v
	}
	for k, want := range map[string]string{"RBEE_CREDS": "", "RBEE_API_KEY": "", "RBEE_CHAOS_SEED": "7", "RBEE_LLAMA_LIB": "/opt/llama-cuda"} {
		if got[k] != want {
			t.Errorf("the child's tests saw %s=%q, want %q", k, got[k], want)
		}
	}
	home := got["RBEE_HOME"]
	if home == "" || home == personHome || !strings.HasPrefix(home, os.TempDir()) {
		t.Errorf("the child's tests ran with RBEE_HOME=%q, want a temporary home of their own (the person's: %s)", home, personHome)
	}
	if _, err := os.Stat(home); !os.IsNotExist(err) {
		t.Errorf("the child's home %s is still there after its tests ended (stat: %v)", home, err)
	}
}

// TestChildReportsSettings is the child of
// TestMainRunsWithoutThePersonsSettings.
func TestChildReportsSettings(t *testing.T) {
	report := os.Getenv(envSettingsChild)
	if report == "" {
		t.Skip("only run as TestMainRunsWithoutThePersonsSettings's child")
	}
	var b strings.Builder
	for _, k := range []string{"RBEE_CREDS", "RBEE_API_KEY", "RBEE_HOME", "RBEE_CHAOS_SEED", "RBEE_LLAMA_LIB"} {
		fmt.Fprintf(&b, "%s=%s\n", k, os.Getenv(k))
	}
	if err := os.WriteFile(report, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestSweep checks that a directory whose owner died is removed, and that
// one whose owner lives, or one too young to judge, is kept.
func TestSweep(t *testing.T) {
	root := t.TempDir()

	live, releaseLive, err := makeOwnedDir(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(releaseLive)

	dead, releaseDead, err := makeOwnedDir(root)
	if err != nil {
		t.Fatal(err)
	}
	releaseDead() // what the kernel does when a test process dies

	youngUnlocked := filepath.Join(root, dirPattern+"young")
	oldUnlocked := filepath.Join(root, dirPattern+"old")
	other := filepath.Join(root, "not-ours")
	for _, d := range []string{youngUnlocked, oldUnlocked, other} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-staleAfter - time.Minute)
	for _, d := range []string{oldUnlocked, other} {
		if err := os.Chtimes(d, old, old); err != nil {
			t.Fatal(err)
		}
	}

	sweep(root)

	for d, want := range map[string]bool{live: true, dead: false, youngUnlocked: true, oldUnlocked: false, other: true} {
		_, err := os.Stat(d)
		if got := err == nil; got != want {
			t.Errorf("%s: exists=%v, want %v (stat: %v)", filepath.Base(d), got, want, err)
		}
	}
	// The live owner still holds its lock: sweeping did not take it.
	f, err := os.Open(filepath.Join(live, ownerLock))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
		t.Fatal("the live directory's lock was free after the sweep")
	}
}
