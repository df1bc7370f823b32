package queen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/remote"
	"github.com/rbee-dev/rbee/internal/version"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
)

// operation is one kind of job the queen runs: how to check its arguments
// at submit time, and how to run it.
type operation struct {
	// admit validates the arguments and may refuse the job before it
	// exists (unknown model, no hive online, queue full).
	admit func(ctx context.Context, args json.RawMessage) error
	// run does the work; it is not used for infer, which the scheduler
	// hands to a worker.
	run func(ctx context.Context, job api.Job) (any, error)
}

func (q *Queen) operations() map[string]operation {
	return map[string]operation{
		api.OpNoop:          {admit: admitJSON[noopArgs], run: q.runNoop},
		api.OpInfer:         {admit: q.admitInfer},
		api.OpHiveStart:     {admit: q.admitHive, run: q.runHiveStart},
		api.OpHiveStop:      {admit: q.admitHive, run: q.runHiveStop},
		api.OpHiveInstall:   {admit: q.admitHive, run: q.runHiveInstall},
		api.OpHiveUninstall: {admit: q.admitHive, run: q.runHiveUninstall},
		api.OpWorkerSpawn:   {admit: admitJSON[api.WorkerSpawnArgs], run: q.runWorkerSpawn},
		api.OpWorkerStop:    {admit: admitJSON[api.WorkerStopArgs], run: q.runWorkerStop},
		api.OpModelDownload: {admit: admitJSON[api.ModelAddArgs], run: q.runModelDownload},
	}
}

func admitJSON[T any](_ context.Context, raw json.RawMessage) error {
	_, err := decodeArgs[T](raw)
	return err
}

func decodeArgs[T any](raw json.RawMessage) (T, error) {
	var v T
	if len(raw) == 0 {
		return v, nil
	}
	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return v, api.Fail(api.ReasonInvalidRequest, "", "malformed arguments: %v", err)
	}
	return v, nil
}

