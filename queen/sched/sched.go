// Package sched places inference jobs. One goroutine (Run) owns everything
// placement depends on: every job that waits or runs, the spawns in flight
// and the jobs waiting on each, and whether the queen's view of the cluster
// can be trusted yet. It is fed by events (a job record changed, a worker or
// hive came, left or was lost, a spawn ended, a grace ended) and acts only
// through Effects, so its decisions are unit-tested without a bus.
//
// The invariant it keeps: every job that is not terminal is, at every
// moment, either queued for a model that a live worker serves or that a
// named spawn will serve, running on a live worker, or being failed with a
// reason that names what is missing. Requests wait on the model's JetStream
// work queue, which hands them out in the order they were submitted;
// workers pull only when a slot is free.
package sched

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rbee-dev/rbee/api"
)

// Job is what the scheduler knows of one infer job, read from its record.
type Job struct {
	ID    string
	State api.JobState
	// Model is the id the user typed; Key its work-queue key.
	Model string
	Key   string
	Pins  Pins
	// Pull and Source download the model when no hive has it.
	Pull   bool
	Source string
	// Worker and Hive run the job (while running); Attempt numbers the
	// attempt that runs or last ran it.
	Worker  string
	Hive    string
	Attempt int
	// StartedAt is when the attempt's worker took the job, by the
	// worker's clock (as its heartbeats' BeatAt).
	StartedAt time.Time
	// unlisted is the BeatAt of the first heartbeat since StartedAt that
	// did not list the job, while no later one did (judgeRunning).
	unlisted time.Time
}

// Pins restrict where a job may run.
type Pins struct {
	Hive   string
	Device string
}

// Matches reports whether a worker or hive at hive/device satisfies p.
func (p Pins) Matches(hive, device string) bool {
	return (p.Hive == "" || p.Hive == hive) && (p.Device == "" || p.Device == device)
}

// View is the scheduler's read-only view of the live cluster, the latest
// snapshot of the queen's registry.
type View interface {
	// Worker returns a live worker.
	Worker(id string) (api.WorkerStatus, bool)
	// Serving returns the live workers that serve key (not draining) and
	// match the pins.
	Serving(key string, p Pins) []api.WorkerStatus
	// Candidates ranks the online hives that hold key and match the pins, best
	// first.
	Candidates(key string, p Pins) []string
	// PullTarget is the online hive a model that no hive has is
	// downloaded to ("" when none).
	PullTarget(p Pins) string
	// HiveState says whether a hive is online, offline, lost or unknown ("").
	HiveState(id string) string
	// Exited says how a worker missing from the view ended, when its hive
	// saw it exit (its exit status).
	Exited(id string) (string, bool)
}

// SpawnOrder asks for a worker for a model on a hive.
type SpawnOrder struct {
	Key, Model string
	Hive       string
	Device     string
	// Pull downloads the model from Source onto Hive first.
	Pull   bool
	Source string
	// Job is the job the spawn's narration goes to.
	Job string
}

// Effects are how the scheduler acts on the world. Each runs on a
// goroutine of its own (but Narrate, which must not block); outcomes come
// back as events (a record changing, a worker registering), never as
// return values the loop waits for, except a spawn's result.
type Effects struct {
	// Spawn starts a worker and returns once it serves (its id) or failed.
	Spawn func(ctx context.Context, o SpawnOrder) (worker string, err error)
	// Recover gives up the job's attempt on a worker that is gone: it
	// retries the job when no token was sent and attempts remain, and
	// fails it with why otherwise (reason worker_lost: why says how the
	// worker was lost). It must be fenced by the attempt, so a worker that
	// finished the job meanwhile wins.
	Recover func(ctx context.Context, job Job, why string)
	// Fail fails a waiting job that no worker can be had for (reason
	// no_capacity: no hive has the model, or no spawn succeeded); reason
	// says what is missing.
	Fail func(ctx context.Context, job, reason string)
	// Narrate tells a job's followers what was decided; it must not block.
	Narrate func(job, action, target, text string)
}

// Config tunes the scheduler.
type Config struct {
	// SpawnTimeout bounds one spawn (start and model load).
	SpawnTimeout time.Duration
	// ReadyWithin is how long a worker a spawn reported ready may take to
	// show in the view before the model counts as unserved again.
	ReadyWithin time.Duration
}

