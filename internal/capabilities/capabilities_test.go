package capabilities

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/rbee-dev/rbee/api"
)

const gib = 1 << 30

var (
	rtx4090 = api.GPU{Index: 0, Name: "NVIDIA GeForce RTX 4090", VRAMTotal: 24564 * mib, VRAMFree: 23975 * mib, ComputeCapability: "8.9", Driver: "550.54.15"}
	h100    = api.GPU{Index: 1, Name: "NVIDIA H100 80GB HBM3", VRAMTotal: 81559 * mib, VRAMFree: 81007 * mib, ComputeCapability: "9.0", Driver: "550.54.15"}
)

func fixture(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	require.NoError(t, err)
	return string(b)
}

// fakeSMI writes an executable shell script standing in for nvidia-smi.
// Tests that exec fakes do not run in parallel: a script written while
// another goroutine forks can fail with "text file busy".
func fakeSMI(t *testing.T, body string) string {
	t.Helper()
	if runtime.GOOS == "windows" {
		t.Skip("fake nvidia-smi is a shell script")
	}
	p := filepath.Join(t.TempDir(), "nvidia-smi")
	require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755))
	require.NoError(t, os.Chmod(p, 0o755)) // WriteFile's mode is subject to umask
	return p
}

// catFixture is a fake that records its arguments to argsFile and prints a
// fixture, so tests see exactly what a real nvidia-smi would have printed.
func catFixture(t *testing.T, name, argsFile string) string {
	t.Helper()
	abs, err := filepath.Abs(filepath.Join("testdata", name))
	require.NoError(t, err)
	return fakeSMI(t, `printf '%s\n' "$@" > '`+argsFile+`'
cat '`+abs+`'`)
}

func alwaysCUDA() bool { return true }

func TestParseNvidiaSMI(t *testing.T) {
	tests := []struct {
		fixture string
		want    []api.GPU
	}{
		{"nvidia-smi/empty.txt", nil},
		{"nvidia-smi/one-gpu.txt", []api.GPU{rtx4090}},
		{"nvidia-smi/two-gpus.txt", []api.GPU{rtx4090, h100}},
		{"nvidia-smi/na-fields.txt", []api.GPU{
			{Index: 0, Name: "NVIDIA A100-SXM4-40GB MIG 3g.20gb", Driver: "535.129.03"},
			{Index: 1, Name: "Tesla T4", VRAMTotal: 15360 * mib, ComputeCapability: "7.5"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.fixture, func(t *testing.T) {
			got, err := ParseNvidiaSMI(fixture(t, tt.fixture))
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestParseNvidiaSMIMalformed(t *testing.T) {
	_, err := ParseNvidiaSMI(fixture(t, "nvidia-smi/malformed.txt"))
	require.Error(t, err)
	// The error must name the line so an operator can see what the driver
	// printed.
	assert.Contains(t, err.Error(), "line 2")
	assert.Contains(t, err.Error(), "NVIDIA H100 80GB HBM3, 81559 MB free")

	for _, line := range []string{
		"x, NVIDIA GeForce RTX 4090, 24564, 23975, 8.9, 550.54.15",
		"[N/A], NVIDIA GeForce RTX 4090, 24564, 23975, 8.9, 550.54.15",
		"-1, NVIDIA GeForce RTX 4090, 24564, 23975, 8.9, 550.54.15",
		"0, NVIDIA GeForce RTX 4090, 24.5, 23975, 8.9, 550.54.15",
		"0, NVIDIA GeForce RTX 4090, 24564, -5, 8.9, 550.54.15",
		"0, NVIDIA GeForce RTX 4090, 99999999999999999999, 1, 8.9, 550.54.15",
		"No devices were found",
	} {
		_, err := ParseNvidiaSMI(line + "\n")
		assert.Error(t, err, line)
	}
}

func TestParseNvidiaSMICommaInName(t *testing.T) {
	got, err := ParseNvidiaSMI("3, Weird, Inc. GPU, 1024, 512, 8.0, 1.2.3\n")
	require.NoError(t, err)
	assert.Equal(t, []api.GPU{{Index: 3, Name: "Weird, Inc. GPU", VRAMTotal: 1024 * mib, VRAMFree: 512 * mib, ComputeCapability: "8.0", Driver: "1.2.3"}}, got)
}

func TestDetectTwoGPUs(t *testing.T) {
	args := filepath.Join(t.TempDir(), "args")
	smi := catFixture(t, "nvidia-smi/two-gpus.txt", args)

	before := time.Now().UTC()
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi), WithCUDALibCheck(alwaysCUDA))
	require.NoError(t, err)

	assert.Equal(t, []api.GPU{rtx4090, h100}, caps.GPUs)
	assert.Empty(t, caps.GPUError)
	assert.Equal(t, []string{BackendCPU, BackendCUDA}, caps.Backends)

	host, _ := os.Hostname()
	assert.Equal(t, host, caps.Hostname)
	assert.Equal(t, runtime.GOOS, caps.OS)
	assert.Equal(t, runtime.GOARCH, caps.Arch)
	assert.Positive(t, caps.CPU.Threads)
	assert.Positive(t, caps.CPU.Cores)
	assert.LessOrEqual(t, caps.CPU.Cores, caps.CPU.Threads)
	assert.Positive(t, caps.RAMTotal)
	assert.Positive(t, caps.RAMFree)
	assert.LessOrEqual(t, caps.RAMFree, caps.RAMTotal)
	assert.False(t, caps.DetectedAt.Before(before))

	// The query is the contract of ParseNvidiaSMI; pin it.
	b, err := os.ReadFile(args)
	require.NoError(t, err)
	assert.Equal(t, strings.Join(nvidiaSMIArgs, "\n")+"\n", string(b))
}

func TestDetectGPUsWithoutCUDALibs(t *testing.T) {
	smi := catFixture(t, "nvidia-smi/one-gpu.txt", filepath.Join(t.TempDir(), "args"))
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi), WithCUDALibCheck(func() bool { return false }))
	require.NoError(t, err)
	assert.Equal(t, []api.GPU{rtx4090}, caps.GPUs)
	assert.Equal(t, []string{BackendCPU}, caps.Backends, "a GPU without CUDA libraries cannot run cuda workers")
}

func TestDetectZeroGPUs(t *testing.T) {
	smi := catFixture(t, "nvidia-smi/empty.txt", filepath.Join(t.TempDir(), "args"))
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi), WithCUDALibCheck(alwaysCUDA))
	require.NoError(t, err)
	assert.Empty(t, caps.GPUs)
	assert.Empty(t, caps.GPUError)
	assert.Equal(t, []string{BackendCPU}, caps.Backends)
}

