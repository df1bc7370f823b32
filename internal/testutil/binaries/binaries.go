// Package binaries builds the four rbee programs once per test process, so
// tests that cross process boundaries run the real binaries.
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

var (
	once sync.Once
	dir  string
	err  error
)

// Names of the programs under cmd/.
var Names = []string{"rbee", "queen-rbee", "rbee-hive", "llm-worker-rbee"}

// Dir builds every program (with -race when the test runs with it and
// RBEE_RACE_BINARIES is set) into one
// directory and returns it. The build happens once per test binary.
func Dir(t testing.TB) string {
	t.Helper()
	once.Do(func() {
		root, e := moduleRoot()
		if e != nil {
			err = e
			return
		}
		dir, err = os.MkdirTemp("", "rbee-bin-")
		if err != nil {
			return
		}
		args := []string{"build", "-o", dir + string(os.PathSeparator)}
		// Race-built daemons are several times slower to build and run;
		// the suite builds them so when RBEE_RACE_BINARIES is set.
		if raceEnabled && os.Getenv("RBEE_RACE_BINARIES") != "" {
			args = append(args, "-race")
		}
		for _, n := range Names {
			args = append(args, "./cmd/"+n)
		}
		cmd := exec.Command("go", args...)
		cmd.Dir = root
		if out, e := cmd.CombinedOutput(); e != nil {
			err = fmt.Errorf("go build: %v\n%s", e, out)
		}
	})
	if err != nil {
		t.Fatalf("building rbee binaries: %v", err)
	}
	return dir
}

// Path is the path of one built program.
func Path(t testing.TB, name string) string { return filepath.Join(Dir(t), name) }

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
