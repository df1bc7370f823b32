package queen

import (
	"sort"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/queen/sched"
)

// A Snapshot is the scheduler's view of the cluster.
var _ sched.View = (*Snapshot)(nil)

// Worker returns a live worker.
func (s *Snapshot) Worker(id string) (api.WorkerStatus, bool) {
	w, ok := s.Workers[id]
	return w, ok
}

// Serving returns the live workers of a model key that take work and match
// the pins.
func (s *Snapshot) Serving(key string, p sched.Pins) []api.WorkerStatus {
	var out []api.WorkerStatus
	for _, w := range s.Workers {
		if w.ModelKey == key && w.State != api.WorkerDraining && p.Matches(w.Hive, w.Device) {
			out = append(out, w)
		}
	}
	return out
}

// contextFor is the largest context among the workers that would serve a
// job of key with pins: a max_tokens above it fits none of them. It is 0
// when none serves yet, or one has not said (a spawn's worker gets its
// context when it loads, so the worker itself checks then).
func (s *Snapshot) contextFor(key string, p sched.Pins) int {
	largest := 0
	for _, w := range s.Serving(key, p) {
		if w.ContextSize == 0 {
			return 0
		}
		largest = max(largest, w.ContextSize)
	}
	return largest
}

// Candidates ranks the online hives holding a model key: enough free memory for
// the model's estimate first, then fewest busy worker slots.
func (s *Snapshot) Candidates(key string, p sched.Pins) []string {
	type cand struct {
		id   string
		fits bool
		busy int
	}
	var cands []cand
	for id, h := range s.Hives {
		if h.State != api.HiveOnline || (p.Hive != "" && p.Hive != id) {
			continue
		}
		for _, m := range h.Status.Models {
			if m.Key != key {
				continue
			}
			busy := 0
			for _, w := range s.Workers {
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

// PullTarget is the online hive with the most free memory (or the pinned
// one): where a model no hive has is downloaded.
func (s *Snapshot) PullTarget(p sched.Pins) string {
	var best string
	var free uint64
	for id, h := range s.Hives {
		if h.State == api.HiveOnline && (p.Hive == "" || p.Hive == id) && (best == "" || h.Status.RAMFree > free || h.Status.RAMFree == free && id < best) {
			best, free = id, h.Status.RAMFree
		}
	}
	return best
}

// Exited says how a worker that is not in the view ended, when its hive saw
// it exit (possibly before this queen started).
func (s *Snapshot) Exited(id string) (string, bool) {
	if s.exits == nil {
		return "", false
	}
	return s.exits.of(id)
}

// HiveState is a hive's state, "" when the queen has not seen it.
func (s *Snapshot) HiveState(id string) string { return s.Hives[id].State }

// online counts the online hives.
func (s *Snapshot) online() int {
	n := 0
	for _, h := range s.Hives {
		if h.State == api.HiveOnline {
			n++
		}
	}
	return n
}

// modelNames maps model keys to the ids users typed, as hives and workers
// report them.
func (s *Snapshot) modelNames() map[string]string {
	out := map[string]string{}
	for _, h := range s.Hives {
		for _, m := range h.Status.Models {
			out[m.Key] = m.ID
		}
	}
	for _, w := range s.Workers {
		out[w.ModelKey] = w.Model
	}
	return out
}
