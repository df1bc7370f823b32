// Package worker is llm-worker-rbee: one process serving one loaded model.
// It registers a heartbeat in the workers bucket, pulls inference requests
// from its model's work queue only when a slot is free, streams tokens and
// narration on the job's subjects, and moves the job record through its
// states. The hive starts it; the queen puts work on its queue.
package worker

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rbee-dev/rbee/worker/engine"
	"github.com/rs/zerolog"
)

// Settings a worker uses unless told otherwise, in one place.
const (
	// DefaultContextSize is each slot's context, in tokens.
	DefaultContextSize = 2048
	// DefaultDevice runs on the CPU.
	DefaultDevice = "cpu"
	// DefaultDrainGrace is how long a shutdown waits for in-flight jobs
	// before cancelling them.
	DefaultDrainGrace = 10 * time.Second
	// DefaultMaxTokens is generated when a request does not say how many
	// (capped at the context size).
	DefaultMaxTokens = 256
	// AckWait is how long the work queue waits for a worker to take a
	// request it fetched before giving it to another. A worker takes a
	// request (moves the job to running and acks) within milliseconds;
	// the generation itself is not bound by it.
	AckWait = 30 * time.Second
	// FetchWait is how long one idle slot's pull waits for a request. It
	// also bounds how long a shutdown waits for idle slots to stop.
	FetchWait = 2 * time.Second
)

// Endpoint names of a worker's micro service (tokens after its group).
const (
	EpStatus = "status"
	EpDrain  = "drain"
)

// DrainRequest asks a worker to stop taking work, let its in-flight jobs
// finish within Grace (DefaultDrainGrace when zero), cancel what is left and
// exit. The reply is the worker's status, already in state draining.
type DrainRequest struct {
	Grace api.Duration `json:"grace,omitempty"`
}

// Config is everything a worker needs. ID, Hive, Model and ModelPath are
// required; the rest have defaults.
type Config struct {
	// ID is the worker id: the registry key and its service group.
	ID string
	// Hive is the id of the hive that started this worker.
	Hive string
	// Model is the model id as in the hive's catalog; its key names the
	// work queue.
	Model string
	// ModelPath is the GGUF file to load.
	ModelPath string
	// Device is "cpu" or "cuda:N".
	Device string
	// Slots is how many requests are generated concurrently, decoded
	// together in batches; 0 chooses from free memory (planSlots).
	Slots int
	// ContextSize is each slot's context, in tokens.
	ContextSize int
	// Lanes is how many llama contexts share the slots; 0 chooses from
	// the device and the model's size (planSlots).
	Lanes int
	// Threads is CPU threads per lane; 0 shares the cores among the lanes.
	Threads int
	// LlamaLib is the llama.cpp library directory (llamalib.Find when empty).
	LlamaLib string
	// Heartbeat is the registry beat interval.
	Heartbeat time.Duration
	// DrainGrace bounds how long a shutdown waits for in-flight jobs.
	DrainGrace time.Duration
	// DefaultMaxTokens applies to requests without max_tokens.
	DefaultMaxTokens int
	// BusOutage is how long a running job's tokens wait for a bus that
	// went away before the job is failed (bus.DefaultOutage). Its end,
	// failed or not, waits for the bus as long as the worker lives.
	BusOutage time.Duration

	// NATSURL, Credentials and Namespace say how to reach the bus;
	// BusOptions are extra connection options (an in-process server).
	NATSURL     string
	Credentials bus.Credentials
	Namespace   string
	BusOptions  []nats.Option

	// Engine loads the model; nil means llama.cpp from LlamaLib.
	Engine engine.Engine
	// Ready, when set, is called once the worker serves requests.
	Ready func(api.WorkerStatus)
	Log   zerolog.Logger
}

// withDefaults fills zero values and checks the rest, so a bad flag is
// reported before anything touches the bus.
func (c Config) withDefaults() (Config, error) {
	if err := subjects.ValidateID(subjects.KindWorker, c.ID); err != nil {
		return c, fmt.Errorf("--id: %w", err)
	}
	if err := subjects.ValidateID(subjects.KindHive, c.Hive); err != nil {
		return c, fmt.Errorf("--hive: %w", err)
	}
	if _, err := subjects.ModelKey(c.Model); err != nil {
		return c, fmt.Errorf("--model: %w", err)
	}
	if c.ModelPath == "" {
		return c, fmt.Errorf("--model-path: the GGUF file of model %s is required", c.Model)
	}
	if c.Device == "" {
		c.Device = DefaultDevice
	}
	if err := checkDevice(c.Device); err != nil {
		return c, err
	}
	if c.ContextSize == 0 {
		c.ContextSize = DefaultContextSize
	}
	switch {
	case c.Slots < 0 || c.Slots > MaxSlots:
		return c, fmt.Errorf("--slots: must be between 1 and %d (0: from free memory), got %d", MaxSlots, c.Slots)
	case c.ContextSize < 16:
		return c, fmt.Errorf("--ctx: must be at least 16 tokens, got %d", c.ContextSize)
	case c.Lanes < 0:
		return c, fmt.Errorf("--lanes: must be at least 1 (0: chosen), got %d", c.Lanes)
	case c.Threads < 0:
		return c, fmt.Errorf("--threads: must be at least 1 (0: chosen), got %d", c.Threads)
	case c.Heartbeat < 0:
		return c, fmt.Errorf("--heartbeat: must be positive, got %s", c.Heartbeat)
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = bus.DefaultHeartbeatInterval
	}
	if c.DrainGrace <= 0 {
		c.DrainGrace = DefaultDrainGrace
	}
	if c.DefaultMaxTokens <= 0 {
		c.DefaultMaxTokens = DefaultMaxTokens
	}
	if c.BusOutage <= 0 {
		c.BusOutage = bus.DefaultOutage
	}
	return c, nil
}

// checkDevice accepts "cpu" and "cuda:N"; whether the GPU exists is the
// engine's to say when loading.
func checkDevice(d string) error {
	if d == "cpu" {
		return nil
	}
	if n, ok := strings.CutPrefix(d, "cuda:"); ok {
		if i, err := strconv.Atoi(n); err == nil && i >= 0 {
			return nil
		}
	}
	return fmt.Errorf("--device: want \"cpu\" or \"cuda:N\", got %q", d)
}

// Check reports a configuration error (a bad id, device or count) without
// touching the bus.
func (c Config) Check() error {
	_, err := c.withDefaults()
	return err
}
