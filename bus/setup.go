package bus

import (
	"context"
	"fmt"
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
}

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
	if _, err := b.JS.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
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
	}); err != nil {
		return fmt.Errorf("create stream %s: %w", s.JobsStream(), err)
	}
	if _, err := b.JS.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:        s.InferStream(),
		Description: "rbee inference requests waiting for a worker with a free slot",
		Subjects:    []string{s.InferAll()},
		Retention:   jetstream.WorkQueuePolicy,
		// A request nobody took within the retention is dead anyway: its
		// job has long timed out.
		MaxAge:  r.JobEvents,
		Storage: jetstream.FileStorage,
	}); err != nil {
		return fmt.Errorf("create stream %s: %w", s.InferStream(), err)
	}
	if _, err := b.JS.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:              s.RequestsStream(),
		Description:       "rbee inference requests, whole, one per job: the job record keeps an excerpt",
		Subjects:          []string{s.RequestsAll()},
		Retention:         jetstream.LimitsPolicy,
		MaxAge:            r.JobEvents,
		MaxMsgsPerSubject: 1,
		MaxBytes:          r.MaxJobBytes,
		Discard:           jetstream.DiscardOld,
		Storage:           jetstream.FileStorage,
	}); err != nil {
		return fmt.Errorf("create stream %s: %w", s.RequestsStream(), err)
	}
	buckets := []jetstream.KeyValueConfig{
		{Bucket: s.HivesBucket(), Description: "live hives: one heartbeat entry per hive with a per-beat TTL", History: 1, LimitMarkerTTL: HeartbeatMarkerTTL, Storage: jetstream.FileStorage},
		{Bucket: s.WorkersBucket(), Description: "live workers: one heartbeat entry per worker with a per-beat TTL", History: 1, LimitMarkerTTL: HeartbeatMarkerTTL, Storage: jetstream.FileStorage},
		// Finished job records get a per-message TTL (Retention.JobEvents);
		// live ones have none, so a long job is never forgotten.
		{Bucket: s.JobsBucket(), Description: "job records, updated by compare-and-swap", History: 1, LimitMarkerTTL: HeartbeatMarkerTTL, Storage: jetstream.FileStorage},
		{Bucket: s.InventoryBucket(), Description: "hives the user added: name and how to reach the machine", History: 1, Storage: jetstream.FileStorage},
	}
	for _, cfg := range buckets {
		if _, err := b.JS.CreateOrUpdateKeyValue(ctx, cfg); err != nil {
			return fmt.Errorf("create bucket %s: %w", cfg.Bucket, err)
		}
	}
	return nil
}

// KV opens a bucket that EnsureStreams created.
func (b *Bus) KV(ctx context.Context, bucket string) (jetstream.KeyValue, error) {
	kv, err := b.JS.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s (is the queen running?): %w", bucket, err)
	}
	return kv, nil
}
