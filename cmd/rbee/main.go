// Command rbee is the keeper: the command line that runs LLMs across every
// machine you own. See `rbee --help`.
package main

import (
	"os"

	"github.com/rbee-dev/rbee/keeper"
)

func main() { os.Exit(keeper.Main(os.Args)) }
