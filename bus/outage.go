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
