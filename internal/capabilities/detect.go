package capabilities

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/shirou/gopsutil/v4/cpu"
	"github.com/shirou/gopsutil/v4/mem"

	"github.com/rbee-dev/rbee/api"
)

// Backend names advertised in api.Capabilities.Backends.
const (
	// BackendCPU is always available: every machine can run a CPU worker.
	BackendCPU = "cpu"
	// BackendCUDA needs both an NVIDIA GPU and a CUDA build of the llama
	// libraries.
	BackendCUDA = "cuda"
)

// procMeminfo and procCPUInfo are variables so tests can point them at
// fixtures.
var (
	procMeminfo = "/proc/meminfo"
	procCPUInfo = "/proc/cpuinfo"
)

// Detect reports the machine's hostname, OS/arch, CPU, RAM, GPUs and the
// inference backends it can run.
//
// GPU problems never make Detect fail, because a hive must start on a
// machine with a broken driver: without nvidia-smi there are simply no GPUs;
// if nvidia-smi fails or exceeds the timeout (WithTimeout) there are no GPUs
// and GPUError says why. Detect fails only when ctx ends, or when the
// hostname or total RAM cannot be read, since the scheduler cannot place
// work on a hive without them.
func Detect(ctx context.Context, opts ...Option) (api.Capabilities, error) {
	c := newConfig(opts)
	if err := ctx.Err(); err != nil {
		return api.Capabilities{}, err
	}
	host, err := os.Hostname()
	if err != nil {
		return api.Capabilities{}, fmt.Errorf("capabilities: hostname: %w", err)
	}
	caps := api.Capabilities{
		Hostname: host,
		OS:       runtime.GOOS,
		Arch:     runtime.GOARCH,
		CPU:      detectCPU(ctx),
		Backends: []string{BackendCPU},
	}

	vm, err := mem.VirtualMemoryWithContext(ctx)
	if err != nil {
		return api.Capabilities{}, fmt.Errorf("capabilities: memory: %w", err)
	}
	caps.RAMTotal = vm.Total
	// Available, not Free: the kernel reclaims page cache for a new worker,
	// so Free alone would make a long-running box look full.
	caps.RAMFree = vm.Available

	gpus, err := queryGPUs(ctx, c)
	switch {
	case err == nil:
		caps.GPUs = gpus
	case errors.Is(err, errNoNvidiaSMI):
		// A CPU-only machine; nothing to report.
	case ctx.Err() != nil:
		return api.Capabilities{}, ctx.Err()
	default:
		caps.GPUError = err.Error()
	}
	if len(caps.GPUs) > 0 && c.cudaLibCheck() {
		caps.Backends = append(caps.Backends, BackendCUDA)
	}
	caps.DetectedAt = time.Now().UTC()
	return caps, nil
}

// FreeMemory returns the bytes of RAM available for new work (MemAvailable).
// It is called on every heartbeat (1 Hz), so on Linux it reads /proc/meminfo
// directly: one small file read, no process spawned, no per-CPU scans.
// Elsewhere, or on kernels older than 3.14 without MemAvailable, it falls
// back to gopsutil, which estimates the same number.
func FreeMemory(ctx context.Context) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if runtime.GOOS == "linux" {
		if f, err := os.Open(procMeminfo); err == nil {
			v, ok, perr := parseMemAvailable(f)
			f.Close()
			if perr != nil {
				return 0, fmt.Errorf("capabilities: %s: %w", procMeminfo, perr)
			}
			if ok {
				return v, nil
			}
		}
	}
	vm, err := mem.VirtualMemoryWithContext(ctx)
	if err != nil {
		return 0, fmt.Errorf("capabilities: free memory: %w", err)
	}
	return vm.Available, nil
}

// GPUFree re-runs nvidia-smi and returns the GPUs with their current free
// VRAM. It spawns a process, so call it less often than FreeMemory. Unlike
// Detect it returns nvidia-smi failures as errors, since the caller is asking
// for exactly this data; a machine without nvidia-smi returns no GPUs and no
// error. The same options as Detect apply (WithNvidiaSMI, WithTimeout).
func GPUFree(ctx context.Context, opts ...Option) ([]api.GPU, error) {
	gpus, err := queryGPUs(ctx, newConfig(opts))
	if errors.Is(err, errNoNvidiaSMI) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("capabilities: %w", err)
	}
	return gpus, nil
}

