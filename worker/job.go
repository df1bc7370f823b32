package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/jobs"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rbee-dev/rbee/worker/engine"
)

// Causes of a generation's cancellation, told apart when the job ends,
// besides the cancel subject's (bus.ErrJobCancelled, bus.ErrAttemptGivenUp).
var (
	errNoFirstToken = errors.New("no first token")
	// errNotTaken stops a generation begun while its job was being taken
	// when the take fails.
	errNotTaken = errors.New("the job was not taken")
)

// busTimeout bounds each bus operation of a job (state writes, acks,
// flushing tokens).
const busTimeout = 10 * time.Second

// stopWait is how long a job's tokens and end still wait for a bus that
// went away once its worker, stopping, has cancelled it. The leader gives
// the job up when the worker's heartbeat expires, so a stopped worker
// (its hive killed, `rbee hive stop`) need not linger for the whole
// outage bound: it exits within its drain grace and this.
const stopWait = 5 * time.Second

// outageCtx bounds a job's tokens' wait for a bus that went away:
// cfg.BusOutage and one more try, and no later than the worker's
// cutoff (stopWait after it halted). Tokens are held in memory meanwhile;
// past the bound the job ends failed rather than hold them on.
func (w *worker) outageCtx() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.BusOutage+busTimeout)
	return ctx, w.cutAtStop(cancel)
}

// untilStopped bounds what a live worker owes a job's record (the take of
// a request it holds, the end of a job it ran) by nothing but its own
// stop: a bus away for longer than any bound (a queen restarted minutes
// later) comes back to a worker that still owes them. Given up, either
// would leave the job running on a live worker until its deadline: the
// leader judges a job by its worker's heartbeat, which beats again. A
// stopped worker's heartbeat goes, and the leader then gives its jobs up.
func (w *worker) untilStopped() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	return ctx, w.cutAtStop(cancel)
}

// cutAtStop makes cancel also run at the worker's cutoff (stopWait after
// it halted), and returns what runs it at once and forgets the cutoff.
func (w *worker) cutAtStop(cancel context.CancelFunc) context.CancelFunc {
	if w.cutoff == nil {
		return cancel
	}
	stop := context.AfterFunc(w.cutoff, cancel)
	return func() { stop(); cancel() }
}

// runSlot pulls one request at a time, only while its slot is free, until
// fetchCtx ends. Requests not pulled stay queued in JetStream for any
// worker of the model. jobCtx ends generations cut short by a shutdown.
func (w *worker) runSlot(fetchCtx, jobCtx context.Context, slotIdx int, slot engine.Slot) {
	for fetchCtx.Err() == nil {
		msg, err := w.consumer().Next(jetstream.FetchMaxWait(FetchWait))
		if err != nil {
			if errors.Is(err, nats.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) {
				continue
			}
			if errors.Is(err, jetstream.ErrConsumerNotFound) && fetchCtx.Err() == nil {
				// The bus lost its state (a server restarted without
				// its store): make the queue's consumer again.
				ctx, cancel := context.WithTimeout(fetchCtx, busTimeout)
				err = w.ensureConsumer(ctx)
				cancel()
				if err == nil {
					continue
				}
			}
			if fetchCtx.Err() == nil {
				w.log.Warn().Err(err).Int("slot", slotIdx).Msg("pulling from the work queue")
			}
			select {
			case <-fetchCtx.Done():
			case <-time.After(250 * time.Millisecond):
			}
			continue
		}
		if fetchCtx.Err() != nil {
			// The drain began while this pull waited: hand the request
			// back at once rather than after AckWait.
			_ = msg.Nak()
			return
		}
		w.handle(jobCtx, slotIdx, slot, msg)
	}
}

