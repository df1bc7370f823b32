// Package jobs owns job records: the state machine, and the only code that
// writes a record to the jobs bucket. Every write is a compare-and-swap on
// the record's revision, so two writers (the queen and a worker, or two
// queens) can never lose each other's update; every state change is also
// published as a state event on the job's subjects.
package jobs

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
)

var (
	// ErrNotFound means no record exists for the id (never created, or aged out).
	ErrNotFound = errors.New("job not found")
	// ErrIllegalTransition means the state machine does not allow the change.
	ErrIllegalTransition = errors.New("illegal job state transition")
	// ErrTerminal means the job already finished; its state is final.
	ErrTerminal = errors.New("job already finished")
	// ErrConflict means the record changed since it was read.
	ErrConflict = errors.New("job record changed concurrently")
	// ErrStale means the writer's attempt is no longer the job's current
	// one: the job was retried, or ended, without it. A stale worker (one
	// paused or cut off long enough to be given up) must not change the
	// job's outcome.
	ErrStale = errors.New("stale attempt")
)

// Attempt names one attempt at running a job: its number (1 for the first
// worker, one more per retry) and the worker that runs it.
type Attempt struct {
	Number int
	Worker string
}

// transitions lists the allowed changes. running → queued is a retry: the
// worker died before sending any token, so the job may run elsewhere.
var transitions = map[api.JobState][]api.JobState{
	api.JobQueued:  {api.JobRunning, api.JobFailed, api.JobCancelled},
	api.JobRunning: {api.JobCompleted, api.JobFailed, api.JobCancelled, api.JobQueued},
}

// CheckTransition reports whether a job may go from one state to another.
func CheckTransition(from, to api.JobState) error {
	if !to.Valid() {
		return fmt.Errorf("%w: unknown state %q", ErrIllegalTransition, to)
	}
	if from.Terminal() {
		return fmt.Errorf("%w (%s)", ErrTerminal, from)
	}
	for _, s := range transitions[from] {
		if s == to {
			return nil
		}
	}
	return fmt.Errorf("%w: %s → %s", ErrIllegalTransition, from, to)
}

var idEncoding = base32.NewEncoding("0123456789abcdefghijklmnopqrstuv").WithPadding(base32.NoPadding)

// NewID returns a job id that sorts by creation time: 48 bits of
// milliseconds and 32 random bits, 16 lower-case characters.
func NewID() string {
	var b [10]byte
	binary.BigEndian.PutUint64(b[:8], uint64(time.Now().UnixMilli())<<16)
	if _, err := rand.Read(b[6:]); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return idEncoding.EncodeToString(b[:])
}

// ValidID checks that id is in NewID's form (16 characters of its base32
// alphabet), as a client-chosen job id must be.
func ValidID(id string) error {
	if len(id) != 16 {
		return fmt.Errorf("job id %q: want 16 characters as jobs.NewID makes, got %d", id, len(id))
	}
	if _, err := idEncoding.DecodeString(id); err != nil {
		return fmt.Errorf("job id %q: want the characters 0-9 and a-v only", id)
	}
	return nil
}

// ErrExists: a job with that id exists already.
var ErrExists = errors.New("job exists")

// Store reads and writes job records.
type Store struct {
	bus       *bus.Bus
	kv        jetstream.KeyValue
	subject   func(id string) string
	retention time.Duration
	actor     api.Actor
}

// Open returns a store writing as actor. Finished records expire after
// retention (bus.DefaultRetention when zero).
func Open(ctx context.Context, b *bus.Bus, actor api.Actor, retention time.Duration) (*Store, error) {
	kv, err := b.KV(ctx, b.Space.JobsBucket())
	if err != nil {
		return nil, err
	}
	if retention <= 0 {
		retention = bus.DefaultRetention().JobEvents
	}
	bucket := b.Space.JobsBucket()
	return &Store{
		bus: b, kv: kv, retention: retention, actor: actor,
		subject: func(id string) string { return subjects.KVSubject(bucket, id) },
	}, nil
}

