package api

import "time"

// Capabilities is what a hive found on its machine. It travels in every hive
// heartbeat, so the scheduler can place work without asking the hive.
type Capabilities struct {
	Hostname string `json:"hostname"`
	OS       string `json:"os"`
	Arch     string `json:"arch"`
	CPU      CPU    `json:"cpu"`
	// RAMTotal and RAMFree are bytes.
	RAMTotal uint64 `json:"ram_total"`
	RAMFree  uint64 `json:"ram_free"`
	GPUs     []GPU  `json:"gpus,omitempty"`
	// Backends are the inference backends this machine can run: "cpu"
	// always, "cuda" when a GPU and the CUDA libraries are present.
	Backends []string `json:"backends"`
	// GPUError says why GPU detection failed, when nvidia-smi exists but
	// failed; a machine without nvidia-smi leaves it empty.
	GPUError   string    `json:"gpu_error,omitempty"`
	DetectedAt time.Time `json:"detected_at"`
}

// CPU describes the processor.
type CPU struct {
	Model   string `json:"model"`
	Cores   int    `json:"cores"`
	Threads int    `json:"threads"`
}

// GPU is one device as nvidia-smi reports it. Memory is in bytes.
type GPU struct {
	Index             int    `json:"index"`
	Name              string `json:"name"`
	VRAMTotal         uint64 `json:"vram_total"`
	VRAMFree          uint64 `json:"vram_free"`
	ComputeCapability string `json:"compute_capability,omitempty"`
	Driver            string `json:"driver,omitempty"`
}

// Model is one entry of a hive's model catalog.
type Model struct {
	// ID is the name users type (-m ID); validated by subjects.ValidateModelID.
	ID string `json:"id"`
	// Key is the subject token derived from ID (subjects.ModelKey).
	Key    string `json:"key"`
	Source string `json:"source"`
	// Path is the model file on the hive's machine.
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	// Architecture, e.g. "llama", from the GGUF metadata.
	Architecture  string `json:"architecture"`
	Parameters    uint64 `json:"parameters"`
	Quantization  string `json:"quantization"`
	ContextLength int    `json:"context_length"`
	// EstimatedMemory is the bytes needed to run the model with
	// EstimatedForContext tokens of context, from gguf-parser-go.
	EstimatedMemory     uint64    `json:"estimated_memory"`
	EstimatedForContext int       `json:"estimated_for_context"`
	AddedAt             time.Time `json:"added_at"`
}
