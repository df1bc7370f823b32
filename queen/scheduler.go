package queen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
)

// maxAttempts bounds how often an inference is handed to a worker: a job
// is retried only when its worker died before sending any token.
const maxAttempts = 2

// scheduler places inference jobs. A job goes onto its model's work queue at
// once; workers of that model pull it when a slot frees. When no worker
// serves the model, the scheduler asks the best hive to start one, one
// spawn per model at a time, while the job waits in the queue.
type scheduler struct {
	q         *Queen
	deadlines *deadlineKeeper

	// mu guards spawning, the only state the scheduler keeps: which model
	// keys have a worker spawn in flight, so eight jobs for a cold model
	// start one worker, not eight.
	mu       sync.Mutex
	spawning map[string]chan struct{}
}

func newScheduler(q *Queen) *scheduler {
	return &scheduler{q: q, spawning: map[string]chan struct{}{}}
}

func (s *scheduler) run(ctx context.Context) { <-ctx.Done() }

// admit checks an infer request before a job exists, so the errors a user
// can cause come back at once with a fitting code.
func (s *scheduler) admit(ctx context.Context, raw json.RawMessage) error {
	args, err := decodeArgs[api.InferArgs](raw)
	if err != nil {
		return err
	}
	if err := validateInfer(args); err != nil {
		return err
	}
	key, _ := subjects.ModelKey(args.Model)
	snap := s.q.registry.Snapshot()
	online := 0
	for _, h := range snap.Hives {
		if h.State == api.HiveOnline {
			online++
		}
	}
	if online == 0 {
		return api.Errorf(api.CodeUnavailable, "no hive is online; start one with `rbee hive start NAME` (add it first with `rbee hive add NAME`)")
	}
	if args.Hive != "" {
		if h, ok := snap.Hives[args.Hive]; !ok || h.State != api.HiveOnline {
			return api.Errorf(api.CodeUnavailable, "hive %s is not online; start it with `rbee hive start %s`", args.Hive, args.Hive)
		}
	}
	if !s.modelServed(snap, key, args) && len(s.hivesWithModel(snap, key, args)) == 0 {
		if !args.Pull {
			return api.Errorf(api.CodeNotFound, "model %s is not on any online hive; download it with `rbee model download --hive HIVE SOURCE --name %s` (SOURCE: an https:// URL, hf:org/repo/file.gguf or file:///path), or pass --pull with -m SOURCE; for the offline demo model: `rbee model synth --hive HIVE %s`", args.Model, args.Model, args.Model)
		}
		if args.Source == "" {
			return api.Errorf(api.CodeBadRequest, "invalid model: --pull needs -m to be a source (https://…, hf:org/repo/file.gguf or file:///path) to download %s from", args.Model)
		}
	}
	if depth := s.queueDepths()[args.Model]; depth >= s.q.cfg.MaxQueue {
		return api.Errorf(api.CodeQueueFull, "queue full: %d requests already wait for model %s (limit %d); try again later", depth, args.Model, s.q.cfg.MaxQueue)
	}
	return nil
}

func validateInfer(a api.InferArgs) error {
	bad := func(field, format string, args ...any) error {
		return api.Errorf(api.CodeBadRequest, "invalid %s: %s", field, fmt.Sprintf(format, args...))
	}
	if err := subjects.ValidateModelID(a.Model); err != nil {
		return api.Errorf(api.CodeBadRequest, "invalid model: %v", err)
	}
	if strings.TrimSpace(a.Prompt) == "" && len(a.Messages) == 0 {
		return bad("prompt", "it is empty")
	}
	p := a.Sampling
	switch {
	case p.MaxTokens < 0:
		return bad("max_tokens", "%d is below 1", p.MaxTokens)
	case p.Temperature < 0 || p.Temperature > 2:
		return bad("temperature", "%g is outside 0…2", p.Temperature)
	case p.TopP < 0 || p.TopP > 1:
		return bad("top_p", "%g is outside 0…1", p.TopP)
	case p.TopK < 0:
		return bad("top_k", "%d is below 0", p.TopK)
	case p.MinP < 0 || p.MinP > 1:
		return bad("min_p", "%g is outside 0…1", p.MinP)
	case p.RepeatPenalty < 0:
		return bad("repeat_penalty", "%g is below 0", p.RepeatPenalty)
	}
	if a.Hive != "" {
		if err := subjects.ValidateID(subjects.KindHive, a.Hive); err != nil {
			return api.Errorf(api.CodeBadRequest, "invalid hive: %v", err)
		}
	}
	if a.Device != "" && a.Device != "cpu" && !strings.HasPrefix(a.Device, "cuda:") {
		return bad("device", "%q; use cpu or cuda:N", a.Device)
	}
	return nil
}

