package keeper

import (
	"fmt"
	"os"
	"testing"

	"github.com/rbee-dev/rbee/internal/testutil/testenv"
)

// TestMain runs the package's tests in a home of their own, with none of
// the person's settings. The keeper reads its credentials and CA from
// rbee's data directory and takes its bus, credentials and namespace from
// RBEE_* variables: on a machine where rbee has run (`go tool task demo`
// writes a client credential into ~/.local/share/rbee), a test that
// dialled its own bus presented that credential and was refused.
func TestMain(m *testing.M) {
	done, err := testenv.Isolate()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	done()
	os.Exit(code)
}
