package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/rbee-dev/rbee/subjects"
)

// ErrDuplicate is returned when another live component already holds the
// registry entry a component wants (two hives started with one id).
var ErrDuplicate = errors.New("already registered")

// instanceHeader marks which process wrote a registry entry, so a component
// can tell its own entry from a namesake's.
const instanceHeader = "Rbee-Instance"

// Heartbeat keeps one registry entry alive: each beat rewrites the entry
// with a per-message TTL, so when beats stop the entry expires by itself and
// watchers see it go. Beats are conditional on the entry's last revision,
// which makes the entry single-owner: a second process with the same id
// cannot overwrite a live one.
type Heartbeat struct {
	bus      *Bus
	bucket   string
	key      string
	subject  string
	interval time.Duration
	ttl      time.Duration
	// Value produces the entry's content at each beat.
	value    func() ([]byte, error)
	instance string
	// kick asks Run for a beat now (after a reconnect).
	kick chan struct{}

	mu  sync.Mutex
	rev uint64
	// beating holds one beat, registration or deregistration at a time,
	// so a beat can neither outrun the leaving nor come after it; left
	// (guarded by it) says the entry was deleted for good.
	beating sync.Mutex
	left    bool
	// abort ends the beat in flight, if any (Reconnected).
	abortMu sync.Mutex
	abort   context.CancelCauseFunc
}

// errReconnected ends a beat whose request went out on a connection that
// is gone: its answer will never come.
var errReconnected = errors.New("the connection was replaced while the beat waited for its answer")

// DefaultHeartbeatInterval is how often components beat unless configured.
const DefaultHeartbeatInterval = time.Second

// TTLForInterval is the entry TTL for a beat interval: three missed beats
// mean the component is lost. JetStream's TTL granularity is one second.
func TTLForInterval(interval time.Duration) time.Duration {
	ttl := 3 * interval
	if ttl < time.Second {
		ttl = time.Second
	}
	return ttl.Round(time.Second)
}

// NewHeartbeat prepares a heartbeat for key in bucket; Register claims it.
func (b *Bus) NewHeartbeat(bucket, key string, interval time.Duration, value func() ([]byte, error)) *Heartbeat {
	if interval <= 0 {
		interval = DefaultHeartbeatInterval
	}
	return &Heartbeat{
		bus: b, bucket: bucket, key: key, subject: subjects.KVSubject(bucket, key),
		interval: interval, ttl: TTLForInterval(interval), value: value, instance: nuid.Next(),
		kick: make(chan struct{}, 1),
	}
}

// Reconnected ends the beat in flight, if any, and makes Run beat at once.
// Call it when the connection is back after a drop: a beat sent on the
// connection that dropped (or into a link that died unseen) is never
// answered, and waiting out its timeout (the interval and a second) before
// beating again would let the entry's TTL (three intervals) run out on a
// component that is alive, when its last beat before the drop was already
// up to an interval old.
func (h *Heartbeat) Reconnected() {
	h.abortMu.Lock()
	if h.abort != nil {
		h.abort(errReconnected)
	}
	h.abortMu.Unlock()
	h.Kick()
}

// Kick makes Run beat at once instead of at its next tick: after the bus
// comes back, the queen judges liveness one TTL later, so every live
// component must have beaten by then. It never blocks.
func (h *Heartbeat) Kick() {
	select {
	case h.kick <- struct{}{}:
	default: // a beat is already due
	}
}

// Interval is the time between beats.
func (h *Heartbeat) Interval() time.Duration { return h.interval }

// TTL is how long the entry outlives the last beat.
func (h *Heartbeat) TTL() time.Duration { return h.ttl }

// Register claims the entry. It fails with ErrDuplicate while a live entry
// written by another process exists.
func (h *Heartbeat) Register(ctx context.Context) error {
	h.beating.Lock()
	defer h.beating.Unlock()
	return h.register(ctx)
}

func (h *Heartbeat) register(ctx context.Context) error {
	stream, err := h.bus.JS.Stream(ctx, subjects.KVStream(h.bucket))
	if err != nil {
		return fmt.Errorf("registry bucket %s: %w", h.bucket, err)
	}
	var expect uint64
	last, err := stream.GetLastMsgForSubject(ctx, h.subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return fmt.Errorf("read registry entry %s: %w", h.key, err)
	case isTombstone(last.Header):
		expect = last.Sequence
	case last.Header.Get(instanceHeader) == h.instance:
		expect = last.Sequence
	default:
		age := time.Since(last.Time).Round(100 * time.Millisecond)
		return fmt.Errorf("%w: %q is already registered by another live process (last beat %s ago); stop it first, or wait %s if it just died", ErrDuplicate, h.key, age, h.ttl)
	}
	return h.publish(ctx, expect)
}

func isTombstone(hdr nats.Header) bool {
	return hdr.Get("KV-Operation") != "" || hdr.Get(jetstream.MarkerReasonHeader) != ""
}

