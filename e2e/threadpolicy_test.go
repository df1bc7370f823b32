package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Every rbee program marks itself batch work first thing
// (internal/threadpolicy), whoever starts it: a queen under systemd, a hive over
// SSH or by hand, not only what an rbee program spawns (which inherits
// it). Each is started here by the test, an ordinary process, against a
// bus that accepts connections and never answers, and its threads are
// read while it waits for the bus.
func TestEveryProgramRunsAsBatchWork(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	accepted := make(chan net.Conn, 16)
	go func() {
		defer close(accepted)
		for {
			conn, err := silent.Accept()
			if err != nil {
				return
			}
			accepted <- conn
		}
	}()
	t.Cleanup(func() {
		_ = silent.Close()
		for conn := range accepted {
			_ = conn.Close()
		}
	})
	url := "nats://" + silent.Addr().String()
	dir := t.TempDir()
	for _, args := range [][]string{
		{"queen-rbee", "--data", filepath.Join(dir, "queen"), "--nats", url, "--gateway", "off"},
		{"rbee-hive", "--id", "h", "--nats", url, "--data", filepath.Join(dir, "hive")},
		{"llm-worker-rbee", "--id", "w", "--hive", "h", "--model", "m", "--model-path", filepath.Join(dir, "m.gguf"), "--nats", url},
		{"rbee", "status"},
	} {
		cmd := exec.Command(filepath.Join(c.bin, args[0]), args[1:]...)
		cmd.Env = append(os.Environ(), "RBEE_HOME="+filepath.Join(dir, "keeper"), "RBEE_NATS_URL="+url)
		require.NoError(t, cmd.Start(), args[0])
		exited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(exited) }()
		// Killed and reaped however the check below ends, a failure too.
		stop := func() { _ = cmd.Process.Kill(); <-exited }
		t.Cleanup(stop)
		var batch, ordinary int
		deadline := time.Now().Add(10 * time.Second)
		for {
			select {
			case <-exited:
				t.Fatalf("%s ended before its threads were read (batch %d, ordinary %d)", args[0], batch, ordinary)
			default:
			}
			batch, ordinary = threadPolicies(t, cmd.Process.Pid)
			if batch > 0 && ordinary == 0 {
				break
			}
			require.True(t, time.Now().Before(deadline), "%s: %d threads batch, %d ordinary", args[0], batch, ordinary)
			time.Sleep(time.Millisecond)
		}
		stop()
	}
}
