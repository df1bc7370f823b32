package keeper

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/bus"
)

// The human forms of what `get` commands show; --json prints the record
// itself.

// livenessGrace is how long a queen judges no liveness after it starts:
// one heartbeat TTL, the queen's default (queen.Config.LivenessGrace), which
// a queen the keeper starts for one command always has.
var livenessGrace = bus.TTLForInterval(bus.DefaultHeartbeatInterval)

// settleMargin covers the time between the queen's start and its
// registry's, and the snapshot that follows the grace.
const settleMargin = 500 * time.Millisecond

// awaitLiveness holds a report on hives and workers until the queen can
// know who is alive. A queen started for this one command has read the
// registry buckets, but live hives and workers beat into its new bus only
// once they have reconnected, so for up to one heartbeat TTL it shows them
// offline, or not at all. It waits until every hive the queen knows is
// online with all its workers listed, or until the grace is over; a queen
// that was already running answers at once.
func awaitLiveness(ctx context.Context, s *Session) error {
	if s.ephemeral == nil {
		return nil
	}
	for {
		var st api.Status
		if err := call(ctx, s, api.EpStatus, nil, &st); err != nil {
			return err
		}
		left := livenessGrace + settleMargin - time.Since(st.StartedAt)
		if left <= 0 || everyoneBack(st) {
			return nil
		}
		t := time.NewTimer(min(left, 200*time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return errInterrupted
		case <-t.C:
		}
	}
}

// everyoneBack says whether every hive in st is online and every worker
// its heartbeat names is in the worker list: nothing more is to come.
func everyoneBack(st api.Status) bool {
	if len(st.Hives) == 0 {
		return false
	}
	workers := map[string]bool{}
	for _, w := range st.Workers {
		workers[w.ID] = true
	}
	for _, h := range st.Hives {
		if h.State != api.HiveOnline || !seen(h) {
			return false
		}
		for _, w := range h.Status.Workers {
			if !workers[w] {
				return false
			}
		}
	}
	return true
}

// seen says whether the queen has heard from the hive since it started. A
// hive that left before (its entry is a goodbye marker) comes back from the
// queen with an empty status and a zero last-seen time.
func seen(h api.HiveView) bool {
	return h.Status != nil && h.LastSeen != nil && !h.LastSeen.IsZero()
}

// lastSeen is the LAST SEEN column of a hive.
func lastSeen(h api.HiveView, now time.Time) string {
	if !seen(h) {
		return "never since the queen started"
	}
	return ago(now, *h.LastSeen)
}

func ago(now, t time.Time) string {
	d := now.Sub(t).Round(time.Second)
	if d < time.Second {
		return "just now"
	}
	return d.String() + " ago"
}

// hiveRow is one line of `rbee hive list`. Devices of a hive that is not
// online are the last ones it reported, and say so.
func hiveRow(h api.HiveView, now time.Time) string {
	devices := "-"
	if seen(h) {
		devices = deviceSummary(h.Status.Capabilities)
		if h.State != api.HiveOnline {
			devices += " (last known)"
		}
	}
	return strings.Join([]string{h.Name, h.State, h.Address, devices, lastSeen(h, now)}, "\t")
}

// printHiveView is `rbee hive get`: the live facts of an online hive, the
// last known ones (labelled, with their age) of one that is not, and only
// the inventory entry of one not heard from since the queen started.
func printHiveView(w io.Writer, v api.HiveView, now time.Time) {
	fmt.Fprintf(w, "hive %s: %s (%s)\n", v.Name, v.State, v.Address)
	if !seen(v) {
		fmt.Fprintf(w, "  never seen since the queen started; start it with `rbee hive start %s`\n", v.Name)
		return
	}
	if v.State != api.HiveOnline {
		fmt.Fprintf(w, "  last known, as of %s (%s):\n", v.LastSeen.Local().Format(time.DateTime), ago(now, *v.LastSeen))
	} else {
		fmt.Fprintf(w, "  last beat %s\n", ago(now, *v.LastSeen))
	}
	printCapabilities(w, v.Name, v.Status.Capabilities)
	fmt.Fprintf(w, "  version %s, pid %d, workers %d, models %d\n", v.Status.Version, v.Status.PID, len(v.Status.Workers), len(v.Status.Models))
}

// printJob is `rbee jobs get`.
func printJob(out io.Writer, j api.Job) {
	fmt.Fprintf(out, "job %s: %s\n", j.ID, j.State)
	w := tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(w, "  %s\t%s\n", k, v)
		}
	}
	when := func(t *time.Time) string {
		if t == nil || t.IsZero() {
			return ""
		}
		return t.Local().Format(time.DateTime)
	}
	row("operation", j.Op.Kind)
	row("created", when(&j.CreatedAt))
	row("started", when(j.StartedAt))
	row("finished", when(j.FinishedAt))
	row("deadline", when(j.Deadline))
	row("where", joinNonEmpty(j.Hive, j.Worker))
	if j.Attempts > 1 {
		row("attempts", fmt.Sprint(j.Attempts))
	}
	if j.Prompt != nil {
		row("prompt", fmt.Sprintf("%s, sha256 %s", humanBytes(uint64(j.Prompt.Bytes)), short(j.Prompt.SHA256)))
	}
	row("error", j.Error)
	if len(j.Result) > 0 {
		row("result", string(j.Result))
	}
	w.Flush()
}

