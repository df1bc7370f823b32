package api

import "time"

// --- queen endpoints ---

// Queen endpoint names (tokens after the queen group).
const (
	EpSubmit     = "submit"
	EpJobGet     = "job-get"
	EpJobList    = "job-list"
	EpJobCancel  = "job-cancel"
	EpStatus     = "status"
	EpHiveAdd    = "hive-add"
	EpHiveRemove = "hive-remove"
	EpHiveList   = "hive-list"
	EpHiveGet    = "hive-get"
	EpWorkerList = "worker-list"
	EpModelList  = "model-list"
)

// SubmitRequest asks the queen to run an operation as a job.
type SubmitRequest struct {
	Op Operation `json:"op"`
	// Timeout, when set, bounds the whole job (the queen fails it after).
	Timeout Duration `json:"timeout,omitempty"`
	// JobID, when set, is the new job's id, chosen by the client (in
	// jobs.NewID's form) so that it can follow the job's subjects while
	// the queen admits it; an id already taken is refused (conflict).
	// Empty: the queen chooses.
	JobID string `json:"job_id,omitempty"`
}

// SubmitReply names the new job; its events follow on the job's subjects.
type SubmitReply struct {
	JobID string `json:"job_id"`
}

// JobRequest names one job.
type JobRequest struct {
	ID string `json:"id"`
}

// JobListRequest asks for one page of the job list, newest first. Job ids
// sort by creation time, so a page is a range of ids.
type JobListRequest struct {
	State JobState `json:"state,omitempty"`
	// Limit caps the jobs in this page (0 = as many as the queen sends in
	// one reply). The queen may send fewer: a page never exceeds the bus's
	// max payload, whatever the records hold.
	Limit int `json:"limit,omitempty"`
	// Before is the cursor: only jobs whose id sorts before it ("" = from
	// the newest). Pass the previous reply's Next to get the next page.
	Before string `json:"before,omitempty"`
}

// JobListReply is one page of jobs, newest first.
type JobListReply struct {
	Jobs []Job `json:"jobs"`
	// Next is the cursor for the following page (the Before of the next
	// request); empty when no job is left.
	Next string `json:"next,omitempty"`
}

// Status is the queen's report of the cluster at a glance.
type Status struct {
	Version   string           `json:"version"`
	StartedAt time.Time        `json:"started_at"`
	Uptime    Duration         `json:"uptime"`
	BusURL    string           `json:"bus_url,omitempty"`
	Hives     []HiveView       `json:"hives"`
	Workers   []WorkerStatus   `json:"workers"`
	Jobs      map[JobState]int `json:"jobs"`
	// Queues is the number of inference requests waiting per model.
	Queues map[string]int `json:"queues"`
	// Queen is the id of the queen that answered, Role whether it leads
	// (runs the scheduler) or stands by, and Leader the id of the queen
	// that leads as far as it knows ("" when none holds the lease).
	Queen  string `json:"queen,omitempty"`
	Role   string `json:"role,omitempty"`
	Leader string `json:"leader,omitempty"`
	// Problems says what the queen could not read for this report (a
	// bus without quorum keeps job records and the inventory out of
	// reach); what it knows without them is reported all the same.
	Problems []string `json:"problems,omitempty"`
}

// Roles of a queen among the queens of one bus.
const (
	QueenLeader  = "leader"
	QueenStandby = "standby"
)

// --- hives ---

// Hive states as the queen sees them.
const (
	HiveOnline  = "online"
	HiveOffline = "offline" // known in the inventory, not running
	HiveLost    = "lost"    // its heartbeat expired without a goodbye
)

// SSHTarget says how to reach a remote hive's machine.
type SSHTarget struct {
	// Spec is what the user typed: user@host:port or an ~/.ssh/config alias.
	Spec         string `json:"spec"`
	IdentityFile string `json:"identity_file,omitempty"`
}

// InventoryEntry is a hive the user added.
type InventoryEntry struct {
	Name string `json:"name"`
	// SSH is nil for a hive on the queen's own machine.
	SSH *SSHTarget `json:"ssh,omitempty"`
	// BinDir is where rbee-hive and llm-worker-rbee live for a local hive
	// (default: next to the queen).
	BinDir string `json:"bin_dir,omitempty"`
	// Prefix is the install root on a remote machine: binaries in
	// Prefix/bin, llama.cpp and hive data in Prefix/share/rbee
	// (default ~/.local).
	Prefix  string    `json:"prefix,omitempty"`
	AddedAt time.Time `json:"added_at"`
}

// Address is how the entry is reached, for display.
func (e InventoryEntry) Address() string {
	if e.SSH == nil {
		return "local"
	}
	return "ssh://" + e.SSH.Spec
}

// HiveAddRequest adds a hive to the inventory.
type HiveAddRequest struct {
	Name         string `json:"name"`
	SSH          string `json:"ssh,omitempty"`
	IdentityFile string `json:"identity_file,omitempty"`
	BinDir       string `json:"bin_dir,omitempty"`
	Prefix       string `json:"prefix,omitempty"`
}

// HiveRequest names one hive.
type HiveRequest struct {
	Name string `json:"name"`
}

