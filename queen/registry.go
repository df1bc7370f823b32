package queen

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/subjects"
)

// HiveRecord is the queen's view of one hive seen on the bus.
type HiveRecord struct {
	Status   api.HiveStatus
	State    string // api.HiveOnline, api.HiveOffline or api.HiveLost
	LastSeen time.Time
}

// Snapshot is an immutable view of the registry at one moment.
type Snapshot struct {
	Hives   map[string]HiveRecord
	Workers map[string]api.WorkerStatus
	changed chan struct{}
	// exits is the registry's record of workers seen to exit (shared by
	// every snapshot; safe for concurrent use).
	exits *exitLog
}

// exitLog remembers, for a while, how workers that were seen to exit ended:
// a queen that starts after a worker died reads it from the purge marker
// the worker's hive left, though it never saw the worker alive.
type exitLog struct{ m sync.Map }

type exitNote struct {
	why string
	at  time.Time
}

// exitMemory bounds how long an exit is remembered (markers live a minute).
const exitMemory = 10 * time.Minute

func (l *exitLog) note(id, why string) {
	now := time.Now()
	l.m.Store(id, exitNote{why, now})
	l.m.Range(func(k, v any) bool {
		if now.Sub(v.(exitNote).at) > exitMemory {
			l.m.Delete(k)
		}
		return true
	})
}

func (l *exitLog) forget(id string) { l.m.Delete(id) }

func (l *exitLog) of(id string) (string, bool) {
	v, ok := l.m.Load(id)
	if !ok {
		return "", false
	}
	return v.(exitNote).why, true
}

// Registry is the queen's live view of hives and workers. One goroutine
// (run) owns it and is fed only by the registry buckets' watchers; readers
// take immutable snapshots. Liveness is the buckets' TTLs: the queen never
// polls anyone.
//
// Liveness is judged only once the bus has been back for a grace of one
// heartbeat TTL: after the queen starts, and after every reconnect. An
// entry that expired while the bus was away (or the queen was down) says
// nothing about its owner, which beats again as soon as it can reach the
// bus; so an expiry seen during the grace is held, and becomes a loss only
// if no beat came by the grace's end. When the grace ends, OnSettled says
// the view is now trustworthy: whatever is missing from it is gone.
//
// A new snapshot is a copy of every entry, so one per heartbeat would cost
// the queen O(entries) per beat: quadratic in the size of the cluster. A
// change that matters to a decision (an entry appearing or leaving, a hive
// going online, offline or lost, a worker changing state or busy slots) is
// published at once; a beat that only refreshes figures (free memory,
// tokens served) is folded into the next snapshot, at most refreshEvery
// later.
type Registry struct {
	bus  *bus.Bus
	snap atomic.Pointer[Snapshot]
	// OnHiveLost and OnWorkerLost are called from the owner goroutine when
	// an entry expires without a goodbye.
	// OnWorkerLost's why says what is known: the hive saw the worker exit,
	// or its heartbeat stopped.
	OnHiveLost   func(id string, last api.HiveStatus)
	OnWorkerLost func(id string, last api.WorkerStatus, why string)
	OnWorkerGone func(id string, last api.WorkerStatus)
	// OnFlush is called from the owner goroutine after each new snapshot.
	OnFlush func()
	// OnSettled is called from the owner goroutine each time a grace ends.
	OnSettled func()
	ready     chan struct{}
	// grace is how long after the bus is back liveness is not judged.
	grace   time.Duration
	busBack chan struct{}
	// settled is set while no grace runs (readable by anyone).
	settled atomic.Bool

	// Owned by run: the current state, newer than the snapshot while dirty.
	hives   map[string]HiveRecord
	workers map[string]api.WorkerStatus
	dirty   bool
	// loading holds back snapshots while the watchers replay the buckets,
	// so a queen starting against 10,000 entries copies them once, not once
	// per entry.
	loading bool
	// flushes counts snapshots published, to show beats are folded.
	flushes atomic.Int64
	// graceUntil ends the current grace; expired holds the entries whose
	// expiry was seen during it, by kind, until they beat again.
	graceUntil     time.Time
	expiredHives   map[string]bool
	expiredWorkers map[string]string
	// lastBeat is when each worker last beat, for the loss's reason.
	lastBeat map[string]time.Time
	exits    *exitLog
}

