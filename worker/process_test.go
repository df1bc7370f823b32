package worker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

type process struct {
	cmd    *exec.Cmd
	stderr *bytes.Buffer
	done   chan struct{}
}

func startProcess(t *testing.T, args ...string) *process {
	t.Helper()
	cmd := exec.Command(binaries.Path(t, "llm-worker-rbee"), args...)
	p := &process{cmd: cmd, stderr: &bytes.Buffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	require.NoError(t, cmd.Start())
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.done
	})
	return p
}

// exitCode waits for the process; stderr may be read after it.
func (p *process) exitCode(t *testing.T) int {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(30 * time.Second):
		t.Fatal("llm-worker-rbee did not exit")
		return -1
	}
}

func TestProcessServesAndExitsCleanlyOnSIGTERM(t *testing.T) {
	f := busfix.Start(t)
	path, _ := tiny(t)
	kv, err := f.Bus.KV(context.Background(), f.Bus.Space.WorkersBucket())
	require.NoError(t, err)
	watch, err := kv.Watch(context.Background(), subjects.WorkerKey("hive1", "wp"))
	require.NoError(t, err)
	defer func() { _ = watch.Stop() }()

	p := startProcess(t, "--nats", f.URL, "--id", "wp", "--hive", "hive1", "--model", modelID,
		"--model-path", path, "--ctx", "512", "--slots", "2", "--heartbeat", "500ms")

	// The entry says loading first, then ready.
	var states []string
	deadline := time.After(30 * time.Second)
	for len(states) == 0 || states[len(states)-1] != api.WorkerReady {
		select {
		case e := <-watch.Updates():
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var st api.WorkerStatus
			require.NoError(t, json.Unmarshal(e.Value(), &st))
			require.Equal(t, p.cmd.Process.Pid, st.PID)
			states = append(states, st.State)
		case <-p.done:
			t.Fatalf("worker exited: %s", p.stderr.String())
		case <-deadline:
			t.Fatalf("worker not ready; states %v", states)
		}
	}
	require.Equal(t, api.WorkerLoading, states[0], "registered before the load")

	id := submit(t, f, api.InferArgs{Prompt: prompt, Sampling: api.Sampling{MaxTokens: 16}})
	got := follow(t, f, id, nil)
	require.Equal(t, api.JobCompleted, got.final.State, got.final.Error)
	require.Equal(t, greedy(t, prompt, 16), got.text)
	require.Equal(t, "wp", got.final.Worker)

	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	require.Equal(t, 0, p.exitCode(t), p.stderr.String())
	_, err = entry(t, f, "wp")
	require.True(t, errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted), "entry gone: %v", err)
}

func TestProcessFailsClearly(t *testing.T) {
	f := busfix.Start(t)
	corrupt := filepath.Join(t.TempDir(), "corrupt.gguf")
	require.NoError(t, os.WriteFile(corrupt, []byte("this is not a model, just some bytes"), 0o644))
	path, _ := tiny(t)
	cases := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"corrupt model", []string{"--nats", f.URL, "--id", "wc", "--hive", "hive1", "--model", modelID, "--model-path", corrupt}, 1, "not a GGUF file"},
		{"missing model", []string{"--nats", f.URL, "--id", "wm", "--hive", "hive1", "--model", modelID, "--model-path", corrupt + ".missing"}, 1, "no such file"},
		{"bad id", []string{"--nats", f.URL, "--id", "w.1", "--hive", "hive1", "--model", modelID, "--model-path", path}, 2, "--id"},
		{"bad device", []string{"--nats", f.URL, "--id", "wd", "--hive", "hive1", "--model", modelID, "--model-path", path, "--device", "gpu"}, 2, "--device"},
		{"unreachable bus", []string{"--nats", "nats://127.0.0.1:1", "--id", "wu", "--hive", "hive1", "--model", modelID, "--model-path", path}, 3, "cannot connect"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := startProcess(t, c.args...)
			require.Equal(t, c.code, p.exitCode(t), p.stderr.String())
			require.Contains(t, p.stderr.String(), c.want)
		})
	}
	// A worker whose model did not load leaves no entry behind.
	_, err := entry(t, f, "wc")
	require.Error(t, err)
}