// Beat rewrites the entry once. When the entry changed under it (it expired
// during a network partition, or the bus restarted) it re-registers. After
// Deregister it does nothing: a beat that came after the leaving would
// otherwise bring the entry back.
func (h *Heartbeat) Beat(ctx context.Context) error {
	h.beating.Lock()
	defer h.beating.Unlock()
	if h.left {
		return nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	h.abortMu.Lock()
	h.abort = cancel
	h.abortMu.Unlock()
	defer func() {
		h.abortMu.Lock()
		h.abort = nil
		h.abortMu.Unlock()
	}()
	h.mu.Lock()
	rev := h.rev
	h.mu.Unlock()
	err := h.publish(ctx, rev)
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		err = h.register(ctx)
	}
	// A beat ended by Reconnected may have been stored all the same; the
	// next one then finds the revision moved and re-reads the entry.
	if err != nil && errors.Is(context.Cause(ctx), errReconnected) {
		return errReconnected
	}
	return err
}

func (h *Heartbeat) publish(ctx context.Context, expect uint64) error {
	data, err := h.value()
	if err != nil {
		return err
	}
	msg := nats.NewMsg(h.subject)
	msg.Data = data
	msg.Header.Set(instanceHeader, h.instance)
	ack, err := h.bus.JS.PublishMsg(ctx, msg, jetstream.WithMsgTTL(h.ttl), jetstream.WithExpectLastSequencePerSubject(expect))
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.rev = ack.Sequence
	h.mu.Unlock()
	return nil
}

// Run beats until ctx ends. Intervals are jittered by up to 10% so many
// components started together do not beat in lockstep. A failed beat is
// reported through onError and retried at the next tick; ErrDuplicate stops
// the loop, because another process now owns the entry.
func (h *Heartbeat) Run(ctx context.Context, onError func(error)) error {
	for {
		jitter := time.Duration(rand.Int64N(int64(h.interval)/10 + 1))
		t := time.NewTimer(h.interval - h.interval/20 + jitter)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		case <-h.kick:
			t.Stop()
		}
		bctx, cancel := context.WithTimeout(ctx, h.interval+time.Second)
		err := h.Beat(bctx)
		cancel()
		if err != nil {
			if errors.Is(err, ErrDuplicate) {
				return err
			}
			// Ended by Reconnected, which kicked: the next beat goes now.
			if errors.Is(err, errReconnected) {
				continue
			}
			if onError != nil && ctx.Err() == nil {
				onError(err)
			}
		}
	}
}

// Deregister deletes the entry, so watchers see the component leave at once
// instead of one TTL later. It deletes only the entry this process wrote.
func (h *Heartbeat) Deregister(ctx context.Context) error {
	h.beating.Lock()
	defer h.beating.Unlock()
	h.left = true
	kv, err := h.bus.KV(ctx, h.bucket)
	if err != nil {
		return err
	}
	h.mu.Lock()
	rev := h.rev
	h.mu.Unlock()
	err = kv.Delete(ctx, h.key, jetstream.LastRevision(rev))
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
		// A beat can be stored while its acknowledgement is lost (the
		// link cut as it went out), leaving rev one behind: the entry is
		// still this process's if its last value is, and goes then.
		// Expired, or another process's now: nothing of ours to delete.
		var stream jetstream.Stream
		if stream, err = h.bus.JS.Stream(ctx, subjects.KVStream(h.bucket)); err == nil {
			last, lerr := stream.GetLastMsgForSubject(ctx, h.subject)
			switch {
			case errors.Is(lerr, jetstream.ErrMsgNotFound):
			case lerr != nil:
				err = lerr
			case isTombstone(last.Header) || last.Header.Get(instanceHeader) != h.instance:
			default:
				err = kv.Delete(ctx, h.key, jetstream.LastRevision(last.Sequence))
			}
		}
	}
	if err != nil {
		return fmt.Errorf("deregister %s: %w", h.key, err)
	}
	return nil
}

// ExitReport is what a purged registry entry says about its owner's end,
// when someone saw it (a hive watching its worker's process). An entry whose
// TTL ran out carries none: its owner only stopped beating.
type ExitReport struct {
	Exit string `json:"exit"`
}

// PurgeExited purges a registry entry whose owner was seen to exit, saying
// how (the purge marker carries report, and watchers see it as the entry's
// value), so the queen can tell a death from a silence. The marker stays
// for markerTTL.
func (b *Bus) PurgeExited(ctx context.Context, bucket, key string, report ExitReport, markerTTL time.Duration) error {
	msg := nats.NewMsg(subjects.KVSubject(bucket, key))
	msg.Data, _ = json.Marshal(report)
	msg.Header.Set("KV-Operation", "PURGE")
	msg.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	_, err := b.JS.PublishMsg(ctx, msg, jetstream.WithMsgTTL(markerTTL))
	return err
}
