package logging_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/internal/logging"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { os.Exit(binaries.Main(m)) }

// TestDaemonLogFile runs the real rbee-hive with its stderr appended to a
// file, the way the queen starts a local hive and a hive its workers, and
// checks that the file holds plain text whose durations carry their unit.
func TestDaemonLogFile(t *testing.T) {
	fix := busfix.Start(t)
	logPath := filepath.Join(t.TempDir(), "hive.log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	require.NoError(t, err)
	defer f.Close()
	cmd := exec.Command(binaries.Path(t, "rbee-hive"), "--id", "logs", "--nats", fix.URL,
		"--heartbeat", "1500ms", "--data", t.TempDir(), "--worker-bin", filepath.Join(t.TempDir(), "none"))
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), "TERM=xterm-256color") // colour is for terminals, not for what TERM says
	require.NoError(t, cmd.Start())
	var waitErr error
	done := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})

	// The hive is online once its registry entry appears; its log line
	// saying so is written before that.
	entries := watchHive(t, fix, "logs")
	select {
	case <-entries:
	case <-done:
		b, _ := os.ReadFile(logPath)
		t.Fatalf("rbee-hive exited early: %v\n%s", waitErr, b)
	case <-time.After(30 * time.Second):
		b, _ := os.ReadFile(logPath)
		t.Fatalf("rbee-hive did not come online within 30s\n%s", b)
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-done:
		require.NoError(t, waitErr, "rbee-hive should exit 0 on SIGTERM")
	case <-time.After(30 * time.Second):
		t.Fatal("rbee-hive did not stop within 30s of SIGTERM")
	}

	b, err := os.ReadFile(logPath)
	require.NoError(t, err)
	t.Logf("log:\n%s", b)
	require.NotContains(t, string(b), "\x1b", "a log file must hold no terminal escape codes")
	require.Contains(t, string(b), "hive online")
	require.Regexp(t, `heartbeat=1\.5s\b`, string(b), "durations carry their unit")
}

// TestDurationsCarryUnits checks both outputs of New: JSON lines in a log
// file and the console form.
func TestDurationsCarryUnits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "d.log")
	log, closeLog, err := logging.New("info", path, "test")
	require.NoError(t, err)
	log.Info().Dur("took", 4443381*time.Nanosecond).Dur("grace", 3*time.Second).Msg("done")
	closeLog()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Contains(t, string(b), `"took":"4.443381ms"`)
	require.Contains(t, string(b), `"grace":"3s"`)
	require.Contains(t, string(b), `"component":"test"`)

	var buf bytes.Buffer
	con := logging.Console(os.Stderr)
	con.Out = &buf
	con.NoColor = true
	_, err = con.Write(b)
	require.NoError(t, err)
	require.Contains(t, buf.String(), "took=4.443381ms")
	require.Contains(t, buf.String(), "grace=3s")
}

// TestNoColourOffTerminal checks the colour decision on a file and with
// NO_COLOR set.
func TestNoColourOffTerminal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	require.NoError(t, err)
	defer f.Close()
	require.False(t, logging.Colour(f), "a file is not a terminal")
	require.True(t, logging.Console(f).NoColor)
	t.Setenv("NO_COLOR", "1")
	require.False(t, logging.Colour(os.Stdin))
}

// watchHive fires once the hive's first registry entry is put.
func watchHive(t *testing.T, fix *busfix.Fixture, id string) <-chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	kv, err := fix.Bus.KV(ctx, fix.Bus.Space.HivesBucket())
	require.NoError(t, err)
	w, err := kv.Watch(ctx, id)
	require.NoError(t, err)
	t.Cleanup(func() { _ = w.Stop() })
	online := make(chan struct{})
	go func() {
		for e := range w.Updates() {
			if e != nil && e.Operation() == jetstream.KeyValuePut {
				close(online)
				return
			}
		}
	}()
	return online
}
