package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/queen"
	"github.com/rs/zerolog"
)

// cluster is a queen (embedded bus, or on an external one) with the bench's
// own client connection, and the hives started on it.
type cluster struct {
	e       *env
	home    string
	natsURL string
	gateway string
	queen   *process
	// queenArgs start the queen again on the same data and port.
	queenArgs []string
	b         *bus.Bus
	hives     map[string]*process
	// issued, when set, is told of each key the bench issues (a NATS
	// cluster learns of keys only from its configuration).
	issued func(keyFile string) error
}

// connectBus dials url, retrying until within passes.
func connectBus(ctx context.Context, url, name string, within time.Duration) (*bus.Bus, error) {
	var last error
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		b, err := bus.Connect(ctx, bus.ConnectConfig{URL: url, Name: name, Reconnect: true, Timeout: time.Second, Log: zerolog.Nop()})
		if err == nil {
			return b, nil
		}
		last = err
		time.Sleep(5 * time.Millisecond)
	}
	if last == nil {
		last = ctx.Err()
	}
	return nil, last
}

// queenSpec says how to start a queen.
type queenSpec struct {
	// NATSURL, when set, makes the queen use that server instead of embedding.
	NATSURL string
	// Home is the queen's data directory (default: a new one).
	Home    string
	Gateway bool
	Args    []string
}

// startQueen starts queen-rbee and waits until its status endpoint answers.
// It returns the time from exec to that answer.
func (e *env) startQueen(ctx context.Context, spec queenSpec) (*cluster, time.Duration, error) {
	bin, err := e.binary("queen-rbee")
	if err != nil {
		return nil, 0, err
	}
	home := spec.Home
	if home == "" {
		home = e.dir("queen")
	}
	c := &cluster{e: e, home: home, hives: map[string]*process{}}
	args := []string{"--data", c.home, "--log-level", "warn"}
	if spec.NATSURL != "" {
		c.natsURL = spec.NATSURL
		args = append(args, "--nats", spec.NATSURL)
	} else {
		port, err := freePort()
		if err != nil {
			return nil, 0, err
		}
		c.natsURL = "nats://127.0.0.1:" + strconv.Itoa(port)
		args = append(args, "--listen", "127.0.0.1:"+strconv.Itoa(port))
	}
	if spec.Gateway {
		port, err := freePort()
		if err != nil {
			return nil, 0, err
		}
		c.gateway = "127.0.0.1:" + strconv.Itoa(port)
		args = append(args, "--gateway", c.gateway)
	} else {
		args = append(args, "--gateway", "off")
	}
	args = append(args, spec.Args...)
	c.queenArgs = args
	p, err := e.procs.start("queen-rbee", bin, args, nil, filepath.Join(c.home, "queen.log"))
	if err != nil {
		return nil, 0, err
	}
	c.queen = p
	ready, err := c.waitQueen(ctx, 20*time.Second)
	if err != nil {
		p.stop(2 * time.Second)
		return nil, 0, fmt.Errorf("queen did not answer: %w; %s", err, logTail(p))
	}
	return c, ready, nil
}

// restartQueen kills the queen (and so its embedded bus) with SIGKILL and
// starts it again on the same data directory and port, returning when the
// new one was exec'd.
func (c *cluster) restartQueen(ctx context.Context) (time.Time, error) {
	c.queen.kill(syscall.SIGKILL)
	<-c.queen.Done()
	bin, err := c.e.binary("queen-rbee")
	if err != nil {
		return time.Time{}, err
	}
	p, err := c.e.procs.start("queen-rbee", bin, c.queenArgs, nil, filepath.Join(c.home, "queen.log"))
	if err != nil {
		return time.Time{}, err
	}
	c.queen = p
	if _, err := c.waitQueen(ctx, 20*time.Second); err != nil {
		return p.Started, fmt.Errorf("restarted queen did not answer: %w; %s", err, logTail(p))
	}
	return p.Started, nil
}

