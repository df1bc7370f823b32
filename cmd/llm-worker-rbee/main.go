// Command llm-worker-rbee serves one loaded model: it pulls inference
// requests for it from the bus while it has a free slot and streams the
// tokens back. A hive starts it; SIGTERM or a drain request stops it
// gracefully.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/threadpolicy"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/worker"
	"github.com/urfave/cli/v2"
)

// Exit codes: bad flags and an unreachable bus are told apart from a worker
// that started and failed (model load, duplicate id).
const (
	exitFailed      = 1
	exitBadFlags    = 2
	exitUnreachable = 3
)

func main() {
	// Best effort (internal/threadpolicy): where the policy cannot be set, every
	// thread stays ordinary.
	_ = threadpolicy.Background()
	app := &cli.App{
		Name:    "llm-worker-rbee",
		Usage:   "serve one model: pull inference requests from the bus and stream tokens",
		Version: version.Version,
		Flags: append(append(cliutil.BusFlags(), cliutil.LogFlags()...),
			&cli.StringFlag{Name: "id", Usage: "worker id (A-Z a-z 0-9 _ -)", Required: true},
			&cli.StringFlag{Name: "hive", Usage: "id of the hive that runs this worker", Required: true},
			&cli.StringFlag{Name: "model", Usage: "model id as in the hive's catalog", Required: true},
			&cli.StringFlag{Name: "model-path", Usage: "GGUF file of the model", Required: true},
			&cli.StringFlag{Name: "device", Usage: `"cpu" or "cuda:N"`, Value: worker.DefaultDevice},
			&cli.IntFlag{Name: "slots", Usage: fmt.Sprintf("requests generated concurrently, batched (default: what fits in free memory, at most %d)", worker.DefaultMaxSlots)},
			&cli.IntFlag{Name: "ctx", Usage: "context size per slot, in tokens", Value: worker.DefaultContextSize},
			&cli.IntFlag{Name: "lanes", Usage: "llama contexts sharing the slots (default: 1 on a GPU or for a big model, one per core for a small one on a CPU)"},
			&cli.IntFlag{Name: "threads", Usage: "CPU threads per lane (default: the cores shared among the lanes)"},
			&cli.StringFlag{Name: "llama-lib", Usage: "directory of the llama.cpp libraries (default: $RBEE_LLAMA_LIB, then the usual places)"},
			&cli.DurationFlag{Name: "heartbeat", Usage: "registry heartbeat interval", Value: bus.DefaultHeartbeatInterval},
			&cli.DurationFlag{Name: "drain-grace", Usage: "how long a shutdown waits for in-flight jobs before cancelling them", Value: worker.DefaultDrainGrace},
		),
		Action: run,
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "llm-worker-rbee:", err)
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			os.Exit(ec.ExitCode())
		}
		os.Exit(exitFailed)
	}
}

func run(c *cli.Context) error {
	if c.NArg() > 0 {
		return cli.Exit(fmt.Sprintf("unexpected arguments: %v", c.Args().Slice()), exitBadFlags)
	}
	log, closeLog, err := logging.New(c.String(cliutil.FlagLogLevel), c.String(cliutil.FlagLogFile), "worker")
	if err != nil {
		return err
	}
	defer closeLog()
	cfg := worker.Config{
		ID: c.String("id"), Hive: c.String("hive"), Model: c.String("model"), ModelPath: c.String("model-path"),
		Device: c.String("device"), Slots: c.Int("slots"), ContextSize: c.Int("ctx"), Lanes: c.Int("lanes"), Threads: c.Int("threads"),
		LlamaLib: c.String("llama-lib"), Heartbeat: c.Duration("heartbeat"), DrainGrace: c.Duration("drain-grace"),
		NATSURL: c.String(cliutil.FlagNATS), Credentials: cliutil.Credentials(c), Namespace: c.String(cliutil.FlagNamespace),
		Log: log,
	}
	if err := cfg.Check(); err != nil {
		return cli.Exit(err.Error(), exitBadFlags)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := worker.Run(ctx, cfg); err != nil {
		log.Error().Err(err).Msg("worker stopped")
		if errors.Is(err, bus.ErrUnreachable) || errors.Is(err, bus.ErrRefused) {
			return cli.Exit(err.Error(), exitUnreachable)
		}
		return cli.Exit(err.Error(), exitFailed)
	}
	return nil
}
