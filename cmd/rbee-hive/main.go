// Command rbee-hive runs one machine for rbee: it reports the machine's
// capabilities in a heartbeat, keeps its model catalog and starts, watches
// and stops its workers on the queen's request. SIGTERM, SIGINT or the
// shutdown endpoint stop it gracefully: workers first, then its registry
// entry, exit 0.
//
// With --leaf it joins the bus through one outbound leaf-node connection to
// a hub (a machine behind NAT opens no port): it runs a bus of its own on
// loopback that its workers use (see hive/leaf.go).
//
// Test hooks, not for production use:
//
//	--ignore-shutdown      ignore the shutdown endpoint and SIGTERM, so the
//	                       queen's SIGKILL fallback can be tested
//	RBEE_FAKE_RAM_FREE=N   report and check at most N bytes of free RAM
//	                       (suffixes K, M, G, Ki, Mi, Gi allowed), so a test
//	                       can refuse a model for memory on any machine
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/threadpolicy"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/urfave/cli/v2"
)

// Exit codes: bad flags and an unreachable bus are told apart from a hive
// that started and failed (a live namesake, an unusable data directory).
const (
	exitFailed      = 1
	exitBadFlags    = 2
	exitUnreachable = 3
)

// EnvFakeRAMFree names the test hook that caps the free RAM the hive reports.
const EnvFakeRAMFree = "RBEE_FAKE_RAM_FREE"

func main() {
	// Best effort (internal/threadpolicy): where the policy cannot be set, every
	// thread stays ordinary.
	_ = threadpolicy.Background()
	app := &cli.App{
		Name:    "rbee-hive",
		Usage:   "run this machine for rbee: capabilities, model catalog and workers",
		Version: version.Version,
		Flags: append(append(cliutil.BusFlags(), cliutil.LogFlags()...),
			&cli.StringFlag{Name: "id", Usage: "hive id (A-Z a-z 0-9 _ -); required"},
			&cli.StringFlag{Name: "leaf", Usage: "join the bus through one outbound leaf-node connection to the hub's leaf listener at `URL` (nats-leaf://HOST:7422, or tls://HOST:7422 with --nats-ca; comma-separated for several), for a machine behind NAT that accepts no inbound connection: the hive runs a bus of its own on loopback for its workers, and --creds authenticates the link as this hive. Excludes --nats", EnvVars: []string{"RBEE_LEAF_URL"}},
			&cli.StringFlag{Name: "data", Usage: "data directory: catalog, worker logs (default $RBEE_HOME/hives/<id>, else ~/.local/share/rbee/hives/<id>)"},
			&cli.DurationFlag{Name: "heartbeat", Usage: "registry heartbeat interval (also given to workers)", Value: bus.DefaultHeartbeatInterval},
			&cli.StringFlag{Name: "worker-bin", Usage: "llm-worker-rbee executable (default: next to rbee-hive)"},
			&cli.StringFlag{Name: "llama-lib", Usage: "directory of the llama.cpp libraries, passed to workers (default: each worker finds them)"},
			&cli.StringFlag{Name: "hub-base", Usage: "base URL hf: model sources resolve against (a mirror, or a test server)"},
			&cli.StringFlag{Name: "nvidia-smi", Usage: "nvidia-smi executable (default: looked up on PATH)"},
			&cli.BoolFlag{Name: "ignore-shutdown", Usage: "TEST HOOK: ignore the shutdown endpoint and SIGTERM (to test the queen's SIGKILL fallback)"},
		),
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return cli.Exit(err.Error(), exitBadFlags)
		},
		Action: run,
	}
	if err := app.Run(os.Args); err != nil {
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			if msg := err.Error(); msg != "" {
				fmt.Fprintln(os.Stderr, "rbee-hive:", msg)
			}
			os.Exit(ec.ExitCode())
		}
		fmt.Fprintln(os.Stderr, "rbee-hive:", err)
		os.Exit(exitFailed)
	}
}

