// Package binaries builds the rbee programs once per test process, so tests
// that cross process boundaries run the real binaries.
//
// The programs (about 200 MB) go into a temporary directory of this test
// process alone, so test binaries of several packages running at once never
// share or remove each other's programs. Main removes the directory when the
// tests end; every package that calls Path or Dir must run its tests through
// it:
//
//	func TestMain(m *testing.M) { os.Exit(binaries.Main(m)) }
//
// A test process that dies before Main returns (a -timeout panic, a kill)
// leaves its directory behind; the next test process that builds removes it
// (see sweep).
package binaries

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	"github.com/rbee-dev/rbee/internal/testutil/testenv"
)

// Names of the programs under cmd/.
var Names = []string{"rbee", "queen-rbee", "rbee-hive", "llm-worker-rbee"}

// NATSServer is upstream nats-server, built from the module at the version
// go.mod pins (the one rbee embeds), for tests of a real cluster.
const NATSServer = "nats-server"

// packages maps a program that is not under cmd/ to its package.
var packages = map[string]string{NATSServer: "github.com/nats-io/nats-server/v2"}

// dirPattern names the temporary directories, for os.MkdirTemp and sweep.
const dirPattern = "rbee-bin-"

var (
	mu      sync.Mutex
	managed bool // Main is running the tests
	dir     string
	release func() // unlocks and closes dir's owner lock
	built   = map[string]error{}
	dirErr  error
)

// Main runs m's tests and then removes the programs they built, returning
// m.Run's exit code for os.Exit. Call it from TestMain. The tests, and the
// programs they start, run without the rbee settings of the person running
// them and in a home of their own (see testenv).
func Main(m *testing.M) int {
	done, err := testenv.Isolate()
	if err != nil {
		fmt.Fprintln(os.Stderr, "binaries:", err)
		return 1
	}
	defer done()
	mu.Lock()
	managed = true
	mu.Unlock()
	defer Cleanup()
	return m.Run()
}

// Cleanup removes the programs built so far and their directory; a later
// Path builds again. Main calls it; a TestMain that cannot use Main calls it
// after m.Run.
func Cleanup() {
	mu.Lock()
	defer mu.Unlock()
	if dir != "" {
		_ = os.RemoveAll(dir)
		release()
	}
	dir, release, dirErr = "", nil, nil
	built = map[string]error{}
}

// Dir builds every program into one directory and returns it. Programs are
// built once per test binary, with -race when the test runs with it and
// RBEE_RACE_BINARIES is set (race-built daemons are several times slower to
// build and run).
func Dir(t testing.TB) string {
	t.Helper()
	var d string
	for _, n := range Names {
		d = filepath.Dir(Path(t, n))
	}
	return d
}

// Path builds one program (once) and returns its path.
func Path(t testing.TB, name string) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if !managed {
		t.Fatalf("binaries: this package's tests must run through binaries.Main, which removes the built programs when they end; add\n\tfunc TestMain(m *testing.M) { os.Exit(binaries.Main(m)) }")
	}
	if dir == "" && dirErr == nil {
		sweep(os.TempDir())
		dir, release, dirErr = makeOwnedDir(os.TempDir())
	}
	if dirErr != nil {
		t.Fatalf("binaries: %v", dirErr)
	}
	err, done := built[name]
	if !done {
		err = build(name)
		built[name] = err
	}
	if err != nil {
		t.Fatalf("building %s: %v", name, err)
	}
	return filepath.Join(dir, name)
}

func build(name string) error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	args := []string{"build", "-o", filepath.Join(dir, name)}
	pkg, upstream := packages[name]
	if !upstream {
		pkg = "./cmd/" + name
	}
	// Upstream's server is not what the race detector is run for here.
	if raceEnabled && os.Getenv("RBEE_RACE_BINARIES") != "" && !upstream {
		args = append(args, "-race")
	}
	args = append(args, pkg)
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	return nil
}

// Root is the module's root directory.
func Root(t testing.TB) string {
	t.Helper()
	r, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func moduleRoot() (string, error) {
	_, file, _, _ := runtime.Caller(0)
	d := filepath.Dir(file)
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("go.mod not found above %s", file)
		}
		d = parent
	}
}
