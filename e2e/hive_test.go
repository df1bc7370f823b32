package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/internal/testutil/sshd"
	"github.com/stretchr/testify/require"
)

// withFakeGPUs puts a fake nvidia-smi reporting two GPUs first on PATH, so
// GPU fields flow from a real hive all the way to `rbee hive get`.
func (c *cluster) withFakeGPUs() *cluster {
	dir := c.t.TempDir()
	src := filepath.Join(binaries.Root(c.t), "e2e", "testdata", "fake-nvidia-smi")
	require.NoError(c.t, os.Symlink(src, filepath.Join(dir, "nvidia-smi")))
	for i, kv := range c.env {
		if strings.HasPrefix(kv, "PATH=") {
			c.env[i] = "PATH=" + dir + string(os.PathListSeparator) + kv[len("PATH="):]
		}
	}
	return c
}

func (c *cluster) setEnv(kv ...string) *cluster {
	c.env = append(c.env, kv...)
	return c
}

// oneSlot makes the workers the queen or the test starts serve one request
// at a time (by default a worker fits its slots to free memory), for tests
// about what waits in the queue.
func (c *cluster) oneSlot() *cluster {
	c.slots = 1
	return c.setEnv("RBEE_WORKER_SLOTS=1")
}

func (c *cluster) hiveView(name string) api.HiveView {
	c.t.Helper()
	r := c.mustRbee("--json", "hive", "get", name)
	var v api.HiveView
	require.NoError(c.t, json.Unmarshal([]byte(r.stdout), &v), r.stdout)
	return v
}

func TestLocalHiveStartStatusStop(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons().withFakeGPUs()
	c.startQueen()
	c.mustRbee("hive", "add", "local")
	r := c.mustRbee("hive", "start", "local")
	require.Contains(t, r.stderr, "started rbee-hive local locally")
	require.Contains(t, r.stderr, "hive local is online")

	r = c.mustRbee("hive", "get", "local")
	require.Contains(t, r.stdout, "online")
	require.Contains(t, r.stdout, "NVIDIA H100 80GB HBM3", "GPU fields flow from nvidia-smi to rbee hive get")
	v := c.hiveView("local")
	require.Len(t, v.Status.Capabilities.GPUs, 2)
	require.Contains(t, v.Status.Capabilities.Backends, "cpu")

	r = c.mustRbee("hive", "refresh", "local")
	require.Contains(t, r.stdout, "cuda:1")

	r = c.mustRbee("hive", "stop", "local")
	require.Contains(t, r.stderr, "asking hive local to shut down")
	require.Contains(t, r.stderr, "hive local stopped")
	require.Equal(t, api.HiveOffline, c.hiveView("local").State)

	r = c.mustRbee("hive", "stop", "local")
	require.Contains(t, r.stderr, "not running")
}

func TestKilledHiveIsLostWithinThreeBeats(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.startQueen()
	c.mustRbee("hive", "add", "local")
	c.mustRbee("hive", "start", "local")
	pid := c.hiveView("local").Status.PID
	require.NotZero(t, pid)

	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	killed := time.Now()
	// Default heartbeat 1 s, TTL 3 beats; JetStream's TTL granularity adds
	// up to a second.
	bound := 3*time.Second + time.Second
	eventually(t, bound+2*time.Second, func() bool { return c.hiveView("local").State == api.HiveLost },
		"killed hive not reported lost")
	took := time.Since(killed)
	t.Logf("kill -9 of the hive seen as lost after %s", took)
	require.LessOrEqual(t, took, bound+time.Second, "lost later than three beats plus granularity (and CLI polling)")
	r := c.mustRbee("hive", "list")
	require.Contains(t, r.stdout, "lost")

	// It comes back: start it again and it is online.
	c.mustRbee("hive", "start", "local")
	require.Equal(t, api.HiveOnline, c.hiveView("local").State)
}

func TestHiveStopFallsBackToSIGTERMThenSIGKILL(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons().setEnv("RBEE_HIVE_ARGS=--ignore-shutdown", "RBEE_HIVE_STOP_GRACE=1s")
	c.startQueen()
	c.mustRbee("hive", "add", "stubborn")
	c.mustRbee("hive", "start", "stubborn")
	pid := c.hiveView("stubborn").Status.PID
	r := c.mustRbee("hive", "stop", "stubborn")
	require.Contains(t, r.stderr, "sending SIGTERM")
	require.Contains(t, r.stderr, "sending SIGKILL")
	require.Contains(t, r.stderr, "stopped by SIGKILL")
	require.NoError(t, waitProcessGone(pid, 5*time.Second))
}