func run(c *cli.Context) error {
	if c.NArg() > 0 {
		return cli.Exit(fmt.Sprintf("unexpected arguments: %v", c.Args().Slice()), exitBadFlags)
	}
	id := c.String("id")
	if err := subjects.ValidateID(subjects.KindHive, id); err != nil {
		return cli.Exit(fmt.Sprintf("--id: %v", err), exitBadFlags)
	}
	if c.String("leaf") != "" && c.String(cliutil.FlagNATS) != "" {
		return cli.Exit("--leaf and --nats are exclusive: a hive joins the hub through a leaf connection, or connects to the bus", exitBadFlags)
	}
	if c.Duration("heartbeat") <= 0 {
		return cli.Exit(fmt.Sprintf("--heartbeat must be positive, got %s", c.Duration("heartbeat")), exitBadFlags)
	}
	ramCap, err := parseBytes(os.Getenv(EnvFakeRAMFree))
	if err != nil {
		return cli.Exit(fmt.Sprintf("%s: %v", EnvFakeRAMFree, err), exitBadFlags)
	}
	log, closeLog, err := logging.New(c.String(cliutil.FlagLogLevel), c.String(cliutil.FlagLogFile), "hive")
	if err != nil {
		return cli.Exit(err.Error(), exitBadFlags)
	}
	defer closeLog()
	data := c.String("data")
	if data == "" {
		data = filepath.Join(cliutil.Home(), "hives", id)
	}
	logPath := c.String(cliutil.FlagLogFile)
	if logPath != "" {
		if abs, err := filepath.Abs(logPath); err == nil {
			logPath = abs
		}
	}
	cfg := hive.Config{
		ID: id, DataDir: data,
		NATSURL: c.String(cliutil.FlagNATS), Leaf: leafURLs(c.String("leaf")), Credentials: cliutil.Credentials(c), Namespace: c.String(cliutil.FlagNamespace),
		Heartbeat: c.Duration("heartbeat"), WorkerBin: c.String("worker-bin"), LlamaLib: c.String("llama-lib"),
		HubBase: c.String("hub-base"), NvidiaSMI: c.String("nvidia-smi"),
		IgnoreShutdown: c.Bool("ignore-shutdown"), RAMFreeCap: ramCap,
		LogPath: logPath, Log: log,
	}
	if ramCap > 0 {
		log.Warn().Uint64("bytes", ramCap).Msg(EnvFakeRAMFree + " is set: free RAM is capped (a test hook)")
	}

	sigs := []os.Signal{os.Interrupt, syscall.SIGTERM}
	if cfg.IgnoreShutdown {
		// The test hook: SIGTERM is caught and dropped (rather than set to
		// SIG_IGN, which workers would inherit), so only SIGKILL (or
		// SIGINT, for a person at a terminal) ends this hive.
		sigs = []os.Signal{os.Interrupt}
		term := make(chan os.Signal, 1)
		signal.Notify(term, syscall.SIGTERM)
		defer signal.Stop(term)
		go func() {
			for range term {
				log.Warn().Msg("ignoring SIGTERM (--ignore-shutdown, a test hook)")
			}
		}()
	}
	ctx, stop := signal.NotifyContext(context.Background(), sigs...)
	defer stop()
	if err := hive.Run(ctx, cfg); err != nil {
		log.Error().Err(err).Msg("hive stopped")
		if errors.Is(err, bus.ErrRefused) {
			return cli.Exit(fmt.Sprintf("%v. `rbee hive start %s` on the queen's machine issues this hive's key and copies it here; by hand: `rbee creds issue hive %s --out FILE` there, then --creds FILE", err, cfg.ID, cfg.ID), exitUnreachable)
		}
		if errors.Is(err, bus.ErrUnreachable) {
			return cli.Exit(err.Error(), exitUnreachable)
		}
		return cli.Exit(err.Error(), exitFailed)
	}
	return nil
}

// leafURLs splits a comma-separated --leaf.
func leafURLs(s string) []string {
	var out []string
	for _, u := range strings.Split(s, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

// parseBytes reads "1048576", "512M", "2Gi" and the like; "" is 0.
func parseBytes(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, nil
	}
	mult := uint64(1)
	units := []struct {
		suffix string
		mult   uint64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"B", 1}}
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a byte count (e.g. 1048576, 512Mi, 2G)", s)
	}
	return n * mult, nil
}
