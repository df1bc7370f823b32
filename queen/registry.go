package queen

import (
	"context"
	"encoding/json"
	"sync"
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
type Registry struct {
	bus  *bus.Bus
	snap atomic.Pointer[Snapshot]
	// OnHiveLost and OnWorkerLost are called from the owner goroutine when
	// an entry expires without a goodbye.
	OnHiveLost   func(id string, last api.HiveStatus)
	OnWorkerLost func(id string, last api.WorkerStatus)
	OnWorkerGone func(id string, last api.WorkerStatus)
	ready        chan struct{}
	readyOnce    sync.Once
}

func newRegistry(b *bus.Bus) *Registry {
	r := &Registry{bus: b, ready: make(chan struct{})}
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
	hivesReady, workersReady := false, false
	for {
		select {
		case <-ctx.Done():
			return nil
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
		if hivesReady && workersReady {
			r.readyOnce.Do(func() { close(r.ready) })
		}
	}
}

// publish swaps in a new snapshot built by mutate from a copy of the old.
func (r *Registry) publish(mutate func(*Snapshot)) {
	old := r.snap.Load()
	next := &Snapshot{
		Hives:   make(map[string]HiveRecord, len(old.Hives)),
		Workers: make(map[string]api.WorkerStatus, len(old.Workers)),
		changed: make(chan struct{}),
	}
	for k, v := range old.Hives {
		next.Hives[k] = v
	}
	for k, v := range old.Workers {
		next.Workers[k] = v
	}
	mutate(next)
	r.snap.Store(next)
	close(old.changed)
}

func (r *Registry) applyHive(ctx context.Context, e jetstream.KeyValueEntry) {
	id := e.Key()
	switch e.Operation() {
	case jetstream.KeyValuePut:
		var st api.HiveStatus
		if err := json.Unmarshal(e.Value(), &st); err != nil {
			r.bus.Log.Warn().Err(err).Str("hive", id).Msg("undecodable hive heartbeat")
			return
		}
		prev, known := r.Snapshot().Hives[id]
		r.publish(func(s *Snapshot) { s.Hives[id] = HiveRecord{Status: st, State: api.HiveOnline, LastSeen: time.Now()} })
		if !known || prev.State != api.HiveOnline {
			r.narrate(ctx, "hive-online", id, "hive %s is online (%s, %d CPU threads)", id, st.Capabilities.Hostname, st.Capabilities.CPU.Threads)
		}
	case jetstream.KeyValueDelete:
		prev, known := r.Snapshot().Hives[id]
		r.publish(func(s *Snapshot) {
			rec := s.Hives[id]
			rec.State = api.HiveOffline
			s.Hives[id] = rec
		})
		if known && prev.State == api.HiveOnline {
			r.narrate(ctx, "hive-offline", id, "hive %s stopped", id)
		}
	case jetstream.KeyValuePurge:
		// A purge is the TTL running out: the hive stopped beating
		// without saying goodbye.
		prev, known := r.Snapshot().Hives[id]
		if !known || prev.State != api.HiveOnline {
			return
		}
		r.publish(func(s *Snapshot) {
			rec := s.Hives[id]
			rec.State = api.HiveLost
			s.Hives[id] = rec
		})
		r.bus.Log.Warn().Str("hive", id).Time("last_seen", prev.LastSeen).Msg("hive lost")
		r.narrateLevel(ctx, "warn", "hive-lost", id, "hive %s lost: no heartbeat since %s", id, prev.LastSeen.Format(time.TimeOnly))
		if r.OnHiveLost != nil {
			r.OnHiveLost(id, prev.Status)
		}
	}
}

func (r *Registry) applyWorker(e jetstream.KeyValueEntry) {
	id := e.Key()
	switch e.Operation() {
	case jetstream.KeyValuePut:
		var st api.WorkerStatus
		if err := json.Unmarshal(e.Value(), &st); err != nil {
			r.bus.Log.Warn().Err(err).Str("worker", id).Msg("undecodable worker heartbeat")
			return
		}
		r.publish(func(s *Snapshot) { s.Workers[id] = st })
	case jetstream.KeyValueDelete, jetstream.KeyValuePurge:
		prev, known := r.Snapshot().Workers[id]
		if !known {
			return
		}
		lost := e.Operation() == jetstream.KeyValuePurge
		r.publish(func(s *Snapshot) { delete(s.Workers, id) })
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
