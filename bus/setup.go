package bus

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Retention bounds what the bus keeps, so a long-running cluster holds no
// state that grows with the number of jobs ever run.
type Retention struct {
	// JobEvents is how long a job's narration, tokens and states are kept,
	// and how long a finished job record stays listed (default 24 h).
	JobEvents time.Duration
	// MaxEventsPerSubject bounds each job's narration, token and state
	// subjects; older events of a runaway job are dropped first.
	MaxEventsPerSubject int64
	// MaxJobBytes bounds the whole job event stream.
	MaxJobBytes int64
	// Replicas is how many servers keep a copy of every stream and bucket.
	// 0 chooses: DefaultClusterReplicas on a cluster whose JetStream can
	// place them, 1 otherwise (the embedded bus is one server). A chosen
	// count only ever grows an existing stream, never shrinks it: a queen
	// started while a node is down must not halve what the cluster keeps.
	Replicas int
}

// DefaultClusterReplicas is the copies a cluster keeps unless told
// otherwise: three survive the loss of any one server with a quorum left.
const DefaultClusterReplicas = 3

// DefaultRetention is what a cluster keeps unless told otherwise.
func DefaultRetention() Retention {
	return Retention{JobEvents: 24 * time.Hour, MaxEventsPerSubject: 100_000, MaxJobBytes: 1 << 30}
}

// HeartbeatMarkerTTL is how long the delete marker of an expired heartbeat
// stays in a registry bucket: long enough for every watcher to see it.
const HeartbeatMarkerTTL = time.Minute

