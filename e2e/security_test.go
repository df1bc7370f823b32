package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// watched is a bus connection whose permission violations are collected.
type watched struct {
	*bus.Bus
	violations chan string
}

func (c *cluster) connectWatched(cr bus.Credentials) *watched {
	c.t.Helper()
	w := &watched{violations: make(chan string, 64)}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: c.url(), Name: "e2e-watched", Credentials: cr, Log: zerolog.Nop(),
		Extra: []nats.Option{nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				select {
				case w.violations <- err.Error():
				default:
				}
			}
		})}})
	require.NoError(c.t, err)
	c.t.Cleanup(b.NC.Close)
	w.Bus = b
	return w
}

// forge publishes data on subject and requires the server to refuse it.
func (w *watched) forge(t *testing.T, subject string, data []byte) {
	t.Helper()
	require.NoError(t, w.NC.Publish(subject, data))
	require.NoError(t, w.NC.Flush())
	deadline := time.After(5 * time.Second)
	for {
		select {
		case v := <-w.violations:
			if strings.Contains(v, `"`+subject+`"`) {
				return
			}
		case <-deadline:
			t.Fatalf("the bus let a client publish on %s", subject)
		}
	}
}

// A client, the credential a person's second machine holds, can follow a
// job but not forge its end, its failure or its text: the bus refuses each
// forgery, the keeper following the job never sees one, and the job
// completes with its own answer.
func TestAClientCannotForgeAnotherJobsEvents(t *testing.T) {
	t.Parallel()
	// Long enough to be running while the forger tries (a few hundred
	// milliseconds alone on this machine, longer while the suite runs),
	// light enough not to starve the suite's timing-bound tests.
	const prompt, tokens = "the queen and her hive", 300
	want := greedyOn(t, "large", prompt, tokens)
	c := newCluster(t).withDaemons()
	c.readyWorkers("large", 1)
	victim := c.start("infer", "-m", "large", "--temperature", "0", "--max-tokens", fmt.Sprint(tokens), prompt)
	eventually(t, 60*time.Second, func() bool { return victim.stdout.String() != "" }, "no token arrived")
	id := victim.jobID(t)

	forger := c.connectWatched(bus.Credentials{KeyFile: c.keyFile(auth.ClientName)})
	tap, err := forger.NC.SubscribeSync("rbee.job." + id + ".>")
	require.NoError(t, err)
	space := subjects.Default()
	state, _ := space.JobEvent(id, subjects.EventState)
	token, _ := space.JobEvent(id, subjects.EventToken)
	narration, _ := space.JobEvent(id, subjects.EventNarration)
	forger.forge(t, state, []byte(`{"state":"completed"}`))
	forger.forge(t, state, []byte(`{"state":"failed","error":"FORGED FAILURE"}`))
	forger.forge(t, token, []byte(`{"index":99999999,"text":" FORGED TEXT"}`))
	forger.forge(t, narration, []byte(`{"human":"FORGED NARRATION"}`))
	cancelSubject, _ := space.JobCancel(id)
	forger.forge(t, cancelSubject, nil)
	// Nor may it command what runs the job, or rewrite its record.
	w := c.workers()[0]
	drain, _ := space.Worker(w.Hive, w.ID, "drain")
	forger.forge(t, drain, []byte(`{}`))
	shutdown, _ := space.Hive("local", api.HiveEpShutdown)
	forger.forge(t, shutdown, []byte(`{}`))
	forger.forge(t, subjects.KVSubject(space.JobsBucket(), id), []byte(`{"state":"completed"}`))

	require.Equal(t, 0, victim.wait(t, 2*time.Minute), victim.stderr.String())
	require.Equal(t, want+"\n", victim.stdout.String(), "the job's own answer, and nothing forged")
	require.NotContains(t, victim.stderr.String(), "FORGED")
	require.Equal(t, api.JobCompleted, c.job(id).State)
	// What the client's own tap saw of the job is the job's, not the forgeries.
	for {
		msg, err := tap.NextMsg(100 * time.Millisecond)
		if err != nil {
			break
		}
		require.NotContains(t, string(msg.Data), "FORGED", "a forged event reached %s", msg.Subject)
	}
}

// A person's second machine gets a client credential with one command; a
// revoked one is refused at its next connect, as are a key the queen never
// issued and none at all, each with a message that names what was tried and
// how to get good credentials, and exit 3.
func TestCredentialsIssuedRevokedAndRefused(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.startQueen()
	laptop := filepath.Join(t.TempDir(), "laptop.nk")
	r := c.mustRbee("creds", "issue", "client", "laptop", "--out", laptop)
	require.Contains(t, r.stdout, laptop)
	fi, err := os.Stat(laptop)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	c.mustRbee("--nats", c.url(), "--creds", laptop, "status")
	r = c.mustRbee("creds", "list")
	for _, name := range []string{auth.QueenName, auth.ClientName, "laptop"} {
		require.Contains(t, r.stdout, name)
	}

	c.mustRbee("creds", "revoke", "laptop")
	r = c.rbee("--nats", c.url(), "--creds", laptop, "status")
	require.Equal(t, 3, r.code, r.stderr)
	require.Contains(t, r.stderr, laptop, "names the credentials tried")
	require.Contains(t, r.stderr, "rbee creds issue client", "says how to get good ones")
	require.NotContains(t, r.stdout+r.stderr, string(seedOf(t, laptop)))

	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	seed, _ := kp.Seed()
	stranger := filepath.Join(t.TempDir(), "stranger.nk")
	require.NoError(t, auth.WriteKeyFile(stranger, "stranger", auth.Principal{Role: auth.RoleClient}, seed, nil))
	r = c.rbee("--nats", c.url(), "--creds", stranger, "status")
	require.Equal(t, 3, r.code, r.stderr)
	require.Contains(t, r.stderr, stranger)

	// No credentials at all: a machine without the queen's data directory.
	r = c.rbeeEnv([]string{"RBEE_HOME=" + t.TempDir()}, "--nats", c.url(), "status")
	require.Equal(t, 3, r.code, r.stderr)
	require.Contains(t, r.stderr, "none were given")
	require.Contains(t, r.stderr, "rbee creds issue client")

	r = c.rbee("creds", "revoke", "nosuch")
	require.Equal(t, 1, r.code, r.stderr)
	r = c.rbee("creds", "issue", "worker", "w1")
	require.Equal(t, 2, r.code, r.stderr)
}