func (q *Queen) submit(ctx context.Context, req api.SubmitRequest) (api.SubmitReply, error) {
	ops := q.operations()
	op, ok := ops[req.Op.Kind]
	if !ok {
		kinds := make([]string, 0, len(ops))
		for k := range ops {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		return api.SubmitReply{}, api.Fail(api.ReasonInvalidRequest, "op.kind", "unknown operation %q; known operations: %s", req.Op.Kind, strings.Join(kinds, ", "))
	}
	if err := op.admit(ctx, req.Op.Args); err != nil {
		return api.SubmitReply{}, err
	}
	timeout := q.cfg.JobTimeout
	if req.Timeout > 0 {
		timeout = time.Duration(req.Timeout)
	}
	// The deadline is armed by the leader from the record (it watches
	// them all, whichever queen took the submit), with the timeout read
	// back as the deadline less the creation time.
	now := time.Now().UTC()
	deadline := now.Add(timeout)
	job := api.Job{ID: req.JobID, Op: req.Op, CreatedAt: now, Deadline: &deadline}
	if job.ID == "" {
		job.ID = jobs.NewID()
	} else if err := jobs.ValidID(job.ID); err != nil {
		return api.SubmitReply{}, api.Fail(api.ReasonInvalidParam, "job_id", "%v", err)
	}
	var err error
	if req.Op.Kind == api.OpInfer {
		job, err = q.submitInfer(ctx, job)
	} else {
		// Marked as this process's before the record exists, so a
		// term beginning meanwhile does not take it for a dead queen's.
		id := job.ID
		q.localOps.Store(id, struct{}{})
		if job, err = q.jobs.Create(ctx, job); err != nil {
			q.localOps.Delete(id)
		}
	}
	if errors.Is(err, jobs.ErrExists) {
		return api.SubmitReply{}, api.Fail(api.ReasonConflict, "job_id", "job id %s is taken: submit again without one, or with a new one", req.JobID)
	}
	if err != nil {
		return api.SubmitReply{}, err
	}
	if req.Op.Kind != api.OpInfer {
		q.startLocal(job, op.run)
	}
	return api.SubmitReply{JobID: job.ID}, nil
}

// startLocal runs a queen-side operation in a goroutine the queen owns. The
// job is cancelled through its cancel subject, like any job, so a cancel
// from any client (or any queen) reaches it.
func (q *Queen) startLocal(job api.Job, run func(context.Context, api.Job) (any, error)) {
	q.runs.Add(1)
	go func() {
		defer q.runs.Done()
		defer q.localOps.Delete(job.ID)
		ctx, cancel := context.WithCancel(q.runCtx)
		defer cancel()
		if job.Deadline != nil {
			var c2 context.CancelFunc
			ctx, c2 = context.WithDeadline(ctx, *job.Deadline)
			defer c2()
		}
		if stop, err := q.bus.OnCancel(job.ID, 0, func(error) { cancel() }); err == nil {
			defer stop()
		}
		// The start is recorded before any work, so a keeper sees the
		// job run. A bus that cannot store it now is waited out, as a
		// worker waits to record a job's end; a job whose start cannot
		// be recorded is failed, never left queued with nobody to run it.
		sctx, scancel := context.WithTimeout(ctx, bus.DefaultOutage)
		_, err := bus.WhileUnavailable(sctx, 10*time.Second, func(ctx context.Context) (api.Job, error) {
			return q.jobs.Transition(ctx, job.ID, api.JobRunning, nil)
		})
		scancel()
		switch {
		case err == nil:
		case errors.Is(err, jobs.ErrTerminal), ctx.Err() != nil && q.runCtx.Err() == nil:
			// Cancelled or timed out before it started: whoever ended
			// it recorded why.
			q.log.Debug().Err(err).Str("job", job.ID).Msg("job ended before it started")
			return
		default:
			q.log.Warn().Err(err).Str("job", job.ID).Msg("could not record the start of an operation; failing it")
			why := api.AsError(err)
			why.Message = "the queen could not record the operation's start: " + why.Message
			if q.runCtx.Err() != nil {
				why = api.Fail(api.ReasonUnavailable, "", "queen shut down before the operation started")
			}
			fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer fcancel()
			_, _ = q.jobs.Transition(fctx, job.ID, api.JobFailed, func(j *api.Job) { j.SetError(why) })
			return
		}
		result, err := run(ctx, job)
		// The end's write is bounded from now: the run may take longer
		// than any bound set before it.
		fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer fcancel()
		if err != nil {
			if ctx.Err() != nil && q.runCtx.Err() == nil {
				// Cancelled or timed out: whoever did so already
				// recorded why.
				return
			}
			// An operation's error keeps the reason it was born with
			// (a hive's answer, a bad argument); anything else is internal.
			why := api.AsError(err)
			if q.runCtx.Err() != nil {
				why = api.Fail(api.ReasonUnavailable, "", "queen shut down during the operation: %s", why.Message)
			}
			_, _ = q.jobs.Transition(fctx, job.ID, api.JobFailed, func(j *api.Job) { j.SetError(why) })
			return
		}
		var raw json.RawMessage
		if result != nil {
			raw, _ = json.Marshal(result)
		}
		_, _ = q.jobs.Transition(fctx, job.ID, api.JobCompleted, func(j *api.Job) { j.Result = raw })
	}()
}

func (q *Queen) say(ctx context.Context, job, action, target, format string, args ...any) {
	q.narrator.Say(ctx, job, action, target, format, args...)
}

type noopArgs struct {
	// Sleep keeps the job running, for tests of cancel and deadlines.
	Sleep api.Duration `json:"sleep,omitempty"`
}

func (q *Queen) runNoop(ctx context.Context, job api.Job) (any, error) {
	args, _ := decodeArgs[noopArgs](job.Op.Args)
	q.say(ctx, job.ID, "noop", "", "nothing to do; the job flow works")
	if args.Sleep > 0 {
		select {
		case <-time.After(time.Duration(args.Sleep)):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return map[string]string{"result": "ok"}, nil
}

func (q *Queen) jobGet(ctx context.Context, req api.JobRequest) (api.Job, error) {
	job, err := q.jobs.Get(ctx, req.ID)
	return job, jobErr(err)
}

func jobErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, subjects.ErrInvalidID):
		return api.Fail(api.ReasonInvalidParam, "id", "%v", err)
	case errors.Is(err, jobs.ErrNotFound):
		return api.Fail(api.ReasonNotFound, "id", "%v", err)
	case errors.Is(err, jobs.ErrTerminal):
		return api.Fail(api.ReasonConflict, "", "%v", err)
	}
	return err
}