// EnsureStreams creates or updates every stream and bucket of the contract.
// It is idempotent: every component may call it at start.
func (b *Bus) EnsureStreams(ctx context.Context, r Retention) error {
	if r.JobEvents <= 0 {
		r.JobEvents = DefaultRetention().JobEvents
	}
	if r.MaxEventsPerSubject <= 0 {
		r.MaxEventsPerSubject = DefaultRetention().MaxEventsPerSubject
	}
	if r.MaxJobBytes <= 0 {
		r.MaxJobBytes = DefaultRetention().MaxJobBytes
	}
	s := b.Space
	rep := &replication{want: r.Replicas, explicit: r.Replicas > 0}
	if !rep.explicit {
		rep.want = 1
		if b.NC.ConnectedClusterName() != "" {
			rep.want = DefaultClusterReplicas
		}
	}
	streams := []jetstream.StreamConfig{{
		Name:              s.JobsStream(),
		Description:       "rbee job events: narration, tokens and state changes of every job",
		Subjects:          s.JobsStreamSubjects(),
		Retention:         jetstream.LimitsPolicy,
		MaxAge:            r.JobEvents,
		MaxMsgsPerSubject: r.MaxEventsPerSubject,
		MaxBytes:          r.MaxJobBytes,
		Discard:           jetstream.DiscardOld,
		Storage:           jetstream.FileStorage,
		// Tokens are small and many and carry no message id (followers
		// drop copies by index); a short window keeps the dedupe index
		// small for the few events that do.
		Duplicates: 30 * time.Second,
	}, {
		Name:        s.InferStream(),
		Description: "rbee inference requests waiting for a worker with a free slot",
		Subjects:    []string{s.InferAll()},
		Retention:   jetstream.WorkQueuePolicy,
		// A request nobody took within the retention is dead anyway: its
		// job has long timed out.
		MaxAge:  r.JobEvents,
		Storage: jetstream.FileStorage,
	}, {
		Name:              s.RequestsStream(),
		Description:       "rbee inference requests, whole, one per job: the job record keeps an excerpt",
		Subjects:          []string{s.RequestsAll()},
		Retention:         jetstream.LimitsPolicy,
		MaxAge:            r.JobEvents,
		MaxMsgsPerSubject: 1,
		MaxBytes:          r.MaxJobBytes,
		Discard:           jetstream.DiscardOld,
		Storage:           jetstream.FileStorage,
	}}
	buckets := []jetstream.KeyValueConfig{
		{Bucket: s.HivesBucket(), Description: "live hives: one heartbeat entry per hive with a per-beat TTL", History: 1, LimitMarkerTTL: HeartbeatMarkerTTL, Storage: jetstream.FileStorage},
		{Bucket: s.WorkersBucket(), Description: "live workers: one heartbeat entry per worker with a per-beat TTL", History: 1, LimitMarkerTTL: HeartbeatMarkerTTL, Storage: jetstream.FileStorage},
		// Finished job records get a per-message TTL (Retention.JobEvents);
		// live ones have none, so a long job is never forgotten.
		{Bucket: s.JobsBucket(), Description: "job records, updated by compare-and-swap", History: 1, LimitMarkerTTL: HeartbeatMarkerTTL, Storage: jetstream.FileStorage},
		{Bucket: s.InventoryBucket(), Description: "hives the user added: name and how to reach the machine", History: 1, Storage: jetstream.FileStorage},
	}
	// The first stream settles the replica count (and says so if it must
	// fall back); the rest are made side by side. Each new replicated
	// stream elects its own leader, which takes an election timeout (4 to
	// 9 s in nats-server) whenever the server it prefers is down but not
	// yet known to be: one after the other, a queen starting beside a
	// dead server waited for each in turn (up to a minute for the eight).
	if err := b.ensureStream(ctx, rep, streams[0]); err != nil {
		return err
	}
	errs := make([]error, len(streams)-1+len(buckets))
	var wg sync.WaitGroup
	for i, cfg := range streams[1:] {
		wg.Go(func() { errs[i] = b.ensureStream(ctx, rep, cfg) })
	}
	for i, cfg := range buckets {
		wg.Go(func() { errs[len(streams)-1+i] = b.ensureBucket(ctx, rep, cfg) })
	}
	wg.Wait()
	// The first in the contract's order, so the same failure reads the
	// same way each time.
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// placementWait is how long a replica count the cluster cannot place yet
// is tried again: its servers may still be finding each other.
const placementWait = 10 * time.Second

// SetupCallWait bounds each JetStream API call of the setup. A call that
// reaches a stream without a leader (one just made, still electing, or
// one whose servers just came back) is dropped, not refused: unbounded,
// it would wait out the caller's whole try, though the leader may be
// there a second later. A create is answered once its stream has a
// leader, which can take an election timeout; one cut short is simply
// tried again, and finds the stream made.
const SetupCallWait = 2 * time.Second

// replication is the replica count EnsureStreams settles on, once for all
// streams and buckets, so they survive the same failures. It is shared by
// the streams made side by side.
type replication struct {
	mu       sync.Mutex
	want     int
	explicit bool
	// downgraded is set once a chosen count could not be placed.
	downgraded bool
}

// cannotPlace reports whether err says the cluster has too few JetStream
// servers (up) for the replicas asked.
func cannotPlace(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	switch apiErr.ErrorCode {
	case 10005, // no suitable peers for placement
		10023, // insufficient resources
		10074: // replicas > 1 not supported in non-clustered mode
		return true
	}
	return false
}

// replicas is the count for a stream that has existing (0: new).
func (r *replication) replicas(existing int) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.explicit || existing <= r.want {
		return r.want
	}
	return existing
}

// downgrade settles on one copy; it reports whether this call made that
// choice (and so should say it).
func (r *replication) downgrade() (first bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	first = !r.downgraded
	r.downgraded, r.want = true, 1
	return first
}