// Create stores a new queued job and publishes its first state event.
func (s *Store) Create(ctx context.Context, job api.Job) (api.Job, error) {
	if err := subjects.ValidateID(subjects.KindJob, job.ID); err != nil {
		return api.Job{}, err
	}
	job.State = api.JobQueued
	if job.CreatedAt.IsZero() {
		job.CreatedAt = time.Now().UTC()
	}
	data, err := json.Marshal(job)
	if err != nil {
		return api.Job{}, err
	}
	var rev uint64
	err = bus.WhileElecting(ctx, true, func(ctx context.Context, retried bool) (err error) {
		rev, err = s.kv.Create(ctx, job.ID, data)
		if retried && errors.Is(err, jetstream.ErrKeyExists) {
			rev, err = s.storedAs(ctx, job.ID, data, err)
		}
		return err
	})
	if errors.Is(err, jetstream.ErrKeyExists) {
		return api.Job{}, fmt.Errorf("create job %s: %w", job.ID, ErrExists)
	}
	if err != nil {
		return api.Job{}, fmt.Errorf("create job %s: %w", job.ID, bus.StoreErr(err))
	}
	job.Revision = rev
	s.publishState(ctx, job, "")
	return job, nil
}

// Get reads a job record.
func (s *Store) Get(ctx context.Context, id string) (api.Job, error) {
	if err := subjects.ValidateID(subjects.KindJob, id); err != nil {
		return api.Job{}, err
	}
	e, err := s.kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return api.Job{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		return api.Job{}, fmt.Errorf("read job %s: %w", id, bus.StoreErr(err))
	}
	return decode(e)
}

func decode(e jetstream.KeyValueEntry) (api.Job, error) {
	var job api.Job
	if err := json.Unmarshal(e.Value(), &job); err != nil {
		return api.Job{}, fmt.Errorf("job record %s is corrupt: %w", e.Key(), err)
	}
	job.Revision = e.Revision()
	return job, nil
}

// List returns the current records, newest first, optionally only those in
// one state. It reads the bucket's last value per key in one pass.
func (s *Store) List(ctx context.Context, state api.JobState) ([]api.Job, error) {
	w, err := s.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("list jobs: %w", bus.StoreErr(err))
	}
	defer func() { _ = w.Stop() }()
	var out []api.Job
	for {
		select {
		case e := <-w.Updates():
			if e == nil { // all current values delivered
				sort.Slice(out, func(i, j int) bool { return out[i].ID > out[j].ID })
				return out, nil
			}
			job, err := decode(e)
			if err != nil {
				continue
			}
			if state == "" || job.State == state {
				out = append(out, job)
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// storedAs settles a retried write refused as a duplicate (refused): an
// earlier try may have been stored with its answer lost. It is ours, at
// the record's revision, if the record holds what we wrote; a record that
// cannot be read leaves the write unsettled (tried again); any other
// record makes the refusal stand.
func (s *Store) storedAs(ctx context.Context, id string, data []byte, refused error) (uint64, error) {
	e, err := s.kv.Get(ctx, id)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return 0, fmt.Errorf("%w: %v, yet job %s cannot be read", bus.ErrUnsettled, refused, id)
	case err != nil:
		return 0, err
	case bytes.Equal(e.Value(), data):
		return e.Revision(), nil
	}
	return 0, refused
}

// CompareAndSwap writes job if its record is still at job.Revision, and
// returns it with the new revision. A finished job's record gets the
// retention as its TTL, so records never accumulate.
func (s *Store) CompareAndSwap(ctx context.Context, job api.Job) (api.Job, error) {
	data, err := json.Marshal(job)
	if err != nil {
		return api.Job{}, err
	}
	msg := nats.NewMsg(s.subject(job.ID))
	msg.Data = data
	opts := []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(job.Revision)}
	if job.State.Terminal() {
		opts = append(opts, jetstream.WithMsgTTL(s.retention))
	}
	var ack *jetstream.PubAck
	err = bus.WhileElecting(ctx, true, func(ctx context.Context, retried bool) (err error) {
		ack, err = s.bus.JS.PublishMsg(ctx, msg, opts...)
		var apiErr *jetstream.APIError
		if retried && errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
			var rev uint64
			if rev, err = s.storedAs(ctx, job.ID, data, err); err == nil {
				ack = &jetstream.PubAck{Sequence: rev}
			}
		}
		return err
	})
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		return api.Job{}, fmt.Errorf("%w: %s (revision %d)", ErrConflict, job.ID, job.Revision)
	}
	if err != nil {
		return api.Job{}, fmt.Errorf("write job %s: %w", job.ID, bus.StoreErr(err))
	}
	job.Revision = ack.Sequence
	return job, nil
}

// Transition moves a job to state to, applying mutate to the record in the
// same write, and publishes the state event. It retries on concurrent
// changes, re-checking the state machine against the fresh record each
// time, so a cancel racing a completion ends in exactly one terminal state.
func (s *Store) Transition(ctx context.Context, id string, to api.JobState, mutate func(*api.Job)) (api.Job, error) {
	return s.transition(ctx, id, to, nil, nil, mutate)
}