func (c *cluster) waitQueen(ctx context.Context, within time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(within)
	var last error
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if c.queen.exited() {
			return 0, fmt.Errorf("queen-rbee exited: %v", c.queen.err)
		}
		if c.b == nil {
			// The bench acts as the queen's machine's owner: the queen's
			// key, once the queen has made it.
			b, err := bus.Connect(ctx, bus.ConnectConfig{URL: c.natsURL, Name: "rbee-bench", Credentials: c.creds(auth.QueenName), Reconnect: true, Timeout: time.Second, Log: zerolog.Nop()})
			if err != nil {
				last = err
				time.Sleep(2 * time.Millisecond)
				continue
			}
			c.b = b
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		err := c.b.Call(cctx, c.b.Space.Queen(api.EpStatus), nil, nil)
		cancel()
		if err == nil {
			return time.Since(c.queen.Started), nil
		}
		last = err
		time.Sleep(2 * time.Millisecond)
	}
	if last == nil {
		last = ctx.Err()
	}
	return 0, last
}

func (c *cluster) close() {
	for _, h := range c.hives {
		h.stop(5 * time.Second)
	}
	if c.b != nil {
		c.b.NC.Close()
	}
	if c.queen != nil {
		c.queen.stop(10 * time.Second)
	}
}

// startHive starts rbee-hive with id on this cluster's bus and waits until
// its registry entry appears, returning the time from exec to then.
func (c *cluster) startHive(ctx context.Context, id string, extra ...string) (*process, time.Duration, error) {
	bin, err := c.e.binary("rbee-hive")
	if err != nil {
		return nil, 0, err
	}
	kv, err := c.b.KV(ctx, c.b.Space.HivesBucket())
	if err != nil {
		return nil, 0, err
	}
	w, err := kv.Watch(ctx, id, jetstream.UpdatesOnly())
	if err != nil {
		return nil, 0, err
	}
	defer func() { _ = w.Stop() }()
	data := filepath.Join(c.home, "hives", id)
	args := []string{"--id", id, "--nats", c.natsURL, "--data", data}
	cr, err := c.issue(auth.HiveName(id), auth.Principal{Role: auth.RoleHive, Hive: id})
	if err != nil {
		return nil, 0, err
	}
	args = append(append(args, cr...), extra...)
	p, err := c.e.procs.start("rbee-hive "+id, bin, args, nil, filepath.Join(c.home, "logs", "hive-"+id+".log"))
	if err != nil {
		return nil, 0, err
	}
	timer := time.NewTimer(30 * time.Second)
	defer timer.Stop()
	for {
		select {
		case en := <-w.Updates():
			if en != nil && en.Operation() == jetstream.KeyValuePut {
				c.hives[id] = p
				return p, time.Since(p.Started), nil
			}
		case <-p.Done():
			return nil, 0, fmt.Errorf("rbee-hive %s exited before registering: %v; %s", id, p.err, logTail(p))
		case <-timer.C:
			p.stop(time.Second)
			return nil, 0, fmt.Errorf("rbee-hive %s did not register within 30s; %s", id, logTail(p))
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
}

// addModel copies the model file into a hive's catalog as name, as
// `rbee model download file://…` does, and returns the path of the
// catalog's copy (the file the hive's workers load).
func (c *cluster) addModel(ctx context.Context, hive, name, file string) (string, error) {
	end, err := c.run(ctx, api.OpModelDownload, api.ModelAddArgs{Hive: hive, Source: "file://" + file, Name: name})
	if err != nil {
		return "", fmt.Errorf("adding %s to hive %s: %w", name, hive, err)
	}
	var m api.Model
	if err := json.Unmarshal(end.Result, &m); err != nil || m.Path == "" {
		return "", fmt.Errorf("adding %s to hive %s: the job's result names no file (%s)", name, hive, end.Result)
	}
	return m.Path, nil
}

// synth writes a generated model into a hive's catalog.
func (c *cluster) synth(ctx context.Context, hive, name, size string) error {
	subject, err := c.b.Space.Hive(hive, api.HiveEpModelSynth)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var reply json.RawMessage
	for {
		// A hive beats before its endpoints are up; give it a moment.
		err := c.b.Call(cctx, subject, api.ModelSynthArgs{Name: name, Size: size}, &reply)
		if errors.Is(err, bus.ErrNoResponder) && cctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		if err != nil {
			return fmt.Errorf("synth %s model %s on %s: %w", size, name, hive, err)
		}
		return nil
	}
}

// run submits an operation as a job, as the keeper does, and follows it to
// its end.
func (c *cluster) run(ctx context.Context, kind string, args any) (*api.StateChange, error) {
	raw, err := json.Marshal(args)
	if err != nil {
		return nil, err
	}
	var reply api.SubmitReply
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	err = c.b.Call(cctx, c.b.Space.Queen(api.EpSubmit), api.SubmitRequest{Op: api.Operation{Kind: kind, Args: raw}}, &reply)
	cancel()
	if err != nil {
		return nil, err
	}
	var final *api.StateChange
	fctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	err = c.b.Follow(fctx, reply.JobID, 0, func(ev api.Event) error {
		if ev.Terminal() {
			final = ev.State
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if final == nil {
		return nil, errors.New("job ended without a terminal state")
	}
	if final.State != api.JobCompleted {
		return final, fmt.Errorf("%s job %s %s: %s", kind, reply.JobID, final.State, final.Error)
	}
	return final, nil
}

// spawnWorker starts a worker for model on hive with one slot and one
// thread, through a worker.spawn job as `rbee worker spawn` submits it.
func (c *cluster) spawnWorker(ctx context.Context, hive, model string) (api.WorkerStatus, error) {
	return c.spawn(ctx, api.WorkerSpawnArgs{Hive: hive, Model: model, Slots: 1, Threads: 1, Ctx: overheadCtx, Device: "cpu"})
}

// spawn runs a worker.spawn job and returns the worker it started.
func (c *cluster) spawn(ctx context.Context, args api.WorkerSpawnArgs) (api.WorkerStatus, error) {
	final, err := c.run(ctx, api.OpWorkerSpawn, args)
	if err != nil {
		return api.WorkerStatus{}, err
	}
	var w api.WorkerStatus
	if err := json.Unmarshal(final.Result, &w); err != nil {
		return api.WorkerStatus{}, fmt.Errorf("worker.spawn result: %w", err)
	}
	return w, nil
}

// stopWorker stops a worker through a worker.stop job.
func (c *cluster) stopWorker(ctx context.Context, id string) error {
	_, err := c.run(ctx, api.OpWorkerStop, api.WorkerStopArgs{Worker: id, Grace: api.Duration(5 * time.Second)})
	return err
}

// creds are the named credential of this cluster's queen and its CA, where
// the queen made them (none on an open bus).
func (c *cluster) creds(name string) bus.Credentials {
	var cr bus.Credentials
	if f := filepath.Join(queen.CredentialsDir(c.home), name+".nk"); exists(f) {
		cr.KeyFile = f
	}
	if f := auth.CAFile(queen.TLSDir(c.home)); exists(f) {
		cr.CAFile = f
	}
	return cr
}

// issue makes the credential a process the bench starts itself needs, as
// `rbee creds issue` would, and returns its flags (none on an open bus).
func (c *cluster) issue(name string, p auth.Principal) ([]string, error) {
	dir := queen.CredentialsDir(c.home)
	if !exists(filepath.Join(dir, auth.Registry)) {
		return nil, nil
	}
	store, err := auth.OpenStore(dir)
	if err != nil {
		return nil, err
	}
	_, _ = store.Revoke(name)
	_, seed, err := store.Issue(name, p)
	if err != nil {
		return nil, err
	}
	key := filepath.Join(c.home, "keys", name+".nk")
	if err := auth.WriteKeyFile(key, name, p, seed, nil); err != nil {
		return nil, err
	}
	args := []string{"--creds", key}
	if ca := c.creds(name).CAFile; ca != "" {
		args = append(args, "--nats-ca", ca)
	}
	if c.issued != nil {
		if err := c.issued(key); err != nil {
			return nil, err
		}
	}
	return args, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
