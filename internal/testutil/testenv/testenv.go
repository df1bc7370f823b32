// Package testenv gives a test process a home of its own and none of the
// rbee settings of the person running the tests.
//
// rbee's programs take their bus, credentials, keys, limits and data
// directory from RBEE_* variables and read credentials from their home. A
// test process inherits the environment of whoever runs it, so on a
// machine where rbee has been used (`go tool task demo` writes a client
// credential into ~/.local/share/rbee; a person may export RBEE_CREDS or
// RBEE_API_KEY) the programs a test starts would present that person's
// credential to the test's own bus, or run with their limits. Isolate,
// called from a TestMain before the tests run, removes them.
package testenv

import (
	"os"
	"strings"
)

// kept are the RBEE_* variables that choose what is tested rather than how
// rbee behaves: the llama.cpp build under test (a CUDA one, say), whether the
// daemons are built with the race detector, and the chaos test's knobs. A
// test knob added later must be listed here, or it is removed before the
// test can read it: a missing entry shows at once, a leaking setting would
// not.
var kept = map[string]bool{
	"RBEE_LLAMA_LIB":      true,
	"RBEE_RACE_BINARIES":  true,
	"RBEE_CHAOS_DURATION": true,
	"RBEE_CHAOS_SEED":     true,
}

// Personal reports whether the variable name is one of the person's rbee
// settings, which Isolate removes.
func Personal(name string) bool {
	return strings.HasPrefix(name, "RBEE_") && !kept[name]
}

// Isolate removes every personal setting from the process's environment and
// points RBEE_HOME at a new temporary directory, so every program the tests
// start without a home of their own gets this one, never the person's. The
// returned function removes that directory; call it when the tests end.
func Isolate() (cleanup func(), err error) {
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); Personal(name) {
			if err := os.Unsetenv(name); err != nil {
				return nil, err
			}
		}
	}
	home, err := os.MkdirTemp("", "rbee-test-home-")
	if err != nil {
		return nil, err
	}
	if err := os.Setenv("RBEE_HOME", home); err != nil {
		_ = os.RemoveAll(home)
		return nil, err
	}
	return func() { _ = os.RemoveAll(home) }, nil
}
