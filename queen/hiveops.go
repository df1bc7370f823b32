package queen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/llamalib"
	"github.com/rbee-dev/rbee/internal/proc"
	"github.com/rbee-dev/rbee/internal/remote"
)

// defaultRemotePrefix is where rbee lives on a remote machine unless the
// inventory entry says otherwise: binaries in bin/, llama.cpp and hive data
// in share/rbee/, like a user-local install.
const defaultRemotePrefix = "~/.local"

// remotePaths are the install locations on a remote hive's machine.
type remotePaths struct{ bin, llama, data string }

func remoteLayout(entry api.InventoryEntry) remotePaths {
	prefix := entry.Prefix
	if prefix == "" {
		prefix = defaultRemotePrefix
	}
	return remotePaths{
		bin:   path.Join(prefix, "bin"),
		llama: path.Join(prefix, "share", "rbee", "llama"),
		data:  path.Join(prefix, "share", "rbee"),
	}
}

// hiveArgs is the argument of every hive.* operation.
type hiveArgs struct {
	Name string `json:"name"`
}

func (q *Queen) admitHive(ctx context.Context, raw json.RawMessage) error {
	a, err := decodeArgs[hiveArgs](raw)
	if err != nil {
		return err
	}
	_, err = q.inventoryEntry(ctx, a.Name)
	return err
}

func (q *Queen) hiveEntry(ctx context.Context, job api.Job) (api.InventoryEntry, error) {
	a, err := decodeArgs[hiveArgs](job.Op.Args)
	if err != nil {
		return api.InventoryEntry{}, err
	}
	entry, err := q.inventoryEntry(ctx, a.Name)
	if err != nil {
		return entry, err
	}
	q.say(ctx, job.ID, "resolve", a.Name, "hive %s is %s", a.Name, entry.Address())
	return entry, nil
}

func (q *Queen) dial(ctx context.Context, entry api.InventoryEntry) (*remote.Client, error) {
	opts := q.sshOptions(entry)
	target, err := remote.ParseTarget(entry.SSH.Spec, opts...)
	if err != nil {
		return nil, err
	}
	// `rbee hive trust` takes the hive's name, so that is what a host key
	// error tells the user to pass.
	target.Alias = entry.Name
	return remote.Dial(ctx, target, opts...)
}

func (q *Queen) sshOptions(entry api.InventoryEntry) []remote.Option {
	var opts []remote.Option
	if q.cfg.SSHConfigFile != "" {
		opts = append(opts, remote.WithConfigFile(q.cfg.SSHConfigFile))
	}
	if q.cfg.SSHKnownHosts != "" {
		opts = append(opts, remote.WithKnownHosts(q.cfg.SSHKnownHosts))
	}
	if entry.SSH != nil && entry.SSH.IdentityFile != "" {
		opts = append(opts, remote.WithIdentity(entry.SSH.IdentityFile))
	}
	return opts
}

func (q *Queen) hiveOnline(name string) bool {
	return q.registry.Snapshot().Hives[name].State == api.HiveOnline
}

