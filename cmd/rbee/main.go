// Command rbee is the keeper: the command line that runs LLMs across every
// machine you own. See `rbee --help`.
package main

import (
	"os"

	"github.com/rbee-dev/rbee/internal/threadpolicy"
	"github.com/rbee-dev/rbee/keeper"
)

func main() {
	// The keeper shows tokens as they come: on the worker's machine it
	// must not cut into the decode that makes them (internal/threadpolicy). Best
	// effort.
	_ = threadpolicy.Background()
	os.Exit(keeper.Main(os.Args))
}
