package hive

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/auth"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/hive/catalog"
	"github.com/rbee-dev/rbee/internal/capabilities"
	"github.com/rbee-dev/rbee/internal/cliutil"
	"github.com/rbee-dev/rbee/internal/proc"
	"github.com/rbee-dev/rbee/subjects"
)

// workerDrainEndpoint is the worker's endpoint that starts a graceful stop.
const workerDrainEndpoint = "drain"

// drainRequest is the body of a worker's drain endpoint.
type drainRequest struct {
	Grace api.Duration `json:"grace,omitempty"`
}

// workerProc is one worker process this hive started. Its fields are set
// before it enters the map and never change, except the atomics and exit,
// which the supervisor writes before closing gone.
type workerProc struct {
	id, model, key, device string
	slots                  int
	proc                   *proc.Process
	// keyFile holds the worker's credentials while it runs ("" if none).
	keyFile string
	started time.Time
	// ready is set once the worker registered as ready; an exit before
	// is a load failure.
	ready atomic.Bool
	// stopping is set before the hive stops the worker on purpose, so its
	// exit is expected rather than reported as a crash.
	stopping atomic.Bool
	// gone is closed once the supervisor has handled the exit; exit then
	// says how the process ended ("exit status 0", "signal: killed").
	gone chan struct{}
	exit string
}

// workerSpawn starts a worker for a catalog model and answers once it is
// registered as ready.
//
// Codes: 400 bad arguments or a device this machine lacks; 404 model not in
// the catalog; 507 not enough free RAM/VRAM for the model's estimate; 500 the
// worker could not be started or exited while loading (with its log tail);
// 504 it was not ready within the load timeout (it is killed).
func (h *hive) workerSpawn(ctx context.Context, args api.WorkerSpawnArgs) (api.WorkerSpawnReply, error) {
	if err := h.checkHive(args.Hive); err != nil {
		return api.WorkerSpawnReply{}, err
	}
	if args.Slots < 0 || args.Ctx < 0 || args.Threads < 0 || args.LoadTimeout < 0 {
		return api.WorkerSpawnReply{}, api.Errorf(api.CodeBadRequest, "slots, ctx, threads and load_timeout must not be negative")
	}
	m, err := h.catalog.Get(args.Model)
	if errors.Is(err, catalog.ErrNotFound) {
		return api.WorkerSpawnReply{}, api.Errorf(api.CodeNotFound,
			"model %s is not in hive %s's catalog; add it with `rbee model download --hive %s SOURCE --name %s`", args.Model, h.cfg.ID, h.cfg.ID, args.Model)
	}
	if err != nil {
		return api.WorkerSpawnReply{}, catalogErr(err)
	}
	device, gpu, err := h.device(args.Device)
	if err != nil {
		return api.WorkerSpawnReply{}, err
	}
	if err := h.checkMemory(ctx, m, device, gpu); err != nil {
		return api.WorkerSpawnReply{}, err
	}
	loadTimeout := time.Duration(args.LoadTimeout)
	if loadTimeout == 0 {
		loadTimeout = h.cfg.LoadTimeout
	}

	id := h.newWorkerID(m.Key)
	// Listen before starting, so a fast worker's registration is not
	// missed. Its beats are published on its key's subject, so a plain
	// subscription hears them as they are stored: no consumer to make,
	// and none to delete (a hive may delete no consumer).
	beats := make(chan *nats.Msg, 16)
	sub, err := h.bus.NC.ChanSubscribe(subjects.KVSubject(h.bus.Space.WorkersBucket(), subjects.WorkerKey(h.cfg.ID, id)), beats)
	if err == nil {
		err = h.bus.NC.FlushWithContext(ctx)
	}
	if err != nil {
		return api.WorkerSpawnReply{}, api.Errorf(api.CodeInternal, "listening for worker %s's registration: %v", id, err)
	}
	defer func() { _ = sub.Unsubscribe() }()

	h.narrator.Say(ctx, args.JobID, "spawn", id, "starting worker %s for model %s on %s", id, m.ID, device)
	w, err := h.startWorker(ctx, id, m, device, args)
	if err != nil {
		return api.WorkerSpawnReply{}, api.Errorf(api.CodeInternal, "starting worker for %s on hive %s: %v", m.ID, h.cfg.ID, err)
	}
	h.narrator.Say(ctx, args.JobID, "spawn", id, "worker %s started (pid %d, log %s); loading %s (%s)",
		id, w.proc.Pid, w.proc.Log, m.ID, catalog.HumanBytes(uint64(m.Size)))
	st, err := h.awaitReady(ctx, w, beats, loadTimeout)
	if err != nil {
		h.narrator.Warn(context.WithoutCancel(ctx), args.JobID, "spawn", id, "%v", err)
		return api.WorkerSpawnReply{}, err
	}
	h.narrator.Say(ctx, args.JobID, "ready", id, "worker %s is ready: %s on %s, %d slot(s) (took %s)",
		id, m.ID, device, st.SlotsTotal, time.Since(w.started).Round(time.Millisecond))
	return api.WorkerSpawnReply{Worker: st}, nil
}