// Scheduler places jobs. Its methods may be called from any goroutine;
// they hand the event to Run.
type Scheduler struct {
	cfg  Config
	view func() View
	fx   Effects

	events chan func()
	// stopped closes when Run stops taking events, so an effect that
	// ends after it does not block on sending its outcome.
	stopped chan struct{}
	// depths is what Depth reads: queued jobs per model id.
	depths atomic.Pointer[map[string]int]
	// effects tracks effect goroutines, so Run waits for them.
	effects sync.WaitGroup
	ctx     context.Context

	// Owned by Run.
	jobs map[string]*Job
	// queued holds the ids of queued jobs by model key; counts their
	// number by model id.
	queued map[string]map[string]struct{}
	counts map[string]int
	// pinned counts the queued jobs per key that are pinned to a hive or
	// device: without any, one question to the view answers for all.
	pinned map[string]int
	// spawns holds the spawn in flight per model key.
	spawns map[string]*spawn
	// ready holds workers a spawn reported ready that the view may not
	// show yet, until when they count as serving their model.
	ready map[string]readyWorker
	// settled is false while the view cannot be trusted (a grace after
	// the bus came back); nothing is judged meanwhile.
	settled bool
	// replaying is true while the records of before the start are read:
	// their jobs were narrated by an earlier queen.
	replaying bool
	dirty     bool
}

// States of a job between a decision and its record catching up: the
// effect that moves the record on runs, and the job is neither placed nor
// judged again from here until the record changes (or the view settles
// anew, if the effect could not reach the bus).
const (
	stateRecovering api.JobState = "recovering"
	stateFailing    api.JobState = "failing"
)

type spawn struct {
	order SpawnOrder
	// tried lists the hives that failed this round, with their reasons.
	tried   []string
	reasons []string
}

type readyWorker struct {
	key   string
	until time.Time
}

// New returns a scheduler reading the cluster through view.
func New(cfg Config, view func() View, fx Effects) *Scheduler {
	if cfg.SpawnTimeout <= 0 {
		cfg.SpawnTimeout = 2 * time.Minute
	}
	if cfg.ReadyWithin <= 0 {
		cfg.ReadyWithin = 5 * time.Second
	}
	s := &Scheduler{
		cfg: cfg, view: view, fx: fx, events: make(chan func(), 4096), stopped: make(chan struct{}),
		jobs: map[string]*Job{}, queued: map[string]map[string]struct{}{}, counts: map[string]int{}, pinned: map[string]int{},
		spawns: map[string]*spawn{}, ready: map[string]readyWorker{}, replaying: true,
	}
	empty := map[string]int{}
	s.depths.Store(&empty)
	return s
}

// Run owns the state until ctx ends, then waits for the effects it started.
func (s *Scheduler) Run(ctx context.Context) {
	s.ctx = ctx
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	defer func() {
		close(s.stopped)
		s.effects.Wait()
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-s.events:
			ev()
		case <-tick.C:
			s.expireReady()
		}
		if s.dirty {
			s.publishDepths()
		}
	}
}

func (s *Scheduler) send(ev func()) {
	select {
	case s.events <- ev:
	case <-s.stopped:
	}
}

// Depth is the number of queued jobs of a model id.
func (s *Scheduler) Depth(model string) int { return (*s.depths.Load())[model] }

// Depths is the number of queued jobs per model id.
func (s *Scheduler) Depths() map[string]int { return maps.Clone(*s.depths.Load()) }

// JobChanged reports a record as it is now (gone: it aged out).
func (s *Scheduler) JobChanged(j Job, gone bool) { s.send(func() { s.jobChanged(j, gone) }) }

// Replayed says the records of before the start have all been reported.
func (s *Scheduler) Replayed() {
	s.send(func() {
		s.replaying = false
		s.placeAll()
	})
}

// WorkerLost reports a worker whose heartbeat expired, or that its hive saw
// die, while it may have run jobs.
func (s *Scheduler) WorkerLost(w api.WorkerStatus, why string) {
	s.send(func() { s.workerDown(w, why) })
}

// WorkerGone reports a worker that left the registry itself (drained).
func (s *Scheduler) WorkerGone(w api.WorkerStatus) {
	s.send(func() { s.workerDown(w, fmt.Sprintf("worker %s on hive %s stopped", w.ID, w.Hive)) })
}

// ViewChanged says the view changed (a new snapshot): a worker that starts
// draining no longer serves its model, so queued jobs may need a new one.
func (s *Scheduler) ViewChanged() { s.send(s.viewChanged) }

// Settled says whether the view can be trusted: true once a grace after
// the bus came back has ended, false when a new one starts.
func (s *Scheduler) Settled(ok bool) { s.send(func() { s.setSettled(ok) }) }

