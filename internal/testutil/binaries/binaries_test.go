package binaries

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// envChild makes this test binary, re-run by TestMainRemovesBuiltPrograms,
// build one program and write its directory to the file the variable names.
const envChild = "RBEE_BINARIES_TEST_CHILD"

// TestMainRemovesBuiltPrograms runs a test process that builds a program
// and checks that nothing of it is left once that process has exited.
func TestMainRemovesBuiltPrograms(t *testing.T) {
	report := filepath.Join(t.TempDir(), "dir")
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildBuildsOneProgram$", "-test.count=1")
	cmd.Env = append(os.Environ(), envChild+"="+report)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child test process: %v\n%s", err, out)
	}
	b, err := os.ReadFile(report)
	if err != nil {
		t.Fatalf("the child did not report its directory: %v", err)
	}
	d := string(b)
	if filepath.Base(d) == "." || d == "" {
		t.Fatalf("the child reported %q", d)
	}
	if _, err := os.Stat(d); !os.IsNotExist(err) {
		t.Fatalf("%s is still there after the tests ended (stat: %v); each test run would leave ~200 MB behind", d, err)
	}
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
