package bus

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rbee-dev/rbee/api"
	"github.com/stretchr/testify/require"
)

// A write that reached no stream leader is tried again until one is
// elected; any other error, which may have been stored, is not.
func TestWhileElectingRetriesOnlyWritesNobodyTook(t *testing.T) {
	calls := 0
	err := WhileElecting(context.Background(), false, func(context.Context, bool) error {
		calls++
		if calls < 3 {
			return jetstream.ErrNoStreamResponse
		}
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, 3, calls)

	// A message id whose first write is staged but not committed (a
	// queen queueing a waiting job again while the submit's copy waits
	// out an election) is tried again: the next try finds it stored.
	calls = 0
	inProcess := &jetstream.APIError{Code: 409, ErrorCode: 10158, Description: "duplicate message id is in process"}
	err = WhileElecting(context.Background(), true, func(context.Context, bool) error {
		calls++
		if calls < 2 {
			return fmt.Errorf("nats: %w", inProcess)
		}
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, 2, calls)

	calls = 0
	other := errors.New("nats: timeout")
	err = WhileElecting(context.Background(), false, func(context.Context, bool) error { calls++; return other })
	require.ErrorIs(t, err, other)
	require.Equal(t, 1, calls, "a write that may have been stored is never sent twice")
	require.NotErrorIs(t, err, ErrNoQuorum)
}

// A write made as a stream's leader dies waits out the slowest election
// nats-server holds (its followers campaign up to electionTimeoutMax after
// the leader's last heartbeat, then vote, and the new leader's interest
// spreads), on a machine whose timers run late, and is stored soon after.
func TestWhileElectingOutlastsTheSlowestElection(t *testing.T) {
	t.Parallel()
	elected := time.Now().Add(electionTimeoutMax + time.Second)
	calls := 0
	err := WhileElecting(context.Background(), true, func(context.Context, bool) error {
		calls++
		if time.Now().Before(elected) {
			return jetstream.ErrNoStreamResponse
		}
		return nil
	})
	require.NoError(t, err, "after %d tries", calls)
	require.Less(t, time.Since(elected), retryPause+time.Second, "stored soon after the election")
}

// A bus that stays without quorum answers with the reason, for programs
// (unavailable, HTTP 503) and for people.
func TestNoQuorumIsAnAnswerWithItsReason(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	err := WhileElecting(ctx, false, func(context.Context, bool) error {
		calls++
		if calls == 2 {
			cancel()
		}
		return nats.ErrNoResponders
	})
	require.ErrorIs(t, err, ErrNoQuorum)
	require.Equal(t, api.ReasonUnavailable, api.ReasonOf(err))
	require.Equal(t, api.CodeUnavailable, api.AsError(err).Code)
	require.Contains(t, err.Error(), "no quorum")
	require.Contains(t, err.Error(), "no responders", "the bus's own words stay for whoever debugs it")
	require.ErrorIs(t, err, nats.ErrNoResponders, "and its error, for code that tells outages apart")
	require.True(t, Unavailable(err), "a writer that rides out outages (a worker ending a job) rides out this one too")

	unavailable := &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}
	require.ErrorIs(t, StoreErr(unavailable), ErrNoQuorum)
	require.NotErrorIs(t, StoreErr(jetstream.ErrKeyExists), ErrNoQuorum)
	require.NotErrorIs(t, StoreErr(jetstream.ErrJetStreamNotEnabled), ErrNoQuorum, "a bus without JetStream is no quorum problem")
	require.True(t, Starting(unavailable), "a cluster without its meta leader is starting")
	require.False(t, Starting(jetstream.ErrJetStreamNotEnabled), "a server without JetStream will not start it")
	require.True(t, outage(fmt.Errorf("follow job j: %w", unavailable)), "a follower attaching while the job stream elects its leader tries again")
	require.False(t, outage(jetstream.ErrStreamNotFound), "a missing stream is an answer")
	require.NoError(t, StoreErr(nil))
}

// A component waiting for a bus that cannot answer says so at once, then
// again every stillWaiting with how long it has waited, so a wait of
// minutes does not look hung; it stops at the first read that works.
func TestWhileStartingSaysAgainThatItWaits(t *testing.T) {
	defer func(retry, still time.Duration) { startingRetry, stillWaiting = retry, still }(startingRetry, stillWaiting)
	startingRetry, stillWaiting = 5*time.Millisecond, 100*time.Millisecond

	began := time.Now()
	var told []time.Duration
	reads := 0
	err := WhileStarting(context.Background(), func(err error, waited time.Duration) {
		require.ErrorIs(t, err, context.DeadlineExceeded, "the latest reason is given")
		told = append(told, time.Since(began))
	}, func() error {
		reads++
		if time.Since(began) < 600*time.Millisecond {
			return fmt.Errorf("create stream: %w", context.DeadlineExceeded)
		}
		return nil
	})
	require.NoError(t, err)
	require.Greater(t, reads, len(told), "tried more often than it says so")
	require.GreaterOrEqual(t, len(told), 3, "said at once, then again while it waited: %v", told)
	require.Less(t, told[0], stillWaiting, "said at the first failure")
	for i := 1; i < len(told); i++ {
		require.GreaterOrEqual(t, told[i]-told[i-1], stillWaiting, "said again only every stillWaiting: %v", told)
	}

	// A reason that is not a bus starting ends the wait at once, unsaid.
	told = nil
	err = WhileStarting(context.Background(), func(error, time.Duration) { told = append(told, 0) }, func() error { return errors.New("bad config") })
	require.EqualError(t, err, "bad config")
	require.Empty(t, told)
}

// WhileUnavailable tries again while the bus is away, each try bounded,
// and returns at once any answer, error or not, and when its context ends.
func TestWhileUnavailableRidesOutOnlyAnAbsentBus(t *testing.T) {
	calls := 0
	v, err := WhileUnavailable(context.Background(), time.Second, func(ctx context.Context) (int, error) {
		calls++
		deadline, ok := ctx.Deadline()
		require.True(t, ok && time.Until(deadline) <= time.Second, "each try is bounded")
		if calls < 3 {
			return 0, nats.ErrNoResponders
		}
		return 7, nil
	})
	require.NoError(t, err)
	require.Equal(t, 7, v)
	require.Equal(t, 3, calls)

	calls = 0
	refused := errors.New("job is finished")
	_, err = WhileUnavailable(context.Background(), time.Second, func(context.Context) (int, error) { calls++; return 0, refused })
	require.ErrorIs(t, err, refused)
	require.Equal(t, 1, calls, "an answer is not tried again")

	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = WhileUnavailable(ctx, time.Second, func(context.Context) (int, error) { return 0, ErrNoQuorum })
	require.ErrorIs(t, err, ErrNoQuorum)
	require.Less(t, time.Since(start), 2*time.Second, "it ends with its context")
}