func TestDetectDriverFailure(t *testing.T) {
	abs, err := filepath.Abs("testdata/nvidia-smi/driver-error.txt")
	require.NoError(t, err)
	smi := fakeSMI(t, "cat '"+abs+"'\nexit 9")

	checked := false
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi),
		WithCUDALibCheck(func() bool { checked = true; return true }))
	require.NoError(t, err, "a broken driver must not stop a hive from starting")
	assert.Empty(t, caps.GPUs)
	assert.Equal(t, []string{BackendCPU}, caps.Backends)
	assert.False(t, checked, "no GPUs, so the CUDA libraries do not matter")
	assert.Contains(t, caps.GPUError, "exit status 9")
	assert.Contains(t, caps.GPUError, "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
	assert.LessOrEqual(t, len(caps.GPUError), 300, "GPUError travels in every heartbeat")
	assert.NotContains(t, caps.GPUError, "\n")
}

func TestDetectFailureReasonFromStderr(t *testing.T) {
	smi := fakeSMI(t, "echo 'Failed to initialize NVML: Driver/library version mismatch' >&2\nexit 18")
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi))
	require.NoError(t, err)
	assert.Equal(t, "nvidia-smi: exit status 18: Failed to initialize NVML: Driver/library version mismatch", caps.GPUError)
}

func TestDetectGarbageOutput(t *testing.T) {
	smi := fakeSMI(t, "echo 'No devices were found'")
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi))
	require.NoError(t, err)
	assert.Empty(t, caps.GPUs)
	assert.Contains(t, caps.GPUError, "No devices were found")
}

func TestDetectNoNvidiaSMI(t *testing.T) {
	t.Run("not on PATH", func(t *testing.T) {
		t.Setenv("PATH", t.TempDir())
		caps, err := Detect(context.Background(), WithCUDALibCheck(alwaysCUDA))
		require.NoError(t, err)
		assert.Empty(t, caps.GPUs)
		assert.Empty(t, caps.GPUError, "no nvidia-smi is a CPU-only machine, not a failure")
		assert.Equal(t, []string{BackendCPU}, caps.Backends)
		assert.Positive(t, caps.RAMTotal)
	})
	t.Run("explicit path missing", func(t *testing.T) {
		caps, err := Detect(context.Background(), WithNvidiaSMI(filepath.Join(t.TempDir(), "nope")))
		require.NoError(t, err)
		assert.Empty(t, caps.GPUs)
		assert.Empty(t, caps.GPUError)
	})
	t.Run("found on PATH at call time", func(t *testing.T) {
		smi := catFixture(t, "nvidia-smi/one-gpu.txt", filepath.Join(t.TempDir(), "args"))
		// The fake needs cat and printf from the rest of PATH.
		t.Setenv("PATH", filepath.Dir(smi)+string(os.PathListSeparator)+os.Getenv("PATH"))
		caps, err := Detect(context.Background())
		require.NoError(t, err)
		assert.Equal(t, []api.GPU{rtx4090}, caps.GPUs)
		assert.Empty(t, caps.GPUError)
	})
}