// handle runs one request from the work queue to its job's terminal state.
func (w *worker) handle(jobCtx context.Context, slotIdx int, slot engine.Slot, msg jetstream.Msg) {
	var req api.InferRequest
	if err := json.Unmarshal(msg.Data(), &req); err != nil || subjects.ValidateID(subjects.KindJob, req.JobID) != nil {
		w.log.Error().Err(err).Str("job", req.JobID).Msg("dropping a malformed inference request")
		_ = msg.Term()
		return
	}
	id := req.JobID
	log := w.log.With().Str("job", id).Int("slot", slotIdx).Logger()
	bctx, cancel := context.WithTimeout(context.Background(), busTimeout)
	defer cancel()

	// Listen for a cancel before the job can be seen running, so a cancel
	// sent right after the transition is not missed.
	genCtx, cancelGen := context.WithCancelCause(jobCtx)
	defer cancelGen(nil)
	attemptNo := max(req.Attempt, 1)
	stopListening, err := w.bus.OnCancel(id, attemptNo, cancelGen)
	if err != nil {
		log.Warn().Err(err).Msg("cannot listen for cancellation; leaving the request queued")
		_ = msg.NakWithDelay(time.Second)
		return
	}
	defer stopListening()

	ereq, promptTokens, bad := w.prepare(req.Args)
	if bad != nil {
		w.reject(bctx, msg, id, attemptNo, bad)
		return
	}

	attempt := jobs.Attempt{Number: attemptNo, Worker: w.cfg.ID}
	if !w.attempts.claim(id, attempt.Number, time.Now()) {
		// A second copy of a request a slot of this process has or ran
		// (a new term queues a waiting job again; a lost ack redelivers
		// one): that slot decides, and the record cannot tell the two
		// apart once the job runs.
		log.Debug().Int("attempt", attempt.Number).Msg("skipping a copy of a request this worker already has")
		_ = msg.Ack()
		return
	}
	ours := false
	defer func() {
		if ours {
			w.attempts.end(id, attempt.Number, time.Now())
		} else {
			w.attempts.release(id, attempt.Number)
		}
	}()
	// The slot is free once generation stops, before the job's end is
	// recorded: whoever sees the end and asks for the worker's status
	// must find the slot free.
	w.slotTaken()
	freeSlot := sync.OnceFunc(w.slotFreed)
	defer freeSlot()
	// The prompt is fed while the job is taken: taking it is a round
	// trip to the record (two when the request carries no copy of it, or
	// the copy is stale), which would otherwise come before the prefill
	// on the way to the first token. The generation does not wait for
	// the take either: its publisher holds the tokens back until the
	// take is confirmed, then this goroutine sends them, so the decode
	// (and every other sequence of its batch) goes on meanwhile. A
	// request that turns out not to be ours (cancelled while queued, a
	// redelivery, a stale attempt) stops its generation unseen.
	pub, err := w.bus.Tokens(id)
	if err != nil { // the id was validated above; kept for safety
		log.Error().Err(err).Msg("dropping a request whose job has no token subject")
		_ = msg.Term()
		return
	}
	pub.ResendWithin = w.cfg.BusOutage
	pub.Hold()
	gate := make(chan error, 1)
	generated := make(chan struct{})
	go func() {
		defer close(generated)
		w.generate(genCtx, cancelGen, slot, id, req, ereq, attempt, pub, gate, freeSlot)
	}()
	take := func(ctx context.Context) (api.Job, error) {
		if req.Record != nil && req.Record.ID == id {
			known := *req.Record
			known.Revision = req.RecordRevision
			return w.store.TakeAt(ctx, known, attempt, w.cfg.Hive)
		}
		return w.store.Take(ctx, id, attempt, w.cfg.Hive)
	}
	taken, err := take(bctx)
	if err != nil && bus.Unavailable(err) {
		taken, err = w.retake(take, func() { _ = msg.InProgress() })
	}
	if (errors.Is(err, jobs.ErrIllegalTransition) || errors.Is(err, jobs.ErrStale)) && w.ownTake(taken, id, attempt) {
		log.Info().Err(err).Int("attempt", attempt.Number).Msg("the job is running on this attempt of this worker: a take whose answer was lost; running it")
		err = nil
	}
	notOurs := func() {
		cancelGen(errNotTaken)
		pub.Close()
		gate <- errNotTaken
		<-generated
	}
	switch {
	case err == nil:
	case errors.Is(err, jobs.ErrTerminal):
		// Cancelled (or failed) while queued: it never runs.
		notOurs()
		log.Debug().Err(err).Msg("skipping a job that already ended")
		_ = msg.Ack()
		return
	case errors.Is(err, jobs.ErrNotFound), errors.Is(err, jobs.ErrIllegalTransition), errors.Is(err, jobs.ErrStale):
		// No record, another worker runs it (a redelivery), or the
		// request is of an attempt the job has moved past.
		notOurs()
		log.Warn().Err(err).Msg("skipping a request whose job is not waiting for it")
		_ = msg.Ack()
		return
	default:
		notOurs()
		log.Warn().Err(err).Msg("could not take the job; leaving it queued")
		_ = msg.NakWithDelay(time.Second)
		return
	}
	// The job is ours now: its narration, then the tokens held back.
	ours = true
	w.narrator.Post(id, "infer", w.cfg.Model,
		map[string]any{"slot": slotIdx, "attempt": attempt.Number, "prompt_tokens": promptTokens, "max_tokens": ereq.MaxTokens},
		"worker %s on hive %s is generating with model %s", w.cfg.ID, w.cfg.Hive, w.cfg.Model)
	pub.Release()
	// If this worker dies now, the queen sees it go and recovers the job,
	// so the request must not be redelivered as well. The ack goes after
	// the tokens held back, not before them: the server would remove the
	// request from the work queue (a file of its own) while the first
	// token waited behind it on this connection. A plain ack, not a
	// confirmed one, for the same reason; should it be lost, the
	// redelivered request finds its job running and is dropped by the
	// state machine.
	if err := msg.Ack(); err != nil {
		log.Warn().Err(err).Msg("acknowledging the request")
	}
	gate <- nil
	<-generated
}

