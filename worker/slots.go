package worker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	parser "github.com/gpustack/gguf-parser-go"

	"github.com/rbee-dev/rbee/internal/capabilities"
)

// Slot count, lanes and threads.
//
// A slot is a sequence of the worker's batch with a KV cache of its own of
// ContextSize tokens (see worker/engine), so what a slot costs is known
// before the model loads: the cache's bytes per token, from the model's
// dimensions in its GGUF header, times the context. The default count is
// what fits in the memory left after the model (at most DefaultMaxSlots); a
// count asked for that does not fit is refused with the numbers, before
// anything is loaded, rather than failing in llama.cpp's allocator or
// pushing the machine into swap.

const (
	// DefaultMaxSlots caps the slot count chosen from memory: more
	// concurrent requests than this on one worker mostly lengthen each.
	DefaultMaxSlots = 4
	// memoryHeadroom is the share of free memory left to the rest of the
	// machine (and llama.cpp's compute buffers) when planning slots.
	memoryHeadroom = 0.2
	// smallModelBytes: a model at most this big is decoded faster by one
	// single-thread context per core than by one context with every
	// core, on a CPU (measured in docs/BENCHMARKS.md, "Concurrency").
	smallModelBytes = 256 << 20
)

// slotPlan is how a worker runs its model.
type slotPlan struct {
	Slots, Lanes, Threads int
	// KVPerSlot is the bytes of KV cache one slot reserves.
	KVPerSlot uint64
	// Resident reads the weights into the worker's memory rather than
	// mapping the file (engine.LoadOptions.Resident): on a CPU, whenever
	// free memory is known to hold them with the slots. A worker serves
	// its model for as long as it lives, and mapped weights are the
	// kernel's to take back while it idles, to be read again by its next
	// request. On this project's VM the difference is large: an 825 MB
	// model mapped took 0.69 s p50 to its first token in table 8's
	// rotation and served one request at 19.6 tokens/s; resident, 91 ms
	// and 43.0 (docs/BENCHMARKS.md, "Resident weights").
	Resident bool
}

// memoryFacts are the inputs of a plan, gathered by gatherFacts.
type memoryFacts struct {
	ModelBytes    uint64
	KVPerToken    uint64
	Free          uint64 // RAM, or the GPU's free memory
	FreeWhat      string // "RAM" or the GPU's name
	Cores         int
	OnGPU         bool
	FreeIsUnknown bool
}

// planSlots chooses the slot count, lanes and threads from cfg (its zero
// values are "choose") and what the machine has.
func planSlots(cfg Config, f memoryFacts) (slotPlan, error) {
	p := slotPlan{Slots: cfg.Slots, Lanes: cfg.Lanes, Threads: cfg.Threads,
		KVPerSlot: f.KVPerToken * uint64(cfg.ContextSize)}
	budget := uint64(0)
	if f.Free > f.ModelBytes {
		budget = uint64(float64(f.Free-f.ModelBytes) * (1 - memoryHeadroom))
	}
	fits := DefaultMaxSlots
	if !f.FreeIsUnknown && p.KVPerSlot > 0 {
		fits = int(min(budget/p.KVPerSlot, MaxSlots))
	}
	need := func(n int) string {
		return fmt.Sprintf("%d slots of %d tokens need %s of KV cache (%s each), and %s of %s is free after the model's %s (%.0f%% kept free)",
			n, cfg.ContextSize, bytesHuman(uint64(n)*p.KVPerSlot), bytesHuman(p.KVPerSlot),
			bytesHuman(budget), f.FreeWhat, bytesHuman(f.ModelBytes), memoryHeadroom*100)
	}
	switch {
	case p.Slots == 0 && fits < 1:
		return p, fmt.Errorf("%w: not even one slot fits: %s; free memory or choose a smaller --ctx", ErrNoMemory, need(1))
	case p.Slots == 0:
		p.Slots = min(fits, DefaultMaxSlots)
	case p.Slots > fits:
		return p, fmt.Errorf("%w: --slots %d does not fit: %s; at most %d fit", ErrNoMemory, p.Slots, need(p.Slots), max(fits, 0))
	}
	// The slots fit after the model, so the model fits.
	p.Resident = !f.OnGPU && !f.FreeIsUnknown
	cores := max(f.Cores, 1)
	if p.Lanes == 0 {
		// One context decodes every sequence's token with the weights
		// read once, which is what a GPU and a big model want; a small
		// model on a CPU is compute-bound and ggml's per-operation thread
		// barriers make one context of N threads slower than N contexts
		// of one.
		p.Lanes = 1
		if !f.OnGPU && f.ModelBytes <= smallModelBytes {
			p.Lanes = min(p.Slots, cores)
		}
	}
	p.Lanes = min(p.Lanes, p.Slots)
	if p.Threads == 0 {
		p.Threads = max(1, cores/p.Lanes)
	}
	return p, nil
}

// MaxSlots is the most slots a worker runs (llama.cpp's sequence limit).
const MaxSlots = 256

// ErrNoMemory: the slots asked for (or one slot) do not fit in memory.
var ErrNoMemory = errors.New("not enough memory")

// gatherFacts reads the model's KV cache size per token and the free
// memory of the device.
func gatherFacts(ctx context.Context, cfg Config) (memoryFacts, error) {
	f := memoryFacts{Cores: runtime.NumCPU(), FreeWhat: "RAM"}
	st, err := os.Stat(cfg.ModelPath)
	if err != nil {
		return f, err
	}
	f.ModelBytes = uint64(st.Size())
	f.KVPerToken, err = kvBytesPerToken(cfg.ModelPath)
	if err != nil {
		return f, err
	}
	if idx, ok := strings.CutPrefix(cfg.Device, "cuda:"); ok {
		f.OnGPU = true
		i, _ := strconv.Atoi(idx)
		gpus, err := capabilities.GPUFree(ctx)
		if err != nil || i >= len(gpus) {
			// The engine says whether the GPU exists; its memory is
			// then unknown, and only the default cap applies.
			f.FreeIsUnknown = true
			return f, nil
		}
		f.Free, f.FreeWhat = gpus[i].VRAMFree, gpus[i].Name
		return f, nil
	}
	f.Free, err = capabilities.FreeMemory(ctx)
	if err != nil {
		f.FreeIsUnknown = true
	}
	return f, nil
}

// kvBytesPerToken is the F16 KV cache one token takes: keys and values of
// every layer's KV heads.
func kvBytesPerToken(path string) (uint64, error) {
	gf, err := parser.ParseGGUFFile(path, parser.SkipLargeMetadata())
	if err != nil {
		return 0, fmt.Errorf("model %s: %w", path, err)
	}
	a := gf.Architecture()
	heads := a.AttentionHeadCount
	kvHeads := a.AttentionHeadCountKV
	if kvHeads == 0 {
		kvHeads = heads
	}
	keyLen, valLen := uint64(a.AttentionKeyLength), uint64(a.AttentionValueLength)
	if heads > 0 {
		if keyLen == 0 {
			keyLen = a.EmbeddingLength / heads
		}
		if valLen == 0 {
			valLen = a.EmbeddingLength / heads
		}
	}
	return a.BlockCount * kvHeads * (keyLen + valLen) * 2, nil
}

// bytesHuman prints n in KiB, MiB or GiB.
func bytesHuman(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	default:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
}