// place runs create with the settled count; a count chosen (not asked
// for) that the cluster cannot place falls back to 1, said once.
func (b *Bus) place(r *replication, what string, existing int, create func(replicas int) error) error {
	n := r.replicas(existing)
	err := create(n)
	// A cluster still forming knows fewer peers than it has for a few
	// seconds; a count that never fits (two servers) is known after that.
	for deadline := time.Now().Add(placementWait); err != nil && cannotPlace(err) && n > 1 && time.Now().Before(deadline); {
		time.Sleep(250 * time.Millisecond)
		err = create(n)
	}
	if err != nil && cannotPlace(err) && !r.explicit && n > 1 && existing <= 1 {
		if r.downgrade() {
			b.Log.Warn().Err(err).Int("replicas", n).
				Msg("the cluster cannot place this many copies of rbee's streams (fewer JetStream servers up); keeping one copy until a queen starts with them all up")
		}
		n = 1
		err = create(n)
	}
	if err != nil {
		if cannotPlace(err) {
			return fmt.Errorf("create %s with %d replicas: the cluster has fewer JetStream servers up than that (start them, or choose --replicas): %w", what, n, err)
		}
		return fmt.Errorf("create %s: %w", what, err)
	}
	return nil
}

// SetupCall runs one JetStream API call of a component's setup within
// SetupCallWait; the caller's try (WhileStarting) makes it again.
func SetupCall[T any](ctx context.Context, call func(context.Context) (T, error)) (T, error) {
	cctx, cancel := context.WithTimeout(ctx, SetupCallWait)
	defer cancel()
	return call(cctx)
}

func (b *Bus) ensureStream(ctx context.Context, r *replication, cfg jetstream.StreamConfig) error {
	existing := 0
	if st, err := SetupCall(ctx, func(ctx context.Context) (jetstream.Stream, error) { return b.JS.Stream(ctx, cfg.Name) }); err == nil {
		existing = st.CachedInfo().Config.Replicas
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("read stream %s: %w", cfg.Name, err)
	}
	return b.place(r, "stream "+cfg.Name, existing, func(n int) error {
		cfg.Replicas = n
		_, err := SetupCall(ctx, func(ctx context.Context) (jetstream.Stream, error) { return b.JS.CreateOrUpdateStream(ctx, cfg) })
		return err
	})
}

func (b *Bus) ensureBucket(ctx context.Context, r *replication, cfg jetstream.KeyValueConfig) error {
	existing := 0
	if kv, err := SetupCall(ctx, func(ctx context.Context) (jetstream.KeyValue, error) { return b.JS.KeyValue(ctx, cfg.Bucket) }); err == nil {
		st, err := SetupCall(ctx, kv.Status)
		if err != nil {
			return fmt.Errorf("read bucket %s: %w", cfg.Bucket, err)
		}
		if s, ok := st.(*jetstream.KeyValueBucketStatus); ok {
			existing = s.StreamInfo().Config.Replicas
		}
	} else if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return fmt.Errorf("read bucket %s: %w", cfg.Bucket, err)
	}
	return b.place(r, "bucket "+cfg.Bucket, existing, func(n int) error {
		cfg.Replicas = n
		_, err := SetupCall(ctx, func(ctx context.Context) (jetstream.KeyValue, error) { return b.JS.CreateOrUpdateKeyValue(ctx, cfg) })
		return err
	})
}

// Replicas is the copies the bus keeps of rbee's streams (those of the job
// event stream, which EnsureStreams settled), for a bucket made beside
// them.
func (b *Bus) Replicas(ctx context.Context) (int, error) {
	st, err := SetupCall(ctx, func(ctx context.Context) (jetstream.Stream, error) { return b.JS.Stream(ctx, b.Space.JobsStream()) })
	if err != nil {
		return 0, fmt.Errorf("read stream %s: %w", b.Space.JobsStream(), err)
	}
	return max(1, st.CachedInfo().Config.Replicas), nil
}

// KV opens a bucket that EnsureStreams created. Its Get reads from the
// leader (LeaderReads).
func (b *Bus) KV(ctx context.Context, bucket string) (jetstream.KeyValue, error) {
	kv, err := b.JS.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s (is the queen running?): %w", bucket, err)
	}
	return LeaderReads(b.NC, kv), nil
}
