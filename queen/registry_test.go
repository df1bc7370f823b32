package queen

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/stretchr/testify/require"
)

// An entry appearing is in the next snapshot at once; a beat that only
// refreshes figures reaches a snapshot within refreshEvery, however steadily
// beats keep coming, and without one snapshot per beat.
func TestRegistryPublishesChangesAtOnceAndFiguresSoon(t *testing.T) {
	f := busfix.Start(t)
	r := newRegistry(f.Bus, time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.run(ctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })
	<-r.ready

	kv, err := f.Bus.KV(ctx, f.Bus.Space.HivesBucket())
	require.NoError(t, err)
	put := func(free uint64) {
		b, _ := json.Marshal(api.HiveStatus{ID: "h1", PID: 7, RAMFree: free})
		_, err := kv.Put(ctx, "h1", b)
		require.NoError(t, err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	defer wcancel()
	put(1)
	_, err = r.Wait(wctx, func(s *Snapshot) bool { return s.Hives["h1"].State == api.HiveOnline })
	require.NoError(t, err)

	before := r.flushes.Load()
	stop := time.Now().Add(2 * refreshEvery)
	beats := 0
	for free := uint64(2); time.Now().Before(stop); free++ {
		put(free)
		beats++
	}
	_, err = r.Wait(wctx, func(s *Snapshot) bool { return s.Hives["h1"].Status.RAMFree == uint64(beats+1) })
	require.NoError(t, err, "the last figure never reached a snapshot")

	snapshots := int(r.flushes.Load() - before)
	t.Logf("%d beats, %d snapshots", beats, snapshots)
	require.Less(t, snapshots, beats/4, "figure-only beats are folded together")
}