// refreshEvery bounds how stale a snapshot's figures may be.
const refreshEvery = 250 * time.Millisecond

func newRegistry(b *bus.Bus, grace time.Duration) *Registry {
	r := &Registry{
		bus: b, ready: make(chan struct{}), loading: true, grace: grace, busBack: make(chan struct{}, 1),
		hives: map[string]HiveRecord{}, workers: map[string]api.WorkerStatus{},
		expiredHives: map[string]bool{}, expiredWorkers: map[string]string{}, lastBeat: map[string]time.Time{},
		exits: &exitLog{},
	}
	r.snap.Store(&Snapshot{Hives: map[string]HiveRecord{}, Workers: map[string]api.WorkerStatus{}, changed: make(chan struct{}), exits: r.exits})
	return r
}

// BusBack starts a new grace: the bus was away and is back. Safe from any
// goroutine (the connection's reconnect callback); it never blocks.
func (r *Registry) BusBack() {
	r.settled.Store(false)
	select {
	case r.busBack <- struct{}{}:
	default:
	}
}

// Settled reports whether liveness is being judged (no grace runs).
func (r *Registry) Settled() bool { return r.settled.Load() }

// WaitSettled returns the first snapshot for which cond holds, or the first
// one once the view is settled, whichever comes first: a decision that a
// thing is missing (no hive online, a hive not running) must not be taken
// from a view the liveness grace still holds back. Bounded by ctx.
func (r *Registry) WaitSettled(ctx context.Context, cond func(*Snapshot) bool) *Snapshot {
	s, _ := r.Wait(ctx, func(s *Snapshot) bool { return r.Settled() || cond(s) })
	return s
}

// Snapshot returns the current view.
func (r *Registry) Snapshot() *Snapshot { return r.snap.Load() }

// Wait blocks until cond holds for a snapshot, or ctx ends.
func (r *Registry) Wait(ctx context.Context, cond func(*Snapshot) bool) (*Snapshot, error) {
	for {
		s := r.snap.Load()
		if cond(s) {
			return s, nil
		}
		select {
		case <-s.changed:
		case <-ctx.Done():
			return s, ctx.Err()
		}
	}
}

// run watches both buckets until ctx ends. Watches resume by themselves
// across reconnects (nats.go re-creates the ordered consumer).
func (r *Registry) run(ctx context.Context) error {
	hivesKV, err := r.bus.KV(ctx, r.bus.Space.HivesBucket())
	if err != nil {
		return err
	}
	workersKV, err := r.bus.KV(ctx, r.bus.Space.WorkersBucket())
	if err != nil {
		return err
	}
	hw, err := hivesKV.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = hw.Stop() }()
	ww, err := workersKV.WatchAll(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = ww.Stop() }()
	// On a cluster, a bucket whose leader died takes no beats until
	// another is elected (seconds, longer than a heartbeat's TTL), and the
	// new leader then expires every entry that could not beat meanwhile:
	// an election is a bus outage of its own, and starts a grace too.
	elected := make(chan *nats.Msg, 16)
	for _, st := range []string{subjects.KVStream(r.bus.Space.HivesBucket()), subjects.KVStream(r.bus.Space.WorkersBucket())} {
		sub, err := r.bus.NC.ChanSubscribe(subjects.LeaderElected(st), elected)
		if err != nil {
			return err
		}
		defer func() { _ = sub.Unsubscribe() }()
	}
	refresh := time.NewTimer(refreshEvery)
	refresh.Stop()
	armed := false
	r.graceUntil = time.Now().Add(r.grace)
	graceEnd := time.NewTimer(r.grace)
	defer graceEnd.Stop()
	hivesReady, workersReady := false, false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-refresh.C:
			armed = false
			if r.dirty {
				r.flush()
			}
			continue
		case <-r.busBack:
			r.graceUntil = time.Now().Add(r.grace)
			graceEnd.Reset(r.grace)
			r.bus.Log.Info().Str("grace", r.grace.String()).Msg("bus back; judging liveness after the grace")
			continue
		case m := <-elected:
			r.graceUntil = time.Now().Add(r.grace)
			graceEnd.Reset(r.grace)
			r.bus.Log.Info().Str("stream", strings.TrimPrefix(m.Subject, subjects.LeaderElected(""))).Str("grace", r.grace.String()).
				Msg("a registry bucket elected a new leader; judging liveness after the grace")
			continue
		case <-graceEnd.C:
			if r.loading {
				graceEnd.Reset(refreshEvery) // judge once the buckets are read
				continue
			}
			r.settle(ctx)
		case e := <-hw.Updates():
			if e == nil {
				hivesReady = true
			} else {
				r.applyHive(ctx, e)
			}
		case e := <-ww.Updates():
			if e == nil {
				workersReady = true
			} else {
				r.applyWorker(e)
			}
		}
		// Armed once per batch, never pushed back: a steady stream of
		// beats cannot postpone the snapshot for ever.
		if r.dirty && !armed {
			refresh.Reset(refreshEvery)
			armed = true
		}
		if hivesReady && workersReady && r.loading {
			r.loading = false
			r.flush()
			close(r.ready)
		}
	}
}

