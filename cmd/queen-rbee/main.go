// Command queen-rbee is rbee's control plane: jobs, scheduling, hive
// lifecycle and the OpenAI-compatible gateway, on an embedded NATS server
// unless told to use an external one.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/threadpolicy"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/queen"
	"github.com/urfave/cli/v2"
)

func main() {
	// Best effort (internal/threadpolicy): where the policy cannot be set, every
	// thread stays ordinary.
	_ = threadpolicy.Background()
	app := &cli.App{
		Name:    "queen-rbee",
		Usage:   "rbee's control plane: jobs, scheduling, hives and the OpenAI-compatible gateway",
		Version: version.Version,
		Flags: append(append(cliutil.BusFlags(), cliutil.LogFlags()...),
			&cli.StringFlag{Name: "data", Usage: "data directory (JetStream files, hive logs)", EnvVars: []string{"RBEE_HOME"}},
			&cli.StringFlag{Name: "listen", Usage: "address of the embedded NATS server; beyond loopback it speaks TLS only", Value: "127.0.0.1:" + strconv.Itoa(bus.DefaultPort)},
			&cli.BoolFlag{Name: "tls", Usage: "require TLS on the embedded bus on loopback too (beyond loopback it always does); the CA and certificate are made in <data>/tls", EnvVars: []string{"RBEE_TLS"}},
			&cli.StringFlag{Name: "tls-cert", Usage: "your own certificate for the embedded bus (with --tls-key and --tls-ca)"},
			&cli.StringFlag{Name: "tls-key", Usage: "the key of --tls-cert"},
			&cli.StringFlag{Name: "tls-ca", Usage: "the CA that signed --tls-cert, handed to hives"},
			&cli.BoolFlag{Name: "open-bus", Usage: "no credentials or permissions on the embedded bus (loopback only: any local process may do anything); for measuring their cost"},
			&cli.StringFlag{Name: "advertise", Usage: "bus URL given to hives on other machines (default: the listen address)"},
			&cli.StringFlag{Name: "gateway", Usage: "OpenAI-compatible HTTP address; \"off\" disables it", Value: "127.0.0.1:7833", EnvVars: []string{"RBEE_GATEWAY"}},
			&cli.StringFlag{Name: "api-key", Usage: "require this bearer key on the HTTP gateway", EnvVars: []string{"RBEE_API_KEY"}},
			&cli.DurationFlag{Name: "job-timeout", EnvVars: []string{"RBEE_JOB_TIMEOUT"}, Usage: "fail jobs not finished within this time", Value: queen.DefaultJobTimeout},
			&cli.DurationFlag{Name: "hive-start-timeout", EnvVars: []string{"RBEE_HIVE_START_TIMEOUT"}, Usage: "how long a started hive has to register", Value: queen.DefaultHiveStartTimeout},
			&cli.DurationFlag{Name: "hive-stop-grace", EnvVars: []string{"RBEE_HIVE_STOP_GRACE"}, Usage: "how long a stopping hive gets before SIGTERM, and again before SIGKILL", Value: queen.DefaultHiveStopGrace},
			&cli.DurationFlag{Name: "worker-start-timeout", EnvVars: []string{"RBEE_WORKER_START_TIMEOUT"}, Usage: "how long spawning a worker and loading its model may take", Value: queen.DefaultWorkerStartTimeout},
			&cli.DurationFlag{Name: "first-token-timeout", EnvVars: []string{"RBEE_FIRST_TOKEN_TIMEOUT"}, Usage: "fail an inference whose worker sends no first token in time", Value: queen.DefaultFirstTokenTimeout},
			&cli.IntFlag{Name: "max-queue", EnvVars: []string{"RBEE_MAX_QUEUE"}, Usage: "inference requests allowed to wait per model", Value: queen.DefaultMaxQueue},
			&cli.IntFlag{Name: "worker-slots", EnvVars: []string{"RBEE_WORKER_SLOTS"}, Usage: "slots of the workers the queen starts for inference requests (default: each worker fits them to its machine's free memory)"},
			&cli.DurationFlag{Name: "retention", EnvVars: []string{"RBEE_RETENTION"}, Usage: "how long finished jobs and their events are kept", Value: bus.DefaultRetention().JobEvents},
			&cli.IntFlag{Name: "replicas", EnvVars: []string{"RBEE_REPLICAS"}, Usage: "copies of every stream and bucket a NATS cluster keeps (default: 3 on a cluster that can place them, else 1; a chosen count never shrinks existing streams)"},
			&cli.StringFlag{Name: "bin-dir", EnvVars: []string{"RBEE_BIN_DIR"}, Usage: "directory holding rbee-hive and llm-worker-rbee (default: next to queen-rbee)"},
			&cli.StringSliceFlag{Name: "hive-arg", EnvVars: []string{"RBEE_HIVE_ARGS"}, Usage: "extra argument for locally started hives (repeatable; comma-separated in RBEE_HIVE_ARGS)"},
			&cli.StringFlag{Name: "ssh-config", Usage: "ssh config file for remote hives", Value: "", EnvVars: []string{"RBEE_SSH_CONFIG"}},
			&cli.StringFlag{Name: "queen-id", EnvVars: []string{"RBEE_QUEEN_ID"}, Usage: "this queen's name among several on one bus (default: one made on first start and kept in <data>/queen-id)"},
			&cli.DurationFlag{Name: "lease-ttl", EnvVars: []string{"RBEE_LEASE_TTL"}, Usage: "how long the scheduler lease outlives its holder's last renewal: the longest a standby queen waits to take over from a dead leader (the lease bucket keeps the first queen's)", Value: queen.DefaultLeaseTTL},
			&cli.StringFlag{Name: "ssh-known-hosts", Usage: "known_hosts file for remote hives", EnvVars: []string{"RBEE_SSH_KNOWN_HOSTS"}},
		),
		Action: run,
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, "queen-rbee:", err)
		var ec cli.ExitCoder
		if errors.As(err, &ec) {
			os.Exit(ec.ExitCode())
		}
		os.Exit(1)
	}
}

