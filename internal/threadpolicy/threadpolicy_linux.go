package threadpolicy

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

func background() error {
	// A thread started from one not yet marked, while the threads are
	// being marked, would be missed: the threads are listed again until
	// a listing finds none left to mark.
	for range 10 {
		changed, err := markAll()
		if err != nil || changed == 0 {
			return err
		}
	}
	return nil
}

// markAll marks every thread of the process as batch work and says how
// many it changed.
func markAll() (changed int, err error) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return 0, fmt.Errorf("threadpolicy: listing this process's threads: %w", err)
	}
	var errs []error
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		set, err := setPolicy(tid, unix.SCHED_BATCH)
		// A thread that ended since the listing is no error.
		if err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("thread %d: %w", tid, err))
		}
		if set {
			changed++
		}
	}
	if len(errs) > 0 {
		return changed, fmt.Errorf("threadpolicy: marking threads as batch work: %w", errors.Join(errs...))
	}
	return changed, nil
}

func foreground() error {
	if _, err := setPolicy(0, unix.SCHED_NORMAL); err != nil {
		return fmt.Errorf("threadpolicy: making a decoding thread ordinary: %w", err)
	}
	return nil
}

// setPolicy switches thread tid (0: the caller) between the two fair
// policies, keeping its nice value, and says whether it changed it.
// Either way needs no privilege.
func setPolicy(tid int, policy uint32) (bool, error) {
	attr, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		return false, err
	}
	if attr.Policy == policy {
		return false, nil
	}
	if attr.Policy != unix.SCHED_NORMAL && attr.Policy != unix.SCHED_BATCH {
		// Real-time, deadline or idle: someone chose it; leave it.
		return false, nil
	}
	attr.Policy = policy
	attr.Size = unix.SizeofSchedAttr
	return true, unix.SchedSetAttr(tid, attr, 0)
}