// HiveView is a hive as listed: its inventory entry (if any) and live state.
type HiveView struct {
	Name     string          `json:"name"`
	Address  string          `json:"address"`
	State    string          `json:"state"`
	Entry    *InventoryEntry `json:"entry,omitempty"`
	Status   *HiveStatus     `json:"status,omitempty"`
	LastSeen *time.Time      `json:"last_seen,omitempty"`
}

// HiveListReply lists hives.
type HiveListReply struct {
	Hives []HiveView `json:"hives"`
}

// HiveStatus is a hive's heartbeat: everything the scheduler needs to know
// about it without asking.
type HiveStatus struct {
	ID           string       `json:"id"`
	Version      string       `json:"version"`
	PID          int          `json:"pid"`
	StartedAt    time.Time    `json:"started_at"`
	BeatAt       time.Time    `json:"beat_at"`
	Capabilities Capabilities `json:"capabilities"`
	RAMFree      uint64       `json:"ram_free"`
	Workers      []string     `json:"workers"`
	Models       []ModelBrief `json:"models"`
	LogPath      string       `json:"log_path,omitempty"`
}

// ModelBrief is what a heartbeat says about one catalog entry.
type ModelBrief struct {
	ID              string `json:"id"`
	Key             string `json:"key"`
	EstimatedMemory uint64 `json:"estimated_memory"`
}

// Hive endpoint names (tokens after the hive's group).
const (
	HiveEpCapabilities = "capabilities"
	HiveEpStatus       = "status"
	HiveEpShutdown     = "shutdown"
	HiveEpModelList    = "model-list"
	HiveEpModelGet     = "model-get"
	HiveEpModelDelete  = "model-delete"
	HiveEpModelAdd     = "model-add"
	HiveEpModelSynth   = "model-synth"
	HiveEpWorkerSpawn  = "worker-spawn"
	HiveEpWorkerStop   = "worker-stop"
	HiveEpWorkerList   = "worker-list"
)

// --- credentials ---

// WorkerCredentialsRequest is what a hive sends, on its own
// subjects.WorkerCredentials subject, for a worker it is about to start.
type WorkerCredentialsRequest struct {
	Worker   string `json:"worker"`
	ModelKey string `json:"model_key"`
}

// WorkerCredentialsReply carries the new worker's key (an nkey seed). It
// reaches only the asking hive's own inbox; the hive hands it to the worker
// in a file of mode 0600 and forgets it.
type WorkerCredentialsReply struct {
	Name string `json:"name"`
	Seed string `json:"seed"`
}

// --- workers ---

// WorkerEpFit is the worker endpoint that measures a request against its
// loaded model (the prompt's tokens, rendered with the chat template,
// against the context) without running it: the queen asks it at admission
// about a prompt long enough not to fit, so such a request never becomes a
// job. It answers a FitReply, or the *Error the job would have failed with.
const WorkerEpFit = "fit"

// FitReply is a request's measure against a worker's model.
type FitReply struct {
	PromptTokens int `json:"prompt_tokens"`
	ContextSize  int `json:"ctx_size"`
}

// Worker states.
const (
	WorkerLoading  = "loading"
	WorkerReady    = "ready"
	WorkerBusy     = "busy"
	WorkerDraining = "draining"
)

// WorkerStatus is a worker's heartbeat.
type WorkerStatus struct {
	ID         string `json:"id"`
	Hive       string `json:"hive"`
	Model      string `json:"model"`
	ModelKey   string `json:"model_key"`
	Device     string `json:"device"`
	SlotsTotal int    `json:"slots_total"`
	SlotsBusy  int    `json:"slots_busy"`
	// ContextSize is the context each slot runs a request in, in tokens
	// (0 until the model is loaded): the queen refuses a max_tokens that
	// fits no worker of the model before any job exists.
	ContextSize int `json:"ctx_size,omitempty"`
	// KVCacheBytes is the KV cache the slots reserve (each its context's
	// worth); KVUsedBytes what their running requests fill now.
	KVCacheBytes uint64    `json:"kv_cache_bytes,omitempty"`
	KVUsedBytes  uint64    `json:"kv_used_bytes,omitempty"`
	MemoryUsed   uint64    `json:"memory_used"`
	State        string    `json:"state"`
	TokensServed uint64    `json:"tokens_served"`
	TokensPerSec float64   `json:"tokens_per_sec"`
	PID          int       `json:"pid"`
	Version      string    `json:"version"`
	StartedAt    time.Time `json:"started_at"`
	BeatAt       time.Time `json:"beat_at"`
	// Jobs are the jobs the worker's slots hold at BeatAt: being taken,
	// generating, or recording their end. The leader gives up the attempt
	// of a job recorded as running on the worker since before BeatAt that
	// is not among them (the worker is live, but does not run it). Nil
	// from a worker that does not say.
	Jobs []string `json:"jobs"`
}

// Duration is a time.Duration that encodes as a Go duration string.
type Duration time.Duration

// MarshalText encodes "1m30s".
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText decodes "1m30s".
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	*d = Duration(v)
	return nil
}