func run(c *cli.Context) error {
	if d := c.Duration("lease-ttl"); d < time.Second {
		return cli.Exit(fmt.Sprintf("--lease-ttl: must be at least 1s (the bus expires keys about once a second), got %s", d), 2)
	}
	if n := c.Int("worker-slots"); n < 0 || n > 256 {
		return cli.Exit(fmt.Sprintf("--worker-slots: must be between 1 and 256 (0: each worker chooses), got %d", n), 2)
	}
	log, closeLog, err := logging.New(c.String(cliutil.FlagLogLevel), c.String(cliutil.FlagLogFile), "queen")
	if err != nil {
		return err
	}
	defer closeLog()
	data := c.String("data")
	if data == "" {
		data = cliutil.Home()
	}
	if err := os.MkdirAll(data, 0o700); err != nil {
		return err
	}
	gateway := c.String("gateway")
	if gateway == "off" {
		gateway = ""
	}
	retention := bus.DefaultRetention()
	retention.JobEvents = c.Duration("retention")
	if retention.Replicas = c.Int("replicas"); retention.Replicas < 0 || retention.Replicas > 5 {
		return cli.Exit(fmt.Sprintf("--replicas: must be between 1 and 5 (NATS keeps at most 5 copies; 0 chooses), got %d", retention.Replicas), 2)
	}
	cfg := queen.Config{
		DataDir: data, Listen: c.String("listen"), NATSURL: c.String(cliutil.FlagNATS),
		Credentials: cliutil.Credentials(c), Namespace: c.String(cliutil.FlagNamespace), Retention: retention,
		OpenBus: c.Bool("open-bus"), TLS: c.Bool("tls"), TLSCert: c.String("tls-cert"), TLSKey: c.String("tls-key"), TLSCA: c.String("tls-ca"),
		JobTimeout: c.Duration("job-timeout"), HiveStartTimeout: c.Duration("hive-start-timeout"),
		HiveStopGrace: c.Duration("hive-stop-grace"), WorkerStartTimeout: c.Duration("worker-start-timeout"),
		FirstTokenTimeout: c.Duration("first-token-timeout"), MaxQueue: c.Int("max-queue"), WorkerSlots: c.Int("worker-slots"),
		AdvertiseURL: c.String("advertise"), BinDir: c.String("bin-dir"), HiveArgs: c.StringSlice("hive-arg"),
		SSHConfigFile: c.String("ssh-config"), SSHKnownHosts: c.String("ssh-known-hosts"),
		GatewayAddr: gateway, APIKey: c.String("api-key"), Log: log,
		QueenID: c.String("queen-id"), LeaseTTL: c.Duration("lease-ttl"),
	}
	pidFile := cliutil.QueenPIDFile(data)
	cfg.Ready = func(*queen.Queen) {
		// Only a queen with its own embedded bus is "the local queen".
		if cfg.NATSURL == "" {
			_ = os.WriteFile(pidFile, []byte(strconv.Itoa(os.Getpid())), 0o600)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = queen.Run(ctx, cfg)
	if cfg.NATSURL == "" {
		if b, rerr := os.ReadFile(pidFile); rerr == nil && string(b) == strconv.Itoa(os.Getpid()) {
			_ = os.Remove(pidFile)
		}
	}
	if err != nil {
		log.Error().Err(err).Msg("queen stopped")
		if errors.Is(err, bus.ErrUnreachable) || errors.Is(err, bus.ErrRefused) {
			return cli.Exit(err.Error(), 3)
		}
	}
	return err
}
