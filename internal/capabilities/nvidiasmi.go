package capabilities

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os/exec"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/rbee-dev/rbee/api"
)

// nvidiaSMIArgs is the query Detect and GPUFree run. The field order is the
// contract of ParseNvidiaSMI.
var nvidiaSMIArgs = []string{
	"--query-gpu=index,name,memory.total,memory.free,compute_cap,driver_version",
	"--format=csv,noheader,nounits",
}

const (
	nvidiaSMIFields = 6
	mib             = 1 << 20
	// maxReasonLen keeps GPUError short: it travels in every heartbeat.
	maxReasonLen = 200
	// waitDelay bounds how long we wait for nvidia-smi's output pipes to
	// close after killing it, in case a grandchild kept them open.
	waitDelay = 500 * time.Millisecond
)

// errNoNvidiaSMI means the machine has no nvidia-smi, which is a normal
// CPU-only machine rather than a failure.
var errNoNvidiaSMI = errors.New("nvidia-smi not found")

// ParseNvidiaSMI parses the output of
//
//	nvidia-smi --query-gpu=index,name,memory.total,memory.free,compute_cap,driver_version --format=csv,noheader,nounits
//
// into one api.GPU per non-blank line, memory converted from MiB to bytes.
// Fields reported as unavailable ("[N/A]", "[Not Supported]", "N/A", ...)
// are left zero or empty, because older drivers and some GPUs (e.g. MIG or
// vGPU setups) do not report every field and the rest is still useful. The
// index is the exception: without it a GPU cannot be addressed, so a missing
// index is an error. A line that does not parse is an error naming the line
// number and its text; empty output means zero GPUs.
func ParseNvidiaSMI(out string) ([]api.GPU, error) {
	var gpus []api.GPU
	for n, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line) // also drops the \r of CRLF output
		if line == "" {
			continue
		}
		gpu, err := parseGPULine(line)
		if err != nil {
			return nil, fmt.Errorf("nvidia-smi output line %d %q: %w", n+1, line, err)
		}
		gpus = append(gpus, gpu)
	}
	return gpus, nil
}

func parseGPULine(line string) (api.GPU, error) {
	f := strings.Split(line, ",")
	if len(f) < nvidiaSMIFields {
		return api.GPU{}, fmt.Errorf("want %d comma-separated fields, got %d", nvidiaSMIFields, len(f))
	}
	for i := range f {
		f[i] = strings.TrimSpace(f[i])
	}
	// nvidia-smi does not quote fields, so a comma inside a GPU name would
	// split it; the fields around the name are fixed, so rejoin the middle.
	last := len(f) - 4
	name := strings.Join(f[1:last], ", ")
	total, free, cc, driver := f[last], f[last+1], f[last+2], f[last+3]

	var g api.GPU
	if unavailable(f[0]) {
		return api.GPU{}, fmt.Errorf("index %q: not available", f[0])
	}
	idx, err := strconv.Atoi(f[0])
	if err != nil || idx < 0 {
		return api.GPU{}, fmt.Errorf("index %q: not a non-negative integer", f[0])
	}
	g.Index = idx
	if !unavailable(name) {
		g.Name = name
	}
	if g.VRAMTotal, err = parseMiB(total); err != nil {
		return api.GPU{}, fmt.Errorf("memory.total: %w", err)
	}
	if g.VRAMFree, err = parseMiB(free); err != nil {
		return api.GPU{}, fmt.Errorf("memory.free: %w", err)
	}
	if !unavailable(cc) {
		g.ComputeCapability = cc
	}
	if !unavailable(driver) {
		g.Driver = driver
	}
	return g, nil
}

// unavailable reports nvidia-smi's placeholders for values it cannot read:
// "[N/A]", "[Not Supported]", "[Unknown Error]", "[Insufficient
// Permissions]", and the bare "N/A" some versions print.
func unavailable(s string) bool {
	return s == "" || strings.EqualFold(s, "N/A") ||
		(strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]"))
}

func parseMiB(s string) (uint64, error) {
	if unavailable(s) {
		return 0, nil
	}
	// Defensive: if "nounits" were ever ignored, accept a trailing "MiB".
	s = strings.TrimSpace(strings.TrimSuffix(s, "MiB"))
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a whole number of MiB", s)
	}
	if v > ^uint64(0)/mib {
		return 0, fmt.Errorf("%q MiB overflows", s)
	}
	return v * mib, nil
}

// queryGPUs runs nvidia-smi and parses its output. It returns errNoNvidiaSMI
// when there is no nvidia-smi, ctx.Err() when the caller's ctx ended, and
// otherwise an error whose text is short enough to be a GPUError.
func queryGPUs(ctx context.Context, c config) ([]api.GPU, error) {
	path := c.nvidiaSMI
	if path == "" {
		// Looked up per call, not at init, so a driver installed while the
		// hive runs is picked up by the next GPUFree.
		p, err := exec.LookPath("nvidia-smi")
		if err != nil {
			return nil, errNoNvidiaSMI
		}
		path = p
	}

	runCtx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	cmd := exec.CommandContext(runCtx, path, nvidiaSMIArgs...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Kill the whole process group on timeout: a wrapper script's children
	// would otherwise outlive it and hold the output pipes open.
	killProcessGroupOnCancel(cmd)
	cmd.WaitDelay = waitDelay

	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			// The caller gave up; that is not a GPU problem.
			return nil, ctx.Err()
		}
		if runCtx.Err() != nil {
			return nil, fmt.Errorf("nvidia-smi timed out after %s", c.timeout)
		}
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, exec.ErrNotFound) {
			return nil, errNoNvidiaSMI
		}
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			// nvidia-smi prints its failure reason ("NVIDIA-SMI has failed
			// because it couldn't communicate with the NVIDIA driver...") on
			// stdout, so look at both streams. exitErr's text is "exit
			// status N", or "signal: ..." if it crashed.
			if reason := firstLine(stdout.String(), stderr.String()); reason != "" {
				return nil, fmt.Errorf("nvidia-smi: %v: %s", exitErr, reason)
			}
			return nil, fmt.Errorf("nvidia-smi: %v", exitErr)
		}
		return nil, shorten(fmt.Sprintf("nvidia-smi: %v", err))
	}
	gpus, err := ParseNvidiaSMI(stdout.String())
	if err != nil {
		return nil, shorten(err.Error())
	}
	return gpus, nil
}

// firstLine returns the first non-blank line of the given texts, shortened.
func firstLine(texts ...string) string {
	for _, t := range texts {
		for _, l := range strings.Split(t, "\n") {
			if l = strings.TrimSpace(l); l != "" {
				return truncate(l)
			}
		}
	}
	return ""
}

func shorten(s string) error { return errors.New(truncate(s)) }

func truncate(s string) string {
	if len(s) <= maxReasonLen {
		return s
	}
	s = s[:maxReasonLen]
	for !utf8.ValidString(s) { // do not cut a rune in half
		s = s[:len(s)-1]
	}
	return s + "..."
}
