package capabilities

import (
	"os"
	"path/filepath"
	"time"
)

// DefaultTimeout bounds one nvidia-smi run. A wedged driver can make
// nvidia-smi hang for minutes; the hive must not wait on it to start.
const DefaultTimeout = 5 * time.Second

// EnvLlamaLib names the environment variable holding the directory of the
// llama.cpp shared libraries the hive's workers load. The default CUDA check
// looks there, because a GPU is useless to us without a CUDA build of ggml.
const EnvLlamaLib = "RBEE_LLAMA_LIB"

// Option changes how Detect and GPUFree probe the machine.
type Option func(*config)

type config struct {
	nvidiaSMI    string // empty: look up "nvidia-smi" on PATH at call time
	timeout      time.Duration
	cudaLibCheck func() bool
}

func newConfig(opts []Option) config {
	c := config{timeout: DefaultTimeout, cudaLibCheck: DefaultCUDALibCheck}
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	return c
}

// WithNvidiaSMI sets the nvidia-smi executable to run instead of looking it
// up on PATH. Tests point it at a fake script; operators can use it when
// the driver tools live outside PATH. A path that does not exist is treated
// like a machine without nvidia-smi (no GPUs, no GPUError). An empty path
// restores the PATH lookup.
func WithNvidiaSMI(path string) Option {
	return func(c *config) { c.nvidiaSMI = path }
}

// WithTimeout bounds each nvidia-smi run. d <= 0 keeps DefaultTimeout,
// because an unbounded run is exactly what the timeout exists to prevent.
func WithTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.timeout = d
		}
	}
}

// WithCUDALibCheck replaces the test for CUDA-capable llama libraries that
// decides whether the "cuda" backend is advertised. It is only consulted
// when at least one GPU was detected. nil keeps DefaultCUDALibCheck.
func WithCUDALibCheck(check func() bool) Option {
	return func(c *config) {
		if check != nil {
			c.cudaLibCheck = check
		}
	}
}

// DefaultCUDALibCheck reports whether the directory named by $RBEE_LLAMA_LIB
// holds a file whose name contains "cuda" (e.g. libggml-cuda.so). Without
// such a library a worker would fall back to CPU, so advertising "cuda"
// would make the scheduler place GPU work where it cannot run.
func DefaultCUDALibCheck() bool {
	dir := os.Getenv(EnvLlamaLib)
	if dir == "" {
		return false
	}
	matches, err := filepath.Glob(filepath.Join(dir, "*cuda*"))
	if err != nil {
		return false
	}
	for _, m := range matches {
		// Stat follows symlinks: libggml-cuda.so is often a link to a
		// versioned file, and a dangling link does not count.
		if fi, err := os.Stat(m); err == nil && fi.Mode().IsRegular() {
			return true
		}
	}
	return false
}
