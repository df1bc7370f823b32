package bus

import (
	"context"
	"encoding/json"
	"errors"

	"github.com/nats-io/nats.go"

	"github.com/rbee-dev/rbee/api"
)

// Causes OnCancel cancels with.
var (
	// ErrJobCancelled: the job was cancelled (an empty message, or one
	// that is not a give-up).
	ErrJobCancelled = errors.New("job cancelled")
	// ErrAttemptGivenUp: the leader gave up the attempt being run
	// (api.GiveUp) and records what follows itself.
	ErrAttemptGivenUp = errors.New("the leader gave this attempt up")
)

// OnCancel listens on a job's cancel subject and cancels with the cause of
// every message that concerns the attempt run here: ErrJobCancelled, or
// ErrAttemptGivenUp for a give-up of this attempt; a give-up of another
// attempt is ignored. Attempt 0 is work without attempts (a download, an
// operation the queen runs), which any message cancels. stop ends the
// listening.
//
// The subscription reaches the server before anything this connection
// sends after OnCancel returns, so a cancel that follows a state this
// connection writes next is never missed. A caller that writes nothing
// before its work begins flushes the connection first.
func (b *Bus) OnCancel(job string, attempt int, cancel context.CancelCauseFunc) (stop func(), err error) {
	subject, err := b.Space.JobCancel(job)
	if err != nil {
		return nil, err
	}
	sub, err := b.NC.Subscribe(subject, func(m *nats.Msg) {
		if cause := cancelCause(m.Data, attempt); cause != nil {
			cancel(cause)
		}
	})
	if err != nil {
		return nil, err
	}
	return func() { _ = sub.Unsubscribe() }, nil
}

// cancelCause reads one message on a job's cancel subject for attempt: the
// cause to cancel with, or nil when it gives up another attempt. A body
// that is not a give-up (empty, or written by hand) cancels the job.
func cancelCause(body []byte, attempt int) error {
	var g api.GiveUp
	if len(body) == 0 || json.Unmarshal(body, &g) != nil || g.Attempt == 0 {
		return ErrJobCancelled
	}
	if attempt == 0 {
		return ErrJobCancelled
	}
	if g.Attempt != attempt {
		return nil
	}
	return ErrAttemptGivenUp
}