// device checks a requested device against the machine: "" and "cpu" mean
// the CPU, "cuda:N" a GPU that capability detection found.
func (h *hive) device(req string) (string, *api.GPU, error) {
	if req == "" || req == "cpu" {
		return "cpu", nil, nil
	}
	n, err := strconv.Atoi(strings.TrimPrefix(req, "cuda:"))
	if !strings.HasPrefix(req, "cuda:") || err != nil || n < 0 {
		return "", nil, api.Errorf(api.CodeBadRequest, "device %q is not \"cpu\" or \"cuda:N\"", req)
	}
	h.mu.Lock()
	gpus := append([]api.GPU{}, h.caps.GPUs...)
	h.mu.Unlock()
	for i := range gpus {
		if gpus[i].Index == n {
			return req, &gpus[i], nil
		}
	}
	if len(gpus) == 0 {
		return "", nil, api.Errorf(api.CodeBadRequest, "device %s does not exist on hive %s: it has no GPUs; use cpu", req, h.cfg.ID)
	}
	have := make([]string, len(gpus))
	for i, g := range gpus {
		have[i] = fmt.Sprintf("cuda:%d", g.Index)
	}
	return "", nil, api.Errorf(api.CodeBadRequest, "device %s does not exist on hive %s; it has cpu, %s", req, h.cfg.ID, strings.Join(have, ", "))
}

// checkMemory refuses a model whose memory estimate exceeds what is free on
// the device now: RAM for the CPU, the GPU's VRAM (asked fresh from
// nvidia-smi, falling back to the last detection) for cuda:N.
func (h *hive) checkMemory(ctx context.Context, m api.Model, device string, gpu *api.GPU) error {
	if m.EstimatedMemory == 0 {
		return nil // no estimate: let the worker try
	}
	var free uint64
	if gpu == nil {
		var err error
		if free, err = h.ramFree(ctx); err != nil {
			return api.Errorf(api.CodeInternal, "reading free memory: %v", err)
		}
	} else {
		free = gpu.VRAMFree
		gctx, cancel := context.WithTimeout(ctx, h.cfg.DetectTimeout)
		gpus, err := capabilities.GPUFree(gctx, h.detectOptions()...)
		cancel()
		if err != nil {
			h.log.Warn().Err(err).Msg("reading free VRAM; using the last detection's figure")
		}
		for _, g := range gpus {
			if g.Index == gpu.Index {
				free = g.VRAMFree
			}
		}
	}
	if m.EstimatedMemory > free {
		return api.Errorf(CodeInsufficientMemory, "model %s needs %s, %s free on %s (hive %s); stop a worker or pick another device or hive",
			m.ID, catalog.HumanBytes(m.EstimatedMemory), catalog.HumanBytes(free), device, h.cfg.ID)
	}
	return nil
}