func waitProcessGone(pid int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if err := syscall.Kill(pid, 0); err != nil {
			return nil
		}
		if b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat")); err == nil && strings.Contains(string(b), ") Z ") {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return os.ErrDeadlineExceeded
}

func TestHiveThatCannotStartFailsWithItsLogTail(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons().setEnv("RBEE_HIVE_ARGS=--heartbeat=bogus", "RBEE_HIVE_START_TIMEOUT=5s")
	c.startQueen()
	c.mustRbee("hive", "add", "broken")
	r := c.rbee("hive", "start", "broken")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "last lines of its log")
	require.Contains(t, r.stderr, "bogus")
}

func TestRemoteHiveOverRealSSH(t *testing.T) {
	t.Parallel()
	srv := sshd.Start(t)
	c := newCluster(t).withDaemons()
	knownHosts := filepath.Join(t.TempDir(), "known_hosts")
	require.NoError(t, os.WriteFile(knownHosts, nil, 0o600))
	c.setEnv("RBEE_SSH_KNOWN_HOSTS="+knownHosts, "RBEE_SSH_CONFIG=/dev/null")
	c.startQueen()
	prefix := filepath.Join(c.home, "remote")
	target := srv.User + "@" + srv.Addr()
	c.mustRbee("hive", "add", "gpu1", "--ssh", target, "--identity", srv.UserKeyPath, "--prefix", prefix)

	// An unknown host key is refused, naming the fix.
	r := c.rbee("hive", "install", "gpu1")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "rbee hive trust gpu1")
	r = c.mustRbee("hive", "trust", "gpu1")
	require.Contains(t, r.stdout, "SHA256:")

	// Starting before installing says what to do.
	r = c.rbee("hive", "start", "gpu1")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "rbee hive install gpu1")

	// Each file is one SSH command, and each command runs the remote
	// user's ~/.bashrc first (0.6 s on the CI image, a pyenv init): the
	// 24 files take 16 s on an idle machine, and more than the keeper's
	// usual minute was seen under the whole suite's load.
	r = c.rbeeWithin(3*time.Minute, "hive", "install", "gpu1")
	require.Equal(t, 0, r.code, "rbee hive install gpu1\nstderr:\n%s", r.stderr)
	require.Contains(t, r.stderr, "sha256 verified")
	for _, name := range []string{"rbee-hive", "llm-worker-rbee"} {
		st, err := os.Stat(filepath.Join(prefix, "bin", name))
		require.NoError(t, err)
		require.NotZero(t, st.Mode()&0o100, "%s is executable", name)
	}

	r = c.mustRbee("hive", "start", "gpu1")
	require.Contains(t, r.stderr, "over SSH")
	require.Contains(t, r.stderr, "hive gpu1 is online")
	require.Equal(t, api.HiveOnline, c.hiveView("gpu1").State)
	// Its key travelled over SSH into a file only its user may read, and
	// the command that started it names the file, not the key.
	remoteKey := filepath.Join(prefix, "share", "rbee", "creds", "hive.nk")
	st, err := os.Stat(remoteKey)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	require.Equal(t, seedOf(t, c.keyFile(auth.HiveName("gpu1"))), seedOf(t, remoteKey))

	r = c.mustRbee("hive", "stop", "gpu1")
	require.Contains(t, r.stderr, "hive gpu1 stopped")
	r = c.mustRbee("hive", "uninstall", "gpu1")
	_, err = os.Stat(filepath.Join(prefix, "bin", "rbee-hive"))
	require.True(t, os.IsNotExist(err))
	_, err = os.Stat(remoteKey)
	require.True(t, os.IsNotExist(err), "uninstall leaves no key behind")
}

// A worker is owned by its hive: when the hive is killed outright, its
// workers go too instead of serving on unowned, and the queen sees them go.
func TestWorkersDieWithTheirKilledHive(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	ws := c.readyWorkers("tiny", 1)
	hive := c.hiveView("local").Status.PID
	require.NoError(t, syscall.Kill(hive, syscall.SIGKILL))
	require.NoError(t, waitProcessGone(ws[0].PID, 10*time.Second), "worker outlived its hive")
	eventually(t, 10*time.Second, func() bool { return len(c.workers()) == 0 }, "the queen still lists the worker")
}
