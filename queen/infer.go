package queen

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/queen/sched"
	"github.com/rbee-dev/rbee/subjects"
)

// maxAttempts bounds how often an inference is handed to a worker: a job
// is retried only when its worker was lost before sending any token.
const maxAttempts = 2

// admitInfer checks an infer request before a job exists, so the errors a
// user can cause come back at once with a fitting code.
func (q *Queen) admitInfer(ctx context.Context, raw json.RawMessage) error {
	args, err := decodeArgs[api.InferArgs](raw)
	if err != nil {
		return err
	}
	if err := validateInfer(args); err != nil {
		return err
	}
	if err := q.checkPayload(args); err != nil {
		return err
	}
	key, _ := subjects.ModelKey(args.Model)
	// Right after a start or a reconnect, hives may not have beaten yet:
	// wait for the grace rather than refuse a hive that lives.
	wctx, cancel := context.WithTimeout(ctx, q.cfg.LivenessGrace+time.Second)
	defer cancel()
	pins := sched.Pins{Hive: args.Hive, Device: args.Device}
	snap := q.registry.WaitSettled(wctx, func(s *Snapshot) bool {
		return s.online() > 0 && (args.Hive == "" || s.HiveState(args.Hive) == api.HiveOnline) &&
			(len(s.Serving(key, pins)) > 0 || len(s.Candidates(key, pins)) > 0)
	})
	if snap.online() == 0 {
		return api.Fail(api.ReasonNoCapacity, "", "no hive is online; start one with `rbee hive start NAME` (add it first with `rbee hive add NAME`)")
	}
	if args.Hive != "" && snap.HiveState(args.Hive) != api.HiveOnline {
		return api.Fail(api.ReasonNoCapacity, "hive", "hive %s is not online; start it with `rbee hive start %s`", args.Hive, args.Hive)
	}
	if len(snap.Serving(key, pins)) == 0 && len(snap.Candidates(key, pins)) == 0 {
		if !args.Pull {
			return api.Fail(api.ReasonNotFound, "model", "model %s is not on any online hive; download it with `rbee model download --hive HIVE SOURCE --name %s` (SOURCE: an https:// URL, hf:org/repo/file.gguf or file:///path), or pass --pull with -m SOURCE; for the offline demo model: `rbee model synth --hive HIVE %s`", args.Model, args.Model, args.Model)
		}
		if args.Source == "" {
			return api.InvalidParam("model", "--pull needs -m to be a source (https://…, hf:org/repo/file.gguf or file:///path) to download %s from", args.Model)
		}
	}
	// The workers' context is known once they serve: a max_tokens that
	// fits none of them is refused here, before it becomes a job, and so
	// is a prompt one of them measures too long.
	if ctxSize := snap.contextFor(key, pins); ctxSize > 0 {
		if err := args.Sampling.Validate(ctxSize); err != nil {
			return err
		}
		if mayNotFit(args, ctxSize) {
			if err := q.measure(ctx, snap, key, pins, ctxSize, args); err != nil {
				return err
			}
		}
	}
	if depth := q.queueDepth(ctx, args.Model, key); depth >= q.cfg.MaxQueue {
		return api.Fail(api.ReasonQueueFull, "", "queue full: %d requests already wait for model %s (limit %d); try again later", depth, args.Model, q.cfg.MaxQueue)
	}
	return nil
}

// validateInfer checks what can be checked before the model is known:
// names, the prompt, and the sampling and length rules the engine applies
// again (api.Sampling.Problem). Every refusal is an *api.Error naming its
// parameter.
// mayNotFit says whether a prompt could have as many tokens as the context:
// a token is at least one byte (llama.cpp's tokenizers fall back to
// bytes), so a raw prompt shorter than the context in bytes always fits; a
// chat adds its template's text, estimated generously. Only such prompts
// are measured by a worker at admission.
func mayNotFit(a api.InferArgs, ctxSize int) bool {
	n := len(a.Prompt) + len(a.System) + 2
	for _, m := range a.Messages {
		n += len(m.Content) + len(m.Role)
	}
	if len(a.Messages) > 0 || a.System != "" {
		n += 16*(len(a.Messages)+1) + 256
	}
	return n >= ctxSize
}

