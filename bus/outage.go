package bus

import (
	"context"
	"errors"
	"time"
)

// DefaultOutage is how long a component rides out a bus that went away (a
// queen restarting with its embedded server, a NATS node failing over)
// before it gives up what it was doing: longer than any restart, short
// enough that a bus gone for good is reported.
const DefaultOutage = 3 * time.Minute

// Unavailable says whether err means the bus was not there to answer (the
// connection down or reconnecting, no server or stream responding in time),
// as opposed to a refusal: worth trying again once the bus is back.
func Unavailable(err error) bool {
	return retryable(err) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrNoQuorum)
}

// unavailableRetry is how soon WhileUnavailable tries again.
const unavailableRetry = 250 * time.Millisecond

// WhileUnavailable calls op until it succeeds, fails for a reason other
// than the bus being away (Unavailable), or ctx ends; each try is bounded
// by try. What rides out an outage (a worker recording a job's end, a
// queen recording an operation's start) bounds ctx by DefaultOutage.
func WhileUnavailable[T any](ctx context.Context, try time.Duration, op func(context.Context) (T, error)) (T, error) {
	for {
		tctx, cancel := context.WithTimeout(ctx, try)
		v, err := op(tctx)
		cancel()
		if err == nil || !Unavailable(err) || ctx.Err() != nil {
			return v, err
		}
		select {
		case <-ctx.Done():
			return v, err
		case <-time.After(unavailableRetry):
		}
	}
}
