// Package e2e runs the real rbee programs as subprocesses against each
// other: the keeper, the queen with its embedded bus, hives and workers.
package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/proc"
	"github.com/rbee-dev/rbee/internal/testutil/binaries"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// cluster is one isolated rbee installation: its own home, bus port and
// gateway port, so tests run in parallel without meeting.
type cluster struct {
	t       *testing.T
	bin     string
	home    string
	port    int
	gateway string
	env     []string
	// slots is the slot count of the workers the test starts (0: each
	// worker's own choice), set by oneSlot.
	slots int
	// natsURLs and caFile, when set, are the servers of an external NATS
	// cluster every program uses (see startNATSCluster) and its CA.
	natsURLs, caFile string
}

// freePort hands out a loopback port a test's program will listen on. A
// port the kernel picked for ":0" and this test then closed may be picked
// again at once by any other ":0" listener (a proxy, a client's socket),
// and the program meant to bind it later finds it taken; so ports come
// from below the kernel's ephemeral range (32768 and up), each handed out
// once per process and checked free.
func freePort(t *testing.T) int {
	t.Helper()
	for range portSpan {
		p := portBase + int(nextPort.Add(1))%portSpan
		if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
			l.Close()
			return p
		}
	}
	t.Fatal("no free loopback port below the ephemeral range")
	return 0
}

const (
	portBase = 20000
	portSpan = 12000
)

// freePortRun hands out n consecutive free loopback ports and returns the
// first, for a program that numbers its ports from a base (`rbee cluster
// config` puts nodes that share a host on consecutive ports).
func freePortRun(t *testing.T, n int) int {
	t.Helper()
	for range portSpan {
		first := portBase + (int(nextPort.Add(int32(n)))-n+1)%portSpan
		if first+n > portBase+portSpan {
			continue
		}
		free := true
		for p := first; p < first+n && free; p++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
			if err != nil {
				free = false
				continue
			}
			l.Close()
		}
		if free {
			return first
		}
	}
	t.Fatal("no run of free loopback ports below the ephemeral range")
	return 0
}

// nextPort starts at a place of its own per process, so two test
// processes rarely try the same ports.
var nextPort = func() *atomic.Int32 {
	var n atomic.Int32
	n.Store(int32(os.Getpid() * 131 % portSpan))
	return &n
}()

func newCluster(t *testing.T) *cluster {
	t.Helper()
	binaries.Path(t, "queen-rbee")
	c := &cluster{t: t, bin: filepath.Dir(binaries.Path(t, "rbee")), home: t.TempDir(), port: freePort(t)}
	c.gateway = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	// The environment holds none of the person's rbee settings
	// (binaries.Main removed them): only what each test sets.
	c.env = append(os.Environ(),
		"RBEE_HOME="+c.home,
		"RBEE_NATS_PORT="+strconv.Itoa(c.port),
		"RBEE_GATEWAY="+c.gateway,
		"PATH="+c.bin+string(os.PathListSeparator)+os.Getenv("PATH"),
	)
	t.Cleanup(c.stopAll)
	return c
}

// withDaemons builds the hive and worker programs too.
func (c *cluster) withDaemons() *cluster {
	binaries.Dir(c.t)
	return c
}

func (c *cluster) url() string {
	if c.natsURLs != "" {
		return c.natsURLs
	}
	return fmt.Sprintf("nats://127.0.0.1:%d", c.port)
}

type result struct {
	stdout, stderr string
	code           int
}

// rbee runs the keeper and waits for it, boundedly.
func (c *cluster) rbee(args ...string) result {
	c.t.Helper()
	return c.rbeeWithin(60*time.Second, args...)
}

func (c *cluster) rbeeWithin(d time.Duration, args ...string) result {
	c.t.Helper()
	return c.run(d, c.env, args...)
}

// rbeeEnv runs the keeper with extra environment variables (later ones win).
func (c *cluster) rbeeEnv(extra []string, args ...string) result {
	c.t.Helper()
	return c.run(60*time.Second, append(append([]string{}, c.env...), extra...), args...)
}

func (c *cluster) run(d time.Duration, env []string, args ...string) result {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.bin, "rbee"), args...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		c.t.Fatalf("rbee %v: %v", args, err)
	}
	if ctx.Err() != nil {
		c.t.Fatalf("rbee %v did not finish within %s; stderr:\n%s", args, d, errb.String())
	}
	return result{out.String(), errb.String(), code}
}

// mustRbee runs the keeper and requires exit 0.
func (c *cluster) mustRbee(args ...string) result {
	c.t.Helper()
	r := c.rbee(args...)
	require.Equal(c.t, 0, r.code, "rbee %v\nstdout:\n%s\nstderr:\n%s", args, r.stdout, r.stderr)
	return r
}

// startQueen starts the local queen in the background.
func (c *cluster) startQueen() {
	c.t.Helper()
	c.mustRbee("queen", "start")
}

// connect opens a bus connection to the cluster, for assertions. It acts
// as the queen (the test is the machine's owner, who can read the queen's
// key): assertions read and write what no client may.
func (c *cluster) connect() *bus.Bus {
	c.t.Helper()
	return c.connectAs(c.keyFile(auth.QueenName))
}

// keyFile is where the queen of this cluster keeps the named credential.
func (c *cluster) keyFile(name string) string {
	return filepath.Join(queen.CredentialsDir(c.home), name+".nk")
}

// connectAs opens a bus connection with the credentials in keyFile.
func (c *cluster) connectAs(keyFile string) *bus.Bus {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: c.url(), Name: "e2e", Credentials: bus.Credentials{KeyFile: keyFile, CAFile: c.caFile}, Reconnect: true, Log: zerolog.Nop()})
	require.NoError(c.t, err)
	c.t.Cleanup(func() { b.NC.Close() })
	return b
}

// stopAll stops the queen and every rbee process this cluster's home
// started, so nothing outlives the test.
func (c *cluster) stopAll() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(c.bin, "rbee"), "queen", "stop")
	cmd.Env = c.env
	_ = cmd.Run()
	// Hives and workers get the home in --data, keepers in RBEE_HOME.
	proc.KillMarked(c.home)
	if c.t.Failed() {
		c.logTails()
	}
}

// logTails logs the end of every program's log in the cluster's home (the
// queen's, its hives', their workers'): a failed test's only account of
// what the programs saw, since the home goes with the test.
func (c *cluster) logTails() {
	_ = filepath.WalkDir(c.home, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".log") {
			return nil
		}
		if b, err := os.ReadFile(path); err == nil {
			rel, _ := filepath.Rel(c.home, path)
			c.t.Logf("%s, its last lines:\n%s", rel, tail(string(b), 40))
		}
		return nil
	})
}

// eventually polls cond until it holds or d passes; for state that has no
// event to wait on from outside the process (a CLI's output).
func eventually(t *testing.T, d time.Duration, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf(msg, args...)
}
