package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// PublishEvent stores one event of a job on its subject and waits for the
// stream's acknowledgement, so an event that returned without error is
// durable and will be seen by every follower.
func (b *Bus) PublishEvent(ctx context.Context, job string, kind subjects.EventKind, v any) error {
	subject, err := b.Space.JobEvent(job, kind)
	if err != nil {
		return err
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", kind, err)
	}
	if _, err := b.JS.Publish(ctx, subject, data); err != nil {
		return fmt.Errorf("publish %s event of job %s: %w", kind, job, err)
	}
	return nil
}

// PostEvent stores one event of a job without waiting for the stream's
// acknowledgement: for an event on the way to a job's first token, where a
// round trip is time the user waits. The server stores one connection's
// messages in the order sent, so the event still precedes whatever this
// connection publishes next; a failure is not reported.
func (b *Bus) PostEvent(job string, kind subjects.EventKind, v any) error {
	subject, err := b.Space.JobEvent(job, kind)
	if err != nil {
		return err
	}
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", kind, err)
	}
	return b.NC.Publish(subject, data)
}

// TokenPublisher streams a job's tokens without waiting for each
// acknowledgement, which would cap a stream at one round trip per token.
// Flush waits for all of them before the job's final state is published, so
// no follower sees the end before the last token.
//
// A token whose acknowledgement is lost to a reconnect (the server or the
// queen that embeds it restarted) is sent again. If the first copy was
// stored after all, the stream holds it twice, and a resent token may land
// after later ones: Follow orders tokens by index and drops copies, so every
// follower still sees each token once, in order. (A message id would let
// the stream drop the copy itself, but its dedupe index costs the server a
// third of its token throughput.)
type TokenPublisher struct {
	bus     *Bus
	subject string
	futures []jetstream.PubAckFuture
	// ResendWithin bounds how long a lost token is retried while the
	// connection recovers.
	ResendWithin time.Duration
}

// Tokens returns a publisher for job's token subject.
func (b *Bus) Tokens(job string) (*TokenPublisher, error) {
	subject, err := b.Space.JobEvent(job, subjects.EventToken)
	if err != nil {
		return nil, err
	}
	return &TokenPublisher{bus: b, subject: subject, ResendWithin: 25 * time.Second}, nil
}

// Publish sends one token.
func (p *TokenPublisher) Publish(t api.Token) error {
	data, err := json.Marshal(t)
	if err != nil {
		return err
	}
	msg := &nats.Msg{Subject: p.subject, Data: data}
	f, err := p.bus.JS.PublishMsgAsync(msg)
	if errors.Is(err, jetstream.ErrTooManyStalledMsgs) || retryable(err) {
		// Too many unacknowledged tokens, as while the connection is
		// down: wait for those, then store this one before going on.
		if err := p.Flush(context.Background()); err != nil {
			return err
		}
		return p.resend(context.Background(), msg, err)
	}
	if err != nil {
		return fmt.Errorf("publish token %d: %w", t.Index, err)
	}
	p.futures = append(p.futures, f)
	// Settle acknowledged futures now and then so a long generation does
	// not hold one future per token.
	if len(p.futures) >= 256 {
		return p.settle(context.Background(), false)
	}
	return nil
}

// Flush waits until every token published so far is stored.
func (p *TokenPublisher) Flush(ctx context.Context) error { return p.settle(ctx, true) }

func (p *TokenPublisher) settle(ctx context.Context, all bool) error {
	kept := p.futures[:0]
	for _, f := range p.futures {
		if !all {
			select {
			case <-f.Ok():
				continue
			case err := <-f.Err():
				if err := p.resend(ctx, f.Msg(), err); err != nil {
					return err
				}
				continue
			default:
				kept = append(kept, f)
				continue
			}
		}
		select {
		case <-f.Ok():
		case err := <-f.Err():
			if err := p.resend(ctx, f.Msg(), err); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if all {
		kept = kept[:0]
	}
	p.futures = kept
	return nil
}

// resend stores a token whose first publish failed with cause, retrying
// while the connection recovers.
func (p *TokenPublisher) resend(ctx context.Context, msg *nats.Msg, cause error) error {
	if msg == nil || !retryable(cause) {
		return fmt.Errorf("token not stored: %w", cause)
	}
	ctx, cancel := context.WithTimeout(ctx, p.ResendWithin)
	defer cancel()
	for {
		actx, acancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := p.bus.JS.PublishMsg(actx, msg)
		acancel()
		if err == nil {
			return nil
		}
		if !retryable(err) && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("token not stored: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("token not stored within %s of a reconnect: %w", p.ResendWithin, cause)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// retryable says whether a publish failed because the connection or the
// server was going away, as opposed to the stream refusing the message.
func retryable(err error) bool {
	return errors.Is(err, nats.ErrDisconnected) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, jetstream.ErrAsyncPublishTimeout)
}

// ErrFollowEnded is returned by a follow handler to stop following early
// without error.
var ErrFollowEnded = errors.New("stop following")

// Follow delivers the stored events of job in order, starting at stream
// sequence from (0 means from the job's first event), then live ones as they
// arrive, and returns nil after the job's terminal state event. Tokens come
// in index order, each once, even where a publisher resent one after a
// reconnect and it was stored behind later ones. No idle
// timeout applies: a job that is quiet for an hour is still followed. It
// returns when ctx ends, when fn returns an error (ErrFollowEnded stops
// without one), or after the terminal event.
func (b *Bus) Follow(ctx context.Context, job string, from uint64, fn func(api.Event) error) error {
	if done, err := b.followEnded(ctx, job, from, fn); done || err != nil {
		return err
	}
	filter, err := b.Space.JobEvents(job)
	if err != nil {
		return err
	}
	// A follower killed without a goodbye leaves its consumer behind;
	// the server drops it after this long without interest.
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}, InactiveThreshold: 30 * time.Second}
	if from > 0 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = from
	}
	cons, err := b.JS.OrderedConsumer(ctx, b.Space.JobsStream(), cfg)
	if err != nil {
		return fmt.Errorf("follow job %s: %w", job, err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("follow job %s: %w", job, err)
	}
	defer it.Stop()
	// Stop leaves the server-side consumer to expire; a follower that ends
	// normally removes it at once, so nothing lingers per finished client.
	defer func() {
		if info := cons.CachedInfo(); info != nil && b.NC.IsConnected() {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_ = b.JS.DeleteConsumer(dctx, b.Space.JobsStream(), info.Name)
			cancel()
		}
	}()
	// Next blocks without a context of its own; stopping the iterator
	// when ctx ends unblocks it.
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	order := tokenOrder{resumed: from > 0}
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("follow job %s: %w", job, err)
		}
		ev, err := DecodeEvent(b.Space, msg)
		if err != nil {
			b.Log.Warn().Err(err).Str("subject", msg.Subject()).Msg("skipping undecodable job event")
			continue
		}
		for _, ev := range order.admit(ev) {
			if err := fn(ev); err != nil {
				if errors.Is(err, ErrFollowEnded) {
					return nil
				}
				return err
			}
			if ev.Terminal() {
				return nil
			}
		}
	}
}

