package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/rbee-dev/rbee/subjects"
)

// followEnded handles a follow that starts past a finished job's end: a
// consumer started after the terminal event would wait forever for an
// event that never comes. When the job's last state event is terminal and
// stored before from, fn gets that event and done is true: the follow is
// over. Otherwise done is false and the follow proceeds as usual (a job that
// is still running, or a from at or before the terminal event, which the
// consumer will deliver).
func (b *Bus) followEnded(ctx context.Context, job string, from uint64, fn func(api.Event) error) (done bool, err error) {
	if from == 0 {
		return false, nil
	}
	subject, err := b.Space.JobEvent(job, subjects.EventState)
	if err != nil {
		return false, err
	}
	stream, err := b.JS.Stream(ctx, b.Space.JobsStream())
	if err != nil {
		return false, fmt.Errorf("follow job %s: %w", job, err)
	}
	raw, err := stream.GetLastMsgForSubject(ctx, subject)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil // no state yet: the job has not even been queued
	}
	if err != nil {
		return false, fmt.Errorf("follow job %s: %w", job, err)
	}
	if raw.Sequence >= from {
		return false, nil
	}
	ev, err := DecodeEvent(b.Space, storedMsg{raw})
	if err != nil {
		return false, fmt.Errorf("follow job %s: last state: %w", job, err)
	}
	if !ev.Terminal() {
		return false, nil
	}
	if err := fn(ev); err != nil && !errors.Is(err, ErrFollowEnded) {
		return true, err
	}
	return true, nil
}

// storedMsg shows a message read directly from a stream as a consumed one,
// so DecodeEvent is the one decoder of job events. It was never delivered
// to a consumer: there is nothing to acknowledge.
type storedMsg struct{ raw *jetstream.RawStreamMsg }

var errNotConsumed = errors.New("a message read from the stream has no acknowledgement")

func (m storedMsg) Metadata() (*jetstream.MsgMetadata, error) {
	return &jetstream.MsgMetadata{
		Sequence:  jetstream.SequencePair{Stream: m.raw.Sequence},
		Timestamp: m.raw.Time,
	}, nil
}
func (m storedMsg) Data() []byte                     { return m.raw.Data }
func (m storedMsg) Headers() nats.Header             { return m.raw.Header }
func (m storedMsg) Subject() string                  { return m.raw.Subject }
func (m storedMsg) Reply() string                    { return "" }
func (m storedMsg) Ack() error                       { return errNotConsumed }
func (m storedMsg) DoubleAck(context.Context) error  { return errNotConsumed }
func (m storedMsg) Nak() error                       { return errNotConsumed }
func (m storedMsg) NakWithDelay(time.Duration) error { return errNotConsumed }
func (m storedMsg) InProgress() error                { return errNotConsumed }
func (m storedMsg) Term() error                      { return errNotConsumed }
func (m storedMsg) TermWithReason(string) error      { return errNotConsumed }
