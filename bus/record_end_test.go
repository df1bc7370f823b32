package bus

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// A follow ends with the record only once it was handed every event the
// stream holds for the job: a follow that is quiet because its consumer is
// catching up after a reconnect must not end before the job's last tokens.
func TestRecordEndWaitsForWhatTheStreamStillHolds(t *testing.T) {
	srv, err := StartServer(ServerConfig{DataDir: t.TempDir(), Listen: "-", Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(srv.Shutdown)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b, err := Connect(ctx, ConnectConfig{Name: t.Name(), Extra: srv.InProcessOptions(), Log: zerolog.Nop()})
	require.NoError(t, err)
	t.Cleanup(func() { b.NC.Close() })
	require.NoError(t, b.EnsureStreams(ctx, DefaultRetention()))

	job := "j1"
	require.NoError(t, b.PublishEvent(ctx, job, subjects.EventState, api.StateChange{State: api.JobRunning, Attempt: 1}))
	require.NoError(t, b.PublishEvent(ctx, job, subjects.EventToken, api.Token{Index: 0, Text: "a"}))
	require.NoError(t, b.PublishEvent(ctx, job, subjects.EventToken, api.Token{Index: 1, Text: "b"}))
	lastToken := uint64(3)

	_, ok := b.recordEnd(ctx, job, lastToken)
	require.False(t, ok, "no record yet")
	kv, err := b.KV(ctx, b.Space.JobsBucket())
	require.NoError(t, err)
	data, _ := json.Marshal(api.Job{ID: job, State: api.JobCompleted, Attempts: 1})
	_, err = kv.Put(ctx, job, data)
	require.NoError(t, err)

	_, ok = b.recordEnd(ctx, job, lastToken-1)
	require.False(t, ok, "a token is still to be handed over")
	ev, ok := b.recordEnd(ctx, job, lastToken)
	require.True(t, ok, "everything handed over, the end event missing")
	require.Equal(t, api.JobCompleted, ev.State.State)

	require.NoError(t, b.PublishEvent(ctx, job, subjects.EventState, api.StateChange{State: api.JobCompleted, Attempt: 1}))
	_, ok = b.recordEnd(ctx, job, lastToken)
	require.False(t, ok, "the end event is there: it is handed over")
}