// measure asks a serving worker with the largest context whether the
// prompt fits, as it would check the job: a refusal becomes the
// admission's answer (prompt_too_long, with its param). A worker that does
// not answer in time lets the request through: it checks again when it
// takes the job.
func (q *Queen) measure(ctx context.Context, snap *Snapshot, key string, pins sched.Pins, ctxSize int, args api.InferArgs) error {
	for _, w := range snap.Serving(key, pins) {
		if w.ContextSize != ctxSize {
			continue
		}
		subject, err := q.bus.Space.Worker(w.Hive, w.ID, api.WorkerEpFit)
		if err != nil {
			return nil
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err = q.bus.Call(cctx, subject, args, nil)
		cancel()
		switch api.ReasonOf(err) {
		case api.ReasonPromptTooLong, api.ReasonInvalidParam:
			return api.AsError(err)
		}
		return nil
	}
	return nil
}

func validateInfer(a api.InferArgs) error {
	if err := subjects.ValidateModelID(a.Model); err != nil {
		return api.InvalidParam("model", "%v", err)
	}
	if err := a.ValidatePrompt(); err != nil {
		return err
	}
	// The context a worker runs the model with is not known here: the
	// worker checks max_tokens and the prompt's length against it.
	if err := a.Sampling.Validate(0); err != nil {
		return err
	}
	if a.Hive != "" {
		if err := subjects.ValidateID(subjects.KindHive, a.Hive); err != nil {
			return api.InvalidParam("hive", "%v", err)
		}
	}
	if a.Device != "" && a.Device != "cpu" && !strings.HasPrefix(a.Device, "cuda:") {
		return api.InvalidParam("device", "%q; use cpu or cuda:N", a.Device)
	}
	return nil
}

// payloadHeaders is room for the headers of a work-queue message (its
// message id) next to its data within the bus's max payload.
const payloadHeaders = 1 << 10

// checkPayload refuses a request whose messages would not fit on the bus:
// the largest is the work-queue message, which carries the whole request.
// Without this the request fails half-way, as a raw "maximum payload
// exceeded" after the job was made.
func (q *Queen) checkPayload(a api.InferArgs) error {
	limit := q.bus.NC.MaxPayload()
	if limit <= 0 {
		return nil // not connected yet: the publish will say so
	}
	if a.FirstTokenTimeout == 0 {
		a.FirstTokenTimeout = api.Duration(q.cfg.FirstTokenTimeout)
	}
	data, err := json.Marshal(api.InferRequest{JobID: jobs.NewID(), Args: a, Attempt: maxAttempts, EnqueuedAt: time.Now().UTC()})
	if err != nil {
		return api.Fail(api.ReasonInvalidRequest, "", "the request cannot be encoded: %v", err)
	}
	if size := int64(len(data)) + payloadHeaders; size > limit {
		return api.Fail(api.ReasonPayloadTooLarge, "prompt",
			"the request is %s with its prompt, and the bus carries at most %s per message (its max_payload); send a prompt of less than about %s, or raise max_payload on the bus",
			mib(size), mib(limit), mib(max(limit-(size-int64(a.PromptBytes())), 0)))
	}
	return nil
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// Excerpt bounds: a record shows this much of a prompt, so a record (and a
// page of them) stays small whatever was submitted.
const (
	excerptPrompt   = 512
	excerptMessage  = 160
	excerptMessages = 8
)

// excerpt returns the arguments as a job record keeps them: the prompt,
// system text and messages cut to a few hundred bytes, with what was cut
// described by size and digest.
func excerpt(raw json.RawMessage, a api.InferArgs) (json.RawMessage, *api.PromptInfo) {
	sum := sha256.Sum256(raw)
	info := &api.PromptInfo{SHA256: hex.EncodeToString(sum[:]), Bytes: len(a.Prompt) + len(a.System)}
	cut := func(s string, n int) string {
		if len(s) <= n {
			return s
		}
		info.Truncated = true
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		return s[:n] + "…"
	}
	a.Prompt = cut(a.Prompt, excerptPrompt)
	a.System = cut(a.System, excerptMessage)
	msgs := a.Messages
	a.Messages = nil
	for i, m := range msgs {
		info.Bytes += len(m.Content)
		if i < excerptMessages/2 || i >= len(msgs)-excerptMessages/2 {
			a.Messages = append(a.Messages, api.ChatMessage{Role: cut(m.Role, 32), Content: cut(m.Content, excerptMessage)})
		} else if i == excerptMessages/2 {
			info.Truncated = true
			a.Messages = append(a.Messages, api.ChatMessage{Role: "…", Content: fmt.Sprintf("(%d messages left out)", len(msgs)-excerptMessages)})
		}
	}
	out, _ := json.Marshal(a)
	return out, info
}

// submitInfer stores the whole request once, creates the job's record with
// an excerpt, and puts the request on the model's work queue. The request
// is stored first, so any reader of the record finds it; the record before
// the work queue, so a worker that pulls the request finds the record.
func (q *Queen) submitInfer(ctx context.Context, job api.Job) (api.Job, error) {
	args, err := decodeArgs[api.InferArgs](job.Op.Args)
	if err != nil {
		return api.Job{}, err
	}
	subject, err := q.bus.Space.Request(job.ID)
	if err != nil {
		return api.Job{}, err
	}
	full, _ := json.Marshal(args)
	// The request is stored while the record is written (one round trip
	// on the submit path, not two); both are acknowledged before the
	// request is queued. Only where the job has no stored request yet: a
	// client-chosen id that is taken must not replace another job's.
	stored, err := q.bus.JS.PublishAsync(subject, full, jetstream.WithExpectLastSequencePerSubject(0))
	if err != nil {
		return api.Job{}, fmt.Errorf("store the request of job %s: %w", job.ID, err)
	}
	job.Op.Args, job.Prompt = excerpt(job.Op.Args, args)
	created, err := q.jobs.Create(ctx, job)
	if err != nil {
		return job, err
	}
	job = created
	select {
	case <-stored.Ok():
	case err = <-stored.Err():
	case <-time.After(2 * time.Second):
		// A stream whose leader just died leaves a publish unanswered.
		err = jetstream.ErrAsyncPublishTimeout
	case <-ctx.Done():
		err = ctx.Err()
	}
	if bus.NotStored(err) || errors.Is(err, jetstream.ErrAsyncPublishTimeout) {
		// Store it again once the stream has a leader. Taken means an
		// earlier try was stored: the record's create made the id ours.
		err = bus.WhileElecting(ctx, true, func(ctx context.Context, _ bool) error {
			_, err := q.bus.JS.Publish(ctx, subject, full, jetstream.WithExpectLastSequencePerSubject(0))
			var apiErr *jetstream.APIError
			if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
				return nil
			}
			return err
		})
	}
	if err == nil {
		err = q.enqueue(ctx, job.ID, args, 1, &job)
	}
	if err != nil {
		q.failJobWith(ctx, job.ID, api.Fail(api.ReasonUnavailable, "", "%v", err))
		return api.Job{}, err
	}
	return job, nil
}

// enqueue puts attempt of a job on its model's work queue; record, when
// not nil, is the job's record as just written, handed to the worker so
// that it takes the job without reading it first.
func (q *Queen) enqueue(ctx context.Context, id string, args api.InferArgs, attempt int, record *api.Job) error {
	if args.FirstTokenTimeout == 0 {
		args.FirstTokenTimeout = api.Duration(q.cfg.FirstTokenTimeout)
	}
	key, err := subjects.ModelKey(args.Model)
	if err != nil {
		return err
	}
	subject, err := q.bus.Space.Infer(key)
	if err != nil {
		return err
	}
	req := api.InferRequest{JobID: id, Args: args, Attempt: attempt, EnqueuedAt: time.Now().UTC()}
	if record != nil {
		req.Record, req.RecordRevision = record, record.Revision
	}
	data, _ := json.Marshal(req)
	// The message id dedupes a re-publish of the same attempt (a
	// restarted queen queueing its waiting jobs again) within the
	// stream's duplicate window; past it, the worker drops the copy.
	// A stream electing its leader (a cluster that lost a server) took
	// nothing; the message id makes any retry safe anyway.
	if err := bus.WhileElecting(ctx, true, func(ctx context.Context, _ bool) error {
		_, err := q.bus.JS.Publish(ctx, subject, data, jetstream.WithMsgID(fmt.Sprintf("%s-%d", id, attempt)))
		return err
	}); err != nil {
		return fmt.Errorf("could not queue the request: %w", err)
	}
	return nil
}

// errRequestGone is a job whose request is not stored: expired, or not
// stored yet by a submit still in flight.
var errRequestGone = errors.New("request not stored")

// request reads a job's whole stored request.
func (q *Queen) request(ctx context.Context, id string) (api.InferArgs, error) {
	var args api.InferArgs
	subject, err := q.bus.Space.Request(id)
	if err != nil {
		return args, err
	}
	stream, err := q.bus.JS.Stream(ctx, q.bus.Space.RequestsStream())
	if err != nil {
		return args, err
	}
	msg, err := stream.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return args, fmt.Errorf("%w: the request of job %s is no longer stored", errRequestGone, id)
	}
	if err != nil {
		return args, err
	}
	if err := json.Unmarshal(msg.Data, &args); err != nil {
		return args, fmt.Errorf("the stored request of job %s is corrupt: %w", id, err)
	}
	return args, nil
}

