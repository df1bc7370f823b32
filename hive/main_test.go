package hive_test

import (
	"os"
	"testing"

	"github.com/rbee-dev/rbee/internal/testutil/binaries"
)

// TestMain removes the programs the tests built (about 200 MB) when they
// end, so a test run leaves nothing in the temporary directory.
func TestMain(m *testing.M) { os.Exit(binaries.Main(m)) }