func (s *Scheduler) jobChanged(j Job, gone bool) {
	old, known := s.jobs[j.ID]
	if gone || j.State.Terminal() {
		if known {
			s.unqueue(old)
			delete(s.jobs, j.ID)
		}
		return
	}
	jc := j
	s.jobs[j.ID] = &jc
	switch j.State {
	case api.JobQueued:
		if known && old.State == api.JobQueued {
			return
		}
		s.enqueue(&jc)
		if !s.replaying {
			s.narrateQueued(&jc)
		}
		s.place(j.Key)
	case api.JobRunning:
		if known {
			s.unqueue(old)
		}
		if s.settled && !s.replaying {
			v := s.view()
			if _, live := v.Worker(j.Worker); !live {
				s.recover(&jc, goneWhy(v, &jc))
			}
		}
	}
}

func (s *Scheduler) enqueue(j *Job) {
	q := s.queued[j.Key]
	if q == nil {
		q = map[string]struct{}{}
		s.queued[j.Key] = q
	}
	if _, ok := q[j.ID]; !ok {
		q[j.ID] = struct{}{}
		s.counts[j.Model]++
		if j.Pins != (Pins{}) {
			s.pinned[j.Key]++
		}
		s.dirty = true
	}
}

func (s *Scheduler) unqueue(j *Job) {
	q := s.queued[j.Key]
	if _, ok := q[j.ID]; !ok {
		return
	}
	delete(q, j.ID)
	if len(q) == 0 {
		delete(s.queued, j.Key)
	}
	if s.counts[j.Model]--; s.counts[j.Model] == 0 {
		delete(s.counts, j.Model)
	}
	if j.Pins != (Pins{}) {
		if s.pinned[j.Key]--; s.pinned[j.Key] == 0 {
			delete(s.pinned, j.Key)
		}
	}
	s.dirty = true
}

func (s *Scheduler) workerDown(w api.WorkerStatus, why string) {
	delete(s.ready, w.ID)
	for _, j := range s.jobs {
		if j.State == api.JobRunning && j.Worker == w.ID {
			s.recover(j, why)
		}
	}
	s.place(w.ModelKey)
}

// recover hands a job whose worker is gone to the Recover effect, once.
func (s *Scheduler) recover(j *Job, why string) {
	// The effect moves the record on; until then the job is neither
	// queued nor on a live worker, so it is not placed again from here.
	j.State = stateRecovering
	job := *j
	s.effect(func(ctx context.Context) { s.fx.Recover(ctx, job, why) })
}

// goneWhy says why a running job's worker is missing from a settled view.
func goneWhy(v View, j *Job) string {
	if exit, ok := v.Exited(j.Worker); ok {
		return fmt.Sprintf("worker %s on hive %s died (%s)", j.Worker, j.Hive, exit)
	}
	return fmt.Sprintf("worker %s on hive %s was lost: it has not beaten since the bus came back", j.Worker, j.Hive)
}

func (s *Scheduler) viewChanged() {
	v := s.view()
	for id := range s.ready {
		if _, ok := v.Worker(id); ok {
			delete(s.ready, id)
		}
	}
	s.judgeRunning(v)
	s.placeAll()
}

// judgeRunning gives up the attempts of running jobs that their live
// workers say they do not run, once the view can be trusted: two of the
// worker's heartbeats in a row, both made after it took the job, do not
// list it among the jobs its slots hold (a worker lists a job from before
// its take until its end is recorded). Nobody would end such a job before
// its deadline: a take or an end whose write failed in a way the worker
// did not see through. One beat would do by the worker's order (its list
// is read after the beat's time); the second costs a beat and spares a
// running job a wrong verdict should the worker's clock step back.
func (s *Scheduler) judgeRunning(v View) {
	if !s.settled || s.replaying {
		return
	}
	for _, j := range s.jobs {
		if j.State != api.JobRunning || j.StartedAt.IsZero() {
			continue
		}
		w, live := v.Worker(j.Worker)
		if !live || w.Jobs == nil || !w.BeatAt.After(j.StartedAt) {
			continue
		}
		switch {
		case slices.Contains(w.Jobs, j.ID):
			j.unlisted = time.Time{}
		case j.unlisted.IsZero():
			j.unlisted = w.BeatAt
		case w.BeatAt.After(j.unlisted):
			s.recover(j, fmt.Sprintf("worker %s on hive %s does not run it (its heartbeats since %s list %d other jobs)",
				j.Worker, j.Hive, j.unlisted.Format("15:04:05.000"), len(w.Jobs)))
		}
	}
}

