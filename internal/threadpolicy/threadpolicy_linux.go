package threadpolicy

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

func background() error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return fmt.Errorf("threadpolicy: listing this process's threads: %w", err)
	}
	var errs []error
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		// A thread that ended since the listing is no error.
		if err := setPolicy(tid, unix.SCHED_BATCH); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("thread %d: %w", tid, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("threadpolicy: marking threads as batch work: %w", errors.Join(errs...))
	}
	return nil
}

func foreground() error {
	if err := setPolicy(0, unix.SCHED_NORMAL); err != nil {
		return fmt.Errorf("threadpolicy: making a decoding thread ordinary: %w", err)
	}
	return nil
}

// setPolicy switches thread tid (0: the caller) between the two fair
// policies, keeping its nice value. Either way needs no privilege.
func setPolicy(tid int, policy uint32) error {
	attr, err := unix.SchedGetAttr(tid, 0)
	if err != nil {
		return err
	}
	if attr.Policy == policy {
		return nil
	}
	if attr.Policy != unix.SCHED_NORMAL && attr.Policy != unix.SCHED_BATCH {
		// Real-time, deadline or idle: someone chose it; leave it.
		return nil
	}
	attr.Policy = policy
	attr.Size = unix.SizeofSchedAttr
	return unix.SchedSetAttr(tid, attr, 0)
}