// fits reports whether a worker or hive matches the job's pins.
func matchesPins(hive, device string, a api.InferArgs) bool {
	return (a.Hive == "" || a.Hive == hive) && (a.Device == "" || a.Device == device)
}

func (s *scheduler) modelServed(snap *Snapshot, key string, a api.InferArgs) bool {
	for _, w := range snap.Workers {
		if w.ModelKey == key && w.State != api.WorkerDraining && matchesPins(w.Hive, w.Device, a) {
			return true
		}
	}
	return false
}

// hivesWithModel ranks online hives holding the model: enough free memory
// for the model's estimate first, then fewest busy worker slots.
func (s *scheduler) hivesWithModel(snap *Snapshot, key string, a api.InferArgs) []string {
	type cand struct {
		id   string
		fits bool
		busy int
	}
	var cands []cand
	for id, h := range snap.Hives {
		if h.State != api.HiveOnline || (a.Hive != "" && a.Hive != id) {
			continue
		}
		for _, m := range h.Status.Models {
			if m.Key != key {
				continue
			}
			busy := 0
			for _, w := range snap.Workers {
				if w.Hive == id {
					busy += w.SlotsBusy
				}
			}
			cands = append(cands, cand{id: id, fits: m.EstimatedMemory <= h.Status.RAMFree, busy: busy})
		}
	}
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].fits != cands[j].fits {
			return cands[i].fits
		}
		if cands[i].busy != cands[j].busy {
			return cands[i].busy < cands[j].busy
		}
		return cands[i].id < cands[j].id
	})
	out := make([]string, len(cands))
	for i, c := range cands {
		out[i] = c.id
	}
	return out
}

// enqueue hands an admitted job to the work queue and makes sure a worker
// will serve it.
func (s *scheduler) enqueue(job api.Job) {
	s.q.runs.Add(1)
	go func() {
		defer s.q.runs.Done()
		// Placing may download a model (--pull) and start a worker; the
		// job's own deadline bounds it.
		deadline := time.Now().Add(s.q.cfg.JobTimeout)
		if job.Deadline != nil {
			deadline = *job.Deadline
		}
		ctx, cancel := context.WithDeadline(s.q.runCtx, deadline)
		defer cancel()
		if err := s.place(ctx, job, 1); err != nil {
			s.fail(job.ID, err.Error())
		}
	}()
}

func (s *scheduler) fail(id, reason string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(s.q.runCtx), 10*time.Second)
	defer cancel()
	if _, err := s.q.cancelJob(ctx, id, reason, api.JobFailed); err != nil && !errors.Is(err, jobs.ErrTerminal) {
		s.q.log.Warn().Err(err).Str("job", id).Msg("failing job")
	}
}

func (s *scheduler) place(ctx context.Context, job api.Job, attempt int) error {
	args, err := decodeArgs[api.InferArgs](job.Op.Args)
	if err != nil {
		return err
	}
	if args.FirstTokenTimeout == 0 {
		args.FirstTokenTimeout = api.Duration(s.q.cfg.FirstTokenTimeout)
	}
	key, err := subjects.ModelKey(args.Model)
	if err != nil {
		return err
	}
	subject, err := s.q.bus.Space.Infer(key)
	if err != nil {
		return err
	}
	data, _ := json.Marshal(api.InferRequest{JobID: job.ID, Args: args, Attempt: attempt, EnqueuedAt: time.Now().UTC()})
	// The request id dedupes a re-publish of the same attempt (after a
	// queen restart, say) within the stream's duplicate window.
	if _, err := s.q.bus.JS.Publish(ctx, subject, data, jetstream.WithMsgID(fmt.Sprintf("%s-%d", job.ID, attempt))); err != nil {
		return fmt.Errorf("could not queue the request: %w", err)
	}
	snap := s.q.registry.Snapshot()
	if s.modelServed(snap, key, args) {
		s.q.say(ctx, job.ID, "queued", args.Model, "queued for model %s; a worker will take it when a slot is free", args.Model)
		return nil
	}
	return s.ensureWorker(ctx, job.ID, key, args)
}

