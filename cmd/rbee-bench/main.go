// Command rbee-bench measures rbee on this machine and writes
// docs/BENCHMARKS.md: orchestration overhead, the token stream, job
// throughput, failure detection, the scale of one queen and each program's
// footprint. Run it with `go tool task bench`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"github.com/rbee-dev/rbee/internal/bench"
	"github.com/rbee-dev/rbee/internal/threadpolicy"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "serve-bus" {
		// Hidden mode: a nats-server of its own, so the scale benchmark can
		// measure the server's CPU and memory apart from the queen's.
		if err := bench.ServeBus(os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "rbee-bench serve-bus:", err)
			os.Exit(1)
		}
		return
	}
	// The bench's clients run as rbee's own programs do: as batch work
	// (internal/threadpolicy), which they measure; its in-process engine's lanes
	// decode as a worker's do. The serve-bus mode above stands for an
	// upstream nats-server and keeps the ordinary policy.
	_ = threadpolicy.Background()
	out := flag.String("out", "", "write the Markdown report here (e.g. docs/BENCHMARKS.md)")
	only := flag.String("only", "", fmt.Sprintf("comma-separated benchmarks to run, 1-%d (default: all)", bench.Count))
	quick := flag.Bool("quick", false, "shrink every size for a quick run")
	flag.Parse()
	opts := bench.Options{Out: *out, Quick: *quick, Stdout: os.Stdout, Log: os.Stderr, Only: map[int]bool{}}
	for _, s := range strings.Split(*only, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > bench.Count {
			fmt.Fprintf(os.Stderr, "rbee-bench: -only takes numbers 1-%d, got %q\n", bench.Count, s)
			os.Exit(2)
		}
		opts.Only[n] = true
	}
	var err error
	if opts.Self, err = os.Executable(); err != nil {
		fmt.Fprintln(os.Stderr, "rbee-bench:", err)
		os.Exit(1)
	}
	if opts.Root, err = os.Getwd(); err != nil {
		fmt.Fprintln(os.Stderr, "rbee-bench:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	if err := bench.Run(ctx, opts); err != nil {
		fmt.Fprintln(os.Stderr, "rbee-bench:", err)
		os.Exit(1)
	}
}
