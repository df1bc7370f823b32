// Package hive is rbee-hive: one per machine. It reports the machine's
// capabilities in a heartbeat, keeps the model catalog, and starts, watches
// and stops the machine's worker processes, all on the queen's request over
// the bus.
//
// What a hive owns and where:
//
//   - its registry entry in the hives bucket (a bus.Heartbeat keyed by the
//     hive id), beaten by one goroutine and kicked at once after a
//     reconnect or a change the scheduler must see;
//   - the catalog under <data>/models (hive/catalog);
//   - its worker processes: a mutex-guarded map (Hive.mu guards it with the
//     capabilities and the catalog summary). Each worker has exactly one
//     supervising goroutine, which waits for the process to exit and is the
//     only place an exit is handled (map removal, registry purge, cluster
//     narration); stopping a worker marks it first, so its exit is expected.
//
// Test hooks (documented here, never for production use): Config.RAMFreeCap
// caps the free RAM the hive reports and checks against (RBEE_FAKE_RAM_FREE
// in the command), and Config.IgnoreShutdown makes the hive ignore the
// shutdown endpoint (and, in the command, SIGTERM) so the queen's SIGKILL
// fallback can be tested.
package hive

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
)

// Error codes a hive answers besides the api.Code* ones.
const (
	// CodeInsufficientMemory (HTTP 507, "insufficient storage"): a worker
	// was refused because its model needs more RAM or VRAM than is free,
	// or a model download because the disk is too full.
	CodeInsufficientMemory = 507
	// CodeCancelled (499, "client closed request"): the job behind the
	// request was cancelled while the hive worked on it.
	CodeCancelled = 499
)

// Settings a hive uses unless told otherwise, in one place.
const (
	// DefaultDetectTimeout bounds one capability detection (nvidia-smi).
	DefaultDetectTimeout = 5 * time.Second
	// DefaultLoadTimeout bounds a worker's start: model load and
	// registration as ready.
	DefaultLoadTimeout = 60 * time.Second
	// DefaultStopGrace is how long a worker may drain when the hive
	// stops it without a grace of its own (at shutdown, or a forced
	// model delete), and again between SIGTERM and SIGKILL. It is shorter
	// than the queen's hive stop grace, so a hive stopping its workers is
	// not signalled by the queen meanwhile.
	DefaultStopGrace = 3 * time.Second
	// DefaultWorkerStopGrace applies to a worker-stop request without a
	// grace.
	DefaultWorkerStopGrace = 10 * time.Second
	// ShortRequestTimeout bounds the hive's quick endpoints; LongRequestTimeout
	// bounds model-add, model-synth and worker-spawn (the caller's request
	// deadline ends its wait much earlier in practice).
	ShortRequestTimeout = 30 * time.Second
	LongRequestTimeout  = 30 * time.Minute
	// WorkerBinary is the worker program's name, looked up next to the
	// hive's own executable unless Config.WorkerBin says otherwise.
	WorkerBinary = "llm-worker-rbee"
	// logTailLines is how much of a failed worker's log an error quotes.
	logTailLines = 20
)

// Config is the hive's settings table. ID and DataDir are required; the rest
// have defaults.
type Config struct {
	// ID names the hive: its registry key and its service group.
	ID string
	// DataDir holds the catalog (models/), worker logs (workers/) and
	// scratch files (tmp/).
	DataDir string
	// NATSURL, Credentials and Namespace say how to reach the bus;
	// BusOptions are extra connection options. Workers are given NATSURL
	// and the credentials (through their environment).
	NATSURL     string
	Credentials bus.Credentials
	Namespace   string
	BusOptions  []nats.Option
	// Leaf, when set, are the URLs of a hub's leaf-node listener: the hive
	// joins the bus through one outbound leaf connection instead of
	// NATSURL (which must then be empty), from a bus of its own on
	// loopback that its workers connect to (see leaf.go). Credentials
	// authenticate the leaf connection to the hub.
	Leaf []string
	// Heartbeat is the registry beat interval (default 1 s); workers
	// beat at the same interval.
	Heartbeat time.Duration
	// WorkerBin is the llm-worker-rbee executable (default: next to the
	// running executable).
	WorkerBin string
	// LlamaLib is the llama.cpp library directory given to workers
	// (--llama-lib); empty lets each worker find it.
	LlamaLib string
	// HubBase is where hf: sources resolve (catalog.WithHubBase); empty
	// keeps Hugging Face.
	HubBase string
	// NvidiaSMI overrides the nvidia-smi executable (empty: PATH).
	NvidiaSMI string
	// DetectTimeout bounds one capability detection (default 5 s).
	DetectTimeout time.Duration
	// LoadTimeout is a spawn's default load timeout (default 60 s).
	LoadTimeout time.Duration
	// StopGrace is the drain grace of workers stopped at shutdown or by a
	// forced delete (default 3 s).
	StopGrace time.Duration
	// LogPath is the hive's own log file, reported in its heartbeat.
	LogPath string

	// IgnoreShutdown is a fault hook for tests only: the shutdown endpoint
	// answers but does nothing, so a caller must fall back to signals.
	IgnoreShutdown bool
	// RAMFreeCap, when not zero, is a test hook: the free RAM the hive
	// reports and checks spawns against is at most this many bytes, so a
	// test can refuse a model for memory on any machine.
	RAMFreeCap uint64

	// Ready, when set, is called once the hive is registered and serves
	// requests.
	Ready func()
	Log   zerolog.Logger
}

// withDefaults fills zero values and checks the rest, so a bad setting is
// reported before anything touches the bus.
func (c Config) withDefaults() (Config, error) {
	if err := subjects.ValidateID(subjects.KindHive, c.ID); err != nil {
		return c, fmt.Errorf("--id: %w", err)
	}
	if c.DataDir == "" {
		return c, errors.New("--data: the hive's data directory is required")
	}
	abs, err := filepath.Abs(c.DataDir)
	if err != nil {
		return c, fmt.Errorf("--data %q: %w", c.DataDir, err)
	}
	c.DataDir = abs
	if len(c.Leaf) > 0 && c.NATSURL != "" {
		return c, errors.New("--leaf and --nats are exclusive: a hive joins through a leaf connection or connects to the bus, not both")
	}
	if c.Heartbeat < 0 {
		return c, fmt.Errorf("--heartbeat must be positive, got %s", c.Heartbeat)
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = bus.DefaultHeartbeatInterval
	}
	if c.DetectTimeout <= 0 {
		c.DetectTimeout = DefaultDetectTimeout
	}
	if c.LoadTimeout <= 0 {
		c.LoadTimeout = DefaultLoadTimeout
	}
	if c.StopGrace <= 0 {
		c.StopGrace = DefaultStopGrace
	}
	if c.WorkerBin == "" {
		c.WorkerBin = DefaultWorkerBin()
	}
	return c, nil
}

// DefaultWorkerBin is llm-worker-rbee next to the running executable.
func DefaultWorkerBin() string {
	exe, err := os.Executable()
	if err != nil {
		return WorkerBinary
	}
	return filepath.Join(filepath.Dir(exe), WorkerBinary)
}

// Layout of the data directory.
func (c Config) modelsDir() string  { return filepath.Join(c.DataDir, "models") }
func (c Config) workersDir() string { return filepath.Join(c.DataDir, "workers") }
func (c Config) tmpDir() string     { return filepath.Join(c.DataDir, "tmp") }
