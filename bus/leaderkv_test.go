package bus_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/bus"
	"github.com/rbee-dev/rbee/internal/testutil/busfix"
	"github.com/rbee-dev/rbee/subjects"
	"github.com/stretchr/testify/require"
)

// A read sees every write acknowledged before it, through whichever server
// it is made: here one across a slow link from the bucket's leader, whose
// own copy learns of a write a link's latency after the writer heard it
// was stored. nats.go's Get (a direct get, which the reader's server
// answers from its copy or hands to another server's, at random) returns
// the old value then; a bucket opened by Bus.KV asks the leader.
func TestALeaderReadSeesEveryAcknowledgedWrite(t *testing.T) {
	c := busfix.StartCluster(t, 3)
	bucket := c.Bus.Space.InventoryBucket()
	leader, reader := c.NearLeader(t, subjects.KVStream(bucket)), c.Far()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	writer, err := busfix.Connect(t, c.Servers[leader].ClientURL()).KV(ctx, bucket)
	require.NoError(t, err)
	rb := busfix.Connect(t, c.Servers[reader].ClientURL())
	direct, err := rb.JS.KeyValue(ctx, bucket)
	require.NoError(t, err)
	kv, err := rb.KV(ctx, bucket)
	require.NoError(t, err)

	// Every server but the reader's own is behind the slow link, so a
	// direct get answered in less than the link's latency was answered
	// by the reader's copy.
	const latency = 500 * time.Millisecond
	local := func() (string, bool) {
		ctx, cancel := context.WithTimeout(ctx, latency/20)
		defer cancel()
		e, err := direct.Get(ctx, "hive")
		if err != nil {
			return "", false
		}
		return string(e.Value()), true
	}
	_, err = writer.Put(ctx, "hive", []byte("v1"))
	require.NoError(t, err)
	c.FarLatency(latency)
	require.Eventually(t, func() bool { v, ok := local(); return ok && v == "v1" }, 30*time.Second, 10*time.Millisecond,
		"the reader's server never answered a direct get from its own copy")

	_, err = writer.Put(ctx, "hive", []byte("v2"))
	require.NoError(t, err)
	acked := time.Now()
	v, ok := local()
	for !ok && time.Since(acked) < latency/2 {
		v, ok = local()
	}
	require.True(t, ok, "no direct get was answered by the reader's copy within half the link's latency")
	require.Equal(t, "v1", v, "the setup's premise: the reader's copy lags the acknowledged write")

	// Each read goes to one server at random: several, side by side,
	// meet the reader's copy too, so a Get that read it would be seen.
	var reads sync.WaitGroup
	errs := make([]error, 16)
	for i := range errs {
		reads.Go(func() {
			e, err := kv.Get(ctx, "hive")
			if err == nil && string(e.Value()) != "v2" {
				err = fmt.Errorf("read %q after v2 was acknowledged", e.Value())
			}
			errs[i] = err
		})
	}
	reads.Wait()
	require.NoError(t, errors.Join(errs...), "a read after an acknowledged write sees it")

	// A key created and read back at once (a queen creating a job, then
	// starting it) is found.
	_, err = writer.Create(ctx, "new", []byte("n"))
	require.NoError(t, err)
	e, err := kv.Get(ctx, "new")
	require.NoError(t, err)
	require.Equal(t, "n", string(e.Value()))
}

// A leader read answers as nats.go's Get does: values, revisions,
// deletes, purges, the marker an expired record leaves, and keys never
// written.
func TestLeaderReadsAnswerAsTheBucketDoes(t *testing.T) {
	f := busfix.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	direct, err := f.Bus.JS.KeyValue(ctx, f.Bus.Space.InventoryBucket())
	require.NoError(t, err)
	kv := bus.LeaderReads(f.Bus.NC, direct)
	require.Equal(t, kv, bus.LeaderReads(f.Bus.NC, kv), "wrapped once")

	rev, err := kv.Put(ctx, "a", []byte("1"))
	require.NoError(t, err)
	_, err = kv.Put(ctx, "d", []byte("1"))
	require.NoError(t, err)
	require.NoError(t, kv.Delete(ctx, "d"))
	_, err = kv.Put(ctx, "p", []byte("1"))
	require.NoError(t, err)
	require.NoError(t, kv.Purge(ctx, "p"))

	jobs, err := f.Bus.JS.KeyValue(ctx, f.Bus.Space.JobsBucket())
	require.NoError(t, err)
	_, err = f.Bus.JS.Publish(ctx, subjects.KVSubject(f.Bus.Space.JobsBucket(), "expired"), []byte("1"), jetstream.WithMsgTTL(time.Second))
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		_, err := jobs.Get(ctx, "expired")
		return err != nil
	}, 5*time.Second, 50*time.Millisecond, "the record did not expire")

	for _, c := range []struct {
		direct jetstream.KeyValue
		key    string
	}{{direct, "a"}, {direct, "d"}, {direct, "p"}, {direct, "never"}, {jobs, "expired"}} {
		key := c.key
		want, wantErr := c.direct.Get(ctx, key)
		got, err := bus.LeaderReads(f.Bus.NC, c.direct).Get(ctx, key)
		require.Equal(t, wantErr, err, key)
		if want == nil {
			require.Nil(t, got, key)
			continue
		}
		require.Equal(t, want.Operation(), got.Operation(), key)
		require.Equal(t, want.Value(), got.Value(), key)
		require.Equal(t, want.Revision(), got.Revision(), key)
		require.Equal(t, want.Key(), got.Key(), key)
		require.Equal(t, want.Bucket(), got.Bucket(), key)
		require.True(t, want.Created().Equal(got.Created()), key)
	}
	e, err := kv.Get(ctx, "a")
	require.NoError(t, err)
	require.Equal(t, rev, e.Revision())
	require.Equal(t, jetstream.KeyValuePut, e.Operation())
	for _, key := range []string{"never", "d", "p"} {
		_, err = kv.Get(ctx, key)
		require.ErrorIs(t, err, jetstream.ErrKeyNotFound, key)
	}
}
