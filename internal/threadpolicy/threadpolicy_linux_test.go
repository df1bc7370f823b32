package threadpolicy

import (
	"os"
	"runtime"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// policies reads the scheduling policy of every thread of this process.
func policies(t *testing.T) map[int]uint32 {
	t.Helper()
	out := map[int]uint32{}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		tid, _ := strconv.Atoi(task.Name())
		a, err := unix.SchedGetAttr(tid, 0)
		if err != nil {
			continue // ended since the listing
		}
		out[tid] = a.Policy
	}
	return out
}

// onNewThread runs fn on a locked goroutine, whose thread Go ends with it
// (so a thread whose policy fn changes goes with the test).
func onNewThread(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		fn()
	}()
	<-done
}

// The tests share one process and run in order: first Background, then
// what follows from it.
func TestBackgroundThenForeground(t *testing.T) {
	// A nice value set before is kept: the policy changes, not the share.
	var niceTid int
	niced := make(chan struct{})
	release := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		niceTid = unix.Gettid()
		if err := unix.Setpriority(unix.PRIO_PROCESS, niceTid, 5); err != nil {
			t.Error(err)
		}
		close(niced)
		<-release // the thread ends with this goroutine (locked)
	}()
	<-niced
	defer close(release)

	if err := Background(); err != nil {
		t.Fatal(err)
	}
	for tid, p := range policies(t) {
		if p != unix.SCHED_BATCH {
			t.Errorf("thread %d has policy %d after Background, want SCHED_BATCH (%d)", tid, p, unix.SCHED_BATCH)
		}
	}
	if a, err := unix.SchedGetAttr(niceTid, 0); err != nil || a.Nice != 5 {
		t.Errorf("nice of a thread after Background: %+v, %v; want 5 kept", a, err)
	}

	// Threads made later inherit it: start a few that cannot share one.
	var tids []int
	for range 4 {
		onNewThread(func() {
			a, err := unix.SchedGetAttr(0, 0)
			if err != nil || a.Policy != unix.SCHED_BATCH {
				t.Errorf("a thread made after Background: %+v, %v; want SCHED_BATCH", a, err)
			}
			tids = append(tids, unix.Gettid())
		})
	}

	// Foreground makes only its own thread ordinary.
	var fgTid int
	onNewThread(func() {
		if err := Foreground(); err != nil {
			t.Error(err)
		}
		fgTid = unix.Gettid()
		for tid, p := range policies(t) {
			if want := uint32(unix.SCHED_BATCH); tid == fgTid {
				if p != unix.SCHED_NORMAL {
					t.Errorf("the foreground thread has policy %d, want SCHED_NORMAL", p)
				}
			} else if p != want {
				t.Errorf("thread %d has policy %d after another's Foreground, want SCHED_BATCH", tid, p)
			}
		}
	})
}

// A policy someone chose (here idle, which needs no privilege) is left as
// it is.
func TestBackgroundLeavesAChosenPolicy(t *testing.T) {
	onNewThread(func() {
		a, err := unix.SchedGetAttr(0, 0)
		if err != nil {
			t.Fatal(err)
		}
		a.Policy, a.Size = unix.SCHED_IDLE, unix.SizeofSchedAttr
		if err := unix.SchedSetAttr(0, a, 0); err != nil {
			t.Skipf("cannot set SCHED_IDLE here: %v", err)
		}
		if err := Background(); err != nil {
			t.Error(err)
		}
		if a, err := unix.SchedGetAttr(0, 0); err != nil || a.Policy != unix.SCHED_IDLE {
			t.Errorf("after Background: %+v, %v; want SCHED_IDLE kept", a, err)
		}
	})
}