func (q *Queen) runHiveStart(ctx context.Context, job api.Job) (any, error) {
	entry, err := q.hiveEntry(ctx, job)
	if err != nil {
		return nil, err
	}
	name := entry.Name
	if q.hiveOnline(name) {
		q.say(ctx, job.ID, "start", name, "hive %s is already running", name)
		return q.registry.Snapshot().Hives[name].Status, nil
	}
	started := time.Now()
	var exited <-chan struct{}
	var logTail func() string
	if entry.SSH == nil {
		p, logPath, err := q.startLocalHive(ctx, job.ID, entry)
		if err != nil {
			return nil, err
		}
		exited = p.Done()
		logTail = func() string { return proc.Tail(logPath, 20) }
	} else {
		client, logPath, err := q.startRemoteHive(ctx, job.ID, entry)
		if err != nil {
			return nil, err
		}
		defer client.Close()
		logTail = func() string {
			tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			out, _ := client.Tail(tctx, logPath, 20)
			return out
		}
	}
	q.say(ctx, job.ID, "wait", name, "waiting up to %s for hive %s to register", q.cfg.HiveStartTimeout, name)
	wctx, cancel := context.WithTimeout(ctx, q.cfg.HiveStartTimeout)
	defer cancel()
	if exited != nil {
		go func() {
			select {
			case <-exited:
				cancel()
			case <-wctx.Done():
			}
		}()
	}
	snap, err := q.registry.Wait(wctx, func(s *Snapshot) bool {
		h, ok := s.Hives[name]
		return ok && h.State == api.HiveOnline && h.LastSeen.After(started)
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		why := fmt.Sprintf("did not register within %s", q.cfg.HiveStartTimeout)
		if exited != nil && isClosed(exited) {
			why = "exited before registering"
		}
		return nil, fmt.Errorf("hive %s %s; last lines of its log:\n%s", name, why, logTail())
	}
	st := snap.Hives[name].Status
	q.say(ctx, job.ID, "online", name, "hive %s is online: %s, %d CPU threads, %d GPU(s), %s RAM free",
		name, st.Capabilities.Hostname, st.Capabilities.CPU.Threads, len(st.Capabilities.GPUs), catalog.HumanBytes(st.RAMFree))
	return st, nil
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (q *Queen) startLocalHive(ctx context.Context, jobID string, entry api.InventoryEntry) (*proc.Process, string, error) {
	binDir := entry.BinDir
	if binDir == "" {
		binDir = q.cfg.BinDir
	}
	bin := filepath.Join(binDir, "rbee-hive")
	if _, err := os.Stat(bin); err != nil {
		return nil, "", fmt.Errorf("rbee-hive not found at %s: build it (go tool task build) or set the hive's bin dir", bin)
	}
	logPath := filepath.Join(q.cfg.DataDir, "logs", "hive-"+entry.Name+".log")
	args := []string{"--id", entry.Name, "--nats", q.localBusURL(), "--namespace", q.bus.Space.Namespace(),
		"--data", filepath.Join(q.cfg.DataDir, "hives", entry.Name)}
	env := cliutil.CredentialEnv(q.cfg.Credentials)
	keyFile, err := q.hiveCredentials(entry.Name)
	if err != nil {
		return nil, "", err
	}
	if keyFile != "" {
		// The path, not the key: a command line is for everyone to read.
		args = append(args, "--"+cliutil.FlagCreds, keyFile)
		env = nil
	}
	if q.caFile != "" {
		args = append(args, "--"+cliutil.FlagCA, q.caFile)
	}
	args = append(args, q.cfg.HiveArgs...)
	p, err := proc.Start(proc.Spec{Path: bin, Args: args, Env: env, LogPath: logPath})
	if err != nil {
		return nil, "", err
	}
	q.localHives.Store(entry.Name, p)
	q.say(ctx, jobID, "spawn", entry.Name, "started rbee-hive %s locally (pid %d, log %s)", entry.Name, p.Pid, logPath)
	return p, logPath, nil
}

func (q *Queen) startRemoteHive(ctx context.Context, jobID string, entry api.InventoryEntry) (*remote.Client, string, error) {
	q.say(ctx, jobID, "connect", entry.Name, "connecting to %s over SSH", entry.SSH.Spec)
	client, err := q.dial(ctx, entry)
	if err != nil {
		return nil, "", err
	}
	layout := remoteLayout(entry)
	bin := path.Join(layout.bin, "rbee-hive")
	if _, _, err := client.Run(ctx, remote.QuotePath(bin)+" --version"); err != nil {
		client.Close()
		if errors.Is(err, remote.ErrCommandNotFound) {
			return nil, "", fmt.Errorf("rbee-hive is not installed on %s (looked for %s); install it with `rbee hive install %s`", entry.Name, bin, entry.Name)
		}
		return nil, "", fmt.Errorf("checking rbee-hive on %s: %w", entry.Name, err)
	}
	logPath := path.Join(layout.data, "logs", "hive-"+entry.Name+".log")
	env := []string{"RBEE_LLAMA_LIB=" + layout.llama}
	var credArgs string
	keyFile, err := q.hiveCredentials(entry.Name)
	if err != nil {
		client.Close()
		return nil, "", err
	}
	if keyFile != "" {
		// The hive's key goes over SSH into a file of mode 0600 there,
		// and the command names the file: a command line is for everyone
		// on that machine to read.
		remoteKey := path.Join(remoteCredsDir(layout), "hive.nk")
		if err := client.Upload(ctx, keyFile, remoteKey, 0o600); err != nil {
			client.Close()
			return nil, "", fmt.Errorf("copying the credentials of hive %s: %w", entry.Name, err)
		}
		credArgs = " --" + cliutil.FlagCreds + " " + remote.QuotePath(remoteKey)
		if q.caFile != "" {
			remoteCA := path.Join(remoteCredsDir(layout), "ca.pem")
			if err := client.Upload(ctx, q.caFile, remoteCA, 0o644); err != nil {
				client.Close()
				return nil, "", fmt.Errorf("copying the bus's CA certificate to hive %s: %w", entry.Name, err)
			}
			credArgs += " --" + cliutil.FlagCA + " " + remote.QuotePath(remoteCA)
		}
	} else {
		// Credentials travel in the command's environment, not its
		// arguments, so other users of that machine cannot read them in ps.
		env = append(env, cliutil.CredentialEnv(q.cfg.Credentials)...)
	}
	quotedEnv := make([]string, len(env))
	for i, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		quotedEnv[i] = k + "=" + remote.QuotePath(v)
	}
	cmd := fmt.Sprintf("mkdir -p %s && env %s %s --id %s --nats %s --namespace %s --data %s%s",
		remote.QuotePath(path.Dir(logPath)), strings.Join(quotedEnv, " "), remote.QuotePath(bin), remote.Quote(entry.Name),
		remote.Quote(q.BusURL()), remote.Quote(q.bus.Space.Namespace()), remote.QuotePath(path.Join(layout.data, "hives", entry.Name)), credArgs)
	pid, err := client.Start(ctx, cmd, logPath)
	if err != nil {
		client.Close()
		return nil, "", fmt.Errorf("starting rbee-hive on %s: %w", entry.Name, err)
	}
	q.say(ctx, jobID, "spawn", entry.Name, "started rbee-hive on %s (pid %d, log %s there), pointing it at %s", entry.SSH.Spec, pid, logPath, q.BusURL())
	return client, logPath, nil
}

func (q *Queen) runHiveStop(ctx context.Context, job api.Job) (any, error) {
	entry, err := q.hiveEntry(ctx, job)
	if err != nil {
		return nil, err
	}
	name := entry.Name
	rec, online := q.awaitHiveVerdict(ctx, name)
	if !online {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		q.say(ctx, job.ID, "stop", name, "hive %s is not running; nothing to stop", name)
		return map[string]string{"stopped": "not running"}, nil
	}
	grace := q.cfg.HiveStopGrace
	subject, _ := q.bus.Space.Hive(name, api.HiveEpShutdown)
	q.say(ctx, job.ID, "shutdown", name, "asking hive %s to shut down (grace %s)", name, grace)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = q.bus.Call(cctx, subject, api.ShutdownRequest{JobID: job.ID}, nil)
	cancel()
	if err != nil {
		q.narrator.Warn(ctx, job.ID, "shutdown", name, "hive %s did not answer the shutdown request: %v", name, err)
	}
	if q.waitHiveGone(ctx, name, grace) {
		q.say(ctx, job.ID, "stopped", name, "hive %s stopped", name)
		return map[string]string{"stopped": "shutdown"}, nil
	}
	pid := rec.Status.PID
	for _, sig := range []string{"TERM", "KILL"} {
		q.narrator.Warn(ctx, job.ID, "signal", name, "hive %s still running after %s; sending SIG%s to pid %d", name, grace, sig, pid)
		if err := q.signalHive(ctx, entry, pid, sig); err != nil {
			return nil, fmt.Errorf("sending SIG%s to hive %s: %w", sig, name, err)
		}
		if q.waitHiveGone(ctx, name, grace) {
			q.say(ctx, job.ID, "stopped", name, "hive %s stopped by SIG%s", name, sig)
			return map[string]string{"stopped": "SIG" + sig}, nil
		}
	}
	return nil, fmt.Errorf("hive %s did not stop", name)
}

// awaitHiveVerdict says whether a hive is running, from a registry that can
// know: "not running" is decided only once liveness is judged (the
// registry is settled), since a queen that just started, or whose bus just
// came back, has not heard yet from hives that are alive and reconnecting.
// A hive seen online is running at once. The wait is bounded by a little
// more than the liveness grace.
func (q *Queen) awaitHiveVerdict(ctx context.Context, name string) (HiveRecord, bool) {
	online := func(s *Snapshot) bool { return s.Hives[name].State == api.HiveOnline }
	wctx, cancel := context.WithTimeout(ctx, q.cfg.LivenessGrace+2*time.Second)
	defer cancel()
	for {
		snap := q.registry.Snapshot()
		if online(snap) {
			return snap.Hives[name], true
		}
		if q.registry.Settled() || wctx.Err() != nil {
			return HiveRecord{}, false
		}
		// Settling publishes no snapshot of its own, so the wait on the
		// next snapshot is short and Settled is asked again.
		pctx, pcancel := context.WithTimeout(wctx, 100*time.Millisecond)
		_, _ = q.registry.Wait(pctx, online)
		pcancel()
	}
}

// waitHiveGone waits until the hive's entry leaves or, after a signal, its
// process is gone (a killed hive cannot deregister, so the queen removes the
// entry for it).
func (q *Queen) waitHiveGone(ctx context.Context, name string, grace time.Duration) bool {
	wctx, cancel := context.WithTimeout(ctx, grace)
	defer cancel()
	_, err := q.registry.Wait(wctx, func(s *Snapshot) bool { return s.Hives[name].State != api.HiveOnline })
	if err == nil {
		return true
	}
	// Local process already gone but its entry not yet expired.
	if v, ok := q.localHives.Load(name); ok && v.(*proc.Process).Exited() {
		q.forgetHive(ctx, name)
		return true
	}
	return false
}

func (q *Queen) forgetHive(ctx context.Context, name string) {
	if kv, err := q.bus.KV(ctx, q.bus.Space.HivesBucket()); err == nil {
		_ = kv.Delete(ctx, name)
	}
}

func (q *Queen) signalHive(ctx context.Context, entry api.InventoryEntry, pid int, sig string) error {
	if entry.SSH == nil {
		if v, ok := q.localHives.Load(entry.Name); ok {
			p := v.(*proc.Process)
			how := map[string]time.Duration{"TERM": q.cfg.HiveStopGrace, "KILL": 0}[sig]
			if sig == "KILL" {
				_, err := p.Stop(ctx, how)
				return err
			}
			_ = signalPid(p.Pid, sig)
			return nil
		}
		return signalPid(pid, sig)
	}
	client, err := q.dial(ctx, entry)
	if err != nil {
		return err
	}
	defer client.Close()
	return client.Kill(ctx, pid, sig)
}

func (q *Queen) runHiveInstall(ctx context.Context, job api.Job) (any, error) {
	entry, err := q.hiveEntry(ctx, job)
	if err != nil {
		return nil, err
	}
	if entry.SSH == nil {
		q.say(ctx, job.ID, "install", entry.Name, "hive %s is local; its binaries are %s", entry.Name, q.cfg.BinDir)
		return map[string]string{"bin_dir": q.cfg.BinDir}, nil
	}
	client, err := q.dial(ctx, entry)
	if err != nil {
		return nil, err
	}
	defer client.Close()
	layout := remoteLayout(entry)
	binDir := layout.bin
	for _, name := range []string{"rbee-hive", "llm-worker-rbee"} {
		local := filepath.Join(q.cfg.BinDir, name)
		if _, err := os.Stat(local); err != nil {
			return nil, fmt.Errorf("%s not found next to the queen (%s); build it first", name, local)
		}
		q.say(ctx, job.ID, "upload", entry.Name, "copying %s to %s:%s", name, entry.Name, binDir)
		if err := client.Upload(ctx, local, path.Join(binDir, name), 0o755); err != nil {
			return nil, fmt.Errorf("copying %s: %w", name, err)
		}
		q.say(ctx, job.ID, "verified", entry.Name, "%s installed and its sha256 verified", name)
	}
	if libDir, err := llamalib.Find(""); err == nil {
		files, _ := os.ReadDir(libDir)
		q.say(ctx, job.ID, "upload", entry.Name, "copying the llama.cpp libraries (%d files) to %s:%s", len(files), entry.Name, layout.llama)
		for _, f := range files {
			if f.IsDir() || !strings.Contains(f.Name(), ".so") {
				continue
			}
			src := filepath.Join(libDir, f.Name())
			if real, err := filepath.EvalSymlinks(src); err == nil {
				src = real
			}
			if err := client.Upload(ctx, src, path.Join(layout.llama, f.Name()), 0o644); err != nil {
				return nil, fmt.Errorf("copying %s: %w", f.Name(), err)
			}
		}
	} else {
		q.narrator.Warn(ctx, job.ID, "upload", entry.Name, "no llama.cpp libraries here to copy (%v); workers on %s need RBEE_LLAMA_LIB", err, entry.Name)
	}
	return map[string]string{"bin_dir": binDir}, nil
}

func (q *Queen) runHiveUninstall(ctx context.Context, job api.Job) (any, error) {
	entry, err := q.hiveEntry(ctx, job)
	if err != nil {
		return nil, err
	}
	if q.hiveOnline(entry.Name) {
		return nil, fmt.Errorf("hive %s is running; stop it first with `rbee hive stop %s`", entry.Name, entry.Name)
	}
	if entry.SSH == nil {
		q.say(ctx, job.ID, "uninstall", entry.Name, "hive %s is local; nothing to remove", entry.Name)
		return nil, nil
	}
	client, err := q.dial(ctx, entry)
	if err != nil {
		return nil, err
	}
	defer client.Close()
	layout := remoteLayout(entry)
	for _, name := range []string{"rbee-hive", "llm-worker-rbee"} {
		if err := client.Remove(ctx, path.Join(layout.bin, name)); err != nil {
			return nil, err
		}
		q.say(ctx, job.ID, "remove", entry.Name, "removed %s from %s:%s", name, entry.Name, layout.bin)
	}
	if _, _, err := client.Run(ctx, "rm -rf -- "+remote.QuotePath(layout.llama)+" "+remote.QuotePath(remoteCredsDir(layout))); err != nil {
		return nil, err
	}
	q.say(ctx, job.ID, "remove", entry.Name, "removed its credentials from %s:%s (`rbee creds revoke %s` revokes them)", entry.Name, remoteCredsDir(layout), auth.HiveName(entry.Name))
	return nil, nil
}

// remoteCredsDir is where a remote hive's key and the bus's CA are kept.
func remoteCredsDir(layout remotePaths) string { return path.Join(layout.data, "creds") }

// --- workers and models, through their hive ---

func (q *Queen) runWorkerSpawn(ctx context.Context, job api.Job) (any, error) {
	a, err := decodeArgs[api.WorkerSpawnArgs](job.Op.Args)
	if err != nil {
		return nil, err
	}
	if !q.hiveOnline(a.Hive) {
		return nil, fmt.Errorf("hive %s is not online; start it with `rbee hive start %s`", a.Hive, a.Hive)
	}
	subject, err := q.bus.Space.Hive(a.Hive, api.HiveEpWorkerSpawn)
	if err != nil {
		return nil, err
	}
	a.JobID = job.ID
	if a.LoadTimeout == 0 {
		a.LoadTimeout = api.Duration(q.cfg.WorkerStartTimeout)
	}
	var reply api.WorkerSpawnReply
	cctx, cancel := context.WithTimeout(ctx, time.Duration(a.LoadTimeout)+5*time.Second)
	defer cancel()
	if err := q.bus.Call(cctx, subject, a, &reply); err != nil {
		return nil, err
	}
	return reply.Worker, nil
}

func (q *Queen) runWorkerStop(ctx context.Context, job api.Job) (any, error) {
	a, err := decodeArgs[api.WorkerStopArgs](job.Op.Args)
	if err != nil {
		return nil, err
	}
	w, ok := q.registry.Snapshot().Workers[a.Worker]
	if !ok {
		return nil, fmt.Errorf("worker %s is not running", a.Worker)
	}
	subject, err := q.bus.Space.Hive(w.Hive, api.HiveEpWorkerStop)
	if err != nil {
		return nil, err
	}
	a.JobID = job.ID
	if a.Grace == 0 {
		a.Grace = api.Duration(10 * time.Second)
	}
	cctx, cancel := context.WithTimeout(ctx, 3*time.Duration(a.Grace)+10*time.Second)
	defer cancel()
	return nil, q.bus.Call(cctx, subject, a, nil)
}

func (q *Queen) runModelDownload(ctx context.Context, job api.Job) (any, error) {
	a, err := decodeArgs[api.ModelAddArgs](job.Op.Args)
	if err != nil {
		return nil, err
	}
	if !q.hiveOnline(a.Hive) {
		return nil, fmt.Errorf("hive %s is not online; start it with `rbee hive start %s`", a.Hive, a.Hive)
	}
	subject, err := q.bus.Space.Hive(a.Hive, api.HiveEpModelAdd)
	if err != nil {
		return nil, err
	}
	a.JobID = job.ID
	var m api.Model
	if err := q.bus.Call(ctx, subject, a, &m); err != nil {
		return nil, err
	}
	return m, nil
}

func (q *Queen) modelList(ctx context.Context, req api.HiveRequest) ([]api.ModelListReply, error) {
	out := []api.ModelListReply{}
	for id, h := range q.registry.Snapshot().Hives {
		if h.State != api.HiveOnline || (req.Name != "" && req.Name != id) {
			continue
		}
		subject, _ := q.bus.Space.Hive(id, api.HiveEpModelList)
		var reply api.ModelListReply
		if err := q.bus.Call(ctx, subject, nil, &reply); err != nil {
			if errors.Is(err, bus.ErrNoResponder) {
				continue
			}
			return nil, err
		}
		reply.Hive = id
		out = append(out, reply)
	}
	return out, nil
}

// signalPid signals a local hive the queen did not start (its pid from the
// hive's own report): TERM, or KILL. A process already gone is not an
// error.
func signalPid(pid int, sig string) error {
	if pid <= 0 {
		return fmt.Errorf("no pid known")
	}
	s := syscall.SIGTERM
	if sig == "KILL" {
		s = syscall.SIGKILL
	}
	if err := syscall.Kill(pid, s); err != nil && err != syscall.ESRCH {
		return err
	}
	return nil
}