// newWorkerID is <hive>-<model key>-<4 hex>, cut to a valid token.
func (h *hive) newWorkerID(key string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	for {
		var b [2]byte
		_, _ = rand.Read(b[:])
		suffix := "-" + hex.EncodeToString(b[:])
		head := h.cfg.ID + "-" + key
		if max := subjects.MaxIDLen - len(suffix); len(head) > max {
			head = strings.TrimRight(head[:max], "-_")
		}
		id := head + suffix
		if _, taken := h.workers[id]; !taken && subjects.ValidateID(subjects.KindWorker, id) == nil {
			return id
		}
	}
}

// startWorker launches the worker process and hands it to its supervisor.
func (h *hive) startWorker(ctx context.Context, id string, m api.Model, device string, a api.WorkerSpawnArgs) (*workerProc, error) {
	args := []string{
		"--id", id, "--hive", h.cfg.ID, "--model", m.ID, "--model-path", m.Path, "--device", device,
		"--heartbeat", h.cfg.Heartbeat.String(), "--namespace", h.bus.Space.Namespace(),
	}
	url := h.cfg.NATSURL
	if url == "" {
		url = h.bus.NC.ConnectedUrlRedacted()
	}
	if url != "" {
		args = append(args, "--nats", url)
	}
	if a.Slots > 0 {
		args = append(args, "--slots", strconv.Itoa(a.Slots))
	}
	if a.Ctx > 0 {
		args = append(args, "--ctx", strconv.Itoa(a.Ctx))
	}
	if a.Threads > 0 {
		args = append(args, "--threads", strconv.Itoa(a.Threads))
	}
	if h.cfg.LlamaLib != "" {
		args = append(args, "--llama-lib", h.cfg.LlamaLib)
	}
	credArgs, env, keyFile, err := h.workerCredentials(ctx, id, m.Key)
	if err != nil {
		return nil, err
	}
	args = append(args, credArgs...)
	p, err := proc.Start(proc.Spec{
		Path: h.cfg.WorkerBin, Args: args, Env: env,
		LogPath:       filepath.Join(h.cfg.workersDir(), id+".log"),
		DieWithParent: true,
	})
	if err != nil {
		removeKey(keyFile)
		return nil, err
	}
	w := &workerProc{id: id, model: m.ID, key: m.Key, device: device, slots: a.Slots, proc: p, keyFile: keyFile, started: time.Now(), gone: make(chan struct{})}
	h.mu.Lock()
	h.workers[id] = w
	h.mu.Unlock()
	h.log.Info().Str("worker", id).Int("pid", p.Pid).Str("model", m.ID).Str("device", device).Msg("worker started")
	go h.supervise(w)
	h.kickBeat()
	return w, nil
}

// awaitReady waits until the worker's registry entry says ready, the
// process exits, the load timeout passes, or the caller gives up.
func (h *hive) awaitReady(ctx context.Context, w *workerProc, beats <-chan *nats.Msg, timeout time.Duration) (api.WorkerStatus, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case msg := <-beats:
			var st api.WorkerStatus
			if len(msg.Data) == 0 || json.Unmarshal(msg.Data, &st) != nil {
				continue // a delete or purge marker, not a beat
			}
			if st.State == api.WorkerReady || st.State == api.WorkerBusy {
				w.ready.Store(true)
				h.kickBeat()
				return st, nil
			}
		case <-w.gone:
			return api.WorkerStatus{}, api.Errorf(api.CodeInternal, "worker %s failed to load model %s (%s); last lines of its log %s:\n%s",
				w.id, w.model, w.exit, w.proc.Log, proc.Tail(w.proc.Log, logTailLines))
		case <-timer.C:
			h.kill(w)
			return api.WorkerStatus{}, api.Errorf(api.CodeTimeout, "worker %s did not become ready within %s, so it was killed; last lines of its log %s:\n%s",
				w.id, timeout, w.proc.Log, proc.Tail(w.proc.Log, logTailLines))
		case <-ctx.Done():
			h.kill(w)
			return api.WorkerStatus{}, api.Errorf(api.CodeTimeout, "gave up waiting for worker %s (%v), so it was killed", w.id, ctx.Err())
		}
	}
}