func (s *Scheduler) setSettled(ok bool) {
	s.settled = ok
	if !ok {
		return
	}
	// Whatever is missing from a settled view is gone. A job whose
	// recovery or failure did not reach its record (the bus went away
	// again meanwhile) is decided again.
	v := s.view()
	for _, j := range s.jobs {
		switch j.State {
		case api.JobRunning, stateRecovering:
			if _, live := v.Worker(j.Worker); !live {
				s.recover(j, goneWhy(v, j))
			} else {
				j.State = api.JobRunning
			}
		case stateFailing:
			j.State = api.JobQueued
			s.enqueue(j)
		}
	}
	s.judgeRunning(v)
	s.placeAll()
}

func (s *Scheduler) placeAll() {
	for _, key := range slices.Sorted(maps.Keys(s.queued)) {
		s.place(key)
	}
}

// served reports whether a queued job of key with pins p will be taken by
// a worker that is live, or that a spawn just reported ready.
func (s *Scheduler) served(v View, key string, p Pins) bool {
	if len(v.Serving(key, p)) > 0 {
		return true
	}
	for _, r := range s.ready {
		if r.key == key {
			return true
		}
	}
	return false
}

// waiting returns the queued jobs of key that no worker will take, oldest
// first (job ids sort by creation). Jobs share few distinct pins, so the
// view is asked once per pins, not once per job.
func (s *Scheduler) waiting(v View, key string) []*Job {
	if s.pinned[key] == 0 && s.served(v, key, Pins{}) {
		return nil
	}
	var out []*Job
	served := map[Pins]bool{}
	for id := range s.queued[key] {
		j := s.jobs[id]
		if j == nil {
			continue
		}
		ok, seen := served[j.Pins]
		if !seen {
			ok = s.served(v, key, j.Pins)
			served[j.Pins] = ok
		}
		if !ok {
			out = append(out, j)
		}
	}
	slices.SortFunc(out, func(a, b *Job) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// place makes sure every queued job of key is served or will be: it starts
// a spawn when none is in flight, and fails the jobs no hive can serve.
//
// Nothing is decided while the view is not settled: right after the queen
// starts or the bus comes back, a worker missing from the view may just not
// have beaten yet, and a spawn would start a second one.
func (s *Scheduler) place(key string) {
	if !s.settled || s.replaying || key == "" || s.spawns[key] != nil || len(s.queued[key]) == 0 {
		return
	}
	v := s.view()
	waiting := s.waiting(v, key)
	if len(waiting) == 0 {
		return
	}
	if sp := s.nextSpawn(v, waiting, nil); sp != nil {
		s.startSpawn(sp)
		return
	}
	for _, j := range waiting {
		s.failWaiting(j, noHiveReason(v, j))
	}
}

// nextSpawn picks a spawn for the oldest waiting job that some hive not yet
// tried can serve.
func (s *Scheduler) nextSpawn(v View, waiting []*Job, tried []string) *spawn {
	for _, j := range waiting {
		for _, h := range v.Candidates(j.Key, j.Pins) {
			if !slices.Contains(tried, h) {
				return &spawn{order: SpawnOrder{Key: j.Key, Model: j.Model, Hive: h, Device: j.Pins.Device, Job: j.ID}}
			}
		}
		if j.Pull && j.Source != "" && len(tried) == 0 {
			if h := v.PullTarget(j.Pins); h != "" {
				return &spawn{order: SpawnOrder{Key: j.Key, Model: j.Model, Hive: h, Device: j.Pins.Device, Pull: true, Source: j.Source, Job: j.ID}}
			}
		}
	}
	return nil
}

func noHiveReason(v View, j *Job) string {
	if j.Pins.Hive != "" && v.HiveState(j.Pins.Hive) != api.HiveOnline {
		state := v.HiveState(j.Pins.Hive)
		if state == "" {
			state = "unknown"
		}
		return fmt.Sprintf("no worker serves model %s and hive %s, which the job is pinned to, is %s", j.Model, j.Pins.Hive, state)
	}
	return fmt.Sprintf("no worker serves model %s and no online hive has it; download it with `rbee model download --hive HIVE SOURCE --name %s`", j.Model, j.Model)
}

func (s *Scheduler) startSpawn(sp *spawn) {
	o := sp.order
	s.spawns[o.Key] = sp
	if o.Pull {
		s.fx.Narrate(o.Job, "pull", o.Hive, fmt.Sprintf("no hive has %s; downloading it from %s onto hive %s", o.Model, o.Source, o.Hive))
	} else {
		s.fx.Narrate(o.Job, "schedule", o.Hive, fmt.Sprintf("no worker serves %s; asking hive %s to start one", o.Model, o.Hive))
	}
	s.effect(func(ctx context.Context) {
		ctx, cancel := context.WithTimeout(ctx, s.cfg.SpawnTimeout)
		defer cancel()
		worker, err := s.fx.Spawn(ctx, o)
		s.send(func() { s.spawnDone(sp, worker, err) })
	})
}

func (s *Scheduler) spawnDone(sp *spawn, worker string, err error) {
	o := sp.order
	if s.spawns[o.Key] != sp {
		return
	}
	delete(s.spawns, o.Key)
	v := s.view()
	if err == nil {
		if _, ok := v.Worker(worker); !ok && worker != "" {
			s.ready[worker] = readyWorker{key: o.Key, until: time.Now().Add(s.cfg.ReadyWithin)}
		}
		s.place(o.Key)
		return
	}
	sp.tried = append(sp.tried, o.Hive)
	sp.reasons = append(sp.reasons, fmt.Sprintf("hive %s: %v", o.Hive, err))
	waiting := s.waiting(v, o.Key)
	if len(waiting) == 0 {
		return
	}
	if next := s.nextSpawn(v, waiting, sp.tried); next != nil {
		s.fx.Narrate(next.order.Job, "schedule", o.Hive, fmt.Sprintf("hive %s could not start a worker for %s: %v; trying hive %s", o.Hive, o.Model, err, next.order.Hive))
		next.tried, next.reasons = sp.tried, sp.reasons
		s.startSpawn(next)
		return
	}
	// Every job that waited on the spawn fails with its reason, now,
	// rather than at its deadline. A job that another hive could still
	// serve (other pins) gets its own spawn.
	reason := fmt.Sprintf("no worker could be started for %s (%s)", o.Model, strings.Join(sp.reasons, "; "))
	for _, j := range waiting {
		if !hivesLeft(v, j, sp.tried) {
			s.failWaiting(j, reason)
		}
	}
	s.place(o.Key)
}

func hivesLeft(v View, j *Job, tried []string) bool {
	for _, h := range v.Candidates(j.Key, j.Pins) {
		if !slices.Contains(tried, h) {
			return true
		}
	}
	return false
}

// failWaiting fails a queued job; it leaves the queue at once so it is not
// placed again while the record catches up.
func (s *Scheduler) failWaiting(j *Job, reason string) {
	s.unqueue(j)
	j.State = stateFailing
	id := j.ID
	s.effect(func(ctx context.Context) { s.fx.Fail(ctx, id, reason) })
}

func (s *Scheduler) narrateQueued(j *Job) {
	v := s.view()
	serving := v.Serving(j.Key, j.Pins)
	if len(serving) == 0 {
		if sp := s.spawns[j.Key]; sp != nil {
			s.fx.Narrate(j.ID, "queued", j.Model, fmt.Sprintf("queued; a worker for %s is starting on hive %s", j.Model, sp.order.Hive))
		}
		return // place narrates the spawn it starts, or the failure
	}
	slots, busy := 0, 0
	for _, w := range serving {
		slots += w.SlotsTotal
		busy += w.SlotsBusy
	}
	ahead := len(s.queued[j.Key]) - 1
	if busy < slots && ahead == 0 {
		s.fx.Narrate(j.ID, "queued", j.Model, fmt.Sprintf("queued for model %s; a worker with a free slot takes it now", j.Model))
		return
	}
	s.fx.Narrate(j.ID, "queued", j.Model, fmt.Sprintf("queued for model %s behind %d earlier requests; %d of %d slots are busy", j.Model, ahead, busy, slots))
}

func (s *Scheduler) expireReady() {
	now := time.Now()
	expired := false
	for id, r := range s.ready {
		if now.After(r.until) {
			delete(s.ready, id)
			expired = true
		}
	}
	if expired {
		s.placeAll()
	}
}

func (s *Scheduler) effect(fn func(ctx context.Context)) {
	s.effects.Add(1)
	go func() {
		defer s.effects.Done()
		fn(s.ctx)
	}()
}

// publishDepths copies the counts for readers: once per event that changed
// them, O(models).
func (s *Scheduler) publishDepths() {
	s.dirty = false
	out := maps.Clone(s.counts)
	s.depths.Store(&out)
}