// Take moves a queued job to running for attempt a, the attempt after the
// record's last one. A request of an older attempt (redelivered after its
// job was retried) is refused with ErrStale, so only one worker per attempt
// ever runs a job.
func (s *Store) Take(ctx context.Context, id string, a Attempt, hive string) (api.Job, error) {
	return s.take(ctx, id, nil, a, hive)
}

// TakeAt is Take from a copy of the record at its revision (the one the
// queen created, handed to the worker with the request): the first write
// goes against that revision without reading the record, one round trip
// less on the way to the first token. A record that changed since (a
// cancel, a retry) fails that write, and the record is read as by Take.
func (s *Store) TakeAt(ctx context.Context, known api.Job, a Attempt, hive string) (api.Job, error) {
	if known.Revision == 0 {
		return s.take(ctx, known.ID, nil, a, hive)
	}
	return s.take(ctx, known.ID, &known, a, hive)
}

func (s *Store) take(ctx context.Context, id string, known *api.Job, a Attempt, hive string) (api.Job, error) {
	return s.transition(ctx, id, api.JobRunning, known, func(j api.Job) error {
		if j.State == api.JobQueued && a.Number != j.Attempts+1 {
			return fmt.Errorf("job %s: %w: request of attempt %d, the job waits for attempt %d", id, ErrStale, a.Number, j.Attempts+1)
		}
		return nil
	}, func(j *api.Job) { j.Worker, j.Hive, j.Attempts = a.Worker, hive, a.Number })
}

// Finish moves a running job to a terminal state on behalf of attempt a.
// It fails with ErrStale when a is no longer the job's attempt (the queen
// gave the worker up and retried or failed the job), and with ErrTerminal
// when someone else ended the job first.
func (s *Store) Finish(ctx context.Context, id string, a Attempt, to api.JobState, mutate func(*api.Job)) (api.Job, error) {
	return s.transition(ctx, id, to, nil, a.current(id), mutate)
}

// FinishAt is Finish written against known, the job's record as its
// worker last read it (a worker reads it to tell whether the end is still
// its own to narrate): a copy by which attempt a may end the job is
// written against without another read, and a write it lost to a change
// since is read again and checked as Finish checks it. A copy that says
// otherwise is not trusted to refuse: Finish reads the record and decides.
func (s *Store) FinishAt(ctx context.Context, known api.Job, a Attempt, to api.JobState, mutate func(*api.Job)) (api.Job, error) {
	check := a.current(known.ID)
	if known.Revision == 0 || CheckTransition(known.State, to) != nil || check(known) != nil {
		return s.Finish(ctx, known.ID, a, to, mutate)
	}
	return s.transition(ctx, known.ID, to, &known, check, mutate)
}

// Reject fails a job waiting for attempt a (a request the worker refused
// before any work: its parameters do not fit the model), with why. The
// check is made on the record the write goes against, so a job that moved
// on meanwhile (taken by another worker's copy of the request, retried,
// ended) is refused with ErrStale or ErrTerminal rather than failed: a
// check on a read of its own, then a write, could fail a job another
// worker had just taken.
func (s *Store) Reject(ctx context.Context, id string, a Attempt, hive string, why *api.Error) (api.Job, error) {
	return s.transition(ctx, id, api.JobFailed, nil, func(j api.Job) error {
		if !j.State.Terminal() && (j.State != api.JobQueued || j.Attempts+1 != a.Number) {
			return fmt.Errorf("job %s: %w: request of attempt %d, the job is %s at attempt %d", id, ErrStale, a.Number, j.State, j.Attempts)
		}
		return nil
	}, func(j *api.Job) {
		j.SetError(why)
		j.Worker, j.Hive = a.Worker, hive
	})
}

// Retry puts a running job back in the queue after attempt a's worker was
// lost, keeping the attempt number: the next request carries a.Number+1.
func (s *Store) Retry(ctx context.Context, id string, a Attempt) (api.Job, error) {
	return s.transition(ctx, id, api.JobQueued, nil, a.current(id), func(j *api.Job) { j.Worker, j.Hive = "", "" })
}

// current checks that attempt a still runs the job.
func (a Attempt) current(id string) func(api.Job) error {
	return func(j api.Job) error {
		if j.State.Terminal() {
			return nil // the state machine says ErrTerminal
		}
		if j.Attempts != a.Number || j.Worker != a.Worker {
			return fmt.Errorf("job %s: %w: attempt %d on worker %s, the job is at attempt %d on worker %q", id, ErrStale, a.Number, a.Worker, j.Attempts, j.Worker)
		}
		return nil
	}
}