// failJob fails a job that has not ended, with reason, as an internal
// failure; failJobWith says why for programs too.
func (q *Queen) failJob(ctx context.Context, id, reason string) {
	q.failJobWith(ctx, id, api.Fail(api.ReasonInternal, "", "%s", reason))
}

// failJobWith fails a job that has not ended, with why.
func (q *Queen) failJobWith(ctx context.Context, id string, why *api.Error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if _, err := q.cancelJob(ctx, id, why, api.JobFailed); err != nil && !errors.Is(err, jobs.ErrTerminal) && !errors.Is(err, jobs.ErrNotFound) {
		q.log.Warn().Err(err).Str("job", id).Msg("failing job")
	}
}

// recoverJob gives up a job's attempt on a worker that is gone. Without a
// token sent, and with attempts left, the job runs again (a new attempt on
// the work queue); otherwise it fails with why. Every write is fenced by
// the attempt: a worker that finished the job meanwhile wins, and a worker
// that comes back after being given up can change nothing.
func (q *Queen) recoverJob(ctx context.Context, j sched.Job, why string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	lost := api.Fail(api.ReasonWorkerLost, "", "%s", why)
	a := jobs.Attempt{Number: j.Attempt, Worker: j.Worker}
	// Tell a worker that is only paused or cut off to stop, should it
	// wake up: its attempt is over either way. It stops without
	// recording an end (it would read "cancelled"); the writes below
	// record what follows.
	q.signalGiveUp(j.ID, j.Attempt, lost)
	if j.Attempt < maxAttempts && !q.tokenSent(ctx, j.ID) {
		_, err := q.jobs.Retry(ctx, j.ID, a)
		switch {
		case err == nil:
			// Followers drop the old attempt's tokens stored from here
			// on; one stored between the check and the fence was seen.
			if q.tokenSent(ctx, j.ID) {
				_, _ = q.jobs.Transition(ctx, j.ID, api.JobFailed, func(job *api.Job) { job.SetError(lost) })
				return
			}
			q.narrator.Warn(ctx, j.ID, "retry", j.Worker, "%s before sending a token; retrying the job on another worker (attempt %d)", why, j.Attempt+1)
			args, err := q.request(ctx, j.ID)
			if err == nil {
				err = q.enqueue(ctx, j.ID, args, j.Attempt+1, nil)
			}
			if err != nil {
				q.failJobWith(ctx, j.ID, api.Fail(api.ReasonWorkerLost, "", "%s; the retry could not be queued: %v", why, err))
			}
			return
		case errors.Is(err, jobs.ErrStale), errors.Is(err, jobs.ErrTerminal), errors.Is(err, jobs.ErrNotFound):
			return // the job moved on without this attempt
		}
	}
	_, err := q.jobs.Finish(ctx, j.ID, a, api.JobFailed, func(job *api.Job) { job.SetError(lost) })
	if err != nil && !errors.Is(err, jobs.ErrStale) && !errors.Is(err, jobs.ErrTerminal) && !errors.Is(err, jobs.ErrNotFound) {
		q.log.Warn().Err(err).Str("job", j.ID).Msg("failing a job whose worker is gone")
	}
}

