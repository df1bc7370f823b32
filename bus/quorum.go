package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
)

// ErrNoQuorum is what storing on the bus meets while its JetStream cannot
// write: on a cluster, fewer than a majority of the servers that keep a
// stream are up, or they are electing its leader. It is an answer, not a
// fault: nothing is half-written, and writes resume by themselves when
// enough servers are back. Programs see reason "unavailable" (HTTP 503).
var ErrNoQuorum = &api.Error{
	Code: api.CodeUnavailable, Reason: api.ReasonUnavailable,
	Message: "the bus cannot store anything now: its JetStream has no quorum " +
		"(more than half of the servers that keep rbee's streams are down, or a leader is being elected); " +
		"nothing was written, and writes resume by themselves when enough servers are back",
}

// StoreErr marks err ErrNoQuorum when it says the bus's JetStream did not
// answer a write or read: a stream without a leader answers nothing
// (ErrNoStreamResponse, or no responders to the JetStream API), and a
// cluster that lost its meta leader says so with a 503. Other errors come
// back as they are. Call it on the errors of JetStream calls only.
func StoreErr(err error) error {
	if err == nil || errors.Is(err, ErrNoQuorum) {
		return err
	}
	if notStored(err) {
		return fmt.Errorf("%w (%v)", ErrNoQuorum, err)
	}
	return err
}

// QuorumWait bounds how long a write waits out a stream's leader election
// (a cluster that lost the server leading a stream elects another within
// seconds) before it is refused with ErrNoQuorum. It stays below the 15 s
// a keeper waits for the queen's answer, so the keeper hears the reason.
const QuorumWait = 10 * time.Second

// WhileElecting runs write until it succeeds, fails for another reason,
// or QuorumWait (or ctx) runs out, retrying only the errors that prove
// nothing was written: no server took the message (a stream without a
// leader has no responder), so a retry can never store it twice.
func WhileElecting(ctx context.Context, write func() error) error {
	deadline := time.Now().Add(QuorumWait)
	backoff := 50 * time.Millisecond
	for {
		err := write()
		if err == nil || !notStored(err) {
			return err
		}
		if time.Now().Add(backoff).After(deadline) {
			return StoreErr(err)
		}
		select {
		case <-ctx.Done():
			return StoreErr(err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// notStored reports whether err proves a write reached no stream leader.
func notStored(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) ||
		errors.As(err, &apiErr) && apiErr.Code == api.CodeUnavailable
}