// kill stops a worker that failed to start, quickly, and waits until its
// exit is handled.
func (h *hive) kill(w *workerProc) {
	w.stopping.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _ = w.proc.Stop(ctx, time.Second)
	select {
	case <-w.gone:
	case <-ctx.Done():
	}
}

// supervise is the one place a worker's exit is handled. An exit the hive
// did not ask for is reported at once: the registry entry is purged, so the
// queen sees the worker lost now rather than when its TTL runs out, and the
// cluster hears why.
func (h *hive) supervise(w *workerProc) {
	<-w.proc.Done()
	w.exit = "exit status 0"
	if err := w.proc.ExitErr(); err != nil {
		w.exit = err.Error() // "signal: killed", "exit status 1"
	}
	expected := w.stopping.Load()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// A worker that left cleanly deleted its own entry; anything else
	// (killed, crashed, stopped by a signal) leaves one to purge.
	purge := !expected
	if expected {
		if e, err := h.workersKV.Get(ctx, subjects.WorkerKey(h.cfg.ID, w.id)); err == nil && e.Operation() == jetstream.KeyValuePut {
			purge = true
		}
	}
	if purge {
		h.reportExit(w)
	}
	h.mu.Lock()
	delete(h.workers, w.id)
	h.mu.Unlock()
	removeKey(w.keyFile)
	if !expected {
		human := fmt.Sprintf("worker %s on hive %s exited unexpectedly (%s)", w.id, h.cfg.ID, w.exit)
		if !w.ready.Load() {
			human = fmt.Sprintf("worker %s on hive %s exited while loading model %s (%s)", w.id, h.cfg.ID, w.model, w.exit)
		}
		_ = h.narrator.Narrate(ctx, api.Narration{
			Level: "warn", Action: "worker-exited", Target: w.id, WorkerID: w.id, Human: human,
			Fields: map[string]any{"exit": w.exit, "model": w.model, "pid": w.proc.Pid, "log": w.proc.Log},
		})
		msg := "worker exited unexpectedly"
		if !w.ready.Load() {
			msg = "worker exited while loading"
		}
		h.log.Warn().Str("worker", w.id).Str("exit", w.exit).Str("log_tail", proc.Tail(w.proc.Log, logTailLines)).Msg(msg)
	} else {
		h.log.Info().Str("worker", w.id).Str("exit", w.exit).Msg("worker stopped")
	}
	close(w.gone)
	h.kickBeat()
}

// reportExit purges the registry entry of a worker that exited, saying how.
// A worker that dies while the bus is away (the queen that embeds it
// restarting, a cut link) is reported once it is back, for as long as a
// job's end would be (bus.DefaultOutage), or until 5 s after the hive
// begins to stop: the queen tells a death from a silence by this report
// alone, and a report given up on leaves the worker "lost" once its entry's
// TTL runs out instead of "died (signal: killed)".
func (h *hive) reportExit(w *workerProc) {
	ctx, cancel := context.WithTimeout(context.Background(), bus.DefaultOutage)
	defer cancel()
	stop := context.AfterFunc(h.stopCtx, func() { time.AfterFunc(5*time.Second, cancel) })
	defer stop()
	key := subjects.WorkerKey(h.cfg.ID, w.id)
	_, err := bus.WhileUnavailable(ctx, 5*time.Second, func(ctx context.Context) (struct{}, error) {
		// Not sent while the connection knows it is down: nats.go would
		// keep each try for the reconnect and send them all then.
		if !h.bus.NC.IsConnected() {
			return struct{}{}, nats.ErrDisconnected
		}
		return struct{}{}, h.bus.PurgeExited(ctx, h.bus.Space.WorkersBucket(), key, bus.ExitReport{Exit: w.exit}, bus.HeartbeatMarkerTTL)
	})
	if err != nil {
		h.log.Warn().Err(err).Str("worker", w.id).Msg("purging the registry entry of an exited worker")
	}
}

