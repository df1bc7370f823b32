// Package llamalib finds the directory holding the llama.cpp shared libraries
// (libllama.so, libggml.so, ...) that the inference engine loads at run time.
package llamalib

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// EnvVar names the environment variable that points at the library directory.
const EnvVar = "RBEE_LLAMA_LIB"

// LibName is the file a directory must contain to count as a library directory.
const LibName = "libllama.so"

// ErrNotFound is returned (wrapped) by Find when no directory qualifies.
var ErrNotFound = errors.New("llama.cpp libraries not found")

// Hint says what to do when the libraries are missing.
const Hint = "run `go tool task deps` or scripts/llama-libs.sh, or set " + EnvVar +
	" to a directory holding libllama.so and libggml.so (your own llama.cpp build or the CUDA package)"

// lookup hooks, replaced by tests.
var (
	executable = os.Executable
	getwd      = os.Getwd
	getenv     = os.Getenv
	homeDir    = os.UserHomeDir
)

// Find returns the directory holding libllama.so. It tries, in order:
//
//  1. explicit (for example the --llama-lib flag), when not empty;
//  2. the directory in $RBEE_LLAMA_LIB, when set;
//  3. <directory of the running executable>/../.deps/llama;
//  4. .deps/llama in the enclosing Go module, found by walking up from the
//     working directory to the directory holding go.mod;
//  5. $XDG_DATA_HOME/rbee/llama (default ~/.local/share/rbee/llama).
//
// An explicit directory or $RBEE_LLAMA_LIB that lacks libllama.so is an error
// rather than a reason to look elsewhere: the user asked for that directory.
// The returned path is absolute. When nothing is found the error wraps
// ErrNotFound, lists the places tried and says what to do.
func Find(explicit string) (string, error) {
	if explicit != "" {
		return check(explicit, "--llama-lib")
	}
	if env := getenv(EnvVar); env != "" {
		return check(env, "$"+EnvVar)
	}
	var tried []string
	for _, c := range candidates() {
		if c == "" {
			continue
		}
		if ok(c) {
			return filepath.Abs(c)
		}
		tried = append(tried, c)
	}
	return "", fmt.Errorf("%w (looked in %s): %s", ErrNotFound, strings.Join(tried, ", "), Hint)
}

func check(dir, source string) (string, error) {
	if ok(dir) {
		return filepath.Abs(dir)
	}
	return "", fmt.Errorf("%w: %s=%s has no %s: %s", ErrNotFound, source, dir, LibName, Hint)
}

func ok(dir string) bool {
	st, err := os.Stat(filepath.Join(dir, LibName))
	return err == nil && !st.IsDir()
}

func candidates() []string {
	var out []string
	if exe, err := executable(); err == nil {
		if real, err := filepath.EvalSymlinks(exe); err == nil {
			exe = real
		}
		out = append(out, filepath.Join(filepath.Dir(exe), "..", ".deps", "llama"))
	}
	if wd, err := getwd(); err == nil {
		if root := moduleRoot(wd); root != "" {
			out = append(out, filepath.Join(root, ".deps", "llama"))
		}
	}
	out = append(out, DataDir())
	return out
}

// moduleRoot walks up from dir to the first directory holding go.mod.
func moduleRoot(dir string) string {
	for {
		if st, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil && !st.IsDir() {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

// DataDir is the per-user install location, $XDG_DATA_HOME/rbee/llama or
// ~/.local/share/rbee/llama. It returns "" when neither can be determined.
func DataDir() string {
	if x := getenv("XDG_DATA_HOME"); x != "" && filepath.IsAbs(x) {
		return filepath.Join(x, "rbee", "llama")
	}
	home, err := homeDir()
	if err != nil || home == "" {
		return ""
	}
	return filepath.Join(home, ".local", "share", "rbee", "llama")
}