// retake settles a take that got no answer (the bus away, or too slow for
// busTimeout): its write may have been applied all the same. It takes the
// job again until the bus answers or the worker stops (untilStopped), and
// keeps the request meanwhile (hold: its in-progress ack). Letting the
// request go before the take is settled could hand it to another worker,
// which would find the job running here and drop it: a job stranded on a
// live worker until its deadline.
//
// A write that was applied makes the new take find the job running on
// this attempt, which ownTake then tells apart; one that was not is made
// now: one round trip settles it either way, where a read would need a
// take after it. Should this worker die meanwhile, the leader gives its
// attempt up.
func (w *worker) retake(take func(context.Context) (api.Job, error), hold func()) (api.Job, error) {
	ctx, cancel := w.untilStopped()
	defer cancel()
	held := time.NewTicker(AckWait / 3)
	defer held.Stop()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-held.C:
				hold()
			}
		}
	}()
	for {
		taken, err := bus.WhileUnavailable(ctx, busTimeout, take)
		// A record read from a replica behind the leader fails the
		// take's write as a conflict, however often it is tried.
		if !errors.Is(err, jobs.ErrConflict) || ctx.Err() != nil {
			return taken, err
		}
		select {
		case <-ctx.Done():
			return taken, err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// ownTake says whether taken, a record a take found already running, was
// taken by this very attempt of this process: the write of an earlier take
// was applied but its answer lost, by this slot (retake) or by the slot of
// an earlier copy of the request. The slot holds the attempt in
// w.attempts, so no other slot here runs it; a record taken before this
// process started is a worker of the same id that died, and is not
// adopted.
func (w *worker) ownTake(taken api.Job, id string, a jobs.Attempt) bool {
	return taken.ID == id && taken.State == api.JobRunning && taken.Worker == a.Worker && taken.Attempts == a.Number &&
		taken.StartedAt != nil && !taken.StartedAt.Before(w.started)
}

// reject fails a job whose parameters are bad before any work is done.
// Only a job waiting for this request's attempt is failed: a redelivered
// or stale request must not fail a job that moved on.
func (w *worker) reject(ctx context.Context, msg jetstream.Msg, id string, attempt int, bad error) {
	_, err := w.store.Reject(ctx, id, jobs.Attempt{Number: attempt, Worker: w.cfg.ID}, w.cfg.Hive, paramError(bad))
	switch {
	case err == nil:
		w.log.Info().Str("job", id).Err(bad).Msg("rejected a bad request")
	case errors.Is(err, jobs.ErrTerminal), errors.Is(err, jobs.ErrNotFound), errors.Is(err, jobs.ErrStale):
		w.log.Debug().Str("job", id).Err(err).Msg("skipping a bad request whose job is not waiting for it")
	default:
		w.log.Warn().Err(err).Str("job", id).Msg("could not fail a bad request; leaving it queued")
		_ = msg.NakWithDelay(time.Second)
		return
	}
	_ = msg.Ack()
}

// First-token watch states.
const (
	waitingFirst int32 = iota
	gotFirst
	firstTimedOut
)

// generate streams the tokens of one running job and records its end.
//
// pub holds the tokens back until the job is taken; gate says, once the take
// is settled, whether it was. A generation whose job was not taken ends
// without a trace (no token, no end recorded): its publisher is closed
// unsent, which stops the generation at its next token.
func (w *worker) generate(ctx context.Context, cancel context.CancelCauseFunc, slot engine.Slot, id string, req api.InferRequest, ereq engine.Request, attempt jobs.Attempt, pub *bus.TokenPublisher, gate <-chan error, freeSlot func()) {
	var first atomic.Int32
	ftt := time.Duration(req.Args.FirstTokenTimeout)
	started := time.Now()
	if ftt > 0 {
		t := time.AfterFunc(ftt, func() {
			if first.CompareAndSwap(waitingFirst, firstTimedOut) {
				cancel(errNoFirstToken)
			}
		})
		defer t.Stop()
	}
	served := 0
	res, genErr := slot.Generate(ctx, ereq, func(t engine.Token) error {
		// The timer cancels a generation stuck before its first token;
		// a first token that comes late anyway is refused here too.
		if t.Index == 0 && (!first.CompareAndSwap(waitingFirst, gotFirst) || ftt > 0 && time.Since(started) > ftt) {
			return errNoFirstToken
		}
		// Every token is published, even one whose text is held back,
		// so indices are the engine's: contiguous from 0.
		if err := pub.Publish(api.Token{Index: t.Index, ID: t.ID, Text: t.Text, Attempt: attempt.Number}); err != nil {
			return err
		}
		served++
		w.tokenServed()
		return nil
	})
	if <-gate != nil {
		w.tokensDropped(served)
		return // not ours: nothing was published, nothing is recorded
	}
	cause := context.Cause(ctx)
	if res.StopReason == engine.StopCancelled && errors.Is(cause, bus.ErrAttemptGivenUp) {
		// The leader gave this attempt up and records the job's next
		// state: tokens not yet stored are dropped (the job may run
		// again, and a token stored now would make the leader fail it
		// instead), and the end is the leader's to write. A generation
		// that ended of itself before the give-up came is recorded
		// below: its end and the leader's are fenced by the attempt,
		// and the first written wins.
		pub.Close()
		freeSlot()
		w.log.Info().Str("job", id).Int("attempt", attempt.Number).Int("tokens", served).
			Msg("the leader gave this attempt up; stopped without recording its end")
		return
	}
	// Every token is stored before the end is, so no follower sees the
	// end before the last token. A bus outage (the queen restarting) is
	// waited out for cfg.BusOutage, the tokens kept in memory; past it the
	// job ends failed, an end recorded once the bus is back (finish).
	fctx, fcancel := w.outageCtx()
	defer fcancel()
	flushErr := pub.Flush(fctx)
	freeSlot()

	result := api.InferResult{
		StopReason:   string(res.StopReason),
		PromptTokens: res.PromptTokens, CachedTokens: res.CachedTokens, CompletionTokens: res.CompletionTokens,
		TimeToFirstToken: api.Duration(res.TimeToFirstToken), Duration: api.Duration(res.Duration),
		TokensPerSecond: tokensPerSecond(res), Worker: w.cfg.ID, Hive: w.cfg.Hive, Attempt: attempt.Number,
	}
	switch {
	case errors.Is(genErr, errNoFirstToken) || (res.StopReason == engine.StopCancelled && errors.Is(cause, errNoFirstToken)):
		w.finish(id, attempt, api.JobFailed, api.Fail(api.ReasonTimeout, "", "no first token within %s from worker %s on hive %s", ftt, w.cfg.ID, w.cfg.Hive), nil)
	case genErr != nil && errors.Is(genErr, engine.ErrInvalidRequest):
		w.finish(id, attempt, api.JobFailed, paramError(genErr), nil)
	case genErr != nil:
		w.finish(id, attempt, api.JobFailed, api.Fail(api.ReasonInternal, "", "generation failed on worker %s: %v", w.cfg.ID, genErr), nil)
	case flushErr != nil:
		w.finish(id, attempt, api.JobFailed, api.Fail(api.ReasonInternal, "", "tokens of worker %s were not stored: %v", w.cfg.ID, flushErr), nil)
	case res.StopReason == engine.StopCancelled && errors.Is(cause, ErrStopped):
		// For the job, its worker is gone: another may answer it.
		w.finish(id, attempt, api.JobFailed, api.Fail(api.ReasonWorkerLost, "", "worker %s on hive %s shut down before the job finished (after %d tokens)", w.cfg.ID, w.cfg.Hive, res.CompletionTokens), &result)
	case res.StopReason == engine.StopCancelled:
		w.finish(id, attempt, api.JobCancelled, api.Fail(api.ReasonCancelled, "", "cancelled"), &result)
	default:
		w.jobSpeed(result.TokensPerSecond)
		w.finish(id, attempt, api.JobCompleted, nil, &result)
	}
}

// paramError is a rejected request's error as the job records it: a
// *engine.ParamError keeps its field and becomes invalid_param (or
// prompt_too_long); anything else is internal.
func paramError(err error) *api.Error {
	var pe *engine.ParamError
	if errors.As(err, &pe) {
		return pe.APIError()
	}
	return api.AsError(err)
}

// finish moves the job to its terminal state for attempt, with why (nil
// for a completion). Someone else may
// have ended it first (the queen cancels or times out a job before
// signalling the worker); then their state stands. A worker given up while
// it was paused or cut off finds its attempt stale and changes nothing, not
// even the narration. A bus outage is ridden out for as long as the worker
// lives (untilStopped): the end is this worker's to record, and no one
// else records it while its heartbeat says it lives.
func (w *worker) finish(id string, attempt jobs.Attempt, to api.JobState, why *api.Error, result *api.InferResult) {
	ctx, cancel := w.untilStopped()
	defer cancel()
	var raw json.RawMessage
	if result != nil {
		raw, _ = json.Marshal(result)
	}
	known, err := bus.WhileUnavailable(ctx, busTimeout, func(ctx context.Context) (api.Job, error) { return w.store.Get(ctx, id) })
	if err != nil {
		known = api.Job{ID: id} // FinishAt reads it
	} else if known.State.Terminal() || known.Attempts != attempt.Number || known.Worker != attempt.Worker {
		w.log.Info().Str("job", id).Int("attempt", attempt.Number).Str("state", string(known.State)).
			Msg("the job moved on without this attempt; its end is not recorded")
		return
	}
	switch to {
	case api.JobCompleted:
		w.narrator.With(ctx, id, "infer", w.cfg.Model, map[string]any{"tokens": result.CompletionTokens, "stop": result.StopReason},
			"worker %s generated %d tokens in %s (%.1f tokens/s, %s)", w.cfg.ID, result.CompletionTokens,
			time.Duration(result.Duration).Round(time.Millisecond), result.TokensPerSecond, result.StopReason)
	case api.JobCancelled:
		w.narrator.Say(ctx, id, "infer", w.cfg.Model, "worker %s stopped generating after %d tokens: cancelled", w.cfg.ID, result.CompletionTokens)
	default:
		w.narrator.Warn(ctx, id, "infer", w.cfg.Model, "%s", why.Message)
	}
	// Written against the record just read: one round trip, not a read
	// and a write, unless the record changed since.
	_, err = bus.WhileUnavailable(ctx, busTimeout, func(ctx context.Context) (api.Job, error) {
		return w.store.FinishAt(ctx, known, attempt, to, func(j *api.Job) {
			j.SetError(why)
			if raw != nil {
				j.Result = raw
			}
		})
	})
	switch {
	case err == nil:
	case errors.Is(err, jobs.ErrTerminal), errors.Is(err, jobs.ErrStale):
		w.log.Debug().Str("job", id).Err(err).Msg("job already ended")
	default:
		w.log.Error().Str("job", id).Str("state", string(to)).Err(err).Msg("could not record the end of a job")
	}
}

// tokensPerSecond is the generation speed after the first token, which is
// what a reader compares between machines; prompt processing is in TTFT.
func tokensPerSecond(r engine.Result) float64 {
	if r.CompletionTokens > 1 && r.Duration > r.TimeToFirstToken {
		return float64(r.CompletionTokens-1) / (r.Duration - r.TimeToFirstToken).Seconds()
	}
	if r.CompletionTokens > 0 && r.Duration > 0 {
		return float64(r.CompletionTokens) / r.Duration.Seconds()
	}
	return 0
}

// prepare turns the job's arguments into an engine request and checks it
// against the loaded model before any work: a bad parameter is a
// *engine.ParamError naming the field.
func (w *worker) prepare(a api.InferArgs) (engine.Request, int, error) {
	ctxSize := w.model.ContextSize()
	prompt, err := w.prompt(a)
	if err != nil {
		return engine.Request{}, 0, err
	}
	s := a.Sampling
	r := engine.Request{
		Prompt: prompt, MaxTokens: s.MaxTokens, Temperature: s.Temperature, TopP: s.TopP,
		TopK: s.TopK, MinP: s.MinP, RepeatPenalty: s.RepeatPenalty, Stop: s.Stop,
	}
	if r.MaxTokens == 0 {
		r.MaxTokens = min(w.cfg.DefaultMaxTokens, ctxSize)
	}
	switch {
	case s.Seed != nil:
		r.Seed = *s.Seed
	case s.Temperature == 0:
		r.Seed = 0 // greedy: the seed plays no part
	default:
		r.Seed = engine.RandomSeed
	}
	if err := r.Validate(ctxSize); err != nil {
		return r, 0, err
	}
	toks, err := w.model.Tokenize(prompt, true)
	if err != nil {
		return r, 0, err
	}
	if len(toks) >= ctxSize {
		field := "prompt"
		if len(a.Messages) > 0 {
			field = "messages" // a chat's prompt is its messages
		}
		return r, len(toks), &engine.ParamError{Field: field, Err: engine.ErrPromptTooLong,
			Reason: fmt.Sprintf("%d tokens do not fit in the context of %d", len(toks), ctxSize)}
	}
	return r, len(toks), nil
}

// prompt is the raw prompt, or the chat (system, then the messages or the
// prompt as the user's turn) rendered with the model's chat template. A
// model without a template gets the turns as "role: content" lines.
func (w *worker) prompt(a api.InferArgs) (string, error) {
	if len(a.Messages) == 0 && a.System == "" {
		return a.Prompt, nil
	}
	var msgs []engine.ChatMessage
	if a.System != "" {
		msgs = append(msgs, engine.ChatMessage{Role: "system", Content: a.System})
	}
	if len(a.Messages) == 0 {
		if a.Prompt == "" {
			return "", &engine.ParamError{Field: "prompt", Reason: "must not be empty"}
		}
		msgs = append(msgs, engine.ChatMessage{Role: "user", Content: a.Prompt})
	}
	for i, m := range a.Messages {
		if m.Role == "" {
			return "", &engine.ParamError{Field: "messages", Reason: fmt.Sprintf("message %d has no role", i)}
		}
		msgs = append(msgs, engine.ChatMessage{Role: m.Role, Content: m.Content})
	}
	out, err := w.model.ApplyChatTemplate(msgs, true)
	if errors.Is(err, engine.ErrNoChatTemplate) {
		var b strings.Builder
		for _, m := range msgs {
			fmt.Fprintf(&b, "%s: %s\n", m.Role, m.Content)
		}
		b.WriteString("assistant:")
		return b.String(), nil
	}
	if err != nil {
		return "", &engine.ParamError{Field: "messages", Reason: err.Error()}
	}
	return out, nil
}
