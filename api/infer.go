package api

import "time"

// ChatMessage is one turn of a chat prompt.
type ChatMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Sampling are the generation parameters of an inference. Zero values mean
// the worker's defaults, except Temperature, where 0 means greedy.
type Sampling struct {
	MaxTokens     int      `json:"max_tokens,omitempty"`
	Temperature   float32  `json:"temperature"`
	TopP          float32  `json:"top_p,omitempty"`
	TopK          int      `json:"top_k,omitempty"`
	MinP          float32  `json:"min_p,omitempty"`
	RepeatPenalty float32  `json:"repeat_penalty,omitempty"`
	Seed          *uint32  `json:"seed,omitempty"`
	Stop          []string `json:"stop,omitempty"`
}

// InferArgs are the arguments of an infer operation, as the keeper or the
// gateway submits them.
type InferArgs struct {
	Model string `json:"model"`
	// Prompt is raw text; Messages, when set, are formatted with the
	// model's chat template instead.
	Prompt   string        `json:"prompt,omitempty"`
	System   string        `json:"system,omitempty"`
	Messages []ChatMessage `json:"messages,omitempty"`
	Sampling Sampling      `json:"sampling"`
	// Hive and Device pin the job to one hive or device.
	Hive   string `json:"hive,omitempty"`
	Device string `json:"device,omitempty"`
	// Pull, with Source, downloads the model onto the best online hive
	// when no hive has it.
	Pull   bool   `json:"pull,omitempty"`
	Source string `json:"source,omitempty"`
	// FirstTokenTimeout fails the job when no token arrives in time after
	// a worker took it.
	FirstTokenTimeout Duration `json:"first_token_timeout,omitempty"`
}

// PromptBytes is the size of the prompt, system text and messages together.
func (a InferArgs) PromptBytes() int {
	n := len(a.Prompt) + len(a.System)
	for _, m := range a.Messages {
		n += len(m.Content)
	}
	return n
}

// InferRequest is what the queen puts on a model's work queue. Workers of
// that model pull it when a slot is free.
type InferRequest struct {
	JobID string    `json:"job_id"`
	Args  InferArgs `json:"args"`
	// Attempt counts how often the job was handed to a worker; a retried
	// job says so in narration.
	Attempt    int       `json:"attempt"`
	EnqueuedAt time.Time `json:"enqueued_at"`
	// Record is the job's record as the queen created it, at revision
	// RecordRevision, on a first attempt: the worker takes the job by
	// writing against that revision without reading the record first
	// (jobs.Store.TakeAt). Absent on a retry.
	Record         *Job   `json:"record,omitempty"`
	RecordRevision uint64 `json:"record_revision,omitempty"`
}

// InferResult is the result of a completed infer job. It holds no copy of
// the generated text: the job's token events are the text, and a follower
// assembles it (bus.Follow gives each token once, in order).
type InferResult struct {
	StopReason   string `json:"stop_reason"`
	PromptTokens int    `json:"prompt_tokens"`
	// CachedTokens is how many of PromptTokens the worker did not decode
	// again: the start of the prompt its slot's cache held from an
	// earlier request.
	CachedTokens     int      `json:"cached_tokens,omitempty"`
	CompletionTokens int      `json:"completion_tokens"`
	TimeToFirstToken Duration `json:"time_to_first_token"`
	Duration         Duration `json:"duration"`
	TokensPerSecond  float64  `json:"tokens_per_second"`
	Worker           string   `json:"worker"`
	Hive             string   `json:"hive"`
	Attempt          int      `json:"attempt,omitempty"`
}

// WorkerSpawnArgs asks a hive to start a worker for a model. It is both the
// worker.spawn operation's arguments and the hive endpoint's request.
type WorkerSpawnArgs struct {
	Hive   string `json:"hive"`
	Model  string `json:"model"`
	Device string `json:"device,omitempty"` // "cpu" (default) or "cuda:N"
	Slots  int    `json:"slots,omitempty"`
	Ctx    int    `json:"ctx,omitempty"`
	// Threads per slot; 0 means the worker's default.
	Threads int `json:"threads,omitempty"`
	// JobID, when set, is the job the hive narrates on.
	JobID string `json:"job_id,omitempty"`
	// LoadTimeout bounds the model load and registration.
	LoadTimeout Duration `json:"load_timeout,omitempty"`
}

// WorkerSpawnReply says which worker now serves the model.
type WorkerSpawnReply struct {
	Worker WorkerStatus `json:"worker"`
}

// WorkerStopArgs stops a worker: drain in-flight work within Grace, then
// SIGTERM, then SIGKILL.
type WorkerStopArgs struct {
	Worker string   `json:"worker"`
	Grace  Duration `json:"grace,omitempty"`
	JobID  string   `json:"job_id,omitempty"`
}

// ModelAddArgs downloads a model into a hive's catalog (model.download).
type ModelAddArgs struct {
	Hive   string `json:"hive"`
	Source string `json:"source"`
	Name   string `json:"name,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
	JobID  string `json:"job_id,omitempty"`
}

// ModelSynthArgs writes a generated model into a hive's catalog, so the
// offline demo and tests need no network.
type ModelSynthArgs struct {
	Name string `json:"name"`
	// Size is "tiny" (default) or "large".
	Size string `json:"size,omitempty"`
}

// ModelRequest names a model on a hive.
type ModelRequest struct {
	Model string `json:"model"`
	Force bool   `json:"force,omitempty"`
}

// ModelListReply lists a hive's catalog.
type ModelListReply struct {
	Hive   string  `json:"hive"`
	Models []Model `json:"models"`
}

// WorkerListReply lists workers.
type WorkerListReply struct {
	Workers []WorkerStatus `json:"workers"`
}

// ShutdownRequest asks a hive to stop its workers and exit.
type ShutdownRequest struct {
	JobID string `json:"job_id,omitempty"`
}
