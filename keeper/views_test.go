package keeper

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

// What a restarted queen sends for an inventory hive that left cleanly
// before it started: its goodbye marker gives an empty status and a zero
// last-seen time.
func neverSeenHive() api.HiveView {
	var zero time.Time
	return api.HiveView{Name: "gpu1", Address: "local", State: api.HiveOffline, Status: &api.HiveStatus{}, LastSeen: &zero}
}

func lostHive(now time.Time) api.HiveView {
	seen := now.Add(-5 * time.Minute)
	return api.HiveView{Name: "gpu1", Address: "local", State: api.HiveLost, LastSeen: &seen, Status: &api.HiveStatus{
		ID: "gpu1", Version: "1.0", PID: 42, StartedAt: seen.Add(-time.Hour),
		Capabilities: api.Capabilities{Hostname: "box", OS: "linux", Arch: "amd64", CPU: api.CPU{Model: "Xeon", Cores: 8, Threads: 16}},
	}}
}

func TestHiveNeverSeenSinceTheQueenStartedIsSaidSo(t *testing.T) {
	now := time.Now()
	row := hiveRow(neverSeenHive(), now)
	require.Contains(t, row, "never since the queen started")
	require.NotContains(t, row, "2562047h", "no age computed from a zero time")
	require.NotContains(t, row, "cpu(0)", "no devices made up from an empty status")

	var out bytes.Buffer
	printHiveView(&out, neverSeenHive(), now)
	require.Contains(t, out.String(), "never seen since the queen started")
	require.NotContains(t, out.String(), ": /", "no blank capabilities")
	require.NotContains(t, out.String(), "0 cores")

	var st bytes.Buffer
	printStatus(&st, api.Status{Hives: []api.HiveView{neverSeenHive()}})
	require.NotContains(t, st.String(), "cpu(0)")
}

func TestLastKnownFactsOfAHiveNotOnlineAreLabelled(t *testing.T) {
	now := time.Now()
	row := hiveRow(lostHive(now), now)
	require.Contains(t, row, "(last known)")
	require.Contains(t, row, "5m0s ago")

	var out bytes.Buffer
	printHiveView(&out, lostHive(now), now)
	require.Contains(t, out.String(), "hive gpu1: lost")
	require.Contains(t, out.String(), "last known, as of")
	require.Contains(t, out.String(), "box: linux/amd64, CPU Xeon (8 cores, 16 threads)")
}

// Every `get` prints a readable record by default; --json is the record.
func TestGetsAreHumanByDefault(t *testing.T) {
	now := time.Now()
	started := now.Add(-time.Minute)
	var b bytes.Buffer
	printJob(&b, api.Job{ID: "j1", Op: api.Operation{Kind: api.OpInfer}, State: api.JobFailed, CreatedAt: now, StartedAt: &started, Hive: "h1", Worker: "w1", Error: "boom"})
	printModel(&b, "h1", api.Model{ID: "tiny", Path: "/m/tiny.gguf", Size: 2048, Architecture: "llama", ContextLength: 512})
	printWorker(&b, api.WorkerStatus{ID: "w1", Hive: "h1", Model: "tiny", Device: "cpu", State: "idle", SlotsTotal: 2, StartedAt: started}, now)
	text := b.String()
	for _, line := range strings.Split(strings.TrimSpace(text), "\n") {
		require.False(t, json.Valid([]byte(line)) || strings.HasPrefix(strings.TrimSpace(line), "{") || strings.HasPrefix(strings.TrimSpace(line), `"`), "a JSON line in the human form: %q", line)
	}
	for _, want := range []string{"job j1: failed", "error", "boom", "h1, w1", "model tiny on hive h1", "512 tokens", "worker w1: idle", "0 of 2 busy"} {
		require.Contains(t, text, want)
	}
}

func TestEveryoneBackNeedsEveryHiveOnlineWithItsWorkers(t *testing.T) {
	now := time.Now()
	online := func(workers ...string) api.HiveView {
		return api.HiveView{Name: "h1", State: api.HiveOnline, LastSeen: &now, Status: &api.HiveStatus{ID: "h1", PID: 1, Workers: workers}}
	}
	require.False(t, everyoneBack(api.Status{}), "no hive heard from yet")
	require.True(t, everyoneBack(api.Status{Hives: []api.HiveView{online()}}))
	require.False(t, everyoneBack(api.Status{Hives: []api.HiveView{online("w1")}}), "its worker has not beaten yet")
	require.True(t, everyoneBack(api.Status{Hives: []api.HiveView{online("w1")}, Workers: []api.WorkerStatus{{ID: "w1"}}}))
	require.False(t, everyoneBack(api.Status{Hives: []api.HiveView{online(), neverSeenHive()}}))
}
