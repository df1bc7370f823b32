package keeper

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// TestMain runs the package's tests in a home of their own, with none of
// the person's settings. The keeper reads its credentials and CA from
// rbee's data directory and takes its bus, credentials and namespace from
// RBEE_* variables: on a machine where rbee has run (`go tool task demo`
// writes a client credential into ~/.local/share/rbee), a test that
// dialled its own bus presented that credential and was refused.
func TestMain(m *testing.M) {
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "RBEE_") || name == "XDG_DATA_HOME" {
			_ = os.Unsetenv(name)
		}
	}
	home, err := os.MkdirTemp("", "rbee-keeper-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_ = os.Setenv("RBEE_HOME", home)
	code := m.Run()
	_ = os.RemoveAll(home)
	os.Exit(code)
}