// flush publishes the current state as a new snapshot and wakes waiters.
func (r *Registry) flush() {
	old := r.snap.Load()
	next := &Snapshot{Hives: maps.Clone(r.hives), Workers: maps.Clone(r.workers), changed: make(chan struct{}), exits: r.exits}
	r.snap.Store(next)
	close(old.changed)
	r.dirty = false
	r.flushes.Add(1)
	if r.OnFlush != nil {
		r.OnFlush()
	}
}

// changed publishes a change that matters at once (once loaded).
func (r *Registry) changed() {
	if r.loading {
		r.dirty = true
		return
	}
	r.flush()
}

// refreshed notes a change that can wait for the next periodic snapshot
// (run arms the timer).
func (r *Registry) refreshed() { r.dirty = true }

// inGrace says whether an expiry now says nothing yet.
func (r *Registry) inGrace() bool { return time.Now().Before(r.graceUntil) }

// settle ends a grace: every entry that expired during it and has not beaten
// since is lost now, through the same path as any loss.
func (r *Registry) settle(ctx context.Context) {
	for id := range r.expiredHives {
		r.hiveLost(ctx, id)
	}
	for id, why := range r.expiredWorkers {
		r.workerLost(id, why)
	}
	clear(r.expiredHives)
	clear(r.expiredWorkers)
	r.settled.Store(true)
	// Wake those waiting for a settled view (WaitSettled).
	r.flush()
	if r.OnSettled != nil {
		r.OnSettled()
	}
}

func (r *Registry) applyHive(ctx context.Context, e jetstream.KeyValueEntry) {
	id := e.Key()
	prev, known := r.hives[id]
	switch e.Operation() {
	case jetstream.KeyValuePut:
		delete(r.expiredHives, id)
		var st api.HiveStatus
		if err := json.Unmarshal(e.Value(), &st); err != nil {
			r.bus.Log.Warn().Err(err).Str("hive", id).Msg("undecodable hive heartbeat")
			return
		}
		r.hives[id] = HiveRecord{Status: st, State: api.HiveOnline, LastSeen: time.Now()}
		if known && prev.State == api.HiveOnline && sameHive(prev.Status, st) {
			r.refreshed()
			return
		}
		r.changed()
		if !known || prev.State != api.HiveOnline {
			r.narrate(ctx, "hive-online", id, "hive %s is online (%s, %d CPU threads)", id, st.Capabilities.Hostname, st.Capabilities.CPU.Threads)
		}
	case jetstream.KeyValueDelete:
		if !known {
			// The goodbye of a hive this queen never saw: nothing is
			// known of it but what the inventory says.
			return
		}
		delete(r.expiredHives, id)
		wasOnline := prev.State == api.HiveOnline
		prev.State = api.HiveOffline
		r.hives[id] = prev
		r.changed()
		if wasOnline {
			r.narrate(ctx, "hive-offline", id, "hive %s stopped", id)
		}
	case jetstream.KeyValuePurge:
		// A purge is the TTL running out: the hive stopped beating
		// without saying goodbye.
		if !known || prev.State != api.HiveOnline {
			return
		}
		if r.inGrace() {
			r.expiredHives[id] = true
			return
		}
		r.hiveLost(ctx, id)
	}
}