// tokenSent reports whether any token of the job is stored (true when the
// stream cannot say: a retry must never duplicate text).
func (q *Queen) tokenSent(ctx context.Context, jobID string) bool {
	subject, err := q.bus.Space.JobEvent(jobID, subjects.EventToken)
	if err != nil {
		return true
	}
	stream, err := q.bus.JS.Stream(ctx, q.bus.Space.JobsStream())
	if err != nil {
		return true
	}
	_, err = stream.GetLastMsgForSubject(ctx, subject)
	return !errors.Is(err, jetstream.ErrMsgNotFound)
}

// spawnFor carries out a scheduler's spawn order: download the model first
// when asked, then start a worker and wait until it serves.
func (q *Queen) spawnFor(ctx context.Context, o sched.SpawnOrder) (string, error) {
	if o.Pull {
		subject, err := q.bus.Space.Hive(o.Hive, api.HiveEpModelAdd)
		if err != nil {
			return "", err
		}
		if err := q.bus.Call(ctx, subject, api.ModelAddArgs{Hive: o.Hive, Source: o.Source, Name: o.Model, JobID: o.Job}, nil); err != nil {
			return "", fmt.Errorf("downloading %s: %w", o.Model, err)
		}
	}
	return q.spawnWorker(ctx, o.Job, api.WorkerSpawnArgs{Hive: o.Hive, Model: o.Model, Device: o.Device, Slots: q.cfg.WorkerSlots})
}

