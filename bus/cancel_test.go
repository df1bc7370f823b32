package bus

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestCancelCause(t *testing.T) {
	giveUp := func(attempt string) []byte {
		return []byte(`{"attempt":` + attempt + `,"error":{"code":502,"reason":"worker_lost","message":"worker w1 was lost"}}`)
	}
	for _, c := range []struct {
		name    string
		body    []byte
		attempt int
		want    error
	}{
		{"an empty message cancels the job", nil, 2, ErrJobCancelled},
		{"a message written by hand cancels the job", []byte("stop"), 2, ErrJobCancelled},
		{"a give-up without an attempt cancels the job", []byte(`{"error":null}`), 2, ErrJobCancelled},
		{"a give-up of the attempt run here", giveUp("2"), 2, ErrAttemptGivenUp},
		{"a give-up of another attempt is not ours", giveUp("1"), 2, nil},
		{"work without attempts stops at any message", giveUp("1"), 0, ErrJobCancelled},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.Equal(t, c.want, cancelCause(c.body, c.attempt))
		})
	}
}
