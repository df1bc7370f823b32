package queen

import (
	"context"
	"encoding/json"
	"maps"
	"slices"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
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
}

// Registry is the queen's live view of hives and workers. One goroutine
// (run) owns it and is fed only by the registry buckets' watchers; readers
// take immutable snapshots. Liveness is the buckets' TTLs: the queen never
// polls anyone.
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
	OnHiveLost   func(id string, last api.HiveStatus)
	OnWorkerLost func(id string, last api.WorkerStatus)
	OnWorkerGone func(id string, last api.WorkerStatus)
	ready        chan struct{}

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
}

// refreshEvery bounds how stale a snapshot's figures may be.
const refreshEvery = 250 * time.Millisecond

func newRegistry(b *bus.Bus) *Registry {
	r := &Registry{bus: b, ready: make(chan struct{}), loading: true, hives: map[string]HiveRecord{}, workers: map[string]api.WorkerStatus{}}
	r.snap.Store(&Snapshot{Hives: map[string]HiveRecord{}, Workers: map[string]api.WorkerStatus{}, changed: make(chan struct{})})
	return r
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
	refresh := time.NewTimer(refreshEvery)
	refresh.Stop()
	armed := false
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
	next := &Snapshot{Hives: maps.Clone(r.hives), Workers: maps.Clone(r.workers), changed: make(chan struct{})}
	r.snap.Store(next)
	close(old.changed)
	r.dirty = false
	r.flushes.Add(1)
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

func (r *Registry) applyHive(ctx context.Context, e jetstream.KeyValueEntry) {
	id := e.Key()
	prev, known := r.hives[id]
	switch e.Operation() {
	case jetstream.KeyValuePut:
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
		wasOnline := known && prev.State == api.HiveOnline
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
		prev.State = api.HiveLost
		r.hives[id] = prev
		r.changed()
		r.bus.Log.Warn().Str("hive", id).Time("last_seen", prev.LastSeen).Msg("hive lost")
		r.narrateLevel(ctx, "warn", "hive-lost", id, "hive %s lost: no heartbeat since %s", id, prev.LastSeen.Format(time.TimeOnly))
		if r.OnHiveLost != nil {
			r.OnHiveLost(id, prev.Status)
		}
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
	id := e.Key()
	prev, known := r.workers[id]
	switch e.Operation() {
	case jetstream.KeyValuePut:
		var st api.WorkerStatus
		if err := json.Unmarshal(e.Value(), &st); err != nil {
			r.bus.Log.Warn().Err(err).Str("worker", id).Msg("undecodable worker heartbeat")
			return
		}
		r.workers[id] = st
		if known && prev.State == st.State && prev.SlotsBusy == st.SlotsBusy && prev.SlotsTotal == st.SlotsTotal && prev.PID == st.PID {
			r.refreshed()
			return
		}
		r.changed()
	case jetstream.KeyValueDelete, jetstream.KeyValuePurge:
		if !known {
			return
		}
		lost := e.Operation() == jetstream.KeyValuePurge
		delete(r.workers, id)
		r.changed()
		if lost && r.OnWorkerLost != nil {
			r.OnWorkerLost(id, prev)
		}
		if !lost && r.OnWorkerGone != nil {
			r.OnWorkerGone(id, prev)
		}
	}
}

func (r *Registry) narrate(ctx context.Context, action, hive, format string, args ...any) {
	r.narrateLevel(ctx, "info", action, hive, format, args...)
}

func (r *Registry) narrateLevel(ctx context.Context, level, action, hive, format string, args ...any) {
	n := r.bus.Narrator(api.Actor{Component: "queen"}, hive, "")
	ev := api.Narration{Level: level, Action: action, Target: hive}
	ev.Human = sprintf(format, args...)
	_ = n.Narrate(ctx, ev)
}