// ensureWorker starts a worker for the model unless one is starting
// already, in which case it waits for that one.
func (s *scheduler) ensureWorker(ctx context.Context, jobID, key string, args api.InferArgs) error {
	s.mu.Lock()
	if wait, ok := s.spawning[key]; ok {
		s.mu.Unlock()
		s.q.say(ctx, jobID, "queued", args.Model, "queued; a worker for %s is starting", args.Model)
		select {
		case <-wait:
		case <-ctx.Done():
		}
		return nil
	}
	done := make(chan struct{})
	s.spawning[key] = done
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.spawning, key)
		s.mu.Unlock()
		close(done)
	}()

	hives := s.hivesWithModel(s.q.registry.Snapshot(), key, args)
	if len(hives) == 0 && args.Pull && args.Source != "" {
		hive, err := s.pull(ctx, jobID, args)
		if err != nil {
			return err
		}
		hives = []string{hive}
	}
	var errs []string
	for _, hive := range hives {
		s.q.say(ctx, jobID, "schedule", hive, "no worker serves %s; asking hive %s to start one", args.Model, hive)
		err := s.q.spawnWorker(ctx, jobID, api.WorkerSpawnArgs{Hive: hive, Model: args.Model, Device: args.Device})
		if err == nil {
			return nil
		}
		if s.q.registry.Snapshot().Workers != nil && s.modelServed(s.q.registry.Snapshot(), key, args) {
			return nil
		}
		errs = append(errs, fmt.Sprintf("%s: %v", hive, err))
		s.q.narrator.Warn(ctx, jobID, "schedule", hive, "hive %s could not start a worker for %s: %v", hive, args.Model, err)
	}
	if len(errs) == 0 {
		return fmt.Errorf("no online hive has model %s", args.Model)
	}
	return fmt.Errorf("no worker could be started for %s (%s)", args.Model, strings.Join(errs, "; "))
}

// pull downloads the model onto the online hive with the most free memory
// (or the pinned one), narrating the download on the job.
func (s *scheduler) pull(ctx context.Context, jobID string, args api.InferArgs) (string, error) {
	var best string
	var free uint64
	for id, h := range s.q.registry.Snapshot().Hives {
		if h.State == api.HiveOnline && (args.Hive == "" || args.Hive == id) && (best == "" || h.Status.RAMFree > free) {
			best, free = id, h.Status.RAMFree
		}
	}
	if best == "" {
		return "", fmt.Errorf("no online hive to download %s to", args.Model)
	}
	s.q.say(ctx, jobID, "pull", best, "no hive has %s; downloading it from %s onto hive %s", args.Model, args.Source, best)
	subject, err := s.q.bus.Space.Hive(best, api.HiveEpModelAdd)
	if err != nil {
		return "", err
	}
	if err := s.q.bus.Call(ctx, subject, api.ModelAddArgs{Hive: best, Source: args.Source, Name: args.Model, JobID: jobID}, nil); err != nil {
		return "", fmt.Errorf("downloading %s onto hive %s: %w", args.Model, best, err)
	}
	return best, nil
}

// spawnWorker asks a hive to start a worker and waits for it, giving up
// early if the hive is lost meanwhile.
func (q *Queen) spawnWorker(ctx context.Context, jobID string, a api.WorkerSpawnArgs) error {
	subject, err := q.bus.Space.Hive(a.Hive, api.HiveEpWorkerSpawn)
	if err != nil {
		return err
	}
	a.JobID = jobID
	if a.LoadTimeout == 0 {
		a.LoadTimeout = api.Duration(q.cfg.WorkerStartTimeout)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(a.LoadTimeout)+5*time.Second)
	defer cancel()
	go func() {
		// A lost hive will never answer: stop waiting for it.
		_, _ = q.registry.Wait(ctx, func(s *Snapshot) bool { return s.Hives[a.Hive].State != api.HiveOnline })
		cancel()
	}()
	var reply api.WorkerSpawnReply
	err = q.bus.Call(ctx, subject, a, &reply)
	if err != nil && q.registry.Snapshot().Hives[a.Hive].State != api.HiveOnline {
		return fmt.Errorf("hive %s was lost while starting the worker", a.Hive)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("worker did not start within %s", time.Duration(a.LoadTimeout))
	}
	return err
}

// forget drops what the scheduler knows about a job that ended early.
func (s *scheduler) forget(string) {}