func (q *Queen) jobList(ctx context.Context, req api.JobListRequest) (api.JobListReply, error) {
	if req.State != "" && !req.State.Valid() {
		return api.JobListReply{}, api.Fail(api.ReasonInvalidParam, "state", "unknown state %q; use queued, running, completed, failed or cancelled", req.State)
	}
	if req.Before != "" {
		if err := subjects.ValidateID(subjects.KindJob, req.Before); err != nil {
			return api.JobListReply{}, api.Fail(api.ReasonInvalidParam, "before", "list cursor: %v", err)
		}
	}
	// Half the bus's max payload leaves room for the reply's framing and for
	// a server whose limit is lower than the one this connection was told.
	budget := int(q.bus.NC.MaxPayload() / 2)
	if budget <= 0 {
		budget = 512 << 10 // half of NATS's default 1 MiB, before any server info
	}
	return q.jobs.Page(ctx, req.State, req.Before, req.Limit, budget)
}

// cancelJob is the one path by which a job is cancelled or failed from
// outside its worker, for the keeper, the gateway (client gone), the
// scheduler and the queen's own deadlines; why is recorded with its reason.
func (q *Queen) cancelJob(ctx context.Context, id string, why *api.Error, state api.JobState) (api.Job, error) {
	job, err := q.jobs.Transition(ctx, id, state, func(j *api.Job) { j.SetError(why) })
	if err != nil {
		return job, err
	}
	q.signalCancel(id)
	return job, nil
}

func (q *Queen) signalCancel(id string) {
	if subj, err := q.bus.Space.JobCancel(id); err == nil {
		_ = q.bus.NC.Publish(subj, nil)
	}
}

// signalGiveUp tells the worker of one attempt of a job, should it still
// run it, that the attempt is over and the queen records what follows
// (api.GiveUp).
func (q *Queen) signalGiveUp(id string, attempt int, why *api.Error) {
	if subj, err := q.bus.Space.JobCancel(id); err == nil {
		data, _ := json.Marshal(api.GiveUp{Attempt: attempt, Error: why})
		_ = q.bus.NC.Publish(subj, data)
	}
}

func (q *Queen) jobCancel(ctx context.Context, req api.JobRequest) (api.Job, error) {
	job, err := q.cancelJob(ctx, req.ID, api.Fail(api.ReasonCancelled, "", "cancelled by user"), api.JobCancelled)
	if errors.Is(err, jobs.ErrTerminal) {
		if job.State == api.JobCancelled {
			return job, nil // cancelling twice is harmless
		}
		return job, api.Fail(api.ReasonConflict, "", "job %s already %s; it cannot be cancelled", req.ID, job.State)
	}
	return job, jobErr(err)
}

// statusReadTimeout bounds each store read of a status report, well inside
// the keeper's 15 s wait for the whole answer.
const statusReadTimeout = 3 * time.Second

func (q *Queen) status(ctx context.Context, _ struct{}) (api.Status, error) {
	// Status is what a person runs when something is wrong: a store that
	// does not answer (no quorum) bounds each read, and the report says
	// what it lacks instead of timing out whole.
	var problems []string
	unreadable := func(what string, err error) {
		problems = append(problems, fmt.Sprintf("%s cannot be read now (the bus's JetStream does not answer: no quorum, or a leader being elected): %v", what, err))
	}
	rctx, cancel := context.WithTimeout(ctx, statusReadTimeout)
	counts, err := q.jobs.Counts(rctx)
	cancel()
	if err != nil {
		unreadable("job records", err)
	}
	rctx, cancel = context.WithTimeout(ctx, statusReadTimeout)
	hives, err := q.hiveViews(rctx)
	cancel()
	if err != nil {
		unreadable("the hive inventory", err)
	}
	snap := q.registry.Snapshot()
	workers := make([]api.WorkerStatus, 0, len(snap.Workers))
	for _, w := range snap.Workers {
		workers = append(workers, w)
	}
	sort.Slice(workers, func(i, j int) bool { return workers[i].ID < workers[j].ID })
	return api.Status{
		Version: version.Version, StartedAt: q.started, Uptime: api.Duration(time.Since(q.started).Round(time.Second)),
		BusURL: q.BusURL(), Hives: hives, Workers: workers, Jobs: counts, Queues: q.queueDepths(ctx),
		Queen: q.id, Leader: q.lease.Leader(), Role: q.role(), Problems: problems,
	}, nil
}

// role says whether this queen leads (runs the scheduler) or stands by.
func (q *Queen) role() string {
	if q.Leading() {
		return api.QueenLeader
	}
	return api.QueenStandby
}

// --- hive inventory ---