// transition is Transition with a check of the record before the write;
// known, when not nil, is a copy of the record at its revision, written
// against without a read on the first try.
func (s *Store) transition(ctx context.Context, id string, to api.JobState, known *api.Job, check func(api.Job) error, mutate func(*api.Job)) (api.Job, error) {
	for attempt := 0; ; attempt++ {
		var job api.Job
		var err error
		if attempt == 0 && known != nil {
			job = *known
		} else if job, err = s.Get(ctx, id); err != nil {
			return api.Job{}, err
		}
		from := job.State
		if err := CheckTransition(from, to); err != nil {
			return job, fmt.Errorf("job %s: %w", id, err)
		}
		if check != nil {
			if err := check(job); err != nil {
				return job, err
			}
		}
		now := time.Now().UTC()
		job.State = to
		switch {
		case to == api.JobRunning:
			job.StartedAt = &now
		case to == api.JobQueued:
			job.StartedAt = nil
		case to.Terminal():
			job.FinishedAt = &now
		}
		if mutate != nil {
			mutate(&job)
		}
		job, err = s.CompareAndSwap(ctx, job)
		if errors.Is(err, ErrConflict) && attempt < 20 {
			continue
		}
		if err != nil {
			return api.Job{}, err
		}
		s.publishState(ctx, job, from)
		return job, nil
	}
}

// Update changes a record without changing its state (where it runs, its
// attempts), with the same compare-and-swap retry as Transition.
func (s *Store) Update(ctx context.Context, id string, mutate func(*api.Job) error) (api.Job, error) {
	for attempt := 0; ; attempt++ {
		job, err := s.Get(ctx, id)
		if err != nil {
			return api.Job{}, err
		}
		if err := mutate(&job); err != nil {
			return job, err
		}
		job, err = s.CompareAndSwap(ctx, job)
		if errors.Is(err, ErrConflict) && attempt < 20 {
			continue
		}
		return job, err
	}
}

func (s *Store) publishState(ctx context.Context, job api.Job, from api.JobState) {
	ev := job.Change(from, s.actor, time.Now().UTC())
	// The record is what counts; its event is for followers, and must not
	// hold a write up for long while a stream elects its leader, but for
	// the job's end, which every follower waits for: that one waits out an
	// election. A try whose answer was lost may have been stored: the
	// end's message id, one per record revision, lets the stream drop the
	// copy a retry sends, so the job ends once in its stream too.
	publish := func() error {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		return s.bus.PublishEvent(pctx, job.ID, subjects.EventState, ev)
	}
	if job.State.Terminal() {
		id := jetstream.WithMsgID(fmt.Sprintf("%s.%s.%d", job.ID, job.State, job.Revision))
		publish = func() error {
			return bus.WhileElecting(ctx, true, func(ctx context.Context, _ bool) error {
				return s.bus.PublishEvent(ctx, job.ID, subjects.EventState, ev, id)
			})
		}
	}
	if job.State == api.JobRunning || from == "" {
		// A job made or starting is on the path to its first token: the
		// record is already written, so the event need not hold the
		// submit or the worker up. (A follower drops a creation event
		// that a cluster stored after the job's next state.)
		publish = func() error { return s.bus.PostEvent(job.ID, subjects.EventState, ev) }
	}
	if err := publish(); err != nil {
		s.bus.Log.Error().Err(err).Str("job", job.ID).Str("state", string(job.State)).Msg("state event not published")
	}
}

// Counts returns how many current records are in each state.
func (s *Store) Counts(ctx context.Context) (map[api.JobState]int, error) {
	all, err := s.List(ctx, "")
	if err != nil {
		return nil, err
	}
	counts := map[api.JobState]int{}
	for _, j := range all {
		counts[j.State]++
	}
	return counts, nil
}

// Watch watches every record: first the current ones, then each change
// (deletes included, as a record ages out), until ctx ends. Decode turns an
// entry into a job.
func (s *Store) Watch(ctx context.Context) (jetstream.KeyWatcher, error) {
	w, err := s.kv.WatchAll(ctx)
	if err != nil {
		return nil, fmt.Errorf("watch jobs: %w", err)
	}
	return w, nil
}

// Decode reads a job record from a bucket entry.
func Decode(e jetstream.KeyValueEntry) (api.Job, error) { return decode(e) }

// IsNotFound reports whether err means the job does not exist.
func IsNotFound(err error) bool { return errors.Is(err, ErrNotFound) }
