package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// machine is where the numbers come from.
type machine struct {
	CPUModel string
	Cores    int
	RAM      uint64
	Kernel   string
	Go       string
	Deps     map[string]string
	Llama    string
	Date     time.Time
}

func describeMachine(libDir string) machine {
	m := machine{Cores: runtime.NumCPU(), Go: runtime.Version(), Deps: map[string]string{}, Date: time.Now().UTC()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				if f := strings.Fields(v); len(f) > 0 {
					kb, _ := strconv.ParseUint(f[0], 10, 64)
					m.RAM = kb << 10
				}
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			switch d.Path {
			case "github.com/nats-io/nats-server/v2", "github.com/nats-io/nats.go", "github.com/hybridgroup/yzma":
				m.Deps[d.Path] = d.Version
			}
		}
	}
	m.Llama = "not found"
	if libDir != "" {
		pkg, _ := os.ReadFile(filepath.Join(libDir, ".package"))
		m.Llama = strings.TrimSpace(string(pkg))
		var meta struct {
			BuildOptions struct {
				LlamaCpp struct {
					Repo    string `json:"repo"`
					Release string `json:"release"`
				} `json:"llamaCpp"`
			} `json:"buildOptions"`
		}
		if b, err := os.ReadFile(filepath.Join(libDir, "_nlcBuildMetadata.json")); err == nil && json.Unmarshal(b, &meta) == nil {
			m.Llama += fmt.Sprintf(" (%s release %s, CPU build)", meta.BuildOptions.LlamaCpp.Repo, meta.BuildOptions.LlamaCpp.Release)
		}
	}
	return m
}

func (m machine) markdown() string {
	var b strings.Builder
	b.WriteString("## Machine\n\n| | |\n|---|---|\n")
	fmt.Fprintf(&b, "| CPU | %s, %d logical cores |\n", m.CPUModel, m.Cores)
	fmt.Fprintf(&b, "| RAM | %.1f GiB |\n", float64(m.RAM)/(1<<30))
	fmt.Fprintf(&b, "| OS | Linux %s, %s/%s |\n", m.Kernel, runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&b, "| Go | %s |\n", m.Go)
	fmt.Fprintf(&b, "| nats-server | %s |\n", orUnknown(m.Deps["github.com/nats-io/nats-server/v2"]))
	fmt.Fprintf(&b, "| nats.go | %s |\n", orUnknown(m.Deps["github.com/nats-io/nats.go"]))
	fmt.Fprintf(&b, "| yzma | %s |\n", orUnknown(m.Deps["github.com/hybridgroup/yzma"]))
	fmt.Fprintf(&b, "| llama.cpp | %s |\n", m.Llama)
	fmt.Fprintf(&b, "| date | %s |\n", m.Date.Format("2006-01-02 15:04 UTC"))
	b.WriteString("\nEvery llama.cpp context the bench makes itself uses 1 thread, and so do the workers' for the models under 256 MiB (a worker runs such a model as one single-thread context per core), except where a table says otherwise: table 8's a way decodes with every core, and its c way on the 412 M model is the worker's choice for a big model, one context of every core.\n")
	return b.String()
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}
