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
	if NotStored(err) {
		return fmt.Errorf("%w (%w)", ErrNoQuorum, err)
	}
	return err
}

// electionTimeoutMax is how long nats-server's Raft followers (v2.15,
// raft.go's maxElectionTimeoutDefault) wait after the last heartbeat of a
// leader before they campaign: a stream whose leader's server was killed
// has none for up to this long, then for the vote and until the new
// leader's interest in the stream's subjects has reached every server.
const electionTimeoutMax = 9 * time.Second

// QuorumWait bounds how long a write waits out a stream's leader election
// before it is refused with ErrNoQuorum: the slowest election after a
// server's death, with room for the vote and for a loaded machine's
// timers (10 s was not: in a suite run, a job submitted just after a
// stream leader's server was killed was refused with no quorum). It stays
// below the 15 s a keeper waits for the queen's answer, so the keeper
// hears the reason.
const QuorumWait = electionTimeoutMax + 3*time.Second

// retryPause is the longest pause between two tries of a write: a write
// to a stream without a leader is refused at once (no server has interest
// in its subjects), so the pause is what a write waits beyond the
// election's end.
const retryPause = 500 * time.Millisecond

// attemptTimeout bounds one try of a write: a stream whose leader just
// died still has interest on its subjects (its followers), so a publish
// to it is not refused but left unanswered.
const attemptTimeout = 2 * time.Second

// A Write is one try of a write to a stream, bounded by its context.
// retried is set on every try after the first: a write whose earlier try
// may have been stored (its answer lost) then checks whether it was.
type Write func(ctx context.Context, retried bool) error

// WhileElecting runs write until it succeeds, fails for another reason,
// or QuorumWait (or ctx) runs out. It retries the errors that prove
// nothing was written (no server took the message: a stream without a
// leader has no responder) and, when the write is idempotent (a message
// id, or a check on retry that it was stored), a try that timed out,
// which a dying leader leaves.
func WhileElecting(ctx context.Context, idempotent bool, write Write) error {
	deadline := time.Now().Add(QuorumWait)
	backoff := 50 * time.Millisecond
	for retried := false; ; retried = true {
		actx, cancel := context.WithTimeout(ctx, attemptTimeout)
		err := write(actx, retried)
		timedOut := actx.Err() != nil && ctx.Err() == nil
		cancel()
		if err == nil {
			return nil
		}
		if !NotStored(err) && !(idempotent && timedOut) {
			return err
		}
		if time.Now().Add(backoff).After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%w (%w)", ErrNoQuorum, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (%w)", ErrNoQuorum, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, retryPause)
	}
}

// ErrUnsettled is what a Write returns when the stream's answers contradict
// each other (a write refused as a duplicate of a record nobody can read):
// a stream that lost its quorum, still answering from one server. It is
// tried again, like a write that reached no leader.
var ErrUnsettled = errors.New("the stream has not settled the write")

// errCodeDuplicateInProcess is nats-server's JSStreamDuplicateMessageConflict
// ("duplicate message id is in process"): a write whose message id another
// write of the same message has staged but not yet committed (the first
// submit's copy, waiting out a stream's election, met by a queen queueing
// its waiting jobs again). Trying again finds the first stored, and is
// answered as its duplicate, or stores the message.
const errCodeDuplicateInProcess = 10158

// NotStored reports whether err proves a write reached no stream leader,
// or left nothing settled.
func NotStored(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) || errors.Is(err, ErrUnsettled) ||
		errors.As(err, &apiErr) && (apiErr.ErrorCode == errCodeDuplicateInProcess || apiErr.Code == api.CodeUnavailable &&
			apiErr.ErrorCode != jetstream.JSErrCodeJetStreamNotEnabled && apiErr.ErrorCode != jetstream.JSErrCodeJetStreamNotEnabledForAccount)
}

// Starting reports whether err is what a JetStream that is not up yet
// answers: nothing (a timeout, no responders) or "temporarily unavailable"
// (a cluster without its meta leader). A server without JetStream at all
// says so, and is not starting.
func Starting(err error) bool {
	var apiErr *jetstream.APIError
	switch {
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount):
		return false
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout), NotStored(err):
		return true
	case errors.As(err, &apiErr):
		return apiErr.Code == api.CodeUnavailable
	}
	return false
}

// startingRetry is how often WhileStarting tries again, and stillWaiting
// how often it says again that it waits: a component held up for minutes
// (a cluster without a quorum) must not look hung. Variables for tests.
var (
	startingRetry = time.Second
	stillWaiting  = 30 * time.Second
)

// WhileStarting runs read until it succeeds, fails for a reason other than
// a bus that cannot answer yet (Starting or Unavailable), or ctx ends,
// trying again every second. It says that it waits through waiting, with
// the latest reason and how long it has waited: at the first failure, then
// every stillWaiting. It is for reads a component cannot do without (its
// setup, a leader's replay of the records), where giving up would leave it
// broken or blind.
func WhileStarting(ctx context.Context, waiting func(err error, waited time.Duration), read func() error) error {
	began := time.Now()
	var told time.Time
	for {
		err := read()
		if err == nil || ctx.Err() != nil || !Starting(err) && !Unavailable(err) {
			return err
		}
		if told.IsZero() || time.Since(told) >= stillWaiting {
			told = time.Now()
			waiting(err, time.Since(began).Round(time.Second))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(startingRetry):
		}
	}
}