// spawnWorker asks a hive to start a worker and waits for it, giving up
// early if the hive is lost meanwhile.
func (q *Queen) spawnWorker(ctx context.Context, jobID string, a api.WorkerSpawnArgs) (string, error) {
	subject, err := q.bus.Space.Hive(a.Hive, api.HiveEpWorkerSpawn)
	if err != nil {
		return "", err
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
	switch {
	case err == nil:
		return reply.Worker.ID, nil
	case q.registry.Snapshot().Hives[a.Hive].State != api.HiveOnline:
		return "", fmt.Errorf("hive %s was lost while starting the worker", a.Hive)
	case errors.Is(err, nats.ErrNoResponders):
		return "", fmt.Errorf("hive %s does not answer (it may have died)", a.Hive)
	case errors.Is(err, context.DeadlineExceeded):
		return "", fmt.Errorf("worker did not start within %s", time.Duration(a.LoadTimeout))
	}
	return "", err
}

// watchJobs feeds term t every record as it changes: the records of before
// the term first (that is its reconcile), then each change. Infer records go
// to the scheduler; every record arms or drops its deadline. The watch
// resumes by itself across reconnects.
func (q *Queen) watchJobs(ctx context.Context, t *term) error {
	w, err := q.jobs.Watch(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil {
				t.sched.Replayed()
				// A term that began after the liveness grace ended is
				// told now, with every record known, so the running jobs
				// of workers that died with the old leader are judged.
				if q.registry.Settled() {
					t.sched.Settled(true)
				}
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				t.sched.JobChanged(sched.Job{ID: e.Key()}, true)
				t.deadlines.forget(ctx, e.Key())
				continue
			}
			job, err := jobs.Decode(e)
			if err != nil {
				continue
			}
			t.deadlines.watch(ctx, job)
			if job.Op.Kind == api.OpInfer {
				t.sched.JobChanged(schedJob(job), false)
			}
		}
	}
}

// schedJob is what the scheduler needs of a record.
func schedJob(job api.Job) sched.Job {
	j := sched.Job{ID: job.ID, State: job.State, Worker: job.Worker, Hive: job.Hive, Attempt: job.Attempts}
	if job.StartedAt != nil {
		j.StartedAt = *job.StartedAt
	}
	var a api.InferArgs
	if json.Unmarshal(job.Op.Args, &a) == nil {
		j.Model, j.Pins, j.Pull, j.Source = a.Model, sched.Pins{Hive: a.Hive, Device: a.Device}, a.Pull, a.Source
		j.Key, _ = subjects.ModelKey(a.Model)
	}
	return j
}