func seedOf(t *testing.T, keyFile string) []byte {
	t.Helper()
	kp, err := auth.ReadKeyFile(keyFile)
	require.NoError(t, err)
	seed, err := kp.Seed()
	require.NoError(t, err)
	return seed
}

// No secret is ever on a command line (which every user of the machine can
// read in ps), in a log, or in narration: the hive and its workers are
// handed key files of mode 0600. And the roles' permissions are enough for
// a normal run: nothing in it is refused.
func TestCredentialsNeverAppearInCommandLinesOrLogs(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons()
	c.readyWorkers("tiny", 1)
	r := c.mustRbee("infer", "-m", "tiny", "--max-tokens", "4", "hello")

	keys, _ := filepath.Glob(filepath.Join(queen.CredentialsDir(c.home), "*.nk"))
	workerKeys, _ := filepath.Glob(filepath.Join(c.home, "hives", "local", "workers", "*.nk"))
	require.NotEmpty(t, workerKeys, "the worker runs with a key file of its own")
	keys = append(keys, workerKeys...)
	require.GreaterOrEqual(t, len(keys), 4, "queen, client, hive and worker keys: %v", keys)
	var seeds [][]byte
	for _, k := range keys {
		fi, err := os.Stat(k)
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), k)
		seeds = append(seeds, seedOf(t, k))
	}

	entries, _ := os.ReadDir("/proc")
	seen := 0
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), c.home) {
			continue
		}
		seen++
		for _, s := range seeds {
			require.NotContains(t, string(cmdline), string(s), "a key on the command line of pid %s", e.Name())
			require.NotContains(t, string(cmdline), string(s[:20]))
		}
	}
	require.GreaterOrEqual(t, seen, 3, "the queen, the hive and the worker were looked at")
	logs := 0
	_ = filepath.Walk(c.home, func(path string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() || !strings.HasSuffix(path, ".log") {
			return nil
		}
		logs++
		data, _ := os.ReadFile(path)
		for _, s := range seeds {
			require.NotContains(t, string(data), string(s[:20]), "a key in %s", path)
		}
		// Each role's permissions cover all it does: in a normal run no
		// program is refused anything (the server logs each refusal in
		// the queen's log, the program in its own).
		require.NotRegexp(t, `(?i)permissions? violation`, string(data), "a refusal in %s", path)
		return nil
	})
	require.GreaterOrEqual(t, logs, 3, "the queen's, the hive's and the worker's logs were read")
	for _, s := range seeds {
		require.NotContains(t, r.stdout+r.stderr, string(s[:20]), "a key in narration")
	}
}

// Where the bus speaks TLS (always beyond loopback; here forced on loopback
// with RBEE_TLS), everything works with the CA the queen made, and a client
// that cannot verify the bus is refused before it sends anything.
func TestTLSBusServesAndRefusesUnverifiedClients(t *testing.T) {
	t.Parallel()
	c := newCluster(t).withDaemons().setEnv("RBEE_TLS=1")
	c.readyHive(map[string]string{"tiny": "tiny"})
	prompt := "hello world, the bee is"
	r := c.mustRbee("infer", "-m", "tiny", "--temperature", "0", "--max-tokens", "8", prompt)
	require.Equal(t, greedy(t, prompt, 8)+"\n", r.stdout)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// The right key without the CA: the bus's certificate does not verify.
	_, err := bus.Connect(ctx, bus.ConnectConfig{URL: c.url(), Credentials: bus.Credentials{KeyFile: c.keyFile(auth.ClientName)}, Log: zerolog.Nop()})
	require.Error(t, err)
	require.Contains(t, err.Error(), "certificate")
	// The CA without a key: TLS, then refused.
	ca := auth.CAFile(queen.TLSDir(c.home))
	_, err = bus.Connect(ctx, bus.ConnectConfig{URL: c.url(), Credentials: bus.Credentials{CAFile: ca}, Log: zerolog.Nop()})
	require.ErrorIs(t, err, bus.ErrRefused)
	// Both: in.
	b, err := bus.Connect(ctx, bus.ConnectConfig{URL: c.url(), Credentials: bus.Credentials{KeyFile: c.keyFile(auth.ClientName), CAFile: ca}, Log: zerolog.Nop()})
	require.NoError(t, err)
	require.True(t, b.NC.TLSRequired())
	b.NC.Close()
}