func (r *Registry) hiveLost(ctx context.Context, id string) {
	prev, known := r.hives[id]
	if !known || prev.State != api.HiveOnline {
		return
	}
	prev.State = api.HiveLost
	r.hives[id] = prev
	r.changed()
	r.bus.Log.Warn().Str("hive", id).Time("last_seen", prev.LastSeen).Msg("hive lost")
	r.narrateLevel(ctx, "warn", "hive-lost", id, "hive %s lost: no heartbeat since %s", id, prev.LastSeen.Format(time.TimeOnly))
	if r.OnHiveLost != nil {
		r.OnHiveLost(id, prev.Status)
	}
}

// sameHive says whether a beat changes nothing the scheduler decides on
// at once: the same process, models and workers. Free memory and the like
// reach the next periodic snapshot.
func sameHive(a, b api.HiveStatus) bool {
	return a.PID == b.PID && a.StartedAt.Equal(b.StartedAt) &&
		slices.Equal(a.Workers, b.Workers) &&
		slices.Equal(a.Models, b.Models)
}

func (r *Registry) applyWorker(e jetstream.KeyValueEntry) {
	id := subjects.WorkerIDFromKey(e.Key())
	prev, known := r.workers[id]
	switch e.Operation() {
	case jetstream.KeyValuePut:
		var st api.WorkerStatus
		if err := json.Unmarshal(e.Value(), &st); err != nil {
			r.bus.Log.Warn().Err(err).Str("worker", id).Msg("undecodable worker heartbeat")
			return
		}
		delete(r.expiredWorkers, id)
		r.exits.forget(id)
		r.lastBeat[id] = time.Now()
		r.workers[id] = st
		if known && prev.State == st.State && prev.SlotsBusy == st.SlotsBusy && prev.SlotsTotal == st.SlotsTotal && prev.PID == st.PID {
			r.refreshed()
			return
		}
		r.changed()
	case jetstream.KeyValuePurge:
		var exit bus.ExitReport
		died := len(e.Value()) > 0 && json.Unmarshal(e.Value(), &exit) == nil && exit.Exit != ""
		if died {
			r.exits.note(id, exit.Exit)
		}
		if !known {
			return
		}
		why := fmt.Sprintf("worker %s on hive %s was lost: no heartbeat since %s", id, prev.Hive, r.lastBeat[id].Format(time.TimeOnly))
		if died {
			why = fmt.Sprintf("worker %s on hive %s died (%s)", id, prev.Hive, exit.Exit)
		}
		if r.inGrace() {
			r.expiredWorkers[id] = why
			return
		}
		r.workerLost(id, why)
	case jetstream.KeyValueDelete:
		// A goodbye: the worker left the registry itself.
		if !known {
			return
		}
		delete(r.expiredWorkers, id)
		delete(r.workers, id)
		delete(r.lastBeat, id)
		r.changed()
		if r.OnWorkerGone != nil {
			r.OnWorkerGone(id, prev)
		}
	}
}

func (r *Registry) workerLost(id, why string) {
	prev, known := r.workers[id]
	if !known {
		return
	}
	delete(r.workers, id)
	delete(r.lastBeat, id)
	r.changed()
	r.bus.Log.Warn().Str("worker", id).Str("why", why).Msg("worker lost")
	if r.OnWorkerLost != nil {
		r.OnWorkerLost(id, prev, why)
	}
}

func (r *Registry) narrate(ctx context.Context, action, hive, format string, args ...any) {
	r.narrateLevel(ctx, "info", action, hive, format, args...)
}

func (r *Registry) narrateLevel(ctx context.Context, level, action, hive, format string, args ...any) {
	n := r.bus.Narrator(api.Actor{Component: "queen"}, hive, "")
	ev := api.Narration{Level: level, Action: action, Target: hive}
	ev.Human = fmt.Sprintf(format, args...)
	_ = n.Narrate(ctx, ev)
}