// printModel is `rbee model get`.
func printModel(out io.Writer, hive string, m api.Model) {
	fmt.Fprintf(out, "model %s on hive %s\n", m.ID, hive)
	w := tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintf(w, "  file\t%s (%s)\n", m.Path, humanBytes(uint64(m.Size)))
	fmt.Fprintf(w, "  source\t%s\n", m.Source)
	fmt.Fprintf(w, "  sha256\t%s\n", m.SHA256)
	fmt.Fprintf(w, "  architecture\t%s, %d parameters, %s\n", m.Architecture, m.Parameters, m.Quantization)
	fmt.Fprintf(w, "  context\t%d tokens\n", m.ContextLength)
	fmt.Fprintf(w, "  memory\t%s for %d tokens of context (estimated)\n", humanBytes(m.EstimatedMemory), m.EstimatedForContext)
	if !m.AddedAt.IsZero() {
		fmt.Fprintf(w, "  added\t%s\n", m.AddedAt.Local().Format(time.DateTime))
	}
	w.Flush()
}

// printWorker is `rbee worker get`.
func printWorker(out io.Writer, wk api.WorkerStatus, now time.Time) {
	fmt.Fprintf(out, "worker %s: %s\n", wk.ID, wk.State)
	w := tabwriter.NewWriter(out, 0, 2, 2, ' ', 0)
	fmt.Fprintf(w, "  model\t%s\n", wk.Model)
	fmt.Fprintf(w, "  hive\t%s, device %s, pid %d\n", wk.Hive, wk.Device, wk.PID)
	fmt.Fprintf(w, "  slots\t%d of %d busy\n", wk.SlotsBusy, wk.SlotsTotal)
	if wk.KVCacheBytes > 0 {
		fmt.Fprintf(w, "  kv cache\t%s of %s in use\n", humanBytes(wk.KVUsedBytes), humanBytes(wk.KVCacheBytes))
	}
	fmt.Fprintf(w, "  served\t%d tokens, %.1f tokens/s\n", wk.TokensServed, wk.TokensPerSec)
	if wk.MemoryUsed > 0 {
		fmt.Fprintf(w, "  memory\t%s\n", humanBytes(wk.MemoryUsed))
	}
	if !wk.StartedAt.IsZero() {
		fmt.Fprintf(w, "  started\t%s (%s)\n", wk.StartedAt.Local().Format(time.DateTime), ago(now, wk.StartedAt))
	}
	if !wk.BeatAt.IsZero() {
		fmt.Fprintf(w, "  last beat\t%s\n", ago(now, wk.BeatAt))
	}
	if wk.Version != "" {
		fmt.Fprintf(w, "  version\t%s\n", wk.Version)
	}
	w.Flush()
}

func short(s string) string {
	if len(s) > 12 {
		return s[:12] + "…"
	}
	return s
}
