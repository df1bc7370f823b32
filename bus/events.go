package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

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

// TokenPublisher streams a job's tokens without waiting for each
// acknowledgement, which would cap a stream at one round trip per token.
// Flush waits for all of them before the job's final state is published, so
// no follower sees the end before the last token.
type TokenPublisher struct {
	bus     *Bus
	subject string
	futures []jetstream.PubAckFuture
}

// Tokens returns a publisher for job's token subject.
func (b *Bus) Tokens(job string) (*TokenPublisher, error) {
	subject, err := b.Space.JobEvent(job, subjects.EventToken)
	if err != nil {
		return nil, err
	}
	return &TokenPublisher{bus: b, subject: subject}, nil
}

// Publish sends one token.
func (p *TokenPublisher) Publish(t api.Token) error {
	data, err := json.Marshal(t)
	if err != nil {
		return err
	}
	f, err := p.bus.JS.PublishAsync(p.subject, data)
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
				return fmt.Errorf("token not stored: %w", err)
			default:
				kept = append(kept, f)
				continue
			}
		}
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return fmt.Errorf("token not stored: %w", err)
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

// ErrFollowEnded is returned by a follow handler to stop following early
// without error.
var ErrFollowEnded = errors.New("stop following")

// Follow delivers the stored events of job in order, starting at stream
// sequence from (0 means from the job's first event), then live ones as they
// arrive, and returns nil after the job's terminal state event. No idle
// timeout applies: a job that is quiet for an hour is still followed. It
// returns when ctx ends, when fn returns an error (ErrFollowEnded stops
// without one), or after the terminal event.
func (b *Bus) Follow(ctx context.Context, job string, from uint64, fn func(api.Event) error) error {
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