func TestDetectTimeout(t *testing.T) {
	smi := fakeSMI(t, "sleep 30")
	const timeout = 300 * time.Millisecond

	start := time.Now()
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi), WithTimeout(timeout))
	elapsed := time.Since(start)

	require.NoError(t, err)
	assert.Less(t, elapsed, timeout+2*time.Second, "Detect must not wait for a hung nvidia-smi")
	assert.Empty(t, caps.GPUs)
	assert.Contains(t, caps.GPUError, "timed out")
	assert.Contains(t, caps.GPUError, timeout.String())
}

func TestDetectTimeoutGrandchildHoldsPipe(t *testing.T) {
	// A backgrounded grandchild keeps stdout open after the script is
	// killed; the process-group kill (and WaitDelay) must still return.
	smi := fakeSMI(t, "sleep 30 &\nwait")
	start := time.Now()
	caps, err := Detect(context.Background(), WithNvidiaSMI(smi), WithTimeout(200*time.Millisecond))
	require.NoError(t, err)
	assert.Less(t, time.Since(start), 2*time.Second)
	assert.Contains(t, caps.GPUError, "timed out")
}

func TestDetectCallerCancel(t *testing.T) {
	t.Run("before", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := Detect(ctx)
		assert.ErrorIs(t, err, context.Canceled)
	})
	t.Run("during nvidia-smi", func(t *testing.T) {
		smi := fakeSMI(t, "sleep 30")
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := Detect(ctx, WithNvidiaSMI(smi), WithTimeout(10*time.Second))
		assert.ErrorIs(t, err, context.DeadlineExceeded, "the caller's deadline is the caller's error, not a GPU problem")
		assert.Less(t, time.Since(start), 2*time.Second)
	})
}

func TestGPUFree(t *testing.T) {
	t.Run("two GPUs", func(t *testing.T) {
		smi := catFixture(t, "nvidia-smi/two-gpus.txt", filepath.Join(t.TempDir(), "args"))
		gpus, err := GPUFree(context.Background(), WithNvidiaSMI(smi))
		require.NoError(t, err)
		assert.Equal(t, []api.GPU{rtx4090, h100}, gpus)
	})
	t.Run("missing", func(t *testing.T) {
		gpus, err := GPUFree(context.Background(), WithNvidiaSMI(filepath.Join(t.TempDir(), "nope")))
		assert.NoError(t, err)
		assert.Nil(t, gpus)
	})
	t.Run("failing", func(t *testing.T) {
		smi := fakeSMI(t, "echo 'NVIDIA-SMI has failed'\nexit 9")
		gpus, err := GPUFree(context.Background(), WithNvidiaSMI(smi))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "exit status 9")
		assert.Nil(t, gpus)
	})
	t.Run("timeout", func(t *testing.T) {
		smi := fakeSMI(t, "sleep 30")
		_, err := GPUFree(context.Background(), WithNvidiaSMI(smi), WithTimeout(100*time.Millisecond))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "timed out")
	})
}

func TestFreeMemory(t *testing.T) {
	free, err := FreeMemory(context.Background())
	require.NoError(t, err)
	assert.Positive(t, free)

	caps, err := Detect(context.Background(), WithNvidiaSMI(filepath.Join(t.TempDir(), "nope")))
	require.NoError(t, err)
	assert.LessOrEqual(t, free, caps.RAMTotal)
}

func TestFreeMemoryFixtures(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the /proc/meminfo fast path is Linux only")
	}
	old := procMeminfo
	t.Cleanup(func() { procMeminfo = old })

	procMeminfo = "testdata/meminfo.txt"
	free, err := FreeMemory(context.Background())
	require.NoError(t, err)
	assert.Equal(t, uint64(41234568*1024), free)

	// Without MemAvailable, fall back to gopsutil's estimate of the real
	// machine rather than fail.
	procMeminfo = "testdata/meminfo-old.txt"
	free, err = FreeMemory(context.Background())
	require.NoError(t, err)
	assert.Positive(t, free)

	procMeminfo = filepath.Join(t.TempDir(), "missing")
	free, err = FreeMemory(context.Background())
	require.NoError(t, err)
	assert.Positive(t, free)
}

