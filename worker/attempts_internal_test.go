package worker

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestAttemptBook(t *testing.T) {
	var b attemptBook
	now := time.Now()
	require.True(t, b.claim("j1", 1, now))
	require.False(t, b.claim("j1", 1, now), "held by a slot")
	require.True(t, b.claim("j1", 2, now), "another attempt is another claim")
	b.release("j1", 2)
	require.True(t, b.claim("j1", 2, now), "a released attempt may be tried again")

	b.end("j1", 1, now)
	require.False(t, b.claim("j1", 1, now.Add(endedKept)), "an attempt run to its end is not run again")
	require.True(t, b.claim("j1", 1, now.Add(endedKept+time.Second)), "until it is forgotten")
	require.Len(t, b.ended, 0, "forgotten attempts leave the book")
}