// workerStop drains a worker, then signals it. Codes: 404 unknown worker,
// 400 negative grace.
func (h *hive) workerStop(ctx context.Context, args api.WorkerStopArgs) (struct{}, error) {
	grace := time.Duration(args.Grace)
	if grace < 0 {
		return struct{}{}, api.Errorf(api.CodeBadRequest, "grace must not be negative, got %s", grace)
	}
	if grace == 0 {
		grace = DefaultWorkerStopGrace
	}
	h.mu.Lock()
	w := h.workers[args.Worker]
	h.mu.Unlock()
	if w == nil {
		return struct{}{}, api.Errorf(api.CodeNotFound, "worker %s is not running on hive %s", args.Worker, h.cfg.ID)
	}
	h.stopWorker(ctx, w, grace, args.JobID)
	return struct{}{}, nil
}

// stopWorker asks the worker to drain within grace, waits grace+2s for it to
// exit, then sends SIGTERM and, after a further grace, SIGKILL. Each step is
// narrated on jobID (the cluster subject when empty). It returns once the
// exit is handled or ctx ends.
func (h *hive) stopWorker(ctx context.Context, w *workerProc, grace time.Duration, jobID string) {
	if !w.stopping.CompareAndSwap(false, true) || w.proc.Exited() {
		// Another request is stopping it, or it is already gone.
		select {
		case <-w.gone:
		case <-ctx.Done():
		}
		return
	}
	h.narrator.Say(ctx, jobID, "drain", w.id, "asking worker %s to drain (grace %s)", w.id, grace)
	subject, err := h.bus.Space.Worker(h.cfg.ID, w.id, workerDrainEndpoint)
	if err == nil {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = h.bus.Call(cctx, subject, drainRequest{Grace: api.Duration(grace)}, nil)
		cancel()
	}
	how := "drained"
	switch {
	case err != nil:
		h.narrator.Warn(ctx, jobID, "signal", w.id, "worker %s did not take the drain request (%v); sending SIGTERM", w.id, err)
	case !waitClosed(ctx, w.gone, grace+2*time.Second):
		h.narrator.Warn(ctx, jobID, "signal", w.id, "worker %s still running %s after the drain request; sending SIGTERM", w.id, grace+2*time.Second)
	}
	if !isClosed(w.gone) {
		sig, serr := w.proc.Stop(ctx, grace)
		if sig == "SIGKILL" {
			h.narrator.Warn(ctx, jobID, "signal", w.id, "worker %s ignored SIGTERM for %s; sent SIGKILL", w.id, grace)
		}
		if serr != nil {
			h.narrator.Warn(ctx, jobID, "signal", w.id, "worker %s: %v", w.id, serr)
		}
		if sig != "" {
			how = "stopped by " + sig
		}
	}
	if !waitClosed(ctx, w.gone, 10*time.Second) {
		return
	}
	h.narrator.Say(ctx, jobID, "stopped", w.id, "worker %s %s (%s)", w.id, how, w.exit)
}

// stopAllWorkers stops every worker at once, each with the stop grace.
func (h *hive) stopAllWorkers(ctx context.Context, jobID string) {
	h.mu.Lock()
	all := make([]*workerProc, 0, len(h.workers))
	for _, w := range h.workers {
		all = append(all, w)
	}
	h.mu.Unlock()
	var wg sync.WaitGroup
	for _, w := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.stopWorker(ctx, w, h.cfg.StopGrace, jobID)
		}()
	}
	wg.Wait()
}