// tokenOrder puts a job's tokens in index order. A token ahead of the next
// index waits until the gap is filled; one behind it is a copy and is
// dropped. The publisher stores every token before the job's end, so a
// terminal event releases whatever still waits, in order. A gap that is
// never filled (the stream's limits discarded the oldest tokens of a huge
// job) is given up once maxHeldTokens wait behind it.
//
// It also fences attempts: once the job's state events say it was retried
// (running → queued) or that a newer attempt runs, tokens of older attempts
// are dropped, and counting starts again at the new attempt's index 0. A
// worker given up while paused or cut off may still publish after it wakes;
// nobody sees those tokens.
const maxHeldTokens = 8192

type tokenOrder struct {
	// resumed means the follow began mid-job: the first token seen sets
	// where counting starts.
	resumed bool
	started bool
	next    int
	held    map[int]api.Event
	// attempt is the oldest attempt whose tokens are still shown.
	attempt int
	// out is reused for what admit returns: no allocation per token.
	out []api.Event
}

// newAttempt drops what an older attempt left and counts from 0 again.
func (o *tokenOrder) newAttempt(a int) {
	o.attempt = a
	o.started, o.resumed, o.next, o.held = true, false, 0, nil
}

// admit takes the next stored event and returns those now due, in order;
// the slice is valid until the next call.
func (o *tokenOrder) admit(ev api.Event) []api.Event {
	o.out = o.out[:0]
	if st := ev.State; st != nil {
		switch {
		case st.State == api.JobQueued && st.From == api.JobRunning && st.Attempt >= o.attempt:
			o.newAttempt(st.Attempt + 1)
		case st.State == api.JobRunning && st.Attempt > o.attempt:
			o.newAttempt(st.Attempt)
		}
	}
	if ev.Token == nil {
		if !ev.Terminal() || len(o.held) == 0 {
			return append(o.out, ev)
		}
		idx := make([]int, 0, len(o.held))
		for i := range o.held {
			idx = append(idx, i)
		}
		slices.Sort(idx)
		for _, i := range idx {
			o.out = append(o.out, o.held[i])
		}
		o.held = nil
		return append(o.out, ev)
	}
	if a := ev.Token.Attempt; a != 0 {
		if a < o.attempt {
			return nil // a stale attempt's token
		}
		if a > o.attempt && o.attempt != 0 {
			o.newAttempt(a)
		}
		o.attempt = a
	}
	i := ev.Token.Index
	if !o.started {
		o.started = true
		if o.resumed {
			o.next = i
		}
	}
	switch {
	case i < o.next:
		return nil
	case i > o.next:
		if o.held == nil {
			o.held = map[int]api.Event{}
		}
		o.held[i] = ev
		if len(o.held) < maxHeldTokens {
			return nil
		}
		o.next = slices.Min(slices.Collect(maps.Keys(o.held)))
		ev = o.held[o.next]
		delete(o.held, o.next)
	}
	o.out = append(o.out, ev)
	for o.next++; ; o.next++ {
		h, ok := o.held[o.next]
		if !ok {
			break
		}
		delete(o.held, o.next)
		o.out = append(o.out, h)
	}
	return o.out
}

// DecodeEvent turns a stored job event message into an api.Event.
func DecodeEvent(space subjects.Space, msg jetstream.Msg) (api.Event, error) {
	var ev api.Event
	if md, err := msg.Metadata(); err == nil {
		ev.Seq = md.Sequence.Stream
	}
	_, kind, ok := space.JobIDFromSubject(msg.Subject())
	if !ok {
		return ev, fmt.Errorf("not a job event subject: %s", msg.Subject())
	}
	ev.Kind = string(kind)
	var err error
	switch kind {
	case subjects.EventNarration:
		ev.Narration = new(api.Narration)
		err = json.Unmarshal(msg.Data(), ev.Narration)
	case subjects.EventToken:
		ev.Token = new(api.Token)
		err = json.Unmarshal(msg.Data(), ev.Token)
	case subjects.EventState:
		ev.State = new(api.StateChange)
		err = json.Unmarshal(msg.Data(), ev.State)
	default:
		err = fmt.Errorf("unknown event kind %q", kind)
	}
	return ev, err
}
