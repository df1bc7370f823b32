package engine

import (
	"testing"

	"github.com/rbee-dev/rbee/internal/threadpolicy"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// A lane decodes as ordinary work while the rest of its program runs as
// batch work (internal/threadpolicy), and two lanes do not share a thread. The
// whole test process stays batch work afterwards, which changes nothing
// for the other tests but their wake-ups.
func TestLanesDecodeInTheForeground(t *testing.T) {
	require.NoError(t, threadpolicy.Background())
	tiny(t)
	m := loadBatched(t, tinyPath, 2, 2, 64).(*llamaModel)
	require.Len(t, m.lanes, 2)
	tids := map[int]bool{}
	for i, l := range m.lanes {
		var policy uint32
		var tid int
		l.between(func() {
			tid = unix.Gettid()
			a, err := unix.SchedGetAttr(0, 0)
			require.NoError(t, err)
			policy = a.Policy
		})
		require.EqualValues(t, unix.SCHED_NORMAL, policy, "lane %d's thread", i)
		tids[tid] = true
	}
	require.Len(t, tids, 2, "each lane keeps a thread of its own")
	a, err := unix.SchedGetAttr(0, 0)
	require.NoError(t, err)
	require.EqualValues(t, unix.SCHED_BATCH, a.Policy, "the test's own thread")
}