// workersOf lists the live workers serving a model.
func (h *hive) workersOf(model string) []*workerProc {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []*workerProc
	for _, w := range h.workers {
		if w.model == model {
			out = append(out, w)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].id < out[j].id })
	return out
}

// workerList lists this hive's worker processes with their registry status;
// one not registered yet is listed as loading.
func (h *hive) workerList(ctx context.Context, _ struct{}) (api.WorkerListReply, error) {
	h.mu.Lock()
	all := make([]*workerProc, 0, len(h.workers))
	for _, w := range h.workers {
		all = append(all, w)
	}
	h.mu.Unlock()
	sort.Slice(all, func(i, j int) bool { return all[i].id < all[j].id })
	out := api.WorkerListReply{Workers: make([]api.WorkerStatus, 0, len(all))}
	for _, w := range all {
		st := api.WorkerStatus{
			ID: w.id, Hive: h.cfg.ID, Model: w.model, ModelKey: w.key, Device: w.device,
			SlotsTotal: w.slots, State: api.WorkerLoading, PID: w.proc.Pid, StartedAt: w.started.UTC(),
		}
		if e, err := h.workersKV.Get(ctx, subjects.WorkerKey(h.cfg.ID, w.id)); err == nil && e.Operation() == jetstream.KeyValuePut {
			_ = json.Unmarshal(e.Value(), &st)
		}
		out.Workers = append(out.Workers, st)
	}
	return out, nil
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func waitClosed(ctx context.Context, ch <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	case <-ctx.Done():
		return false
	}
}

// workerCredentials gives a worker its own credentials. A hive holding an
// rbee credential asks the queen for one scoped to this worker and its
// model, and writes it to a file of mode 0600 that only the worker reads
// (and that goes when the worker does). A hive on a bus set up by hand
// (a token, a user) passes what it has, in the environment. Neither is
// ever on a command line, which every user of the machine can read.
func (h *hive) workerCredentials(ctx context.Context, id, modelKey string) (args, env []string, keyFile string, err error) {
	if h.leaf != nil {
		args, env = h.leaf.workerCredentials()
		return args, env, "", nil
	}
	cr := h.cfg.Credentials
	if cr.CAFile != "" {
		args = append(args, "--"+cliutil.FlagCA, cr.CAFile)
	}
	if cr.KeyFile == "" {
		return args, cliutil.CredentialEnv(cr), "", nil
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var reply api.WorkerCredentialsReply
	err = h.bus.Call(cctx, h.bus.Space.WorkerCredentials(h.cfg.ID), api.WorkerCredentialsRequest{Worker: id, ModelKey: modelKey}, &reply)
	if errors.Is(err, bus.ErrNoResponder) {
		// No queen issues keys: a NATS deployment configured from `rbee
		// creds server-config`, where a hive's key also covers its
		// workers.
		h.log.Info().Str("worker", id).Msg("no queen issues worker credentials on this bus; the worker uses the hive's")
		return append(args, "--"+cliutil.FlagCreds, cr.KeyFile), nil, "", nil
	}
	if err != nil {
		return nil, nil, "", fmt.Errorf("asking the queen for worker %s's credentials: %w", id, err)
	}
	kp, err := auth.ParseKey([]byte(reply.Seed))
	if err != nil {
		return nil, nil, "", fmt.Errorf("the queen's credentials for worker %s: %w", id, err)
	}
	seed, _ := kp.Seed()
	keyFile = filepath.Join(h.cfg.workersDir(), id+".nk")
	p := auth.Principal{Role: auth.RoleWorker, Hive: h.cfg.ID, Worker: id, ModelKey: modelKey}
	if err := auth.WriteKeyFile(keyFile, reply.Name, p, seed, nil); err != nil {
		return nil, nil, "", fmt.Errorf("writing worker %s's credentials: %w", id, err)
	}
	return append(args, "--"+cliutil.FlagCreds, keyFile), nil, keyFile, nil
}

func removeKey(path string) {
	if path != "" {
		_ = os.Remove(path)
	}
}