// newScheduler wires a scheduler for term t to the queen's registry and
// effects. Every effect is fenced by the lease: a term that lost it (its
// queen paused past the TTL, cut off, or replaced) does nothing.
func (q *Queen) newScheduler(t *term) *sched.Scheduler {
	return sched.New(sched.Config{SpawnTimeout: q.cfg.WorkerStartTimeout + 30*time.Second},
		func() sched.View { return q.registry.Snapshot() },
		sched.Effects{
			Spawn: func(ctx context.Context, o sched.SpawnOrder) (string, error) {
				if err := q.fence(ctx, t, "spawn", o.Job); err != nil {
					return "", err
				}
				return q.spawnFor(ctx, o)
			},
			Recover: func(ctx context.Context, j sched.Job, why string) {
				if q.fence(ctx, t, "recover", j.ID) == nil {
					q.recoverJob(ctx, j, why)
				}
			},
			// The scheduler fails a waiting job only when no worker can be
			// had for it: no hive with the model, or no spawn succeeded.
			Fail: func(ctx context.Context, id, reason string) {
				if q.fence(ctx, t, "fail", id) == nil {
					q.failJobWith(ctx, id, api.Fail(api.ReasonNoCapacity, "", "%s", reason))
				}
			},
			Narrate: func(job, action, target, text string) {
				// A term that is over tells nobody what it decided
				// (only this queen's own bookkeeping is read: narration
				// must not block).
				if epoch, held := q.lease.Epoch(); job != "" && held && epoch == t.epoch {
					q.narrator.Post(job, action, target, nil, "%s", text)
				}
			},
		})
}

// fence returns nil when term t may act on job now (see Lease.Check), and
// logs the effect with the term's epoch either way, so an operator, or a
// test, can tell which leader did what and that a lost one did nothing.
func (q *Queen) fence(ctx context.Context, t *term, effect, job string) error {
	err := q.lease.Await(ctx, t.epoch)
	if err != nil {
		q.log.Warn().Err(err).Uint64("epoch", t.epoch).Str("effect", effect).Str("job", job).Msg("leader effect refused: the lease is lost")
		return err
	}
	q.log.Info().Uint64("epoch", t.epoch).Str("effect", effect).Str("job", job).Msg("leader effect")
	return nil
}

// queueDepth is the number of inference requests waiting for model (work
// queue key). The leader's scheduler counts the queued jobs by their
// records. A standby has no scheduler; it counts the requests on the
// model's work queue that no worker has taken: the same jobs seen from the
// queue's side, plus any copy a reconcile queued again (a worker drops
// those), so a standby may refuse a little early under a full queue, never
// admit past the limit by much. 0 when the queue cannot be read: admission
// must not fail on a figure.
func (q *Queen) queueDepth(ctx context.Context, model, key string) int {
	if t := q.term.Load(); t != nil {
		return t.sched.Depth(model)
	}
	subject, err := q.bus.Space.Infer(key)
	if err != nil {
		return 0
	}
	return int(q.workQueueDepths(ctx, subject)[subject])
}

// queueDepths is the number of waiting inference requests per model: the
// scheduler's by model id while leading, else the work queue's by model
// key (see queueDepth).
func (q *Queen) queueDepths(ctx context.Context) map[string]int {
	if t := q.term.Load(); t != nil {
		return t.sched.Depths()
	}
	out := map[string]int{}
	prefix := strings.TrimSuffix(q.bus.Space.InferAll(), "*")
	for subject, n := range q.workQueueDepths(ctx, q.bus.Space.InferAll()) {
		if key, ok := strings.CutPrefix(subject, prefix); ok && n > 0 {
			out[key] = int(n)
		}
	}
	return out
}

// workQueueDepths reads the messages per subject of the work queue stream
// that match filter.
func (q *Queen) workQueueDepths(ctx context.Context, filter string) map[string]uint64 {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	stream, err := q.bus.JS.Stream(ctx, q.bus.Space.InferStream())
	if err != nil {
		return nil
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return nil
	}
	return info.State.Subjects
}

// workerWhy says how a worker was lost, truthfully: the queen knows only
// that its heartbeat stopped (its hive purges the entry of a worker it saw
// exit, which looks the same).
func workerWhy(w api.WorkerStatus) string {
	return fmt.Sprintf("worker %s on hive %s was lost (it died or stopped answering)", w.ID, w.Hive)
}