// queueDepths counts the requests waiting on each model's work queue.
func (s *scheduler) queueDepths() map[string]int {
	out := map[string]int{}
	ctx, cancel := context.WithTimeout(s.q.runCtx, 5*time.Second)
	defer cancel()
	stream, err := s.q.bus.JS.Stream(ctx, s.q.bus.Space.InferStream())
	if err != nil {
		return out
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(s.q.bus.Space.InferAll()))
	if err != nil {
		return out
	}
	keyToModel := s.modelNames()
	for subj, n := range info.State.Subjects {
		key := subj[strings.LastIndexByte(subj, '.')+1:]
		name := key
		if m, ok := keyToModel[key]; ok {
			name = m
		}
		out[name] += int(n)
	}
	return out
}

// modelNames maps model keys back to the ids users typed.
func (s *scheduler) modelNames() map[string]string {
	out := map[string]string{}
	snap := s.q.registry.Snapshot()
	for _, h := range snap.Hives {
		for _, m := range h.Status.Models {
			out[m.Key] = m.ID
		}
	}
	for _, w := range snap.Workers {
		out[w.ModelKey] = w.Model
	}
	return out
}

// workerLost handles a worker whose heartbeat expired or whose hive saw it
// die: its running jobs are retried elsewhere when no token was sent yet,
// and failed otherwise. Called on the registry goroutine, so it only starts
// work.
func (s *scheduler) workerLost(id string, last api.WorkerStatus) {
	s.q.runs.Add(1)
	go func() {
		defer s.q.runs.Done()
		ctx, cancel := context.WithTimeout(s.q.runCtx, 30*time.Second)
		defer cancel()
		running, err := s.q.jobs.List(ctx, api.JobRunning)
		if err != nil {
			return
		}
		for _, job := range running {
			if job.Worker == id {
				s.recoverJob(ctx, job, fmt.Sprintf("worker %s on hive %s died", id, last.Hive))
			}
		}
		s.rescueQueued(ctx, last.ModelKey)
	}()
}

// rescueQueued makes sure jobs still waiting for a model that just lost its
// last worker get a new one, or fail clearly instead of waiting until their
// deadline.
func (s *scheduler) rescueQueued(ctx context.Context, key string) {
	if key == "" || s.modelServed(s.q.registry.Snapshot(), key, api.InferArgs{}) {
		return
	}
	queued, err := s.q.jobs.List(ctx, api.JobQueued)
	if err != nil {
		return
	}
	var waiting []api.Job
	var args api.InferArgs
	for _, job := range queued {
		a, err := decodeArgs[api.InferArgs](job.Op.Args)
		if err != nil || job.Op.Kind != api.OpInfer {
			continue
		}
		if k, _ := subjects.ModelKey(a.Model); k == key {
			waiting = append(waiting, job)
			args = a
		}
	}
	if len(waiting) == 0 {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, s.q.cfg.WorkerStartTimeout+10*time.Second)
	defer cancel()
	if err := s.ensureWorker(sctx, waiting[0].ID, key, args); err != nil {
		for _, job := range waiting {
			s.fail(job.ID, "the last worker for "+args.Model+" is gone and no new one could be started: "+err.Error())
		}
	}
}

func (s *scheduler) recoverJob(ctx context.Context, job api.Job, why string) {
	if job.Attempts < maxAttempts && !s.tokenSent(ctx, job.ID) {
		retried, err := s.q.jobs.Transition(ctx, job.ID, api.JobQueued, func(j *api.Job) { j.Worker, j.Hive = "", "" })
		if err == nil {
			s.q.narrator.Warn(ctx, job.ID, "retry", job.Worker, "%s before sending a token; retrying the job on another worker (attempt %d)", why, retried.Attempts+1)
			if err := s.place(ctx, retried, retried.Attempts+1); err != nil {
				s.fail(job.ID, err.Error())
			}
			return
		}
	}
	s.fail(job.ID, why)
}

func (s *scheduler) tokenSent(ctx context.Context, jobID string) bool {
	subject, err := s.q.bus.Space.JobEvent(jobID, subjects.EventToken)
	if err != nil {
		return true
	}
	stream, err := s.q.bus.JS.Stream(ctx, s.q.bus.Space.JobsStream())
	if err != nil {
		return true
	}
	_, err = stream.GetLastMsgForSubject(ctx, subject)
	return !errors.Is(err, jetstream.ErrMsgNotFound)
}

// hiveLost fails or re-routes work tied to a hive that vanished. Jobs
// waiting for a worker spawn on it are released by spawnWorker itself;
// workers of the hive are handled as they are lost.
func (s *scheduler) hiveLost(id string, _ api.HiveStatus) {}