func TestParseMemAvailable(t *testing.T) {
	v, ok, err := parseMemAvailable(strings.NewReader("MemAvailable:   bogus kB\n"))
	assert.Error(t, err)
	assert.False(t, ok)
	assert.Zero(t, v)

	v, ok, err = parseMemAvailable(strings.NewReader("MemTotal: 1 kB\nMemAvailable: 2 kB\n"))
	require.NoError(t, err)
	assert.True(t, ok)
	assert.Equal(t, uint64(2048), v)
}

// FreeMemory runs every heartbeat; keep an eye on its cost.
func BenchmarkFreeMemory(b *testing.B) {
	ctx := context.Background()
	for b.Loop() {
		if _, err := FreeMemory(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

func TestParseCPUInfo(t *testing.T) {
	assert.Equal(t, api.CPU{Model: "AMD Ryzen 9 7950X 16-Core Processor", Cores: 2, Threads: 4},
		parseCPUInfo(fixture(t, "cpuinfo-x86.txt")))
	// No core ids on this ARM board: cores unknown here, detectCPU fills
	// them from the thread count.
	assert.Equal(t, api.CPU{Model: "Raspberry Pi 4 Model B Rev 1.1", Cores: 0, Threads: 2},
		parseCPUInfo(fixture(t, "cpuinfo-arm.txt")))
	assert.Equal(t, api.CPU{}, parseCPUInfo(""))
}

func TestDefaultCUDALibCheck(t *testing.T) {
	t.Run("unset", func(t *testing.T) {
		t.Setenv(EnvLlamaLib, "")
		assert.False(t, DefaultCUDALibCheck())
	})
	t.Run("cpu build only", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "libggml-cpu.so"), nil, 0o644))
		require.NoError(t, os.Mkdir(filepath.Join(dir, "cuda"), 0o755)) // a directory is not a library
		t.Setenv(EnvLlamaLib, dir)
		assert.False(t, DefaultCUDALibCheck())
	})
	t.Run("cuda build", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "libggml-cuda.so"), nil, 0o644))
		t.Setenv(EnvLlamaLib, dir)
		assert.True(t, DefaultCUDALibCheck())
	})
	t.Run("default used by Detect", func(t *testing.T) {
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "libggml-cuda.so"), nil, 0o644))
		t.Setenv(EnvLlamaLib, dir)
		smi := catFixture(t, "nvidia-smi/one-gpu.txt", filepath.Join(t.TempDir(), "args"))
		caps, err := Detect(context.Background(), WithNvidiaSMI(smi))
		require.NoError(t, err)
		assert.Equal(t, []string{BackendCPU, BackendCUDA}, caps.Backends)
	})
}

func TestOptionsDefaults(t *testing.T) {
	c := newConfig([]Option{WithTimeout(0), WithTimeout(-time.Second), WithCUDALibCheck(nil), nil})
	assert.Equal(t, DefaultTimeout, c.timeout)
	assert.NotNil(t, c.cudaLibCheck)
	assert.Empty(t, c.nvidiaSMI)
}

func TestTruncate(t *testing.T) {
	long := strings.Repeat("é", 300)
	got := truncate(long)
	assert.LessOrEqual(t, len(got), maxReasonLen+len("..."))
	assert.True(t, strings.HasSuffix(got, "..."))
	assert.Equal(t, "short", truncate("short"))
}

// The e2e fake must stay in the exact format this package parses.
func TestE2EFakeNvidiaSMI(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("bash not available")
	}
	path, err := filepath.Abs("../../e2e/testdata/fake-nvidia-smi")
	require.NoError(t, err)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.NotZero(t, fi.Mode()&0o111, "fake-nvidia-smi must be executable")

	gpus, err := GPUFree(context.Background(), WithNvidiaSMI(path))
	require.NoError(t, err)
	require.Len(t, gpus, 2)
	for i, g := range gpus {
		assert.Equal(t, i, g.Index)
		assert.NotEmpty(t, g.Name)
		assert.Greater(t, g.VRAMTotal, uint64(gib))
		assert.LessOrEqual(t, g.VRAMFree, g.VRAMTotal)
	}

	// Arguments must not matter to it.
	out, err := exec.Command(path, "-L").Output()
	require.NoError(t, err)
	again, err := ParseNvidiaSMI(string(out))
	require.NoError(t, err)
	assert.Equal(t, gpus, again)
}
