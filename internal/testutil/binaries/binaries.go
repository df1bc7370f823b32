// Package binaries builds the rbee programs once per test process, so tests
// that cross process boundaries run the real binaries.
package binaries

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

// Names of the programs under cmd/.
var Names = []string{"rbee", "queen-rbee", "rbee-hive", "llm-worker-rbee"}

var (
	mu     sync.Mutex
	dir    string
	built  = map[string]error{}
	dirErr error
)

// Dir builds every program into one directory and returns it. Programs are
// built once per test binary, with -race when the test runs with it and
// RBEE_RACE_BINARIES is set (race-built daemons are several times slower to
// build and run).
func Dir(t testing.TB) string {
	t.Helper()
	for _, n := range Names {
		Path(t, n)
	}
	return dir
}

// Path builds one program (once) and returns its path.
func Path(t testing.TB, name string) string {
	t.Helper()
	mu.Lock()
	defer mu.Unlock()
	if dir == "" && dirErr == nil {
		dir, dirErr = os.MkdirTemp("", "rbee-bin-")
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
	if raceEnabled && os.Getenv("RBEE_RACE_BINARIES") != "" {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/"+name)
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