// parseMemAvailable reads /proc/meminfo content and returns MemAvailable in
// bytes; ok is false when the field is absent (kernel < 3.14).
func parseMemAvailable(r io.Reader) (v uint64, ok bool, err error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		rest, found := strings.CutPrefix(sc.Text(), "MemAvailable:")
		if !found {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0, false, fmt.Errorf("MemAvailable has no value")
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			return 0, false, fmt.Errorf("MemAvailable %q: %w", f[0], err)
		}
		// The kernel labels it "kB" but means KiB.
		return kb * 1024, true, nil
	}
	return 0, false, sc.Err()
}

// detectCPU is best effort: a missing model name must not stop a hive, and
// containers or unusual architectures often hide parts of the topology. It
// asks gopsutil first and fills gaps from /proc/cpuinfo, then from the Go
// runtime.
func detectCPU(ctx context.Context) api.CPU {
	var c api.CPU
	if infos, err := cpu.InfoWithContext(ctx); err == nil {
		for _, i := range infos {
			if m := strings.TrimSpace(i.ModelName); m != "" {
				c.Model = m
				break
			}
		}
	}
	if n, err := cpu.CountsWithContext(ctx, false); err == nil && n > 0 {
		c.Cores = n
	}
	if n, err := cpu.CountsWithContext(ctx, true); err == nil && n > 0 {
		c.Threads = n
	}
	if c.Model == "" || c.Cores == 0 || c.Threads == 0 {
		if b, err := os.ReadFile(procCPUInfo); err == nil {
			fb := parseCPUInfo(string(b))
			if c.Model == "" {
				c.Model = fb.Model
			}
			if c.Cores == 0 {
				c.Cores = fb.Cores
			}
			if c.Threads == 0 {
				c.Threads = fb.Threads
			}
		}
	}
	if c.Threads == 0 {
		c.Threads = runtime.NumCPU()
	}
	if c.Cores == 0 || c.Cores > c.Threads {
		// Without topology information, assume no SMT rather than guess.
		c.Cores = c.Threads
	}
	return c
}

// parseCPUInfo extracts the model, physical cores and logical CPUs from
// /proc/cpuinfo. The model key differs per architecture ("model name" on
// x86, "Model" or "Hardware" on ARM boards, "cpu model" on MIPS, "cpu" on
// POWER), so the first one found in that order of preference wins. Cores are
// distinct (physical id, core id) pairs; without those, Cores stays 0.
func parseCPUInfo(s string) api.CPU {
	var c api.CPU
	models := map[string]string{}
	type core struct{ pkg, id string }
	cores := map[core]struct{}{}
	var pkg, id string
	var haveID bool
	flush := func() {
		if haveID {
			cores[core{pkg, id}] = struct{}{}
		}
		pkg, id, haveID = "", "", false
	}
	for _, line := range strings.Split(s, "\n") {
		k, v, found := strings.Cut(line, ":")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !found {
			if k == "" {
				flush() // a blank line ends one processor's block
			}
			continue
		}
		switch k {
		case "processor":
			// On x86 and most ARM kernels each logical CPU is a block
			// starting with "processor : N"; old ARM kernels also have a
			// "Processor : <model>" line, which is not a number.
			if _, err := strconv.Atoi(v); err == nil {
				c.Threads++
			}
		case "physical id":
			pkg = v
		case "core id":
			id, haveID = v, true
		}
		if _, seen := models[k]; !seen && v != "" {
			models[k] = v
		}
	}
	flush()
	for _, k := range []string{"model name", "Model", "Hardware", "cpu model", "cpu", "Processor"} {
		if m, ok := models[k]; ok {
			c.Model = m
			break
		}
	}
	c.Cores = len(cores)
	return c
}