func (q *Queen) hiveAdd(ctx context.Context, req api.HiveAddRequest) (api.InventoryEntry, error) {
	if err := subjects.ValidateID(subjects.KindHive, req.Name); err != nil {
		return api.InventoryEntry{}, api.Fail(api.ReasonInvalidParam, "name", "%v", err)
	}
	entry := api.InventoryEntry{Name: req.Name, BinDir: req.BinDir, Prefix: req.Prefix, AddedAt: time.Now().UTC()}
	if req.SSH != "" {
		if _, err := remote.ParseTarget(req.SSH); err != nil {
			return api.InventoryEntry{}, api.Fail(api.ReasonInvalidParam, "ssh", "ssh target %q: %v", req.SSH, err)
		}
		entry.SSH = &api.SSHTarget{Spec: req.SSH, IdentityFile: req.IdentityFile}
	}
	data, _ := json.Marshal(entry)
	if _, err := q.inventory.Create(ctx, req.Name, data); err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return api.InventoryEntry{}, api.Fail(api.ReasonConflict, "name", "hive %s already exists; remove it first to change it", req.Name)
		}
		return api.InventoryEntry{}, err
	}
	return entry, nil
}

func (q *Queen) inventoryEntry(ctx context.Context, name string) (api.InventoryEntry, error) {
	if err := subjects.ValidateID(subjects.KindHive, name); err != nil {
		return api.InventoryEntry{}, api.Fail(api.ReasonInvalidParam, "name", "%v", err)
	}
	e, err := q.inventory.Get(ctx, name)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return api.InventoryEntry{}, api.Fail(api.ReasonNotFound, "name", "hive %s is not in the inventory; add it with `rbee hive add %s`", name, name)
	}
	if err != nil {
		return api.InventoryEntry{}, err
	}
	var entry api.InventoryEntry
	if err := json.Unmarshal(e.Value(), &entry); err != nil {
		return api.InventoryEntry{}, fmt.Errorf("inventory entry %s is corrupt: %w", name, err)
	}
	return entry, nil
}

func (q *Queen) hiveRemove(ctx context.Context, req api.HiveRequest) (api.InventoryEntry, error) {
	entry, err := q.inventoryEntry(ctx, req.Name)
	if err != nil {
		return entry, err
	}
	if rec, ok := q.registry.Snapshot().Hives[req.Name]; ok && rec.State == api.HiveOnline {
		return entry, api.Fail(api.ReasonConflict, "name", "hive %s is running; stop it first with `rbee hive stop %s`", req.Name, req.Name)
	}
	if err := q.inventory.Delete(ctx, req.Name); err != nil {
		return entry, err
	}
	return entry, nil
}

func (q *Queen) hiveViews(ctx context.Context) ([]api.HiveView, error) {
	views := map[string]*api.HiveView{}
	keys, err := q.inventory.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	for k := range keys.Keys() {
		entry, err := q.inventoryEntry(ctx, k)
		if err != nil {
			continue
		}
		views[k] = &api.HiveView{Name: k, Address: entry.Address(), State: api.HiveOffline, Entry: &entry}
	}
	for id, rec := range q.registry.Snapshot().Hives {
		v, ok := views[id]
		if !ok {
			if rec.State == api.HiveOffline {
				continue // left cleanly and not in the inventory: gone
			}
			v = &api.HiveView{Name: id, Address: "unmanaged"}
			views[id] = v
		}
		st := rec.Status
		seen := rec.LastSeen
		v.State, v.Status, v.LastSeen = rec.State, &st, &seen
	}
	out := make([]api.HiveView, 0, len(views))
	for _, v := range views {
		out = append(out, *v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (q *Queen) hiveList(ctx context.Context, _ struct{}) (api.HiveListReply, error) {
	views, err := q.hiveViews(ctx)
	return api.HiveListReply{Hives: views}, err
}

func (q *Queen) hiveGet(ctx context.Context, req api.HiveRequest) (api.HiveView, error) {
	if err := subjects.ValidateID(subjects.KindHive, req.Name); err != nil {
		return api.HiveView{}, api.Fail(api.ReasonInvalidParam, "name", "%v", err)
	}
	views, err := q.hiveViews(ctx)
	if err != nil {
		return api.HiveView{}, err
	}
	for _, v := range views {
		if v.Name == req.Name {
			return v, nil
		}
	}
	return api.HiveView{}, api.Fail(api.ReasonNotFound, "name", "hive %s is not in the inventory and not running; add it with `rbee hive add %s`", req.Name, req.Name)
}

func (q *Queen) workerList(_ context.Context, req api.HiveRequest) (api.WorkerListReply, error) {
	snap := q.registry.Snapshot()
	out := []api.WorkerStatus{}
	for _, w := range snap.Workers {
		if req.Name == "" || w.Hive == req.Name {
			out = append(out, w)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return api.WorkerListReply{Workers: out}, nil
}
